"""faststyle's benchmarks, run as ``python -m benchmarks NAME`` (benchmarks/__main__.py lists them).

Nothing is imported here: the dispatcher imports the chosen benchmark alone (``huge`` keeps its own process free of
torch).
"""
