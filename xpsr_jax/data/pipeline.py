"""grain input pipeline for XPSR training over the `xpsr_pairs` TFDS dataset (no TensorFlow).

    config = default_pipeline_config()
    config.data_dir, config.tokenizer_path = "tfds", "sd15/tokenizer"
    iterator = make_train_iterator(config)          # process index/count from JAX
    batch = next(iterator)
    # batch["pixel_values"]             float32 (B, R, R, 3) in [-1, 1]   HR crop
    # batch["conditioning_pixel_values"] float32 (B, R, R, 3) in [0, 1]   LR x4 bicubic (or HR)
    # batch["highlevel_input_ids"]      int32 (B, 77)
    # batch["lowlevel_input_ids"]       int32 (B, 77)
    # batch["image_id"]                 str (B,) only with config.include_image_id
    saved = iterator_state_bytes(iterator)          # checkpoint this
    restore_iterator_state(iterator, saved)         # continues with the same next batch

Order of operations (grain `MapDataset`, then `IterDataset`):
source -> global shuffle (reshuffled every epoch) -> repeat forever -> per-example transform
(randomness from `(seed, global index)`) -> skip `start_index` examples -> blocks of
`batch_size` consecutive examples -> this process's blocks `[process_index::process_count]`
-> threads -> tokenize -> optional worker processes.

Every example's crop, flip and 10%-rule draw depend only on the seed and its position in the
global stream, so they do not depend on the number of processes, threads, workers or restarts.
Step `s` of a run with P processes reads the global stream positions
`[start_index + s*G, start_index + (s+1)*G)` with `G = batch_size * P`, process `p` the block
`p`: the global batch, laid out process by process, is the same for any process count with the
same G, and a resumed run only needs the global position (`start_index = steps * G`).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import cv2
import grain
import jax
import numpy as np
from absl import flags
from ml_collections import config_dict

from xpsr_jax.cli_config import ConfigError, invalid_value
from xpsr_jax.models.tokenizer import load_clip_tokenizer, tokenize

HIGHLEVEL_PROMPT_SOURCES = ("hr", "lr", "empty")


def default_pipeline_config() -> config_dict.ConfigDict:
    """Defaults of the training input pipeline (locked ConfigDict)."""
    config = config_dict.ConfigDict()
    config.data_dir = config_dict.placeholder(str)  # TFDS data_dir holding xpsr_pairs
    config.dataset = "xpsr_pairs/prepared"  # TFDS name[/config][:version]
    config.split = "train"
    config.seed = 0
    config.resolution = 512  # HR crop side; the LR crop is resolution / scale
    config.scale = 4
    config.batch_size = 2  # per process
    config.random_flip = True
    # Official train.py: LocalImageDataset(original_image_ratio=0.1): conditioning = HR image
    # and low-level prompt = the HR image's quality description.
    config.hr_conditioning_prob = 0.1
    # "hr": the HR caption (paper); "lr": the LR caption; "empty": "" as the released
    # training script feeds the networks.
    config.highlevel_prompt_source = "hr"
    config.tokenizer_path = config_dict.placeholder(str)  # an SD-1.5 style tokenizer/ folder
    config.max_length = 77
    config.num_threads = 4  # threads per process reading + decoding + cropping
    config.prefetch_buffer_size = 32  # examples buffered by those threads
    config.num_workers = 0  # extra worker processes (grain mp_prefetch); 0: none
    config.worker_buffer_size = 2  # batches buffered per worker process
    config.include_image_id = False  # adds a str array "image_id" (not for jax.device_put)
    config.lock()
    return config


def validate_pipeline_config(config: config_dict.ConfigDict) -> None:
    """Raises ConfigError (a ValueError) naming the first bad key of a pipeline config."""
    def bad(key: str, valid: str) -> ConfigError:
        return invalid_value(key, config[key], valid, "pipeline")

    if not config.data_dir:
        raise bad("data_dir", "the TFDS data_dir holding the built xpsr_pairs dataset")
    if not config.tokenizer_path:
        raise bad("tokenizer_path", "a CLIP tokenizer folder (vocab.json, merges.txt)")
    if config.highlevel_prompt_source not in HIGHLEVEL_PROMPT_SOURCES:
        raise bad("highlevel_prompt_source", " | ".join(HIGHLEVEL_PROMPT_SOURCES))
    if not 0.0 <= config.hr_conditioning_prob <= 1.0:
        raise bad("hr_conditioning_prob", "a probability in [0, 1]")
    if config.scale < 1:
        raise bad("scale", "an integer >= 1")
    if config.resolution < 1 or config.resolution % config.scale:
        raise bad("resolution", f"a positive multiple of scale={config.scale}")
    for key in ("batch_size", "max_length"):
        if config[key] < 1:
            raise bad(key, "an integer >= 1")
    for key in ("num_threads", "num_workers", "prefetch_buffer_size", "worker_buffer_size"):
        if config[key] < 0:
            raise bad(key, "an integer >= 0")
    if not 0 <= config.seed < 2**32:
        raise bad("seed", "an integer in [0, 2**32)")


# ----------------------------------------------------------------------------- per example


def example_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of the example at global stream position `index`."""
    return np.random.default_rng([seed, index])


def paired_random_crop(hr: np.ndarray, lr: np.ndarray, resolution: int, scale: int,
                       rng: np.random.Generator, image_id: str = "?"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """paired_random_crop(hr, lr, resolution, scale, rng) -> (hr crop, lr crop), aligned.

    `lr` is either at native size (HR / scale; LR crop side resolution / scale, HR offsets on
    a multiple of `scale`) or already upsampled to the HR size (official layout; same crop).
    """
    hr_h, hr_w = hr.shape[:2]
    lr_h, lr_w = lr.shape[:2]
    if (lr_h, lr_w) == (hr_h, hr_w):
        factor = 1
    elif (lr_h * scale, lr_w * scale) == (hr_h, hr_w):
        factor = scale
    else:
        raise ValueError(
            f"image {image_id!r}: HR {hr_w}x{hr_h} and LR {lr_w}x{lr_h} are neither x{scale} "
            "apart nor the same size"
        )
    if hr_h < resolution or hr_w < resolution:
        raise ValueError(
            f"image {image_id!r}: HR {hr_w}x{hr_h} is smaller than the crop resolution {resolution}"
        )
    lr_crop = resolution // factor
    top = int(rng.integers(0, lr_h - lr_crop + 1)) * factor
    left = int(rng.integers(0, lr_w - lr_crop + 1)) * factor
    hr_patch = hr[top:top + resolution, left:left + resolution]
    lr_patch = lr[top // factor:top // factor + lr_crop, left // factor:left // factor + lr_crop]
    return hr_patch, lr_patch


def upsample_bicubic(lr: np.ndarray, size: int) -> np.ndarray:
    """upsample_bicubic((h, w, 3) uint8, size) -> (size, size, 3) uint8.

    OpenCV INTER_CUBIC (Keys a = -0.75, half-pixel centres) equals torch
    F.interpolate(mode="bicubic", align_corners=False), which the official make_train.py
    uses to upsample the LR it trains on; PIL's BICUBIC uses a = -0.5. Staying in uint8
    matches the official LR, which is stored as an 8-bit PNG after upsampling.
    """
    if lr.shape[0] == size and lr.shape[1] == size:
        return lr
    return cv2.resize(lr, (size, size), interpolation=cv2.INTER_CUBIC)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def select_highlevel_prompt(record: dict, source: str) -> str:
    """The high-level prompt for `source` in HIGHLEVEL_PROMPT_SOURCES.

    "hr" falls back to the LR caption when the HR caption is empty, as the official loader
    does when highlevel_prompt_GT/*.txt is empty.
    """
    if source == "empty":
        return ""
    lr_prompt = _text(record["highlevel_prompt_lr"])
    if source == "lr":
        return lr_prompt
    return _text(record["highlevel_prompt_hr"]) or lr_prompt


class TrainExampleTransform:
    """TrainExampleTransform(config)(index, record) -> example with prompt strings.

    The draws, in fixed order: crop offsets, flip, HR-conditioning coin.
    """

    def __init__(self, config: config_dict.ConfigDict):
        self.seed = int(config.seed)
        self.resolution = int(config.resolution)
        self.scale = int(config.scale)
        self.random_flip = bool(config.random_flip)
        self.hr_conditioning_prob = float(config.hr_conditioning_prob)
        self.highlevel_prompt_source = str(config.highlevel_prompt_source)
        self.include_image_id = bool(config.include_image_id)

    def __call__(self, index: int, record: dict) -> dict:
        rng = example_rng(self.seed, index)
        image_id = _text(record["image_id"])
        hr, lr = paired_random_crop(record["hr"], record["lr"], self.resolution, self.scale,
                                    rng, image_id)
        flip = rng.random() < 0.5
        if self.random_flip and flip:
            hr, lr = hr[:, ::-1], lr[:, ::-1]
        use_hr_conditioning = rng.random() < self.hr_conditioning_prob
        if use_hr_conditioning:
            conditioning = hr
            lowlevel_prompt = _text(record["lowlevel_prompt_hr"])
        else:
            conditioning = upsample_bicubic(np.ascontiguousarray(lr), self.resolution)
            lowlevel_prompt = _text(record["lowlevel_prompt_lr"])
        example = {
            "pixel_values": hr.astype(np.float32) / 255.0 * 2.0 - 1.0,
            "conditioning_pixel_values": conditioning.astype(np.float32) / 255.0,
            "highlevel_prompt": select_highlevel_prompt(record, self.highlevel_prompt_source),
            "lowlevel_prompt": lowlevel_prompt,
        }
        if self.include_image_id:
            example["image_id"] = image_id
        return example


# ----------------------------------------------------------------------------- per batch


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """load_tokenizer(path) -> transformers.CLIPTokenizer (cached per process); the loader of
    xpsr_jax.models.tokenizer, so training and inference tokenize alike."""
    try:
        return load_clip_tokenizer(path)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"pipeline config: tokenizer_path={path!r} is not a loadable CLIP tokenizer folder "
            f"(needs vocab.json and merges.txt): {error}"
        ) from error


class TokenizeBatch:
    """TokenizeBatch(tokenizer_path, max_length)(batch) -> batch with *_input_ids.

    Runs once per batch on one thread: fast tokenizers are not safe to call from several
    threads at once. The tokenizer is loaded lazily in each worker process.
    """

    def __init__(self, tokenizer_path: str, max_length: int):
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length

    def __call__(self, batch: dict) -> dict:
        tokenizer = load_tokenizer(self.tokenizer_path)
        batch = dict(batch)
        for kind in ("highlevel", "lowlevel"):
            texts = [str(t) for t in batch.pop(f"{kind}_prompt").tolist()]
            batch[f"{kind}_input_ids"] = tokenize(tokenizer, texts, self.max_length)
        return batch


# ----------------------------------------------------------------------------- assembly


def open_data_source(config: config_dict.ConfigDict):
    """The TFDS random-access source of `config.dataset` / `config.split` (no TensorFlow)."""
    import tensorflow_datasets as tfds  # lazy: seconds to import; only opening a dataset needs it

    try:
        return tfds.data_source(config.dataset, split=config.split, data_dir=config.data_dir)
    except Exception as error:  # tfds raises several types for a missing dataset
        raise ValueError(
            f"pipeline config: cannot open dataset={config.dataset!r} split={config.split!r} "
            f"in data_dir={config.data_dir!r} (build it with python -m xpsr_jax.data.prepare): "
            f"{error}"
        ) from error


def _process_defaults(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def make_train_dataset(config: config_dict.ConfigDict, *, process_index: int | None = None,
                       process_count: int | None = None, start_index: int = 0
                       ) -> grain.IterDataset:
    """make_train_dataset(config, *, process_index=None, process_count=None, start_index=0)
    -> IterDataset of this process's batches, infinite. Defaults: jax.process_index() /
    process_count(). `start_index`: the global stream position to start at (resume)."""
    validate_pipeline_config(config)
    if start_index < 0:
        raise ValueError(f"start_index={start_index} is invalid; valid: an integer >= 0")
    process_index, process_count = _process_defaults(process_index, process_count)
    load_tokenizer(config.tokenizer_path)  # fail now, not inside a worker
    source = open_data_source(config)
    if len(source) < process_count:
        raise ValueError(
            f"dataset has {len(source)} examples, fewer than {process_count} processes")

    dataset = (
        grain.MapDataset.source(source)
        .shuffle(seed=config.seed)
        .repeat()  # forever; shuffle sees the epoch in the index and reshuffles
        .map_with_index(TrainExampleTransform(config))
        [start_index:]
        .batch(config.batch_size, drop_remainder=True)  # blocks of consecutive positions
        [process_index::process_count]
    )
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=config.num_threads,
                          prefetch_buffer_size=config.prefetch_buffer_size)
    ).map(TokenizeBatch(config.tokenizer_path, config.max_length))
    if config.num_workers > 0:

        if not flags.FLAGS.is_parsed():
            # grain's worker start reads absl flags; a program without absl.app never parses
            # them. Marking them parsed keeps every flag at its default.
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
        ))
    return iter_dataset


def make_train_iterator(config: config_dict.ConfigDict, *, process_index: int | None = None,
                        process_count: int | None = None, start_index: int = 0
                        ) -> grain.DatasetIterator:
    """make_train_iterator(config, *, process_index=None, process_count=None, start_index=0)
    -> iterator with get_state() / set_state(); see the module docstring for the layout."""
    return iter(make_train_dataset(config, process_index=process_index,
                                   process_count=process_count, start_index=start_index))


def iterator_state_bytes(iterator: grain.DatasetIterator) -> bytes:
    """The iterator's position as JSON bytes (store it with the model checkpoint)."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode("utf-8")


def restore_iterator_state(iterator: grain.DatasetIterator, state: bytes | dict) -> None:
    """Moves `iterator` (built from the same config) to a position saved by iterator_state_bytes."""
    if isinstance(state, (bytes, bytearray)):
        state = json.loads(state.decode("utf-8"))
    iterator.set_state(state)
