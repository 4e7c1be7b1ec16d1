"""Shared test helpers: tiny models and datasets on disk, parity assertions, training set-ups,
the tiny LLaVA writer, a PyTorch sampling loop, TensorBoard event reading, multi-device scripts."""
