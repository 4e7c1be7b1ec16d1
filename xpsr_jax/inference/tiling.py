"""Large images: latent tiles with Gaussian blending (the UNet path) and a tiled VAE.

Latent tiles follow the release's pipeline exactly: tiling starts when h * w > tile ** 2, the
tile side is min(tile, h, w), tiles step by (tile - overlap) with the last one flush with the
border, and their noise predictions are blended with the release's Gaussian weights (var 0.01;
its x midpoint is (w - 1) / 2 and its y midpoint h / 2, kept as written).

The tiled VAE follows the release's `vaehook` (its default, non-"fast" mode): the image is cut
into tiles padded by 32 px (encoder) / 11 latent px (decoder), every GroupNorm uses statistics
pooled over all tiles, attention runs per tile, and each tile's valid region is written back, so
the result does not depend on the tile grid except through the per-tile attention and padding.
Two ways to run it, with the same numbers: `run_tiled_streaming` (the default) keeps one tile's
activations in memory and recomputes a pass per GroupNorm; `run_tiled` runs all tiles of a batch
as one vmapped computation whose GroupNorms share statistics with `lax.pmean` over the tile axis
(faster, memory proportional to the image).
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


class _TileGeometry(NamedTuple):
    window_shape: tuple[int, int]  # input window (height, width), equal for every tile
    starts: np.ndarray  # (T, 2) input window (y, x)
    placement: np.ndarray  # (T, 6): output window (y, x) and its valid rows/columns [y0, y1) x [x0, x1)


def _tile_geometry(tiles: list[VAETile], scale: float) -> _TileGeometry:
    placement = []
    for t in tiles:
        vy0, vy1, vx0, vx1 = (int(v * scale) for v in t.valid)
        wy, wx = int(t.window[0] * scale), int(t.window[2] * scale)
        placement.append((wy, wx, vy0 - wy, vy1 - wy, vx0 - wx, vx1 - wx))
    window = (tiles[0].window[1] - tiles[0].window[0], tiles[0].window[3] - tiles[0].window[2])
    return _TileGeometry(window, np.asarray([(t.window[0], t.window[2]) for t in tiles], np.int32),
                         np.asarray(placement, np.int32))


def _cut_window(array: jax.Array, geometry: _TileGeometry, index) -> jax.Array:
    start = jnp.asarray(geometry.starts)[index]
    return jax.lax.dynamic_slice(array, (0, start[0], start[1], 0),
                                 (array.shape[0], *geometry.window_shape, array.shape[-1]))


def _write_valid(result: jax.Array, tile_output: jax.Array, geometry: _TileGeometry, index) -> jax.Array:
    """`result` with tile `index`'s valid region taken from its output window `tile_output`."""
    wy, wx, y0, y1, x0, x1 = (jnp.asarray(geometry.placement)[index, k] for k in range(6))
    out_h, out_w = tile_output.shape[1:3]
    rows, cols = jnp.arange(out_h)[:, None], jnp.arange(out_w)[None, :]
    start = (0, wy, wx, 0)
    current = jax.lax.dynamic_slice(result, start, tile_output.shape)
    valid = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
    return jax.lax.dynamic_update_slice(result, jnp.where(valid, tile_output, current), start)


def run_tiled(fn, array: jax.Array, tiles: list[VAETile], scale: float) -> jax.Array:
    """Apply `fn` (a tile-synced encoder or decoder) to every tile window of `array` (N, H, W, C)
    at once (vmapped over tiles) and assemble the valid regions; output = input size * `scale`.

    Windows are cut and valid regions written back in loops over the tile index (every window has
    the same size; each output pixel lies in exactly one valid region), so the program does not
    grow with the tile count. Memory holds every tile's activations at once: see
    `run_tiled_streaming` for the bounded-memory version."""
    n, height, width, _ = array.shape
    geometry = _tile_geometry(tiles, scale)
    windows = jax.vmap(lambda index: _cut_window(array, geometry, index))(jnp.arange(len(tiles)))
    outputs = jax.vmap(fn, axis_name=VAE_TILE_AXIS)(windows)
    result = jnp.zeros((n, int(height * scale), int(width * scale), outputs.shape[-1]), outputs.dtype)
    return jax.lax.fori_loop(0, len(tiles), lambda i, r: _write_valid(r, outputs[i], geometry, i), result)


class _StreamedStatistics:
    """The `statistics_source` of every GroupNorm during `run_tiled_streaming`'s trace.

    Pass `p` normalises GroupNorm i < p with its pooled statistics from `table` (the earlier
    passes' results) and the rest with the tile's own; every call records the tile's own
    (mean, var), which the stage that ran it returns, so pass p can pool GroupNorm p's.
    """

    def __init__(self, norms):
        self.index = {id(norm): i for i, norm in enumerate(norms)}
        self.table = self.pass_index = None
        self.recorded: list[jax.Array] = []

    def __call__(self, norm, mean, var):
        i = self.index[id(norm)]
        self.recorded.append(jnp.stack([mean, var]))
        pooled = i < self.pass_index
        return jnp.where(pooled, self.table[i, 0], mean), jnp.where(pooled, self.table[i, 1], var)


def run_tiled_streaming(module: nnx.Module, stages_of, array: jax.Array, tiles: list[VAETile],
                        scale: float) -> jax.Array:
    """The tiled VAE in O(tile) memory: the stages `stages_of(module)` lists (e.g. a VAE and
    `AutoencoderKL.decode_stages`) run on one tile window of `array` (N, H, W, C) at a time;
    output = input size * `scale`.

    GroupNorm statistics are pooled over all tiles as in `run_tiled` (tile means averaged, the
    variance by the parallel-variance formula: the same numbers, no tile kept). Since GroupNorm k's
    statistics depend on every earlier one's, pass k (of K + 1) loops over the tiles running the
    stages up to GroupNorm k (later stages are skipped by `lax.cond`) and pools its statistics; the
    last pass runs every stage and writes each tile's valid region. Memory: one tile's activations,
    the input and the output; compute: about K/2 forward passes in total (the price of exact
    statistics without storing O(image) activations; `run_tiled` is faster where memory allows).
    One traced forward serves every pass, so the program does not grow with K or the tile count.
    """
    n, height, width, _ = array.shape
    stages = stages_of(nnx.clone(module))  # a copy made in this trace: its GroupNorms take the source
    norms = [norm for stage in stages for norm in stage.norms]
    if not norms:
        raise ValueError("run_tiled_streaming: the stages apply no GroupNorm; tile them with run_tiled")
    first_norm, count = [], 0  # per stage: the index of its first GroupNorm (or of the next one)
    for stage in stages:
        first_norm.append(count)
        count += len(stage.norms)
    source = _StreamedStatistics(norms)
    geometry = _tile_geometry(tiles, scale)
    window = jax.ShapeDtypeStruct((n, *geometry.window_shape, array.shape[-1]), array.dtype)

    def stage_fn(stage):
        def run(x):
            source.recorded = []
            y = stage.fn(x)
            return y, jnp.stack(source.recorded) if stage.norms else None
        return run

    def forward(x, table, pass_index):
        source.table, source.pass_index = table, pass_index
        statistics = None
        for stage, first in zip(stages, first_norm):
            run = stage_fn(stage)
            if first == 0:  # needed by every pass
                x, recorded = run(x)
            else:
                skipped = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, x))
                x, recorded = jax.lax.cond(first <= pass_index, run, lambda _: skipped, x)
            if recorded is not None:
                own = recorded[jnp.clip(pass_index - first, 0, len(stage.norms) - 1)]
                statistics = own if statistics is None else jnp.where(
                    (pass_index >= first) & (pass_index < first + len(stage.norms)), own, statistics)
        return x, statistics

    for norm in norms:
        norm.statistics_source = source
    out_shape, stats_shape = jax.eval_shape(lambda w: forward(w, jnp.zeros((len(norms) + 1, 2, n, 1, 1, 1)),
                                                               jnp.int32(0)), window)
    table = jnp.zeros((len(norms) + 1,) + stats_shape.shape, jnp.float32)  # row K: the last pass's, unused
    result = jnp.zeros((n, int(height * scale), int(width * scale), out_shape.shape[-1]), out_shape.dtype)

    def one_pass(pass_index, carry):
        table, result = carry

        def one_tile(index, carry):
            tile_statistics, result = carry
            out, statistics = forward(_cut_window(array, geometry, index), table, pass_index)
            # Every pass writes; the last pass's values are the ones that remain.
            return tile_statistics.at[index].set(statistics), _write_valid(result, out, geometry, index)

        tile_statistics = jnp.zeros((len(tiles),) + stats_shape.shape, jnp.float32)
        tile_statistics, result = jax.lax.fori_loop(0, len(tiles), one_tile, (tile_statistics, result))
        means, variances = tile_statistics[:, 0], tile_statistics[:, 1]
        mean = means.mean(axis=0)
        variance = (variances + jnp.square(means - mean)).mean(axis=0)  # equal-size windows
        return table.at[pass_index].set(jnp.stack([mean, variance])), result

    _, result = jax.lax.fori_loop(0, len(norms) + 1, one_pass, (table, result))
    return result
