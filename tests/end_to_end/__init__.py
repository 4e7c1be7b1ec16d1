"""End-to-end tests: each compiles the train step or runs whole commands (many minutes on a
2-core CPU), so they are outside the default run: `python -m pytest -m end_to_end tests/end_to_end`."""
