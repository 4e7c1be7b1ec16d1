"""LPIPS in JAX (xpsr_jax.models.lpips) against the `lpips` package on the same weights.

The package computes with its own ScalingLayer, normalisation and lin layers (its shipped
weights/v0.1/vgg.pth, randomised here so every lin weight matters) over a random VGG16 trunk
(tests/torch_reference/vgg16.py: torchvision's layout), saved as a torchvision checkpoint.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("lpips") is None:  # imported below, beside a torchvision stand-in
    pytest.skip("the lpips package is not installed", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tests.helpers.lpips_fixtures import write_random_lpips  # noqa: E402
from tests.helpers.parity_utils import nchw_to_nhwc  # noqa: E402
from xpsr_jax.models.lpips import LPIPSWeightsError, load_lpips  # noqa: E402


@pytest.fixture()
def pair(monkeypatch, tmp_path):
    reference, packaged, _, _ = write_random_lpips(monkeypatch, tmp_path)
    return reference, packaged, tmp_path


def test_lpips_matches_the_package(pair):
    reference, _, folder = pair
    ours = load_lpips(folder / "vgg16.pth", folder / "lin.pth")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 48, 40)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(y)).reshape(-1).numpy()
    got = np.asarray(jax.jit(lambda a, b: ours(a, b))(nchw_to_nhwc(x), nchw_to_nhwc(y)))
    print("lpips ours", got, "package", expected)
    assert np.all(expected > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # the gradient the generator's LPIPS loss takes, against torch autograd
    xt = torch.from_numpy(x).requires_grad_(True)
    reference(xt, torch.from_numpy(y)).mean().backward()
    grad = jax.grad(lambda a: jnp.mean(ours(a, nchw_to_nhwc(y))))(jnp.asarray(nchw_to_nhwc(x)))
    np.testing.assert_allclose(np.asarray(grad), nchw_to_nhwc(xt.grad.numpy()), rtol=1e-4,
                               atol=1e-4 * float(np.abs(xt.grad.numpy()).max()))


def test_packaged_lin_layers_are_read_and_files_are_named(pair, tmp_path):
    reference, packaged, folder = pair
    ours = load_lpips(folder / "vgg16.pth")  # default: the package's weights/v0.1/vgg.pth
    for k, lin in enumerate(ours.lins):
        np.testing.assert_array_equal(np.transpose(np.asarray(lin.kernel.get_value()), (3, 2, 0, 1)),
                                      packaged[f"lin{k}.model.1.weight"].numpy())
    with pytest.raises(LPIPSWeightsError, match="loss.lpips_backbone='.*missing.pth'.*vgg16-397923af"):
        load_lpips(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing tensor"):
        load_lpips(tmp_path / "partial.pth", folder / "lin.pth")
