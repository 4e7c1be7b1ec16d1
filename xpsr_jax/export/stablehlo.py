"""`python -m xpsr_jax.export stablehlo`: the sampling networks serialized with `jax.export`.

    python -m xpsr_jax.export stablehlo --weights xpsr-release --sd15 sd15 \
        --config configs/infer.py --out xpsr-stablehlo [--weights-mode argument|baked] \
        [--size 512x512 --size 512x768] [--set num_inference_steps=25]

Three functions are exported for each conditioning size (the spatial size is fixed: the tiling
and the UNet's skip shapes are decided from it at trace time), each with a symbolic batch
dimension `b` (or one file per batch size with --batch-sizes):

- `encode_text`   CLIP token ids (b, 77) int32 -> embeddings (b, 77, D)
- `denoise_step`  one guided noise prediction: ControlNet + UNet on the CFG pairs, guidance
- `sample`        the whole sampling function: the text encoder (negative prompts baked in),
                  VAE encode, the denoising loop, VAE decode, colour fix -> uint8 image

Every function takes (weights, inputs): `inputs` a dict keyed by the input names of
metadata.json; `weights` the dict of the networks it uses (from weights.safetensors) with
--weights-mode argument, or {} with --weights-mode baked (the weights are constants of the
module; the serialized format caps a file at 2 GiB, so baked suits small models only).
`xpsr_jax.export.load_artifact(OUT)` runs the result without the model code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import export
from safetensors.flax import save_file

from xpsr_jax.cli_config import ConfigFlagError, parse_config_flags
from xpsr_jax.export.output import ExportError, atomic_output_dir, check_output_target, refuse_one_step_release
from xpsr_jax.inference.config import default_infer_config, validate_infer_config
from xpsr_jax.inference.pipeline import WeightsFolderError, XPSRPipeline, resolve_sd15
from xpsr_jax.inference.sampling import PromptEmbeds, guided_noise, sample
from xpsr_jax.models import tokenize
from xpsr_jax.models.single_file import add_single_file_arguments
from xpsr_jax.weights.artifact import METADATA
from xpsr_jax.weights.formats import MANIFEST, STABLEHLO

WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_DIR = "tokenizer"
BATCH_DIM = "b"
WEIGHTS_MODES = ("argument", "baked")
# A flatbuffer (the serialized Exported) cannot exceed 2 GiB; leave room for the program itself.
BAKED_LIMIT_BYTES = 2**31 - 2**27
ARTIFACT_VERSION = 1
NETWORKS_OF = {"encode_text": ("text_encoder",), "denoise_step": ("unet", "controlnet"),
               "sample": ("unet", "controlnet", "vae", "text_encoder")}
DEFAULT_CONFIG = "configs/infer.py"  # the packaged inference config (xpsr_jax/configs/infer.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="XPSR release folder (unet/, controlnet/) or an "
                        "orbax inference checkpoint (python -m xpsr_jax.export orbax)")
    parser.add_argument("--sd15", help="SD 1.5 folder (vae/, text_encoder/, tokenizer/, scheduler/), or the single "
                        "original-layout file (.safetensors / .ckpt); default: --weights when it has them")
    add_single_file_arguments(parser)
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE.py[:VARIANT]",
                        help="inference config (default: configs/infer.py); --config.KEY=VALUE overrides one "
                             "value, as for infer.py; the recipe is fixed into the artifact")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="old spelling of --config.KEY=VALUE (still accepted)")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--weights-mode", choices=WEIGHTS_MODES, default="argument",
                        help="argument: weights saved in weights.safetensors and passed to every call "
                        "(default); baked: weights are constants inside the modules (< 2 GiB each)")
    parser.add_argument("--size", action="append", default=[], metavar="HxW",
                        help="conditioning (processed) size to export, multiples of 8 (repeatable; "
                        "default: process_size x process_size)")
    parser.add_argument("--batch-sizes", default="symbolic", metavar="symbolic|N,N,...",
                        help="symbolic: one module for every batch size (default); or fixed sizes")
    parser.add_argument("--platforms", default="", metavar="cpu,cuda,tpu",
                        help="platforms to lower for (default: this process's backend)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W), both positive multiples of 8 (the VAE downsamples by 8)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ExportError(f"--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 512x512")
    height, width = int(parts[0]), int(parts[1])
    if height < 8 or width < 8 or height % 8 or width % 8:
        raise ExportError(f"--size {text!r}: both sides must be positive multiples of 8 (the VAE's downsampling)")
    return height, width


def parse_batch_sizes(text: str) -> list[int] | None:
    """None for a symbolic batch dimension, else the sorted fixed batch sizes."""
    if text == "symbolic":
        return None
    try:
        sizes = sorted({int(part) for part in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise ExportError(f"--batch-sizes {text!r}: expected 'symbolic' or positive integers like 1,2,4")
    return sizes


def run(args) -> int:
    if args.overrides:
        print("note: --set KEY=VALUE is now spelled --config.KEY=VALUE", file=sys.stderr)
    try:
        config, _ = parse_config_flags(["--config", args.config, *getattr(args, "config_overrides", []),
                                        *(f"--config.{kv}" for kv in args.overrides)],
                                       default=DEFAULT_CONFIG, prog="python -m xpsr_jax.export stablehlo")
    except ConfigFlagError as error:
        raise ExportError(str(error)) from error
    out = export_stablehlo(args.weights, args.out, sd15=args.sd15, tokenizer=args.tokenizer,
                           sd15_config=args.sd15_config, config=config, weights_mode=args.weights_mode,
                           sizes=[parse_size(s) for s in args.size], batch_sizes=parse_batch_sizes(args.batch_sizes),
                           platforms=[p for p in args.platforms.split(",") if p], overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _leaf_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def flatten_weights(group: str, state) -> tuple[dict, list[str], object]:
    """({name: array}, names in flatten order, treedef) of one network's state."""

    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [f"{group}/{_leaf_name(path)}" for path, _ in leaves]
    if len(set(names)) != len(names):
        raise AssertionError(f"{group}: weight names are not unique")
    return dict(zip(names, (leaf for _, leaf in leaves))), names, treedef


def _spec(name: str, shape, dtype) -> dict:
    """An input or output of a function; `batched`: its first dimension is the batch (every
    array but the step's scalar timestep)."""

    return {"name": name, "shape": [d if isinstance(d, int) else str(d) for d in shape],
            "dtype": np.dtype(dtype).name, "batched": len(shape) > 0}


def _tree_specs(tree) -> list[dict]:
    return [_spec(name, value.shape, value.dtype) for name, value in tree.items()]


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class _Exporter:
    """Builds the three functions of one pipeline and exports them."""

    def __init__(self, pipe, weights_mode: str, platforms: list[str]):
        self.pipe = pipe
        self.weights_mode = weights_mode
        self.platforms = platforms or [jax.default_backend()]
        self.groups = {}  # group -> (weights dict, names, treedef)
        for group, state in (("unet", pipe.states["unet"]), ("controlnet", pipe.states["controlnet"]),
                             ("vae", pipe.states["vae"]), ("text_encoder", pipe.text_encoder_state)):
            self.groups[group] = flatten_weights(group, state)
        cfg = pipe.config
        self.negative_ids = tokenize(pipe.tokenizer, [cfg.negative_prompt, cfg.lowlevel_negative_prompt])
        self.max_length = int(self.negative_ids.shape[1])
        text_abstract = jax.eval_shape(self._text_encoder, self._state_group("text_encoder", None),
                                       jax.ShapeDtypeStruct((1, self.max_length), "int32"))
        self.embed_dim, self.embed_dtype = int(text_abstract.shape[-1]), text_abstract.dtype

    def group_bytes(self, group: str) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.groups[group][0].values())

    def _state_group(self, group: str, weights: dict | None):
        """The network state: the concrete (baked) arrays, or rebuilt from the weights argument."""

        arrays, names, treedef = self.groups[group]
        if weights is None:
            return jax.tree_util.tree_unflatten(treedef, [arrays[n] for n in names])
        return jax.tree_util.tree_unflatten(treedef, [weights[n] for n in names])

    def _text_encoder(self, text_state, ids):
        return nnx.merge(self.pipe.text_encoder_def, text_state)(ids)

    def _weights_arg(self, weights: dict, group: str):
        return self._state_group(group, None if self.weights_mode == "baked" else weights)

    # ------------------------------------------------------------ the functions

    def encode_text(self, weights, inputs):
        return {"embeddings": self._text_encoder(self._weights_arg(weights, "text_encoder"), inputs["input_ids"])}

    def denoise_step(self, weights, inputs):
        states = {group: self._weights_arg(weights, group) for group in ("unet", "controlnet")}
        embeds = PromptEmbeds(inputs["highlevel"], inputs["highlevel_negative"], inputs["lowlevel"],
                              inputs["lowlevel_negative"])
        eps = guided_noise(self.pipe.networks, self.pipe.plan, states, inputs["latents"], inputs["timestep"],
                            inputs["conditioning"], embeds)
        return {"noise_pred": eps}

    def sample(self, weights, inputs):
        highlevel_ids, lowlevel_ids = inputs["highlevel_ids"], inputs["lowlevel_ids"]
        batch = highlevel_ids.shape[0]
        # One text-encoder batch [highlevel..., lowlevel..., negative, lowlevel negative], as
        # XPSRPipeline.encode_prompts runs it.
        ids = jnp.concatenate([highlevel_ids, lowlevel_ids, jnp.asarray(self.negative_ids)], axis=0)
        embeds = self._text_encoder(self._weights_arg(weights, "text_encoder"), ids)
        shape = (batch,) + embeds.shape[1:]
        negatives = embeds[-2:]
        embeds = PromptEmbeds(embeds[:batch], jnp.broadcast_to(negatives[0], shape), embeds[batch:2 * batch],
                              jnp.broadcast_to(negatives[1], shape))
        states = {group: self._weights_arg(weights, group) for group in ("unet", "controlnet", "vae")}
        # The pipeline divides in float32 before the call; the same IEEE division here.
        conditioning = inputs["conditioning"].astype(jnp.float32) / 255.0
        out = sample(self.pipe.networks, self.pipe.plan, states, conditioning, embeds, None, inputs["keys"])
        return dict(out._asdict())

    # ------------------------------------------------------------ specs and export

    def input_specs(self, name: str, batch, size: tuple[int, int] | None) -> dict:
        sds = jax.ShapeDtypeStruct
        length = self.max_length
        if name == "encode_text":
            return {"input_ids": sds((batch, length), jnp.int32)}
        height, width = size
        if name == "sample":
            return {"conditioning": sds((batch, height, width, 3), jnp.uint8),
                    "highlevel_ids": sds((batch, length), jnp.int32),
                    "lowlevel_ids": sds((batch, length), jnp.int32),
                    "keys": sds((batch, 2), jnp.uint32)}
        embed = sds((batch, length, self.embed_dim), self.embed_dtype)
        return {"latents": sds((batch, height // 8, width // 8, 4), jnp.float32),
                "timestep": sds((), jnp.int32),
                "conditioning": sds((batch, height, width, 3), jnp.float32),
                "highlevel": embed, "highlevel_negative": embed, "lowlevel": embed, "lowlevel_negative": embed}

    def weight_specs(self, name: str) -> dict:
        if self.weights_mode == "baked":
            return {}
        return {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for group in NETWORKS_OF[name]
                for n, a in self.groups[group][0].items()}

    def export(self, name: str, batch, size):
        inputs = self.input_specs(name, batch, size)
        exported = export.export(jax.jit(getattr(self, name)), platforms=self.platforms)(
            self.weight_specs(name), inputs)
        return exported, inputs


def _function_plan(sizes, batch_sizes):
    """(function name, size or None, batch or None for symbolic) for every file to write."""
    batches = [None] if batch_sizes is None else batch_sizes
    plan = [("encode_text", None, b) for b in batches]
    for size in sizes:
        plan += [(name, size, b) for name in ("denoise_step", "sample") for b in batches]
    return plan


def _file_name(name: str, size, batch) -> str:
    size_part = "" if size is None else f"_{size[0]}x{size[1]}"
    return f"{name}{size_part}_b{'sym' if batch is None else batch}.jaxexport"


def export_stablehlo(weights: str | os.PathLike, out: str | os.PathLike, *, sd15: str | os.PathLike | None = None,
                     tokenizer: str | os.PathLike | None = None, sd15_config: str | os.PathLike | None = None,
                     config=None, weights_mode: str = "argument", sizes: list[tuple[int, int]] | None = None,
                     batch_sizes: list[int] | None = None, platforms: list[str] | None = None,
                     overwrite: bool = False) -> Path:
    """Export `weights` (a release or an orbax inference checkpoint, + the SD 1.5 base) under the
    inference `config` to the folder `out`; see `export_pipeline` for the options."""

    refuse_one_step_release(weights, "a StableHLO artifact")
    config = default_infer_config() if config is None else config
    try:
        validate_infer_config(config)
    except ValueError as error:
        raise ExportError(str(error)) from error
    try:
        base = resolve_sd15(Path(weights), sd15, tokenizer=tokenizer, sd15_config=sd15_config)
    except (WeightsFolderError, FileNotFoundError) as error:
        raise ExportError(str(error)) from error
    _check_options(Path(out), weights_mode, sizes, overwrite, inputs=(weights, base))  # before the slow load
    try:
        pipe = XPSRPipeline.from_pretrained(weights, sd15=base, config=config)
    except (WeightsFolderError, FileNotFoundError) as error:
        raise ExportError(str(error)) from error
    return export_pipeline(pipe, out, tokenizer_dir=base / TOKENIZER_DIR, weights_mode=weights_mode, sizes=sizes,
                           batch_sizes=batch_sizes, platforms=platforms, overwrite=overwrite,
                           source={"weights": str(Path(weights).absolute()), "sd15": str(base.absolute())})


def _check_options(out: Path, weights_mode: str, sizes, overwrite: bool, inputs=()) -> None:
    if weights_mode not in WEIGHTS_MODES:
        raise ExportError(f"weights_mode={weights_mode!r}; valid: {' | '.join(WEIGHTS_MODES)}")
    check_output_target(out, inputs=inputs, overwrite=overwrite)
    for size in sizes or []:
        if len(size) != 2 or min(size) < 8 or size[0] % 8 or size[1] % 8:
            raise ExportError(f"size {size}: both sides must be positive multiples of 8")


def export_pipeline(pipe, out: str | os.PathLike, *, tokenizer_dir: str | os.PathLike, weights_mode: str = "argument",
                    sizes: list[tuple[int, int]] | None = None, batch_sizes: list[int] | None = None,
                    platforms: list[str] | None = None, overwrite: bool = False, source: dict | None = None) -> Path:
    """Export a loaded `XPSRPipeline` (its networks, recipe and tokenizer files) to `out`.

    sizes: conditioning (H, W) sizes (default: process_size square); batch_sizes: None for a
    symbolic batch, else fixed sizes; platforms: jax.export platforms (default: this backend).
    Nothing is left at `out` when it fails (the folder is written aside and renamed at the end).
    """

    out = Path(out)
    inputs = [path for path in (source or {}).values() if path]
    _check_options(out, weights_mode, sizes, overwrite, inputs)
    sizes = [tuple(s) for s in (sizes or [(pipe.config.process_size, pipe.config.process_size)])]
    exporter = _Exporter(pipe, weights_mode, list(platforms or []))
    plan = _function_plan(sizes, batch_sizes)

    total_weights = sum(exporter.group_bytes(g) for g in exporter.groups)
    if weights_mode == "baked":
        per_file = {entry: sum(exporter.group_bytes(g) for g in NETWORKS_OF[entry[0]]) for entry in plan}
        biggest = max(per_file, key=per_file.get)
        if per_file[biggest] > BAKED_LIMIT_BYTES:
            raise ExportError(
                f"{out.absolute()}: --weights-mode baked would put {per_file[biggest] / 2**30:.2f} GiB of weights "
                f"into {_file_name(*biggest)}, over the {BAKED_LIMIT_BYTES / 2**30:.2f} GiB a serialized module "
                f"can hold (flatbuffers); use --weights-mode argument")
        required = sum(per_file.values())
    else:
        required = total_weights
    with atomic_output_dir(out, required_bytes=required, overwrite=overwrite, inputs=inputs) as staging:
        functions = []
        for name, size, batch in plan:
            symbolic = jax.export.symbolic_shape(BATCH_DIM)[0] if batch is None else batch
            exported, inputs = exporter.export(name, symbolic, size)
            file_name = _file_name(name, size, batch)
            (staging / file_name).write_bytes(exported.serialize())
            outputs = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
            functions.append({"name": name, "file": file_name, "size": None if size is None else list(size),
                              "batch": BATCH_DIM if batch is None else batch,
                              "networks": list(NETWORKS_OF[name]),
                              "inputs": _tree_specs(inputs), "outputs": _tree_specs(outputs)})
        if weights_mode == "argument":

            arrays = {n: a for group in exporter.groups.values() for n, a in group[0].items()}
            save_file(arrays, str(staging / WEIGHTS_FILE))
        shutil.copytree(tokenizer_dir, staging / TOKENIZER_DIR)
        metadata = _metadata(pipe, exporter, functions, sizes, batch_sizes, source or {})
        (staging / METADATA).write_text(json.dumps(_jsonable(metadata), indent=2) + "\n")
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {"format": STABLEHLO, "artifact_version": ARTIFACT_VERSION, "created_by":
                    "python -m xpsr_jax.export stablehlo", "weights_mode": weights_mode, "source": source or {},
                    "files": {str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                              for p in files}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _metadata(pipe, exporter: _Exporter, functions, sizes, batch_sizes, source: dict) -> dict:
    cfg = pipe.config
    sampler = pipe.sampler
    return {
        "artifact_version": ARTIFACT_VERSION,
        "jax_version": jax.__version__,
        "platforms": exporter.platforms,
        "weights_mode": exporter.weights_mode,
        "weights_file": WEIGHTS_FILE if exporter.weights_mode == "argument" else None,
        "calling_convention": "fn(weights, inputs): both dicts; weights = the arrays of weights_file whose "
                              "names start with '<network>/' for each of the function's networks ({} when baked)",
        "sizes": [list(s) for s in sizes],
        "batch": {"symbolic": batch_sizes is None, "dim": BATCH_DIM if batch_sizes is None else None,
                  "sizes": batch_sizes,
                  "note": "one module for every batch size >= 1" if batch_sizes is None else
                          "fixed batch sizes chosen at export (--batch-sizes); smaller batches are padded"},
        "functions": functions,
        "scheduler": {"sampler": cfg.sampler, "class": type(sampler).__name__,
                      "num_inference_steps": int(len(sampler.timesteps)),
                      "timesteps": [int(t) for t in sampler.timesteps], "settings": dict(sampler.settings),
                      "scheduler_config": pipe.scheduler_config},
        "prompts": {
            "handling": "token ids: `sample` includes the CLIP text encoder and takes the token ids of the "
                        "high-level prompt (caption + ' ' + added_prompt) and of the low-level prompt; the "
                        "negative prompts of the config are baked in. `denoise_step` takes embeddings "
                        "(from `encode_text`).",
            "tokenizer": TOKENIZER_DIR, "max_length": exporter.max_length,
            "padding": "max_length with the pad token, truncated so that EOS is last (CLIPTokenizer)",
            "added_prompt": cfg.added_prompt, "negative_prompt": cfg.negative_prompt,
            "lowlevel_negative_prompt": cfg.lowlevel_negative_prompt,
            "negative_ids": exporter.negative_ids, "embedding_dim": exporter.embed_dim,
            "embedding_dtype": str(exporter.embed_dtype)},
        "random": {"keys": "per-image uint32 (2,) key data: jax.random.key_data(jax.random.PRNGKey(seed)) "
                           "with the default threefry2x32 implementation", "default_seed": cfg.seed},
        "conditioning": "uint8 (b, H, W, 3) RGB, the LR preprocessed as xpsr_jax.inference.preprocess_lr "
                        "(x upscale bicubic, short side raised to process_size, floored to multiples of 8); "
                        "denoise_step takes it as float32 in [0, 1] (uint8 / 255)",
        "infer_config": cfg.to_dict(),
        "weights_sizes_bytes": {g: exporter.group_bytes(g) for g in exporter.groups},
        "source": source,
    }
