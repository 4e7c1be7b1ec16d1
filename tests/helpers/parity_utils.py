"""Helpers for Flax <-> PyTorch parity tests."""

from __future__ import annotations

import numpy as np


def randomize_torch_parameters(module, *, seed: int = 0, scale: float = 0.2) -> None:
    """Give EVERY parameter of a torch module random values, zero-initialised layers included.

    Weights get N(0, 1) * scale / sqrt(fan_in) so activations stay O(1); 1-D tensors (biases,
    norm scales/shifts) get offsets around their init so a wrong one shows.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                fan_in = int(np.prod(param.shape[1:]))
                param.copy_(noise / np.sqrt(fan_in))
            elif name.endswith("weight") and ("norm" in name or "ln" in name):
                param.copy_(1.0 + scale * noise)
            else:
                param.copy_(scale * noise)


def nchw_to_nhwc(array) -> np.ndarray:
    return np.transpose(np.asarray(array), (0, 2, 3, 1))


def nhwc_to_nchw(array) -> np.ndarray:
    return np.transpose(np.asarray(array), (0, 3, 1, 2))


def max_errors(ours, reference) -> tuple[float, float]:
    """(max-abs error, max-abs error / max-abs reference value)."""
    ours = np.asarray(ours, np.float64)
    reference = np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f"shape {ours.shape} != reference {reference.shape}"
    abs_err = float(np.max(np.abs(ours - reference)))
    return abs_err, abs_err / max(float(np.max(np.abs(reference))), 1e-12)


def assert_parity(ours, reference, *, atol: float, label: str = "") -> tuple[float, float]:
    abs_err, rel_err = max_errors(ours, reference)
    print(f"parity {label}: max-abs {abs_err:.3e}, relative {rel_err:.3e}")
    assert abs_err <= atol, f"{label}: max-abs error {abs_err:.3e} > {atol:.1e} (relative {rel_err:.3e})"
    return abs_err, rel_err
