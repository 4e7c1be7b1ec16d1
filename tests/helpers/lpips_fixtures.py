"""The `lpips` package with random weights, saved in the files xpsr_jax.models.lpips reads.

`lpips` imports torchvision, which does not import beside CI's CPU PyTorch wheel; the package is
imported beside tests/torch_reference/vgg16.py's stand-in (torchvision's VGG16 layout).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.helpers.parity_utils import randomize_torch_parameters
from tests.torch_reference.vgg16 import torchvision_stand_in


def import_lpips_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", torchvision_stand_in())
    for name in ("lpips", "lpips.lpips", "lpips.pretrained_networks", "lpips.trainer"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import lpips
    return lpips


def write_random_lpips(monkeypatch, folder: Path, seed: int = 3):
    """(the package's LPIPS(net="vgg") with every weight random, its packaged lin state, the trunk
    file as a torchvision checkpoint, the lin-layer file as the package's)."""
    lpips = import_lpips_package(monkeypatch)
    reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    packaged = {k: v.clone() for k, v in reference.state_dict().items() if k[:3] == "lin" and k[3].isdigit()}
    randomize_torch_parameters(reference, seed=seed, scale=0.2)
    with torch.no_grad():  # the package's lin weights are non-negative; keep that
        for name, param in reference.named_parameters():
            if name.startswith("lin"):
                param.abs_()
    reference.requires_grad_(False)
    # lpips names each trunk module by its torchvision index: slice2.5.weight is features.5.weight
    trunk = {"features." + k.split(".", 1)[1]: v for k, v in reference.net.state_dict().items()}
    trunk["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision checkpoint has these
    torch.save(trunk, folder / "vgg16.pth")
    torch.save({k: v for k, v in reference.state_dict().items() if k[:3] == "lin" and k[3].isdigit()},
               folder / "lin.pth")
    return reference, packaged, folder / "vgg16.pth", folder / "lin.pth"
