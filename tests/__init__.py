"""The test suite: unit and parity tests here (the default run), end-to-end tests in
`end_to_end/` (marker `end_to_end`, run explicitly), shared helpers in `helpers/`, and the
PyTorch XPSR oracle in `torch_reference/`."""
