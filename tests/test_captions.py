"""Tests of ``python -m xpsr_jax.captions`` with a tiny random LLaVA (no download)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tests.helpers.tiny_llava import tiny_llava_dir  # noqa: F401  (session fixture)

from xpsr_jax.captions import CaptionInputError, load_captions, merge_caption_files
from xpsr_jax.captions.cli import main
from xpsr_jax.captions.config import QUESTIONS
from xpsr_jax.captions.generate import INSTALL_HINT, import_torch
from xpsr_jax.captions.io import read_records, shard_output_path

NUM_IMAGES = 5
HR_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]  # one of each kind


def read_jsonl(path) -> list[dict]:
    lines = pathlib.Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines]


def keyed(records) -> dict:
    return {(r["image_id"], r["source"], r["task"]): r["text"] for r in records}


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """5 LR (16 px, png) and 5 HR (48 px, every extension) noise images, same ids."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    dirs = {"lr": root / "LR", "hr": root / "HR"}
    for folder in dirs.values():
        folder.mkdir()
    for i in range(NUM_IMAGES):
        lr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        hr = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(lr).save(dirs["lr"] / f"img{i:03d}.png")
        Image.fromarray(hr).save(dirs["hr"] / f"img{i:03d}{HR_EXTENSIONS[i]}")
    (dirs["hr"] / "notes.txt").write_text("not an image")
    return dirs


def caption_args(model_dir, dirs, output, *extra) -> list[str]:
    return [
        "--model", model_dir, "--lr-dir", str(dirs["lr"]), "--hr-dir", str(dirs["hr"]),
        "--output", str(output), "--max-new-tokens", "8", *extra,
    ]


@pytest.fixture(scope="module")
def reference(tiny_llava_dir, image_dirs, tmp_path_factory) -> dict:  # noqa: F811
    """Greedy captions made one image at a time: {(image_id, source, task): text}."""
    output = tmp_path_factory.mktemp("reference") / "captions.jsonl"
    assert main(caption_args(tiny_llava_dir, image_dirs, output, "--batch-size", "1")) == 0
    return keyed(read_jsonl(output))


def test_reference_run_covers_every_image(reference):
    ids = {f"img{i:03d}" for i in range(NUM_IMAGES)}
    assert set(reference) == {(i, s, "highlevel") for i in ids for s in ("lr", "hr")}
    # Texts depend on the image, so comparisons below can catch a misordered batch.
    assert len(set(reference.values())) > 1
    # Only new tokens are decoded: the word-level tokenizer makes one word per
    # token, and the prompt alone is longer than 8 words.
    assert all(len(text.split()) <= 8 for text in reference.values())


def test_batches_give_the_same_greedy_captions(
    tiny_llava_dir, image_dirs, reference, tmp_path  # noqa: F811
):
    output = tmp_path / "captions.jsonl"
    assert main(caption_args(tiny_llava_dir, image_dirs, output, "--batch-size", "2")) == 0
    records = read_jsonl(output)
    for source in ("lr", "hr"):
        assert sum(r["source"] == source for r in records) == NUM_IMAGES
    assert keyed(records) == reference
    assert {r["question"] for r in records} == {QUESTIONS["highlevel"]}
    assert {r["model"] for r in records} == {tiny_llava_dir}


def test_killed_run_resumes_without_duplicates_or_gaps(
    tiny_llava_dir, image_dirs, reference, tmp_path  # noqa: F811
):
    output = tmp_path / "captions.jsonl"
    args = caption_args(tiny_llava_dir, image_dirs, output, "--batch-size", "2")
    assert main([*args, "--max-images", "3"]) == 0  # stops after batches of 2 + 1
    assert len(read_jsonl(output)) == 3
    # What a kill in the middle of a write leaves: a partial last line.
    with open(output, "a") as f:
        f.write('{"image_id": "img003", "source": "l')
    with pytest.warns(UserWarning, match="partial last line"):
        assert main(args) == 0
    records = read_jsonl(output)  # every line parses again
    assert len(records) == 2 * NUM_IMAGES
    assert keyed(records) == reference


def test_two_shards_cover_all_images_once_and_merge(
    tiny_llava_dir, image_dirs, reference, tmp_path  # noqa: F811
):
    output = tmp_path / "captions.jsonl"
    shard_files = []
    for shard in (0, 1):
        args = caption_args(tiny_llava_dir, image_dirs, output, "--batch-size", "3")
        assert main([*args, "--shard", str(shard), "--num-shards", "2"]) == 0
        shard_files.append(tmp_path / f"captions.shard-{shard}-of-2.jsonl")
    assert not output.exists()  # shards never write the shared name
    shard_keys = [set(keyed(read_jsonl(p))) for p in shard_files]
    assert not shard_keys[0] & shard_keys[1]
    assert shard_keys[0] | shard_keys[1] == set(reference)

    # Merging a shard twice is harmless (deduped); the result equals the single run.
    assert main(["--merge", *map(str, shard_files + shard_files[:1]), "--output", str(output)]) == 0
    assert len(read_jsonl(output)) == 2 * NUM_IMAGES
    assert load_captions(output) == reference
    assert load_captions(shard_files) == reference


def test_lowlevel_run_adds_its_own_records_to_the_same_file(
    tiny_llava_dir, image_dirs, reference, tmp_path  # noqa: F811
):
    output = tmp_path / "captions.jsonl"
    output.write_text(
        "".join(
            json.dumps({"image_id": i, "source": s, "task": t, "text": text,
                        "model": "m", "question": QUESTIONS["highlevel"]}) + "\n"
            for (i, s, t), text in reference.items()
        )
    )
    # The fallback template yields the chat template's prompt, so greedy texts
    # match a run through the chat template with the same question.
    template = r"USER: <image>\n{question} ASSISTANT:"
    args = [
        "--model", tiny_llava_dir, "--hr-dir", str(image_dirs["hr"]), "--output", str(output),
        "--max-new-tokens", "8", "--task", "lowlevel", "--batch-size", "5",
        "--prompt-template", template,
    ]
    assert main(args) == 0
    captions = load_captions(output)
    lowlevel = {k: v for k, v in captions.items() if k[2] == "lowlevel"}
    assert {(i, s) for i, s, _ in lowlevel} == {(f"img{i:03d}", "hr") for i in range(NUM_IMAGES)}
    assert {k: v for k, v in captions.items() if k[2] == "highlevel"} == reference
    assert {r["question"] for r in read_jsonl(output) if r["task"] == "lowlevel"} == {
        QUESTIONS["lowlevel"]
    }

    chat_output = tmp_path / "chat.jsonl"
    chat_args = [a for a in args if a not in ("--prompt-template", template)]
    chat_args[chat_args.index(str(output))] = str(chat_output)
    assert main(chat_args) == 0
    assert load_captions(chat_output) == lowlevel


def test_sampling_is_reproducible_from_its_seed(tiny_llava_dir, image_dirs, tmp_path):  # noqa: F811
    texts = []
    for name in ("a", "b"):
        output = tmp_path / f"{name}.jsonl"
        args = [
            "--model", tiny_llava_dir, "--lr-dir", str(image_dirs["lr"]), "--output", str(output),
            "--max-new-tokens", "8", "--batch-size", "5",
            "--do-sample", "--temperature", "2.0", "--top-p", "0.95", "--seed", "3",
        ]
        assert main(args) == 0
        texts.append(load_captions(output))
    assert len(texts[0]) == NUM_IMAGES
    assert texts[0] == texts[1]


@pytest.fixture
def bad_input_dirs(tmp_path, image_dirs):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("a.png", "a.jpg"):
        Image.new("RGB", (8, 8)).save(twins / name)
    wrong_question = tmp_path / "wrong_question.jsonl"
    wrong_question.write_text(
        json.dumps({"image_id": "img000", "source": "lr", "task": "highlevel", "text": "x",
                    "model": "m", "question": "What is this?"}) + "\n"
    )
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop.name)
    raising_config = tmp_path / "raising_config.py"
    raising_config.write_text("def get_config(arg=None):\n    raise RuntimeError('boom')\n")
    return {"lr": str(image_dirs["lr"]), "empty": str(empty), "twins": str(twins),
            "missing": str(tmp_path / "missing"), "wrong_question": str(wrong_question), "folder": str(folder),
            "loop": str(loop), "raising_config": str(raising_config), "bad_text": os.fsdecode(b"what \xff is it")}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr-dir", "{missing}"], "image folder {missing}: no such folder"),
        (["--hr-dir", "{empty}"], "image folder {empty}: no images (.png"),
        (["--lr-dir", "{twins}"], "share the name 'a'"),
        (["--output", "o.jsonl"], "give --lr-dir and/or --hr-dir"),
        (["--lr-dir", "{lr}", "--shard", "2", "--num-shards", "2"], "--shard 2 is out of range"),
        (["--lr-dir", "{lr}", "--num-shards", "0"], "--num-shards must be >= 1, got 0"),
        (["--lr-dir", "{lr}", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--lr-dir", "{lr}", "--model", "{missing}"], "model folder '{missing}' does not exist"),
        (["--lr-dir", "{lr}", "--output", "{wrong_question}"], "question 'What is this?'"),
        (["--merge", "{missing}"], "caption file '{missing}' does not exist"),
        (["--lr-dir", "{lr}", "--output", "{folder}"], "caption file '{folder}' is a folder, not a JSONL file"),
        (["--lr-dir", "{lr}", "--output", "{loop}"], "caption file '{loop}' is a link to nothing or a link loop"),
        (["--merge", "{wrong_question}", "--output", "{folder}"], "caption file '{folder}' is a folder"),
        (["--lr-dir", "{lr}", "--do-sample", "--temperature", "nan"],
         "--temperature must be a finite number > 0 with --do-sample, got nan"),
        (["--lr-dir", "{lr}", "--do-sample", "--top-p", "2"], "--top-p must be in (0, 1] with --do-sample, got 2.0"),
        (["--lr-dir", "{lr}", "--question", "{bad_text}"], "is not valid text"),
        (["--lr-dir", "{lr}", "--config", "{raising_config}"], "raised RuntimeError: boom"),
    ],
)
def test_bad_input_exits_with_a_message_naming_it(argv, message, bad_input_dirs, tmp_path, capsys):
    argv = [a.format(**bad_input_dirs) for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message.format(**bad_input_dirs) in capsys.readouterr().err


def test_default_model_id_must_be_downloaded_beforehand(image_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./llava-hf/llava-1.5-7b-hf here
    with pytest.raises(SystemExit):
        main(["--lr-dir", str(image_dirs["lr"])])
    err = capsys.readouterr().err
    assert "model folder 'llava-hf/llava-1.5-7b-hf' does not exist" in err
    assert "downloaded" in err


def test_missing_torch_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(SystemExit) as exit_info:
        import_torch()
    assert INSTALL_HINT in str(exit_info.value.code)


def _record(image_id, text, source="lr", task="highlevel", question=QUESTIONS["highlevel"]):
    return {"image_id": image_id, "source": source, "task": task, "text": text,
            "model": "m", "question": question}


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_reader_drops_only_a_partial_last_line(tmp_path):
    path = _write(tmp_path / "a.jsonl", [_record("x", "one")], tail='{"image_id": "y"')
    with pytest.warns(UserWarning, match="partial last line"):
        records, complete_len = read_records(path)
    assert [r["image_id"] for r in records] == ["x"]
    assert complete_len == len(json.dumps(_record("x", "one"))) + 1

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image_id": \n' + json.dumps(_record("x", "one")) + "\n")
    with pytest.raises(CaptionInputError, match=f"{broken}:1: not a JSON record"):
        read_records(broken)
    bad_source = _write(tmp_path / "bad_source.jsonl", [_record("x", "one", source="mid")])
    with pytest.raises(CaptionInputError, match=r"bad_source.jsonl:1: source 'mid'"):
        read_records(bad_source)


def test_merge_rejects_conflicting_captions_and_mixed_questions(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_record("x", "one"), _record("y", "two")])
    conflict = _write(tmp_path / "b.jsonl", [_record("x", "other")])
    with pytest.raises(CaptionInputError, match="conflicting captions for image_id='x'"):
        merge_caption_files([a, conflict], tmp_path / "out.jsonl")
    mixed = _write(tmp_path / "c.jsonl", [_record("z", "three", question="Why?")])
    with pytest.raises(CaptionInputError, match="task 'highlevel' was asked two questions"):
        merge_caption_files([a, mixed], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written

    other_task = _write(tmp_path / "d.jsonl", [_record("x", "blurry", task="lowlevel",
                                                       question=QUESTIONS["lowlevel"])])
    assert merge_caption_files([a, other_task, a], tmp_path / "out.jsonl") == 3
    assert load_captions(tmp_path / "out.jsonl") == {
        ("x", "lr", "highlevel"): "one", ("y", "lr", "highlevel"): "two",
        ("x", "lr", "lowlevel"): "blurry",
    }


def test_shard_file_names():
    assert shard_output_path("out/c.jsonl", 0, 1) == pathlib.Path("out/c.jsonl")
    assert shard_output_path("out/c.jsonl", 2, 4) == pathlib.Path("out/c.shard-2-of-4.jsonl")
    assert shard_output_path("c.txt", 1, 2) == pathlib.Path("c.txt.shard-1-of-2.jsonl")


def test_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "xpsr_jax.captions", "--help"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    for text in ("--num-shards", "CUDA_VISIBLE_DEVICES", QUESTIONS["lowlevel"]):
        assert text in help_text


def test_a_config_file_sets_options_and_flags_win(tmp_path):
    """--config FILE.py: loaded as every command loads configs; flags given on the line win."""
    from xpsr_jax.captions import cli

    config_file = tmp_path / "captions_config.py"
    config_file.write_text("from xpsr_jax.captions.config import get_config as defaults\n\n\n"
                           "def get_config(arg=None):\n    config = defaults()\n    config.batch_size = 3\n"
                           "    config.max_new_tokens = 64\n    return config\n")
    parse = cli.build_parser().parse_args
    config = cli.config_from_args(parse(["--lr-dir", "lr", "--config", str(config_file), "--max-new-tokens", "5"]))
    assert (config.batch_size, config.max_new_tokens, config.lr_dir) == (3, 5, "lr")
    config_file.write_text("from ml_collections import config_dict\n\n\ndef get_config(arg=None):\n"
                           "    return config_dict.ConfigDict({'batchsize': 2})\n")
    with pytest.raises(cli.io.CaptionInputError, match=r"unknown caption keys \['batchsize'\]"):
        cli.config_from_args(parse(["--lr-dir", "lr", "--config", str(config_file)]))


def test_a_whole_last_record_without_newline_is_kept_and_appends_start_a_new_line(tmp_path):
    """A file written by hand often lacks the final newline: its last record counts; a cut line
    (what a kill leaves) is still dropped with a warning; appends after repair stay one per line."""
    from xpsr_jax.captions import io as caption_io

    record = {"image_id": "a", "source": "lr", "task": "highlevel", "text": "a cat", "model": "m", "question": "q"}
    second = dict(record, task="lowlevel", text="blurry")
    path = tmp_path / "captions.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(second))  # no final newline
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole record is no reason to warn
        records, _ = caption_io.read_records(path)
    assert [r["task"] for r in records] == ["highlevel", "lowlevel"]
    assert load_captions(path)[("a", "lr", "lowlevel")] == "blurry"
    caption_io.repair_partial_tail(path)
    with caption_io.CaptionWriter(path) as writer:
        writer.write([dict(record, source="hr")])
    assert [json.loads(line)["source"] for line in path.read_text().splitlines()] == ["lr", "lr", "hr"]
    path.write_text(json.dumps(record) + "\n" + json.dumps(second)[:20])
    with pytest.warns(UserWarning, match="partial last line .* not a whole record"):
        records, _ = caption_io.read_records(path)
    assert len(records) == 1


def test_a_rerun_never_keeps_the_captions_of_another_model_or_of_a_changed_image(
    tiny_llava_dir, image_dirs, tmp_path, capsys  # noqa: F811
):
    lr = tmp_path / "LR"
    shutil.copytree(image_dirs["lr"], lr)
    other_model = shutil.copytree(tiny_llava_dir, tmp_path / "other_model")
    output = tmp_path / "captions.jsonl"
    args = ["--lr-dir", str(lr), "--output", str(output), "--max-new-tokens", "8", "--batch-size", "5"]
    assert main(["--model", tiny_llava_dir, *args]) == 0
    made = output.read_text()
    with pytest.raises(SystemExit) as exit_info:  # its captions would be kept as the other model's
        main(["--model", str(other_model), *args])
    assert exit_info.value.code == 2 and output.read_text() == made
    assert f"made by the model {tiny_llava_dir!r}" in capsys.readouterr().err
    # img001 replaced under the same name: its record is dropped (file rewritten) and made again.
    Image.fromarray(255 - np.asarray(Image.open(lr / "img001.png"))).save(lr / "img001.png")
    assert main(["--model", tiny_llava_dir, *args]) == 0
    assert "1 record(s)" in capsys.readouterr().err
    records = read_jsonl(output)
    assert [r["image_id"] for r in records].count("img001") == 1 and len(records) == NUM_IMAGES
    digests = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in lr.iterdir()}
    assert all(r["image_sha256"] == digests[r["image_id"]] for r in records)
    # A record without the hash (written by hand, or by an older version) is kept: the field is optional.
    output.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "image_sha256"}) + "\n"
                              for r in records))
    assert main(["--model", tiny_llava_dir, *args]) == 0
    assert len(read_jsonl(output)) == NUM_IMAGES and "0 to caption" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_fails_before_the_model_loads(
    tiny_llava_dir, image_dirs, tmp_path, capsys, monkeypatch  # noqa: F811
):
    from xpsr_jax.captions import batches

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(batches, "load_captioner", never)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = ["--model", tiny_llava_dir, "--lr-dir", str(image_dirs["lr"])]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--output", str(a_file / "captions.jsonl")])
    assert exit_info.value.code == 2
    assert f"cannot write the caption file {str(a_file / 'captions.jsonl')!r}" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)]).returncode != 0:
        pytest.skip("chattr +i (an immutable folder) needs root on ext4")
    try:
        with pytest.raises(SystemExit):
            main([*args, "--output", str(locked / "captions.jsonl")])
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert "(Operation not permitted)" in capsys.readouterr().err and not any(locked.iterdir())


def test_records_with_and_without_the_provenance_fields_are_valid():
    from xpsr_jax.captions.io import validate_record

    record = _record("x", "one")
    assert validate_record(record, "f:1") == record
    assert validate_record({**record, "image_sha256": "ab" * 32, "model_fingerprint": "cd" * 32}, "f:1")
    with pytest.raises(CaptionInputError, match="field 'image_sha256' must be a string"):
        validate_record({**record, "image_sha256": 3}, "f:1")
