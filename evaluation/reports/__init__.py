"""The reports: thin command lines over the evaluation library, each with ``main(argv)``; run them as
``python -m evaluation NAME [options]``."""
