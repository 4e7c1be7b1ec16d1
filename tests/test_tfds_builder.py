"""The `xpsr_pairs` TFDS builder: built from both source layouts, read back without TensorFlow."""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.helpers.data_fixtures import (
    PYTHON,
    caption_text,
    no_tensorflow_env,
    write_captions,
    write_official_layout,
    write_prepared_work_dir,
)
from xpsr_jax.data import images, tfds_builder
from xpsr_jax.data.degradation import DEGRADATION_PARAM_KEYS

PROMPT_SOURCE_TASK = {
    "highlevel_prompt_lr": ("lr", "highlevel"),
    "highlevel_prompt_hr": ("hr", "highlevel"),
    "lowlevel_prompt_lr": ("lr", "lowlevel"),
    "lowlevel_prompt_hr": ("hr", "lowlevel"),
}

# Runs in a fresh interpreter where `import tensorflow` raises ImportError: builds, then reads.
BUILD_AND_READ_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow_datasets as tfds
    from xpsr_jax.data import tfds_builder
    work_dir, data_dir, out = sys.argv[1:4]
    tfds_builder.build_dataset(config_name="prepared", source_dir=work_dir, data_dir=data_dir)
    source = tfds.data_source("xpsr_pairs/prepared", split="train", data_dir=data_dir)
    texts, arrays = {}, {}
    for index in range(len(source)):
        example = source[index]
        image_id = example["image_id"].decode()
        texts[image_id] = {k: (v.decode() if isinstance(v, bytes) else
                               {p: float(x) for p, x in v.items()})
                           for k, v in example.items() if k not in ("hr", "lr")}
        arrays[f"hr/{image_id}"], arrays[f"lr/{image_id}"] = example["hr"], example["lr"]
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(texts, f)
    try:
        import tensorflow
        print("TENSORFLOW IMPORTED")
    except ImportError:
        pass
    real_tf = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")
               and not m.startswith("tensorflow_datasets")]
    print("TF_MODULES", [m for m in real_tf if sys.modules[m] is not None])
""")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(work_dir, data_dir, image ids) of a 6-example dataset built in one process."""
    root = tmp_path_factory.mktemp("prepared")
    ids = write_prepared_work_dir(root / "work", count=6, hr_size=64)
    # The fixture stores the crops unsharpened; say so as prepare's crop stage would.
    settings = root / "work" / tfds_builder.PREPARE_SETTINGS_FILE
    settings.write_text(json.dumps({"hr_target": "original"}))
    tfds_builder.build_dataset(config_name="prepared", source_dir=root / "work",
                               data_dir=root / "tfds")
    return root / "work", root / "tfds", ids


def read_all(data_dir, name="xpsr_pairs/prepared"):
    source = tfds.data_source(name, split="train", data_dir=os.fspath(data_dir))
    return {ex["image_id"].decode(): ex for ex in (source[i] for i in range(len(source)))}


def test_build_and_read_back_without_tensorflow_keep_every_feature(prepared, tmp_path):
    work_dir, _, ids = prepared
    out = tmp_path / "read"
    result = subprocess.run(
        [PYTHON, "-c", BUILD_AND_READ_SCRIPT, str(work_dir), str(tmp_path / "tfds"), str(out)],
        env=no_tensorflow_env(tmp_path / "no_tf"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TENSORFLOW IMPORTED" not in result.stdout
    assert "TF_MODULES []" in result.stdout

    texts = json.loads((tmp_path / "read.json").read_text())
    arrays = np.load(tmp_path / "read.npz")
    assert sorted(texts) == ids
    params = tfds_builder.read_degradation_records(work_dir / "degradation.jsonl")
    for image_id in ids:
        for kind in ("hr", "lr"):
            expected = images.read_rgb(work_dir / kind.upper() / f"{image_id}.png")
            stored = arrays[f"{kind}/{image_id}"]
            assert stored.dtype == np.uint8 and stored.shape == expected.shape
            np.testing.assert_array_equal(stored, expected)
        assert arrays[f"lr/{image_id}"].shape == (16, 16, 3)
        example = texts[image_id]
        for feature, (source, task) in PROMPT_SOURCE_TASK.items():
            assert example[feature] == caption_text(image_id, source, task)
        assert example["source_file"] == params[image_id]["source_file"]
        assert set(example["degradation"]) == set(DEGRADATION_PARAM_KEYS)
        for key in DEGRADATION_PARAM_KEYS:
            assert example["degradation"][key] == np.float32(params[image_id]["params"][key])


def test_parallel_parts_merge_into_one_dataset(prepared, tmp_path):
    work_dir, single_dir, ids = prepared
    path = tfds_builder.build_dataset(config_name="prepared", source_dir=work_dir,
                                      data_dir=tmp_path, num_parts=2, num_processes=2,
                                      shards_per_part=2)
    builder = tfds.builder_from_directory(os.fspath(path))
    split = builder.info.splits["train"]
    assert split.num_shards == 4 and split.num_examples == 6
    assert not (tmp_path / ".xpsr_parts").exists()
    assert tfds_builder.read_hr_target(tmp_path) == "original"  # the parts' metadata is kept
    merged, single = read_all(tmp_path), read_all(single_dir)
    assert sorted(merged) == ids
    for image_id in ids:
        np.testing.assert_array_equal(merged[image_id]["hr"], single[image_id]["hr"])
        np.testing.assert_array_equal(merged[image_id]["lr"], single[image_id]["lr"])
        assert merged[image_id]["lowlevel_prompt_hr"] == single[image_id]["lowlevel_prompt_hr"]


def test_finished_dataset_is_not_rebuilt(prepared):
    work_dir, data_dir, _ = prepared
    info = tfds_builder.dataset_dir(data_dir, "prepared") / "dataset_info.json"
    before = info.stat().st_mtime_ns
    tfds_builder.build_dataset(config_name="prepared", source_dir=work_dir, data_dir=data_dir)
    assert info.stat().st_mtime_ns == before


def test_official_layout(tmp_path):
    ids = write_official_layout(tmp_path / "dataset_0", count=3, hr_size=32, sub="DIV2K")
    ids += write_official_layout(tmp_path / "dataset_1", count=2, hr_size=32, sub="Flickr2K",
                                 seed=5)
    tfds_builder.build_dataset(config_name="official",
                               source_dir=[tmp_path / "dataset_0", tmp_path / "dataset_1"],
                               data_dir=tmp_path / "tfds", num_parts=2)
    examples = read_all(tmp_path / "tfds", "xpsr_pairs/official")
    assert sorted(examples) == sorted(ids)
    for image_id, example in examples.items():
        root, sub, name = image_id.split("/")
        expected_hr = images.read_rgb(tmp_path / root / "HR" / sub / f"{name}.png")
        expected_lr = images.read_rgb(tmp_path / root / "LR" / sub / f"{name}.png")
        np.testing.assert_array_equal(example["hr"], expected_hr)
        np.testing.assert_array_equal(example["lr"], expected_lr)  # kept at HR size
        for feature, (source, task) in PROMPT_SOURCE_TASK.items():
            # First line only, leading space stripped, as the official loader reads it.
            assert example[feature].decode() == caption_text(image_id, source, task)
        assert all(math.isnan(v) for v in example["degradation"].values())
    info = tfds.builder_from_directory(
        os.fspath(tfds_builder.dataset_dir(tmp_path / "tfds", "official"))).info
    assert "NaN" in info.description
    assert info.metadata["hr_target"] == "unknown"  # HR stored as found
    assert tfds_builder.read_hr_target(tmp_path / "tfds", "xpsr_pairs/official") == "unknown"


def test_hr_target_metadata_of_prepared_datasets(prepared, tmp_path):
    work_dir, data_dir, _ = prepared
    assert tfds_builder.read_hr_target(data_dir) == "original"
    assert tfds_builder.read_hr_target(data_dir, "xpsr_pairs/prepared:1.0.0") == "original"
    # A dataset built before hr_target was recorded has no metadata.json.
    old = tmp_path / "old" / "xpsr_pairs" / "prepared" / "1.0.0"
    old.mkdir(parents=True)
    (old / "dataset_info.json").write_text("{}")
    assert tfds_builder.read_hr_target(tmp_path / "old") == "unknown"
    with pytest.raises(tfds_builder.DatasetSourceError, match="not built"):
        tfds_builder.read_hr_target(tmp_path / "nowhere")
    # Work folders: no settings file -> unknown; settings from before hr_target -> original.
    assert tfds_builder.prepared_hr_target(tmp_path) == "unknown"
    (tmp_path / tfds_builder.PREPARE_SETTINGS_FILE).write_text(json.dumps({"seed": 0}))
    assert tfds_builder.prepared_hr_target(tmp_path) == "original"
    (tmp_path / tfds_builder.PREPARE_SETTINGS_FILE).write_text(json.dumps({"hr_target": "usm"}))
    assert tfds_builder.prepared_hr_target(tmp_path) == "usm"


def test_missing_prompt_names_image_and_kind(tmp_path):
    ids = write_prepared_work_dir(tmp_path / "work", count=2, hr_size=32)
    (tmp_path / "work" / "captions.jsonl").unlink()
    write_captions(tmp_path / "work" / "captions.jsonl", ids, skip={(ids[1], "hr", "lowlevel")})
    with pytest.raises(tfds_builder.DatasetSourceError,
                       match=rf"{ids[1]}.*lowlevel prompt of the HR image"):
        tfds_builder.build_dataset(config_name="prepared", source_dir=tmp_path / "work",
                                   data_dir=tmp_path / "tfds")

    official_ids = write_official_layout(tmp_path / "dataset_0", count=2)
    (tmp_path / "dataset_0" / "highlevel_prompt_GT" / "DIV2K" / "0001.txt").unlink()
    with pytest.raises(tfds_builder.DatasetSourceError,
                       match=rf"{official_ids[1]}.*highlevel_prompt_hr"):
        tfds_builder.scan_official(tmp_path / "dataset_0")


def test_part_of_splits_into_disjoint_covering_parts():
    items = list(range(10))
    parts = [tfds_builder.part_of(items, index, 3) for index in range(3)]
    assert sum(parts, []) == items and [len(p) for p in parts] == [3, 4, 3]
    with pytest.raises(ValueError, match="part_index 3"):
        tfds_builder.part_of(items, 3, 3)


def test_building_says_what_it_does_not_download(prepared, tmp_path, capsys):
    work_dir, _, _ = prepared
    tfds_builder.build_dataset(config_name="prepared", source_dir=work_dir, data_dir=tmp_path)
    out = capsys.readouterr().out
    assert "Downloading" not in out and "downloaded" not in out, out
    assert "building dataset xpsr_pairs/prepared from local files into" in out, out
