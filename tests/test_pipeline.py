"""The grain training pipeline over a tiny built `xpsr_pairs` dataset (64 px HR, 16 px LR)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tests.helpers.data_fixtures import build_tiny_clip_tokenizer, caption_text, write_prepared_work_dir
from xpsr_jax.data import images, pipeline, tfds_builder
from xpsr_jax.models.tokenizer import tokenize

NUM_EXAMPLES = 6
RESOLUTION = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(data_dir, tokenizer folder, {image_id: (hr, lr) uint8})."""
    root = tmp_path_factory.mktemp("pipeline")
    ids = write_prepared_work_dir(root / "work", count=NUM_EXAMPLES, hr_size=64)
    tfds_builder.build_dataset(config_name="prepared", source_dir=root / "work",
                               data_dir=root / "tfds")
    pairs = {i: (images.read_rgb(root / "work" / "HR" / f"{i}.png"),
                 images.read_rgb(root / "work" / "LR" / f"{i}.png")) for i in ids}
    return str(root / "tfds"), build_tiny_clip_tokenizer(root / "tokenizer"), pairs


def make_config(built, **overrides):
    config = pipeline.default_pipeline_config()
    config.data_dir, config.tokenizer_path, _ = built
    config.resolution = RESOLUTION
    config.batch_size = 2
    config.num_threads = 2
    config.include_image_id = True
    for key, value in overrides.items():
        config[key] = value
    return config


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def token_ids(dataset, text):
    tokenizer = pipeline.load_tokenizer(dataset[1])
    return tokenize(tokenizer, [text], 77)[0]


def find_crop(image, patch):
    """(top, left, flipped) where `patch` sits in `image` (maybe mirrored), else None."""
    size = patch.shape[0]
    for flipped, candidate in ((False, patch), (True, patch[:, ::-1])):
        for top in range(image.shape[0] - size + 1):
            for left in range(image.shape[1] - size + 1):
                if np.array_equal(image[top:top + size, left:left + size], candidate):
                    return top, left, flipped
    return None


def test_batches_are_aligned_crops_with_right_shapes_and_ranges(dataset):
    iterator = pipeline.make_train_iterator(make_config(dataset, hr_conditioning_prob=0.0),
                                            process_index=0, process_count=1)
    flips = set()
    for batch in take(iterator, 3):
        assert batch["pixel_values"].shape == (2, RESOLUTION, RESOLUTION, 3)
        assert batch["conditioning_pixel_values"].shape == (2, RESOLUTION, RESOLUTION, 3)
        assert batch["pixel_values"].dtype == np.float32
        assert batch["conditioning_pixel_values"].dtype == np.float32
        assert batch["highlevel_input_ids"].shape == (2, 77)
        assert batch["highlevel_input_ids"].dtype == np.int32
        assert batch["lowlevel_input_ids"].dtype == np.int32
        assert -1.0 <= batch["pixel_values"].min() < batch["pixel_values"].max() <= 1.0
        assert 0.0 <= batch["conditioning_pixel_values"].min()
        assert batch["conditioning_pixel_values"].max() <= 1.0
        for row, image_id in enumerate(batch["image_id"]):
            hr, lr = dataset[2][str(image_id)]
            hr_patch = np.round((batch["pixel_values"][row] + 1.0) * 127.5).astype(np.uint8)
            found = find_crop(hr, hr_patch)
            assert found is not None, "pixel_values is not a crop of the HR image"
            top, left, flipped = found
            flips.add(flipped)
            assert top % 4 == 0 and left % 4 == 0  # LR-aligned
            lr_size = RESOLUTION // 4
            lr_patch = lr[top // 4:top // 4 + lr_size, left // 4:left // 4 + lr_size]
            if flipped:
                lr_patch = lr_patch[:, ::-1]
            expected = cv2.resize(np.ascontiguousarray(lr_patch), (RESOLUTION, RESOLUTION),
                                  interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
            np.testing.assert_array_equal(batch["conditioning_pixel_values"][row], expected)
            np.testing.assert_array_equal(
                batch["lowlevel_input_ids"][row],
                token_ids(dataset, caption_text(str(image_id), "lr", "lowlevel")))
    assert flips == {False, True}


def test_processes_see_disjoint_examples_that_cover_the_dataset(dataset):
    config = make_config(dataset, batch_size=1)
    seen = []
    for process_index in (0, 1):
        iterator = pipeline.make_train_iterator(config, process_index=process_index,
                                                process_count=2)
        seen.append([str(b["image_id"][0]) for b in take(iterator, NUM_EXAMPLES // 2)])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(dataset[2])


def test_every_epoch_covers_the_dataset_in_a_new_order(dataset):
    iterator = pipeline.make_train_iterator(make_config(dataset, batch_size=1),
                                            process_index=0, process_count=1)
    order = [str(b["image_id"][0]) for b in take(iterator, 2 * NUM_EXAMPLES)]
    first, second = order[:NUM_EXAMPLES], order[NUM_EXAMPLES:]
    assert sorted(first) == sorted(second) == sorted(dataset[2])
    assert first != second


def test_restored_state_continues_with_the_same_next_batch(dataset):
    config = make_config(dataset)
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    take(iterator, 2)
    saved = pipeline.iterator_state_bytes(iterator)
    expected = take(iterator, 2)
    fresh = pipeline.make_train_iterator(config)  # process index / count from JAX: 0 of 1
    pipeline.restore_iterator_state(fresh, saved)
    for want, got in zip(expected, take(fresh, 2)):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # and a different position gives different batches (the check above can fail)
    assert not np.array_equal(expected[0]["pixel_values"], expected[1]["pixel_values"])


def test_hr_conditioning_rule_switches_image_and_lowlevel_prompt(dataset):
    always = take(pipeline.make_train_iterator(make_config(dataset, hr_conditioning_prob=1.0),
                                               process_index=0, process_count=1), 2)
    never = take(pipeline.make_train_iterator(make_config(dataset, hr_conditioning_prob=0.0),
                                              process_index=0, process_count=1), 2)
    for with_hr, with_lr in zip(always, never):
        # Same crops either way: the coin is drawn after the crop and flip.
        np.testing.assert_array_equal(with_hr["pixel_values"], with_lr["pixel_values"])
        np.testing.assert_allclose(with_hr["conditioning_pixel_values"],
                                   (with_hr["pixel_values"] + 1.0) / 2.0, atol=1e-6)
        assert np.abs(with_lr["conditioning_pixel_values"]
                      - (with_lr["pixel_values"] + 1.0) / 2.0).mean() > 0.01
        for row, image_id in enumerate(with_hr["image_id"]):
            np.testing.assert_array_equal(
                with_hr["lowlevel_input_ids"][row],
                token_ids(dataset, caption_text(str(image_id), "hr", "lowlevel")))
            np.testing.assert_array_equal(
                with_lr["lowlevel_input_ids"][row],
                token_ids(dataset, caption_text(str(image_id), "lr", "lowlevel")))


@pytest.mark.parametrize("source", ["hr", "lr", "empty"])
def test_highlevel_prompt_source(dataset, source):
    config = make_config(dataset, highlevel_prompt_source=source)
    batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
    for row, image_id in enumerate(batch["image_id"]):
        text = "" if source == "empty" else caption_text(str(image_id), source, "highlevel")
        np.testing.assert_array_equal(batch["highlevel_input_ids"][row], token_ids(dataset, text))


def test_bad_config_values_name_the_key(dataset):
    with pytest.raises(ValueError, match="highlevel_prompt_source='gt'"):
        pipeline.make_train_iterator(make_config(dataset, highlevel_prompt_source="gt"),
                                     process_index=0, process_count=1)
    with pytest.raises(ValueError, match="tokenizer_path='/nonexistent/tokenizer'"):
        pipeline.make_train_iterator(make_config(dataset, tokenizer_path="/nonexistent/tokenizer"),
                                     process_index=0, process_count=1)
    with pytest.raises(ValueError, match="resolution=30"):
        pipeline.validate_pipeline_config(make_config(dataset, resolution=30))
    with pytest.raises(ValueError, match="dataset='xpsr_pairs/official'"):
        pipeline.make_train_iterator(make_config(dataset, dataset="xpsr_pairs/official"),
                                     process_index=0, process_count=1)


def test_paired_crop_handles_native_and_upsampled_lr():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    native = hr[::4, ::4]  # pixel (i, j) of the LR sits at (4i, 4j) of the HR
    hr_patch, lr_patch = pipeline.paired_random_crop(hr, native, 8, 4, np.random.default_rng(3))
    assert hr_patch.shape == (8, 8, 3) and lr_patch.shape == (2, 2, 3)
    np.testing.assert_array_equal(hr_patch[::4, ::4], lr_patch)
    hr_patch, same_size = pipeline.paired_random_crop(hr, hr.copy(), 8, 4,
                                                      np.random.default_rng(3))
    np.testing.assert_array_equal(hr_patch, same_size)
    with pytest.raises(ValueError, match="image 'x'.*neither x4"):
        pipeline.paired_random_crop(hr, hr[:10, :10], 8, 4, rng, "x")
    with pytest.raises(ValueError, match="smaller than the crop resolution 32"):
        pipeline.paired_random_crop(hr, native, 32, 4, rng, "x")


def test_worker_processes_give_the_same_examples_and_restore(dataset):
    config = make_config(dataset, batch_size=1, num_workers=1)
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    try:
        with_workers = take(iterator, 3)
        saved = pipeline.iterator_state_bytes(iterator)
        following = take(iterator, 2)
        pipeline.restore_iterator_state(iterator, saved)
        again = next(iterator)
    finally:
        iterator.close()
    np.testing.assert_array_equal(again["pixel_values"], following[0]["pixel_values"])
    in_process = take(pipeline.make_train_iterator(make_config(dataset, batch_size=1),
                                                   process_index=0, process_count=1), 5)
    # One worker sees the whole stream, so the batches match the in-process pipeline.
    for got, want in zip(with_workers + following, in_process):
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
        np.testing.assert_array_equal(got["lowlevel_input_ids"], want["lowlevel_input_ids"])
