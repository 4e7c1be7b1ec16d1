"""Large images: latent tiles with Gaussian blending (the UNet path) and a tiled VAE.

Latent tiles follow the release's pipeline exactly: tiling starts when h * w > tile ** 2, the
tile side is min(tile, h, w), tiles step by (tile - overlap) with the last one flush with the
border, and their noise predictions are blended with the release's Gaussian weights (var 0.01;
its x midpoint is (w - 1) / 2 and its y midpoint h / 2, kept as written).

The tiled VAE follows the release's `vaehook` (its default, non-"fast" mode): the image is cut
into tiles padded by 32 px (encoder) / 11 latent px (decoder), every GroupNorm uses statistics
pooled over all tiles, attention runs per tile, and each tile's valid region is written back.
Here all tiles of a batch run as one vmapped computation whose GroupNorms share statistics with
`lax.pmean` over the tile axis, so the result does not depend on the tile grid except through
the per-tile attention and padding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xpsr_jax.models.layers import GroupNorm

VAE_ENCODER_PAD = 32  # image px
VAE_DECODER_PAD = 11  # latent px
VAE_TILE_AXIS = "vae_tiles"


# ---------------------------------------------------------------- latent tiles (UNet + ControlNet)

def latent_tiling_applies(height: int, width: int, tile_size: int) -> bool:
    """The release tiles only when the latent has more than tile_size ** 2 pixels."""
    return height * width > tile_size * tile_size


def _grid_count(extent: int, tile: int, overlap: int) -> int:
    count, covered = 0, 0
    while covered < extent:
        covered = max(count * tile - overlap * count, 0) + tile
        count += 1
    return count


def latent_tile_offsets(height: int, width: int, tile_size: int, overlap: int) -> tuple[int, list[tuple[int, int]]]:
    """(tile side, [(y, x) offsets]) in the release's order (x-major, as its `row` loop)."""
    tile = min(tile_size, height, width)
    columns = _grid_count(width, tile, overlap)
    rows = _grid_count(height, tile, overlap)
    offsets = []
    for i in range(columns):
        x = width - tile if i == columns - 1 else max(i * tile - overlap * i, 0)
        for j in range(rows):
            y = height - tile if j == rows - 1 else max(j * tile - overlap * j, 0)
            offsets.append((y, x))
    return tile, offsets


def gaussian_tile_weights(tile_height: int, tile_width: int) -> np.ndarray:
    """The release's `_gaussian_weights` (float64, (tile_height, tile_width))."""
    var = 0.01
    x = np.arange(tile_width, dtype=np.float64)
    x_mid = (tile_width - 1) / 2
    x_probs = np.exp(-(x - x_mid) ** 2 / (tile_width * tile_width) / (2 * var)) / np.sqrt(2 * np.pi * var)
    y = np.arange(tile_height, dtype=np.float64)
    y_mid = tile_height / 2
    y_probs = np.exp(-(y - y_mid) ** 2 / (tile_height * tile_height) / (2 * var)) / np.sqrt(2 * np.pi * var)
    return np.outer(y_probs, x_probs)


def tiled_model_call(model_fn, latents: jax.Array, image: jax.Array, *, tile_size: int, overlap: int,
                     tile_batch_size: int) -> jax.Array:
    """Blend `model_fn(latent_tile, image_tile, tiles_per_sample)` over the release's latent tiles.

    latents (N, h, w, C), image (N, 8h, 8w, 3); `model_fn` gets (N * k, t, t, C) and
    (N * k, 8t, 8t, 3) batch-major (sample n's k tiles are rows n*k .. n*k+k-1) and returns
    predictions of the latent tile's shape. Tiles run `tile_batch_size` at a time in a scan whose
    carry is the blend buffer, so the only full-latent arrays are that buffer and the input:
    memory is one group of tiles, and the program's size does not grow with the tile count
    (441 tiles for a 2048 px output at 16-latent-px tiles).
    """
    n, height, width, channels = latents.shape
    tile, offsets = latent_tile_offsets(height, width, tile_size, overlap)
    factor = image.shape[1] // height
    group = min(tile_batch_size, len(offsets))
    padded = offsets + [offsets[-1]] * (-len(offsets) % group)  # repeats are computed, not added
    groups = np.asarray(padded, np.int32).reshape(-1, group, 2)
    is_tile = (np.arange(len(padded)) < len(offsets)).reshape(-1, group)
    weights = gaussian_tile_weights(tile, tile)

    def crop(array, group_offsets, scale):
        def one(offset):
            start = (0, offset[0] * scale, offset[1] * scale, 0)
            return jax.lax.dynamic_slice(array, start, (n, tile * scale, tile * scale, array.shape[-1]))
        tiles = jax.vmap(one)(group_offsets)  # (k, N, ...)
        return jnp.swapaxes(tiles, 0, 1).reshape((n * group,) + tiles.shape[2:])

    def run_group(blended, inputs):
        group_offsets, group_is_tile = inputs
        out = model_fn(crop(latents, group_offsets, 1), crop(image, group_offsets, factor), group)
        out = jnp.swapaxes(out.reshape((n, group) + out.shape[1:]), 0, 1)  # (k, N, t, t, C)

        def add_tile(index, blended):  # tile by tile, in the order of `offsets`
            start = (0, group_offsets[index, 0], group_offsets[index, 1], 0)
            window = jax.lax.dynamic_slice(blended, start, (n, tile, tile, channels))
            update = window + out[index].astype(jnp.float32) * jnp.asarray(weights)[None, :, :, None]
            return jax.lax.dynamic_update_slice(blended, jnp.where(group_is_tile[index], update, window), start)

        return jax.lax.fori_loop(0, group, add_tile, blended), None

    blended, _ = jax.lax.scan(run_group, jnp.zeros(latents.shape, jnp.float32),
                              (jnp.asarray(groups), jnp.asarray(is_tile)))
    contributors = np.zeros((height, width), np.float32)  # the same float32 sums, on the host
    for y, x in offsets:
        contributors[y:y + tile, x:x + tile] += weights
    return blended / jnp.asarray(contributors)[None, :, :, None]


# ---------------------------------------------------------------- tiled VAE

class VAETile(NamedTuple):
    window: tuple[int, int, int, int]  # input (y0, y1, x0, x1)
    valid: tuple[int, int, int, int]  # the part of the output this tile writes, in output coordinates


def _best_tile_size(lower: int, upper: int) -> int:
    """vaehook's `get_best_tile_size`: round up to a multiple of 32, 16, ... 2 that fits `upper`."""
    divider = 32
    while divider >= 2:
        remainder = lower % divider
        if remainder == 0:
            return lower
        candidate = lower - remainder + divider
        if candidate <= upper:
            return candidate
        divider //= 2
    return lower


def _axis_tiles(extent: int, tile_size: int, pad: int, align: int) -> list[tuple[int, int, int, int]]:
    """[(window start, window end, valid start, valid end)] along one axis, equal window sizes."""
    count = max(math.ceil((extent - 2 * pad) / tile_size), 1)
    core = _best_tile_size(math.ceil((extent - 2 * pad) / count), tile_size)
    core = -(-core // align) * align
    window = min(core + 2 * pad, extent)
    tiles = []
    for i in range(count):
        start, end = pad + i * core, min(pad + (i + 1) * core, extent)
        if start >= extent - pad and i > 0:
            break  # rounding made the grid longer than the image
        valid_start = 0 if i == 0 else start
        valid_end = extent if end >= extent - pad else end
        window_start = min(max(start - pad, 0), extent - window)
        tiles.append((window_start, window_start + window, valid_start, valid_end))
    return tiles


def vae_tiles(height: int, width: int, tile_size: int, pad: int, *, align: int = 1) -> list[VAETile] | None:
    """The tile grid of an input, or None when it is small enough to run whole (as vaehook)."""
    if max(height, width) <= 2 * pad + tile_size:
        return None
    return [VAETile((ys, ye, xs, xe), (vys, vye, vxs, vxe))
            for ys, ye, vys, vye in _axis_tiles(height, tile_size, pad, align)
            for xs, xe, vxs, vxe in _axis_tiles(width, tile_size, pad, align)]


def with_tile_synced_group_norm(module: nnx.Module) -> nnx.Module:
    """A copy of `module` whose GroupNorms pool their statistics over the vmapped VAE tile axis."""
    synced = nnx.clone(module)
    for _, child in nnx.iter_modules(synced):
        if isinstance(child, GroupNorm):
            child.stats_axis_name = VAE_TILE_AXIS
    return synced


def run_tiled(fn, array: jax.Array, tiles: list[VAETile], scale: float) -> jax.Array:
    """Apply `fn` (a tile-synced encoder or decoder) to every tile window of `array` (N, H, W, C)
    at once (vmapped over tiles) and assemble the valid regions; output = input size * `scale`.

    Windows are cut and valid regions written back in loops over the tile index (every window has
    the same size; each output pixel lies in exactly one valid region), so the program does not
    grow with the tile count."""
    n, height, width, channels = array.shape
    window_h, window_w = tiles[0].window[1] - tiles[0].window[0], tiles[0].window[3] - tiles[0].window[2]
    starts = jnp.asarray([(t.window[0], t.window[2]) for t in tiles], jnp.int32)
    windows = jax.vmap(lambda start: jax.lax.dynamic_slice(array, (0, start[0], start[1], 0),
                                                           (n, window_h, window_w, channels)))(starts)
    outputs = jax.vmap(fn, axis_name=VAE_TILE_AXIS)(windows)
    out_h, out_w = outputs.shape[2:4]
    # Per tile: where its output window goes, and its valid region inside that window.
    placement = []
    for t in tiles:
        vy0, vy1, vx0, vx1 = (int(v * scale) for v in t.valid)
        wy, wx = int(t.window[0] * scale), int(t.window[2] * scale)
        placement.append((wy, wx, vy0 - wy, vy1 - wy, vx0 - wx, vx1 - wx))
    placement = jnp.asarray(placement, jnp.int32)
    rows, cols = jnp.arange(out_h)[:, None], jnp.arange(out_w)[None, :]

    def write(index, result):
        wy, wx, y0, y1, x0, x1 = (placement[index, k] for k in range(6))
        start = (0, wy, wx, 0)
        current = jax.lax.dynamic_slice(result, start, (n, out_h, out_w, outputs.shape[-1]))
        valid = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
        return jax.lax.dynamic_update_slice(result, jnp.where(valid, outputs[index], current), start)

    result = jnp.zeros((n, int(height * scale), int(width * scale), outputs.shape[-1]), outputs.dtype)
    return jax.lax.fori_loop(0, len(tiles), write, result)
