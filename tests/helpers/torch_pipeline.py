"""A PyTorch XPSR pipeline assembled for parity tests: our PyTorch reference networks
(tests/torch_reference), diffusers' AutoencoderKL and schedulers, transformers' CLIP, and the
release's recipe (pipelines/pipeline_xpsr.py, test.py, myutils/wavelet_color_fix.py) step by step.

    reference = TorchXPSRPipeline(sd15_folder, release_folder, sampler="ddpm")
    out = reference(conditioning_uint8, caption, quality, draws)   # dict of numpy arrays

Every random draw is injected (`draws`: NCHW torch tensors vae_sample, first, added, steps),
so a run can be replayed draw for draw against xpsr_jax.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.torch_reference import XPSRControlNetTorch, XPSRUNetTorch
from xpsr_jax.weights.files import read_state_dict

ADDED_PROMPT = "clean, high-resolution, 8k, high quality, clear text."
NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed."
LOWLEVEL_NEGATIVE_PROMPT = "high resolution, best quality, clear"


def load_release_torch(folder: Path):
    """(unet, controlnet) of an official-layout folder, loaded strictly into the reference."""
    models = []
    for name, cls in (("unet", XPSRUNetTorch), ("controlnet", XPSRControlNetTorch)):
        config = json.loads((folder / name / "config.json").read_text())
        model = cls({k: v for k, v in config.items() if not k.startswith("_")}).eval()
        state = read_state_dict(folder / name / "diffusion_pytorch_model.safetensors")
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
        models.append(model)
    return models


def _calc_mean_std(feat: torch.Tensor, eps: float = 1e-5):
    b, c = feat.shape[:2]
    var = feat.reshape(b, c, -1).var(dim=2) + eps  # unbiased, as the release
    return feat.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), var.sqrt().reshape(b, c, 1, 1)


def adain_color_fix_pil(target: Image.Image, source: Image.Image) -> Image.Image:
    """The release's adain_color_fix: ToTensor, AdaIN, clamp, ToPILImage (x * 255 truncated)."""
    t = torch.from_numpy(np.asarray(target, np.float32) / 255.0).permute(2, 0, 1)[None]
    s = torch.from_numpy(np.asarray(source, np.float32) / 255.0).permute(2, 0, 1)[None]
    s_mean, s_std = _calc_mean_std(s)
    t_mean, t_std = _calc_mean_std(t)
    result = ((t - t_mean) / t_std * s_std + s_mean)[0].clamp_(0.0, 1.0)
    return Image.fromarray(result.mul(255).byte().permute(1, 2, 0).numpy())


class TorchXPSRPipeline:
    def __init__(self, sd15: Path, release: Path, *, sampler: str = "ddpm", final_sigmas_type: str = "sigma_min"):
        from diffusers import AutoencoderKL, DDPMScheduler, UniPCMultistepScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(sd15 / "tokenizer"), local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(str(sd15 / "text_encoder"), local_files_only=True).eval()
        self.vae = AutoencoderKL.from_pretrained(str(sd15 / "vae"), local_files_only=True).eval()
        self.unet, self.controlnet = load_release_torch(release)
        if sampler == "ddpm":
            self.scheduler = DDPMScheduler.from_pretrained(str(sd15 / "scheduler"), local_files_only=True)
        elif sampler == "unipc":
            self.scheduler = UniPCMultistepScheduler.from_pretrained(str(sd15 / "scheduler"), local_files_only=True,
                                                                     final_sigmas_type=final_sigmas_type)
        else:
            raise ValueError(sampler)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def __call__(self, conditioning: np.ndarray, caption: str, quality: str, draws: dict, *,
                 num_inference_steps: int = 20, guidance_scale: float = 4.5, conditioning_scale: float = 1.0,
                 added_noise_level: int = 800) -> dict:
        # _encode_prompt: [negative, positive] for both prompt kinds
        prompt_embeds = torch.cat([self._encode([NEGATIVE_PROMPT]), self._encode([caption + " " + ADDED_PROMPT])])
        lowlevel_embeds = torch.cat([self._encode([LOWLEVEL_NEGATIVE_PROMPT]), self._encode([quality])])
        # prepare_image: uint8 / 255, NCHW, doubled for CFG
        image = torch.from_numpy(conditioning.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        image_cfg = torch.cat([image] * 2)
        # prepare_latents (init_latent_with_noise False)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        posterior = self.vae.encode(image * 2.0 - 1.0).latent_dist
        latents = (posterior.mean + posterior.std * draws["vae_sample"]) * self.vae.config.scaling_factor
        latents = self.scheduler.add_noise(latents, draws["first"], timesteps[:1].repeat(1))
        latents = self.scheduler.add_noise(latents, draws["added"], torch.LongTensor([added_noise_level]))
        latents = latents * self.scheduler.init_noise_sigma
        latents_init = latents.clone()
        import diffusers.schedulers.scheduling_ddpm as ddpm_module
        original_randn = ddpm_module.randn_tensor
        trajectory = []
        try:
            for i, t in enumerate(timesteps):
                ddpm_module.randn_tensor = lambda *args, _i=i, **kwargs: draws["steps"][_i]
                latent_in = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
                control = self.controlnet(latent_in, t, prompt_embeds, lowlevel_embeds, image_cfg,
                                          conditioning_scale=conditioning_scale)
                noise_pred = self.unet(latent_in, t, prompt_embeds, lowlevel_embeds,
                                       list(control.down_block_res_samples), control.mid_block_res_sample)
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                trajectory.append(latents.clone())
        finally:
            ddpm_module.randn_tensor = original_randn
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        # image_processor.postprocess(output_type="pil"), then adain_color_fix against the conditioning
        pixels = (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        sampled = Image.fromarray((pixels * 255).round().astype("uint8"))
        fixed = adain_color_fix_pil(sampled, Image.fromarray(conditioning))
        to_nhwc = lambda x: x.permute(0, 2, 3, 1).numpy()  # noqa: E731
        return dict(latents_init=to_nhwc(latents_init), latents=to_nhwc(latents), decoded=to_nhwc(decoded),
                    images=np.asarray(fixed)[None], trajectory=[to_nhwc(x) for x in trajectory],
                    timesteps=timesteps.numpy())
