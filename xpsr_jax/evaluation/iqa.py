"""Learned and statistical IQA metrics through pyiqa, only when it and its weights are local.

    metrics, unavailable = load_iqa_metrics(["lpips", "musiq"], device="cpu")
    metrics["lpips"].score_image(pred_rgb, gt_rgb) -> float      (H, W, 3) uint8 RGB
    metrics["fid"].score_folders(pred_dir, gt_dir) -> float       set metric: one number
    unavailable: {name: reason}                                   e.g. pyiqa not installed

pyiqa (`pip install pyiqa`, an optional extra) downloads weights on first use; this module
never lets it. Before a metric is built, the files its pyiqa version-0.1.16 constructor would
fetch are looked for in their caches (`IQA_METRICS[name].weight_files`, under torch.hub's dir
and the Hugging Face cache), and a missing file makes the metric unavailable with the path in
the reason. Construction and scoring also run under `no_network()`, which makes every socket
connection fail and puts Hugging Face in offline mode, so a file this table does not know about
is reported as a refused download instead of being fetched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from huggingface_hub import constants


@dataclasses.dataclass(frozen=True)
class IqaMetric:
    """One pyiqa metric as we run it."""

    name: str  # our name (CLI, reports)
    pyiqa_name: str  # pyiqa.create_metric name
    needs_reference: bool  # full-reference: needs --gt
    over_folders: bool  # one number per folder pair (FID), not per image
    lower_better: bool
    # (cache, file) pairs; cache is "pyiqa" (torch hub dir / pyiqa), "torchvision" (torch hub
    # dir / checkpoints), "clip" (torch hub dir / clip) or "huggingface" (HF hub cache folder).
    weight_files: tuple[tuple[str, str], ...]


# The files pyiqa 0.1.16 fetches for each metric (read from its archs/*.py).
IQA_METRICS: dict[str, IqaMetric] = {
    metric.name: metric
    for metric in (
        IqaMetric("lpips", "lpips", True, False, True, (
            ("pyiqa", "LPIPS_v0.1_alex-df73285e.pth"),
            ("torchvision", "alexnet-owt-7be5be79.pth"))),
        IqaMetric("dists", "dists", True, False, True, (
            ("pyiqa", "DISTS_weights-f5e65c96.pth"),
            ("torchvision", "vgg16-397923af.pth"))),
        IqaMetric("fid", "fid", True, True, True, (
            ("pyiqa", "pt_inception-2015-12-05-6726825d.pth"),)),
        IqaMetric("niqe", "niqe", False, False, True, (
            ("pyiqa", "niqe_modelparameters.mat"),)),
        IqaMetric("musiq", "musiq", False, False, False, (  # the KonIQ-10k checkpoint
            ("pyiqa", "musiq_koniq_ckpt-e95806b9.pth"),)),
        # pyiqa's plain "maniqa" is the KonIQ-10k model; the XPSR release's test.py calls it.
        IqaMetric("maniqa_koniq", "maniqa", False, False, False, (
            ("pyiqa", "ckpt_koniq10k.pt"),
            ("huggingface", "models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k"))),
        IqaMetric("maniqa_pipal", "maniqa-pipal", False, False, False, (
            ("pyiqa", "MANIQA_PIPAL-ae6d356b.pth"),
            ("huggingface", "models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k"))),
        IqaMetric("clipiqa", "clipiqa", False, False, False, (  # CLIP RN50, fixed prompts
            ("clip", "RN50.pt"),)),
    )
}


class NetworkBlockedError(OSError):
    """Raised for any socket connection attempted inside `no_network()`."""


class LoadedIqaMetric:
    """A built pyiqa metric with numpy in, float out."""

    def __init__(self, metric: IqaMetric, pyiqa_metric: Callable, device):
        self.metric = metric
        self._pyiqa_metric = pyiqa_metric
        self._device = device

    def score_image(self, pred_rgb: np.ndarray, gt_rgb: np.ndarray | None = None) -> float:
        """Score one (H, W, 3) uint8 RGB prediction (against gt_rgb for full-reference)."""
        inputs = [self._to_tensor(pred_rgb)]
        if self.metric.needs_reference:
            inputs.append(self._to_tensor(gt_rgb))
        with no_network():
            return _as_float(self._pyiqa_metric(*inputs))

    def score_folders(self, pred_dir: str | Path, gt_dir: str | Path) -> float:
        """A set metric (FID) between two folders of images."""
        with no_network():
            return _as_float(self._pyiqa_metric(str(pred_dir), str(gt_dir)))

    def _to_tensor(self, rgb: np.ndarray):
        import torch  # lazy: PyTorch is optional (pyiqa's metrics need it)

        array = np.ascontiguousarray(np.asarray(rgb, np.float32).transpose(2, 0, 1)[None] / 255.0)
        return torch.from_numpy(array).to(self._device)


def load_iqa_metrics(
    names: list[str], device: str | None = None
) -> tuple[dict[str, LoadedIqaMetric], dict[str, str]]:
    """Builds the named pyiqa metrics that can run offline; returns (built, {name: why not})."""
    unknown = [name for name in names if name not in IQA_METRICS]
    if unknown:
        raise ValueError(f"unknown IQA metrics {unknown}; known: {sorted(IQA_METRICS)}")
    if not names:
        return {}, {}
    if not pyiqa_installed():
        reason = "pyiqa is not installed (optional: pip install pyiqa, then place its weights)"
        return {}, {name: reason for name in names}
    built: dict[str, LoadedIqaMetric] = {}
    unavailable: dict[str, str] = {}
    torch_device = None
    for name in names:
        metric = IQA_METRICS[name]
        missing = [path for path in expected_weight_paths(metric) if not path.exists()]
        if missing:
            unavailable[name] = (
                "weights not found locally (nothing is downloaded): "
                + ", ".join(str(path) for path in missing)
            )
            continue
        try:
            import torch  # lazy: optional; absent means the pyiqa metrics are skipped

            pyiqa = importlib.import_module("pyiqa")
            if torch_device is None:
                torch_device = torch.device(
                    device or ("cuda" if torch.cuda.is_available() else "cpu")
                )
            with no_network():
                pyiqa_metric = pyiqa.create_metric(metric.pyiqa_name, device=torch_device)
        except Exception as error:  # pyiqa raises many kinds; the reason is what matters
            blocked = isinstance(error, NetworkBlockedError) or "offline" in str(error).lower()
            what = "tried to download (refused)" if blocked else "failed to build"
            unavailable[name] = f"pyiqa {what}: {type(error).__name__}: {error}"
            continue
        built[name] = LoadedIqaMetric(metric, pyiqa_metric, torch_device)
    return built, unavailable


def pyiqa_installed() -> bool:
    """True when `import pyiqa` would find the package (checked without importing it)."""
    return "pyiqa" in sys.modules or importlib.util.find_spec("pyiqa") is not None


def expected_weight_paths(metric: IqaMetric) -> list[Path]:
    """Where pyiqa / torchvision / CLIP / timm would look for `metric`'s weight files."""
    return [_cache_dir(cache) / file for cache, file in metric.weight_files]


def _cache_dir(cache: str) -> Path:
    if cache == "huggingface":

        return Path(constants.HF_HUB_CACHE)
    import torch.hub  # lazy: optional dependency, only for pyiqa's cache folder

    hub = Path(torch.hub.get_dir())
    return {"pyiqa": hub / "pyiqa", "torchvision": hub / "checkpoints", "clip": hub / "clip"}[cache]


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Every socket connection fails inside; Hugging Face libraries run in offline mode."""

    def refuse(*args, **kwargs):
        raise NetworkBlockedError(
            "xpsr_jax.evaluation does not download: a metric tried to open a network "
            "connection; put its weights in the local cache instead"
        )

    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_socket = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection)
    hub_constants = sys.modules.get("huggingface_hub.constants")
    saved_hub_offline = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection = saved_socket
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_hub_offline


def _as_float(value) -> float:
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().mean().item()
    return float(np.mean(value))
