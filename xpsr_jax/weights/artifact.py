"""Running a StableHLO artifact of `python -m xpsr_jax.export stablehlo` without the model code.

    artifact = load_artifact("xpsr-stablehlo")
    out = artifact.sample(conditioning_uint8, ["a red house"], ["blurry, noisy"], seeds=[0])
    out["images"]                                   # uint8 (B, H, W, 3) at the processed size

    embeds = artifact.encode_prompts(["a red house"], ["blurry, noisy"])
    eps = artifact.denoise_step(latents, 981, conditioning_uint8 / 255.0, embeds)

Imports only jax, numpy, safetensors and (for prompts given as text) transformers' CLIP
tokenizer from the artifact's own tokenizer/ folder; never xpsr_jax.models or xpsr_jax.inference.
Inputs are checked against metadata.json before any call; errors name the artifact and the input.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from jax import export
from safetensors.flax import load_file

from xpsr_jax.seeds import seed_key_data
from xpsr_jax.weights.formats import (
    MANIFEST,
    STABLEHLO,
    WeightsFormatError,
    read_manifest,
)

METADATA = "metadata.json"  # the artifact's description of its programs (written by export/stablehlo.py)
PROMPT_FIELDS = ("highlevel", "highlevel_negative", "lowlevel", "lowlevel_negative")


class ArtifactError(WeightsFormatError):
    """A folder that is not a usable StableHLO artifact (the message names the path)."""


class ArtifactInputError(ValueError):
    """An input of the wrong shape or dtype (the message names the input and what is expected)."""


def load_artifact(path: str | os.PathLike) -> "StableHLOArtifact":
    """`load_artifact(folder)` -> StableHLOArtifact; ArtifactError naming the path when the folder
    is not a StableHLO export or misses a file."""
    return StableHLOArtifact(path)


class StableHLOArtifact:
    """A loaded artifact. Modules are deserialized, and weights read, on first use."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path}: StableHLO artifact folder not found")
        try:
            manifest = read_manifest(self.path)
        except WeightsFormatError as error:
            raise ArtifactError(str(error)) from error
        if manifest is None or manifest.get("format") != STABLEHLO:
            found = "no manifest.json" if manifest is None else f"format {manifest.get('format')!r}"
            raise ArtifactError(f"{self.path}: not a StableHLO artifact ({found}; expected a folder written by "
                                f"`python -m xpsr_jax.export stablehlo`)")
        self.manifest = manifest
        for name, entry in sorted(manifest.get("files", {}).items()):
            file = self.path / name
            if not file.is_file():
                raise ArtifactError(f"{self.path}: missing file {name} (listed in {MANIFEST}); the artifact "
                                    f"is incomplete, export it again")
            if file.stat().st_size != entry["bytes"]:
                raise ArtifactError(f"{file}: {file.stat().st_size} bytes, {MANIFEST} says {entry['bytes']}; "
                                    f"the file is truncated or was changed")
        metadata_path = self.path / METADATA
        if not metadata_path.is_file():
            raise ArtifactError(f"{self.path}: missing file {METADATA}")
        self.metadata = json.loads(metadata_path.read_text())
        self.config = self.metadata["infer_config"]
        self.sizes = [tuple(s) for s in self.metadata["sizes"]]
        self.symbolic_batch = bool(self.metadata["batch"]["symbolic"])
        self.batch_sizes = self.metadata["batch"]["sizes"]
        self.timesteps = np.asarray(self.metadata["scheduler"]["timesteps"], np.int32)
        self._functions = {(f["name"], None if f["size"] is None else tuple(f["size"]), f["batch"]): f
                           for f in self.metadata["functions"]}
        self._callables: dict = {}
        self._weights: dict | None = None
        self._tokenizer = None
        self._check_platform()

    def __repr__(self) -> str:
        batch = "symbolic batch" if self.symbolic_batch else f"batch sizes {self.batch_sizes}"
        return (f"StableHLOArtifact({str(self.path)!r}, sizes {self.sizes}, {batch}, "
                f"weights {self.metadata['weights_mode']}, {self.config['sampler']} x {len(self.timesteps)})")

    def _check_platform(self) -> None:
        platforms = self.metadata["platforms"]
        if jax.default_backend() not in platforms:
            raise ArtifactError(f"{self.path}: exported for platforms {platforms}; this process runs on "
                                f"{jax.default_backend()!r} (export again with --platforms)")

    # ------------------------------------------------------------ modules and weights

    def _entry(self, name: str, size, batch: int) -> tuple[dict, int]:
        """(metadata entry, batch size to run) for `name` at `size` and a real batch of `batch`."""
        size = None if size is None else tuple(size)
        if size is not None and size not in self.sizes:
            raise ArtifactInputError(
                f"{self.path}: {name}: conditioning size {size[0]}x{size[1]} is not exported; the artifact "
                f"covers {', '.join(f'{h}x{w}' for h, w in self.sizes)} (export with --size {size[0]}x{size[1]})")
        if self.symbolic_batch:
            return self._functions[(name, size, "b")], batch
        fitting = [b for b in self.batch_sizes if b >= batch]
        if not fitting:
            raise ArtifactInputError(f"{self.path}: {name}: batch {batch} is larger than the exported batch "
                                     f"sizes {self.batch_sizes}; split it")
        return self._functions[(name, size, fitting[0])], fitting[0]

    def _callable(self, entry: dict):
        if entry["file"] not in self._callables:

            file = self.path / entry["file"]
            if not file.is_file():
                raise ArtifactError(f"{self.path}: missing file {entry['file']}")
            try:
                exported = export.deserialize(bytearray(file.read_bytes()))
            except Exception as error:  # a corrupt flatbuffer raises assorted errors
                raise ArtifactError(f"{file}: cannot deserialize the module ({type(error).__name__}: {error})") \
                    from error
            self._callables[entry["file"]] = jax.jit(exported.call)
        return self._callables[entry["file"]]

    def weights(self) -> dict:
        """The weights passed to every call ({} when baked), read once."""
        if self._weights is None:
            if self.metadata["weights_mode"] == "baked":
                self._weights = {}
            else:

                file = self.path / self.metadata["weights_file"]
                if not file.is_file():
                    raise ArtifactError(f"{self.path}: missing file {self.metadata['weights_file']} "
                                        f"(--weights-mode argument keeps the weights there)")
                self._weights = load_file(str(file))
        return self._weights

    def _weights_for(self, entry: dict) -> dict:
        weights = self.weights()
        if not weights:
            return {}
        prefixes = tuple(f"{network}/" for network in entry["networks"])
        return {name: array for name, array in weights.items() if name.startswith(prefixes)}

    def _call(self, name: str, size, inputs: Mapping[str, object]) -> dict:
        """Check `inputs` against the metadata, pad a fixed-size batch, call, unpad."""
        entry, _ = self._entry(name, size, 1)
        arrays = self._checked_inputs(entry, inputs)
        batch = _batch_of(entry, arrays)
        entry, run_batch = self._entry(name, size, batch)
        if run_batch != batch:
            arrays = {key: _pad_batch(value, run_batch) if spec["batched"] else value
                      for (key, value), spec in zip(arrays.items(), entry["inputs"])}
        out = self._callable(entry)(self._weights_for(entry), arrays)
        return {key: np.asarray(value)[:batch] for key, value in out.items()}

    def _checked_inputs(self, entry: dict, inputs: Mapping[str, object]) -> dict:
        expected = [spec["name"] for spec in entry["inputs"]]
        if sorted(inputs) != sorted(expected):
            raise ArtifactInputError(f"{self.path}: {entry['name']} takes inputs {expected}; got {sorted(inputs)}")
        arrays, batch = {}, None
        for spec in entry["inputs"]:
            value = inputs[spec["name"]]
            array = value if hasattr(value, "dtype") and hasattr(value, "shape") else np.asarray(value)
            shape = tuple(array.shape)
            # The batch dimension is free: symbolic, or padded up to an exported batch size.
            want = ["b"] + list(spec["shape"][1:]) if spec["batched"] else list(spec["shape"])
            described = "(" + ", ".join(str(d) for d in want) + ")" if want else "() (a scalar)"
            problem = None
            if np.dtype(array.dtype) != np.dtype(spec["dtype"]):
                problem = f"dtype {np.dtype(array.dtype).name}"
            elif len(shape) != len(want) or any(isinstance(w, int) and w != s for w, s in zip(want, shape)):
                problem = f"shape {shape}"
            elif spec["batched"] and shape[0] == 0:
                problem = "an empty batch"
            elif spec["batched"] and batch is not None and shape[0] != batch:
                problem = f"batch {shape[0]} (the other inputs have batch {batch})"
            if problem:
                raise ArtifactInputError(f"{self.path}: {entry['name']} input {spec['name']!r} must be "
                                         f"{spec['dtype']} of shape {described}; got {problem}")
            if spec["batched"]:
                batch = shape[0]
            arrays[spec["name"]] = array
        return arrays

    # ------------------------------------------------------------ prompts and keys

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import CLIPTokenizer  # lazy: slow to import; only text prompts need it

            folder = self.path / self.metadata["prompts"]["tokenizer"]
            if not folder.is_dir():
                raise ArtifactError(f"{self.path}: missing folder {self.metadata['prompts']['tokenizer']}/ "
                                    f"(the CLIP tokenizer)")
            self._tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        return self._tokenizer

    def highlevel_prompt(self, caption: str) -> str:
        """caption + " " + the config's added prompt, as the pipeline builds it."""
        added = self.metadata["prompts"]["added_prompt"]
        return f"{caption} {added}" if added else caption

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """int32 (len(texts), 77) CLIP token ids (padded to max_length, EOS last when truncated)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.metadata["prompts"]["max_length"]
        if not texts:
            return np.zeros((0, length), np.int32)
        encoded = self.tokenizer()(texts, padding="max_length", max_length=length, truncation=True,
                                   return_tensors="np")
        return np.asarray(encoded["input_ids"], np.int32)

    @staticmethod
    def keys_from_seeds(seeds: Sequence[int]) -> np.ndarray:
        """uint32 (B, 2): each image's key data from its seed, as XPSRPipeline derives them."""
        return seed_key_data(seeds)

    # ------------------------------------------------------------ the functions

    def encode_text(self, input_ids) -> np.ndarray:
        """CLIP embeddings (B, 77, D) of token ids (B, 77) int32."""
        return self._call("encode_text", None, {"input_ids": input_ids})["embeddings"]

    def encode_prompts(self, highlevel_prompts: Sequence[str], lowlevel_prompts: Sequence[str]) -> dict:
        """The four embeddings `denoise_step` takes: the prompts (the added prompt appended to each
        high-level one) and the config's two negatives, broadcast to the batch."""
        highlevel_prompts, lowlevel_prompts = list(highlevel_prompts), list(lowlevel_prompts)
        _same_count(self.path, highlevel_prompts, lowlevel_prompts)
        count = len(highlevel_prompts)
        prompts = self.metadata["prompts"]
        ids = np.concatenate([self.tokenize([self.highlevel_prompt(p) for p in highlevel_prompts]),
                              self.tokenize(lowlevel_prompts), np.asarray(prompts["negative_ids"], np.int32)])
        embeds = self.encode_text(ids)
        shape = (count,) + embeds.shape[1:]
        return {"highlevel": embeds[:count], "highlevel_negative": np.broadcast_to(embeds[2 * count], shape),
                "lowlevel": embeds[count:2 * count], "lowlevel_negative": np.broadcast_to(embeds[2 * count + 1], shape)}

    def sample(self, conditioning_uint8, highlevel_prompts: Sequence[str] | None = None,
               lowlevel_prompts: Sequence[str] | None = None, *, highlevel_ids=None, lowlevel_ids=None,
               seeds: Sequence[int] | None = None, keys=None) -> dict:
        """The whole sampling function on preprocessed conditioning images (B, H, W, 3) uint8.

        Prompts as text (the tokenizer of the artifact; the added prompt is appended to each
        high-level one) or as token ids; draws from per-image `seeds` (default: the config's seed)
        or raw `keys` (B, 2) uint32. Returns numpy arrays: images (uint8), latents, latents_init,
        decoded.
        """
        conditioning_uint8 = np.asarray(conditioning_uint8)
        if conditioning_uint8.ndim != 4:
            raise ArtifactInputError(f"{self.path}: sample input 'conditioning' must be uint8 of shape "
                                     f"(b, H, W, 3); got shape {conditioning_uint8.shape}")
        batch = conditioning_uint8.shape[0]
        if highlevel_ids is None or lowlevel_ids is None:
            if highlevel_prompts is None or lowlevel_prompts is None:
                raise ArtifactInputError(f"{self.path}: sample needs highlevel_prompts and lowlevel_prompts, "
                                         f"or highlevel_ids and lowlevel_ids")
            highlevel_prompts, lowlevel_prompts = list(highlevel_prompts), list(lowlevel_prompts)
            _same_count(self.path, highlevel_prompts, lowlevel_prompts)
            highlevel_ids = self.tokenize([self.highlevel_prompt(p) for p in highlevel_prompts])
            lowlevel_ids = self.tokenize(lowlevel_prompts)
        if keys is None:
            seeds = [self.config["seed"]] * batch if seeds is None else list(seeds)
            if len(seeds) != batch:
                raise ArtifactInputError(f"{self.path}: sample: {len(seeds)} seeds for {batch} images")
            keys = self.keys_from_seeds(seeds)
        return self._call("sample", conditioning_uint8.shape[1:3],
                          {"conditioning": conditioning_uint8, "highlevel_ids": highlevel_ids,
                           "lowlevel_ids": lowlevel_ids, "keys": keys})

    def denoise_step(self, latents, timestep, conditioning, embeds: Mapping[str, object]) -> np.ndarray:
        """The guided noise prediction (B, h, w, 4) float32 at integer `timestep` (ControlNet +
        UNet on the classifier-free-guidance pairs, then guidance). conditioning: float32 in [0, 1]
        (B, H, W, 3); embeds: the dict of `encode_prompts`."""
        conditioning = np.asarray(conditioning) if not hasattr(conditioning, "shape") else conditioning
        if len(conditioning.shape) != 4:
            raise ArtifactInputError(f"{self.path}: denoise_step input 'conditioning' must be float32 of shape "
                                     f"(b, H, W, 3); got shape {tuple(conditioning.shape)}")
        missing = [f for f in PROMPT_FIELDS if f not in embeds]
        if missing:
            raise ArtifactInputError(f"{self.path}: denoise_step: embeds lacks {missing}; pass the dict of "
                                     f"encode_prompts")
        inputs = {"latents": latents, "timestep": np.asarray(timestep, np.int32), "conditioning": conditioning,
                  **{f: embeds[f] for f in PROMPT_FIELDS}}
        return self._call("denoise_step", tuple(conditioning.shape[1:3]), inputs)["noise_pred"]


def _same_count(path: Path, highlevel: list, lowlevel: list) -> None:
    if len(highlevel) != len(lowlevel):
        raise ArtifactInputError(f"{path}: {len(highlevel)} high-level prompts but {len(lowlevel)} low-level "
                                 f"prompts; give one of each per image")


def _batch_of(entry: dict, arrays: dict) -> int:
    return next(int(arrays[spec["name"]].shape[0]) for spec in entry["inputs"] if spec["batched"])


def _pad_batch(array, count: int):
    """Repeat the last entry up to `count` rows (the extra results are dropped)."""
    array = np.asarray(array)
    return np.concatenate([array, np.repeat(array[-1:], count - array.shape[0], axis=0)], axis=0)
