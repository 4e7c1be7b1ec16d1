"""Throughput of the grain training pipeline (examples/s) on a synthetic 512 px dataset.

    python -m benchmarks.data_pipeline                       # default sweep, tiny tokenizer
    python -m benchmarks.data_pipeline --threads 4 --workers 0 --steps 100
    python -m benchmarks.data_pipeline --tokenizer /models/sd15/tokenizer

Builds `--examples` synthetic pairs (HR 512 smooth texture, LR 128) into a temporary TFDS
dataset, then for each (threads, workers) setting times `--steps` batches after `--warmup`
batches and prints examples/s. Without --tokenizer a tiny CLIP BPE vocabulary is used
(tests/data_fixtures.py); the real SD-1.5 tokenizer costs a little more per prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time

import cv2
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def synthetic_hr(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth noise + gradient: compresses like a photo, unlike white noise."""
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (size, size, 3)).astype(np.float32), (0, 0), 2)
    ramp = np.linspace(0, 80, size, dtype=np.float32)
    image = (noise - noise.mean()) * 3 + 128 + ramp[None, :, None] - 40
    image += rng.normal(0, 4, image.shape).astype(np.float32)  # sensor-like grain
    return np.clip(image, 0, 255).astype(np.uint8)


def write_work_dir(work_dir: pathlib.Path, count: int, size: int) -> None:
    """A prepare work folder without running the degradation (NaN params, area-downscaled LR)."""
    from xpsr_jax.data import images
    from xpsr_jax.data.degradation import DEGRADATION_PARAM_KEYS

    rng = np.random.default_rng(0)
    lines, captions = [], []
    for index in range(count):
        image_id = f"bench_{index:04d}"
        hr = synthetic_hr(rng, size)
        lr = cv2.resize(hr, (size // 4, size // 4), interpolation=cv2.INTER_AREA)
        images.write_png_atomic(work_dir / "HR" / f"{image_id}.png", hr)
        images.write_png_atomic(work_dir / "LR" / f"{image_id}.png", lr)
        lines.append(json.dumps({"image_id": image_id, "source_file": "synthetic",
                                 "params": {k: math.nan for k in DEGRADATION_PARAM_KEYS}}))
        for source in ("lr", "hr"):
            for task, text in (("highlevel", "a photo of a house by a lake with trees and a "
                                "cloudy sky, mountains in the background"),
                               ("lowlevel", "the image is blurry with visible noise and jpeg "
                                "artifacts, the overall quality is poor")):
                captions.append(json.dumps({"image_id": image_id, "source": source, "task": task,
                                            "text": text, "model": "synthetic", "question": "?"}))
    (work_dir / "degradation.jsonl").write_text("\n".join(lines) + "\n")
    (work_dir / "captions.jsonl").write_text("\n".join(captions) + "\n")


def measure(config, steps: int, warmup: int) -> float:
    """Examples per second of `steps` batches after `warmup` batches."""
    from xpsr_jax.data import pipeline

    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    try:
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        for _ in range(steps):
            next(iterator)
        seconds = time.perf_counter() - start
    finally:
        close = getattr(iterator, "close", None)
        if close:
            close()
    return steps * config.batch_size / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=48, help="synthetic dataset size")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder (default: tiny test one)")
    args = parser.parse_args(argv)

    from xpsr_jax.data import pipeline, tfds_builder

    with tempfile.TemporaryDirectory(prefix="xpsr_bench_") as temp:
        temp = pathlib.Path(temp)
        start = time.perf_counter()
        write_work_dir(temp / "work", args.examples, args.resolution)
        tfds_builder.build_dataset(config_name="prepared", source_dir=temp / "work",
                                   data_dir=temp / "tfds")
        print(f"built {args.examples} examples of {args.resolution} px in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        tokenizer = args.tokenizer
        if not tokenizer:
            from tests.helpers.data_fixtures import build_tiny_clip_tokenizer

            tokenizer = build_tiny_clip_tokenizer(temp / "tokenizer")

        print(f"{'threads':>8} {'workers':>8} {'examples/s':>11}")
        for workers in args.workers:
            for threads in args.threads:
                config = pipeline.default_pipeline_config()
                config.data_dir, config.tokenizer_path = str(temp / "tfds"), tokenizer
                config.resolution, config.batch_size = args.resolution, args.batch_size
                config.num_threads, config.num_workers = threads, workers
                rate = measure(config, args.steps, args.warmup)
                print(f"{threads:>8} {workers:>8} {rate:>11.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
