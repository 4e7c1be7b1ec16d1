"""The shapes of the four networks without their weights: SD 1.5's, the tiny model's, or those a
folder's config.json files describe. What a compile-only plan or a benchmark builds abstractly.

    arch = architecture("sd15")            # or "tiny", or an SD 1.5 / diffusers folder
    arch.unet, arch.vae, arch.text_encoder  # the configs; arch.scheduler the noise schedule's
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from xpsr_jax.models.clip import CLIPTextConfig
from xpsr_jax.models.tiny import SCHEDULER_CONFIG, TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG
from xpsr_jax.models.tiny_tokenizer import tiny_clip_vocab
from xpsr_jax.models.unet import UNet2DConditionConfig
from xpsr_jax.models.vae import AutoencoderKLConfig

NAMED_ARCHITECTURES = ("sd15", "tiny")
PARTS = ("unet", "vae", "text_encoder")


@dataclass(frozen=True)
class Architecture:
    name: str
    unet: UNet2DConditionConfig
    vae: AutoencoderKLConfig
    text_encoder: CLIPTextConfig
    scheduler: dict  # scheduler_config.json: the training noise schedule


def architecture(spec: str) -> Architecture:
    """"sd15" (SD 1.5's configs), "tiny" (`xpsr_jax.models.tiny`'s), or a folder with unet/,
    vae/ and text_encoder/ config.json files (an SD 1.5 folder); FileNotFoundError otherwise."""
    if spec == "sd15":
        return Architecture("sd15", UNet2DConditionConfig(), AutoencoderKLConfig(),
                            CLIPTextConfig.stable_diffusion_v1(), SCHEDULER_CONFIG)
    if spec == "tiny":
        return Architecture("tiny", UNet2DConditionConfig.from_dict(UNET_CONFIG),
                            AutoencoderKLConfig.from_dict(VAE_CONFIG),
                            CLIPTextConfig.from_dict({**TEXT_ENCODER_CONFIG, "vocab_size": len(tiny_clip_vocab())}),
                            SCHEDULER_CONFIG)
    folder = Path(spec)
    missing = [f"{part}/config.json" for part in PARTS if not (folder / part / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"model {spec!r}: neither {' nor '.join(NAMED_ARCHITECTURES)} nor a folder with "
                                f"{', '.join(f'{part}/config.json' for part in PARTS)} (missing {', '.join(missing)})")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    return Architecture(
        str(folder),
        UNet2DConditionConfig.from_json_file(folder / "unet" / "config.json"),
        AutoencoderKLConfig.from_json_file(folder / "vae" / "config.json"),
        CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"),
        json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else SCHEDULER_CONFIG)
