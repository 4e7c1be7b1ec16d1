"""XPSR training config: SD 1.5 size at 512 px with the official hyper-parameters.

Commands::

    python -m xpsr_jax.train --config train.py --workdir runs/xpsr \
        --config.base_model=/models/stable-diffusion-v1-5 --config.pipeline.data_dir=tfds
    python -m xpsr_jax.train --config train.py:tiny --workdir /tmp/tiny \
        --config.base_model=tiny/sd15 --config.pipeline.data_dir=tiny/tfds
    python -m xpsr_jax.train ...            # the same entry point

Rerunning the same command with the same --workdir resumes from the latest checkpoint.

Variants (`:a,b`): `tiny` shrinks resolution, batch, steps and precision for a CPU run on
the tiny models of `xpsr_jax.models.tiny`; `released_prompts` feeds the empty high-level
prompt as the released training script does (the default is the paper's HR caption);
`one_step` trains the one-step XPSR (OSEDiff's objective, docs/one_step.md) with the official
OSEDiff hyper-parameters (`tiny,one_step` on a CPU).
Command-line flags (`--config.KEY=VALUE`) override file values; the config is locked, so a
mistyped key is an error. `xpsr_jax.training.config.validate_train_config` checks values.
"""

from ml_collections import config_dict

from xpsr_jax.data.pipeline import default_pipeline_config

VARIANTS = ("tiny", "released_prompts", "one_step")
# scripts/train/train_osediff.sh of the official OSEDiff code (--neg_prompt).
OSEDIFF_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, unreal engine, "
    "blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, "
    "lowres, over-smooth")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    """get_config("variant,...") -> locked ConfigDict of the training run."""
    variants = [v for v in (arg or "").split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"train.py: unknown variant(s) {unknown}; valid: {VARIANTS}")

    config = config_dict.ConfigDict()
    # Diffusers Stable Diffusion 1.5 folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), or
    # the single original-layout file (v1-5-pruned-emaonly.safetensors, .ckpt: converted once into
    # a cached folder; give pipeline.tokenizer_path, and base_model_config when its networks are
    # not SD 1.5's shapes). Required. The frozen weights are checksummed and checked on resume.
    config.base_model = ""
    config.base_model_config = ""  # a diffusers folder with unet/ vae/ text_encoder/ config.json files
    # "" : initialise XPSR from base_model by the official rules (XPSRUNet.from_sd_unet,
    # XPSRControlNet.from_unet). Otherwise a release folder (unet/ + controlnet/) or an orbax
    # inference checkpoint to fine-tune / continue from; the frozen VAE and text encoder still
    # come from base_model.
    config.init_from = ""

    # XPSR UNet architecture switches (the release config: SFA nowhere in the UNet).
    config.model = config_dict.ConfigDict()
    config.model.down_use_lowlevel_prompt = False
    config.model.mid_use_lowlevel_prompt = False
    config.model.up_use_lowlevel_prompt = (False, False, False, False)  # one per up block

    # The grain input pipeline (xpsr_jax.data.pipeline.default_pipeline_config). Required:
    # pipeline.data_dir. tokenizer_path "" -> base_model/tokenizer. batch_size is PER PROCESS:
    # the global batch is batch_size x process count. Official: 2 per GPU x 8 GPUs = 16 per
    # step (x2 accumulation = 32 per update), here 16 per process for one 8-device host.
    config.pipeline = default_pipeline_config()
    config.pipeline.data_dir = ""
    config.pipeline.tokenizer_path = ""
    config.pipeline.batch_size = 16

    # Steps = global batches (micro-steps). Official: 300k optimizer updates x 2 accumulation.
    config.total_steps = 600_000
    config.seed = 0  # model init and per-step draws (timesteps, noise, VAE sample)
    config.log_every = 50  # steps between metrics.jsonl / TensorBoard lines
    config.checkpoint_every = 2_500  # steps between async orbax saves (also on SIGTERM)
    config.keep_checkpoints = 3  # keep the last N checkpoints
    # Where the checkpoints go: "" = WORKDIR/checkpoints; a folder or a bucket (gs://bucket/run/ckpt:
    # orbax writes it from every host of a pod; the workdir keeps config, metrics and logs).
    config.checkpoint_dir = ""

    config.optimizer = config_dict.ConfigDict()
    config.optimizer.learning_rate = 5e-5  # peak learning rate (official AdamW)
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 1e-2
    config.optimizer.eps = 1e-8
    config.optimizer.schedule = "constant"  # "constant" (official) | "cosine" (to 0 at total_steps)
    config.optimizer.warmup_steps = 0  # linear warmup from 0 (official: 0)
    config.optimizer.grad_clip_norm = 1.0  # global-norm clip; 0 = off
    config.optimizer.gradient_accumulation_steps = 2  # official 2 (optax.MultiSteps)
    config.optimizer.ema_decay = 0.0  # EMA of the trainable weights; 0 = off

    # "xpsr": the paper's diffusion objective; "one_step": the one-step generator (the one_step variant)
    config.objective = "xpsr"

    config.loss = config_dict.ConfigDict()
    config.loss.dfc_weight = 0.05  # weight of the degradation-free constraint L1 terms
    # objective "one_step": LPIPS's VGG16 trunk, torchvision's ImageNet checkpoint (vgg16-397923af.pth),
    # and its lin layers ("" = the lpips package's weights/v0.1/vgg.pth, as lpips.LPIPS(net="vgg")).
    config.loss.lpips_backbone = ""
    config.loss.lpips_weights = ""

    # The one-step objective (objective "one_step"): OSEDiff's defaults, train_osediff.py / .sh lines.
    config.one_step = config_dict.ConfigDict()
    config.one_step.init_from = ""  # a multi-step XPSR release to start ControlNet / SFA from (= init_from)
    config.one_step.lora_rank = 4  # --lora_rank=4
    config.one_step.lora_alpha = 8.0  # peft LoraConfig's default lora_alpha (OSEDiff leaves it unset)
    config.one_step.lambda_l2 = 1.0  # --lambda_l2=1
    config.one_step.lambda_lpips = 2.0  # --lambda_lpips=2
    config.one_step.lambda_vsd = 1.0  # --lambda_vsd=1
    config.one_step.lambda_vsd_lora = 1.0  # --lambda_vsd_lora=1
    config.one_step.cfg_vsd = 7.5  # --cfg_vsd=7.5
    config.one_step.negative_prompt = OSEDIFF_NEGATIVE_PROMPT  # --neg_prompt

    config.precision = config_dict.ConfigDict()
    config.precision.param_dtype = "float32"  # trainable master weights
    config.precision.compute_dtype = "bfloat16"  # activations of UNet + ControlNet
    config.precision.frozen_dtype = "bfloat16"  # stored dtype of VAE, text encoder, frozen UNet
    config.precision.loss_scaling = "none"  # "none" | "dynamic" (for float16 compute on GPU)

    # One jax.sharding.Mesh over every device: data x fsdp (-1 = all devices left over).
    config.mesh = config_dict.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.shard_trainable = False  # trainable params + optimizer state over fsdp
    config.mesh.shard_frozen = False  # frozen weights over fsdp (else replicated)
    # Only the optimizer state over fsdp, params whole on every chip (ZeRO-1): most of fsdp's memory
    # saving for AdamW (its two moments, and the accumulated gradients, are 3x the params) with a
    # handful of collectives instead of one per tensor. Not with shard_trainable (which has it).
    config.mesh.shard_optimizer = False

    # Gradient checkpointing per network: "none" | "attention" (cross-attention blocks) | "full".
    # XLA's persistent compilation cache: "default" = WORKDIR/compile_cache (a resumed run, or
    # every host of a pod sharing the workdir, reads the compiled step), a folder, or "" for none.
    config.compile_cache = "default"
    # On CPU devices only: the train step compiles with LLVM at level 1 and without YNNPACK
    # fusions (a faster compile, and a cached step loads in ~8 s instead of ~25 s; same step time).
    config.xla_cpu_fast_compile = True
    config.remat = config_dict.ConfigDict()
    config.remat.unet = "attention"
    config.remat.controlnet = "attention"

    # xpsr_jax.models.attention backend: "auto" | "xla" | "cudnn" | "chunked".
    config.attention_backend = "auto"

    # Periodic validation: the inference pipeline on a few fixed LR images, LR | SR | HR grid.
    config.validation = config_dict.ConfigDict()
    config.validation.every = 0  # steps between validations; 0 = off
    config.validation.num_images = 4  # first N images (sorted by name) of lr_dir
    config.validation.lr_dir = ""  # folder of LR images (HR/ next to it, same names, if any)
    config.validation.infer_config = "configs/infer.py:validation"  # inference settings

    if "tiny" in variants:
        # CPU-sized run on the tiny models (xpsr_jax.models.tiny.write_tiny_model).
        config.pipeline.resolution = 64
        config.pipeline.batch_size = 2
        config.pipeline.num_threads = 2
        config.pipeline.prefetch_buffer_size = 4
        config.total_steps = 20
        config.log_every = 1
        config.checkpoint_every = 5
        config.keep_checkpoints = 2
        config.optimizer.learning_rate = 1e-3
        config.optimizer.gradient_accumulation_steps = 1
        config.precision.compute_dtype = "float32"
        config.precision.frozen_dtype = "float32"
        config.remat.unet = "none"
        config.remat.controlnet = "none"
        config.attention_backend = "xla"
        config.validation.num_images = 2
    if "one_step" in variants:
        config.objective = "one_step"
        # train_osediff.sh: --learning_rate=5e-5 --train_batch_size=4 (x 4 GPUs)
        # --gradient_accumulation_steps=1 --checkpointing_steps 500; --max_train_steps default 100000;
        # AdamW defaults (0.9, 0.999, wd 1e-2, eps 1e-8), constant schedule, --max_grad_norm 1.0 per network.
        if "tiny" not in variants:
            config.optimizer.learning_rate = 5e-5
            config.pipeline.batch_size = 16
            config.total_steps = 100_000
            config.checkpoint_every = 500
        config.optimizer.gradient_accumulation_steps = 1
    if "released_prompts" in variants:
        config.pipeline.highlevel_prompt_source = "empty"
    config.lock()
    return config
