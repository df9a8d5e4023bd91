"""faststyle's tests: tests/<package>/ mirrors the packages, the suites of the whole product sit here at the top;
fixtures in conftest.py, shared builders in support.py (a package, so that test files of the same name in two
folders import as tests.<package>.test_<name>)."""
