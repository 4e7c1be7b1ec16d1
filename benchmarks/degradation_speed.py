"""Real-ESRGAN degradation speed: crops per second on synthetic textured HR crops.

    python -m benchmarks.degradation_speed --crops 50 --size 512 --threads 1
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
from tqdm import tqdm

from xpsr_jax.data.degradation import default_degradation_config, degrade, to_uint8


def synthetic_hr(size: int, seed: int) -> np.ndarray:
    """A textured test image (smoothed noise + gradients), uint8 RGB."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.uniform(0, 1, (size, size, 3)).astype(np.float32), (0, 0), 3)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    texture = 0.1 * (noise - noise.mean()) / (noise.std() + 1e-6)
    return to_uint8(texture + ramp[None, :, None] * 0.6 + 0.2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=50, help="how many crops to degrade")
    parser.add_argument("--size", type=int, default=512, help="crop side")
    parser.add_argument("--threads", type=int, default=1, help="cv2 threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cv2.setNumThreads(args.threads)
    config = default_degradation_config()
    hr = synthetic_hr(args.size, args.seed)
    start = time.perf_counter()
    for example_id in tqdm(range(args.crops), desc=f"degrading {args.size}px crops"):
        degrade(hr, config, seed=args.seed, example_id=example_id)
    rate = args.crops / (time.perf_counter() - start)
    print(f"{rate:.2f} crops/s ({args.size}x{args.size}, cv2 threads {args.threads})")


if __name__ == "__main__":
    main()
