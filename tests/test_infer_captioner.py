"""infer.py --captioner: a plain folder of photos (no prompts anywhere) to SR outputs in one
command, the captions made by a tiny random LLaVA, saved as they are made, reused by a rerun and
resumed after a crash that loses at most one batch."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.tiny_llava import record_caption_inputs, tiny_llava_dir  # noqa: F401  (session fixture)
from xpsr_jax.captions import io as caption_io
from xpsr_jax.captions.transforms import apply_transforms, parse_transforms
from xpsr_jax.inference import cli
from xpsr_jax.inference.config import default_infer_config
from xpsr_jax.inference.prompts import PromptSource
from xpsr_jax.models.tiny import write_tiny_model

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture()
def photos(tmp_path) -> Path:
    """Real photos (the package's examples) as 16 px LR inputs, in a plain folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        Image.open(REPO / "xpsr_jax" / "examples" / "hr" / f"{name}.png").convert("RGB").resize(
            (16, 16), Image.BICUBIC).save(folder / f"{name}.png")
    return folder


def infer(tiny, photos, out, llava, *extra) -> tuple[int, str, str]:
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = cli.main(["--weights", str(tiny.xpsr), "--sd15", str(tiny.sd15), "--input", str(photos),
                         "--output", str(out), "--captioner", llava, "--config",
                         str(REPO / "configs" / "infer.py:tiny"), "--config.num_inference_steps=1",
                         "--config.captioner.max_new_tokens=6", "--config.captioner.batch_size=2", *extra])
    return code, printed.getvalue(), errors.getvalue()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_plain_folder_to_sr_with_captions_made_saved_and_reused(tiny, photos, tmp_path, monkeypatch,
                                                               tiny_llava_dir):  # noqa: F811
    seen = record_caption_inputs(monkeypatch)
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    out = tmp_path / "out"
    spec = "upscale:64,jpeg:40"
    code, stdout, stderr = infer(tiny, photos, out, tiny_llava_dir, "--caption-transform", spec)
    assert code == 0, stdout + stderr
    assert sorted(p.name for p in out.glob("*.png")) == [f"{name}.png" for name in PHOTOS]
    assert all(Image.open(out / f"{name}.png").size == (64, 64) for name in PHOTOS)
    made = records(out / "captions.jsonl")
    assert sorted((r["image_id"], r["task"]) for r in made) == sorted(
        (name, task) for name in PHOTOS for task in ("highlevel", "lowlevel"))
    assert {r["source"] for r in made} == {"lr"} and {r["caption_transform"] for r in made} == {spec}
    assert "captions: 6 made, 0 reused" in stdout and "prompts from the captioner" in stdout
    # The MLLM saw the transformed photo; the SR input (the file) is untouched.
    expected = {name: np.asarray(apply_transforms(Image.open(photos / f"{name}.png").convert("RGB"),
                                                  parse_transforms(spec))) for name in PHOTOS}
    assert len(seen) == 6 and all(any(np.array_equal(s, e) for e in expected.values()) for s in seen)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    # The SR network got the photo itself: the same captions given as a file give the same images.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["--weights", str(tiny.xpsr), "--sd15", str(tiny.sd15), "--input", str(photos),
                         "--output", str(tmp_path / "from_file"), "--captions", str(out / "captions.jsonl"),
                         "--config", str(REPO / "configs" / "infer.py:tiny"),
                         "--config.num_inference_steps=1"]) == 0, printed.getvalue()
    for name in PHOTOS:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "from_file" / f"{name}.png")),
                                      np.asarray(Image.open(out / f"{name}.png")))

    # A rerun (outputs redone) makes no new caption.
    text = (out / "captions.jsonl").read_text()
    code, stdout, stderr = infer(tiny, photos, out, tiny_llava_dir, "--caption-transform", spec, "--overwrite")
    assert code == 0, stdout + stderr
    assert "captions: 0 made, 6 reused" in stdout
    assert (out / "captions.jsonl").read_text() == text


def test_a_crash_while_captioning_loses_at_most_one_batch(tiny, photos, tmp_path, monkeypatch,
                                                          tiny_llava_dir):  # noqa: F811
    out = tmp_path / "out"
    real_write = caption_io.CaptionWriter.write
    calls = []

    def write_then_die(self, batch):
        calls.append(1)
        if len(calls) == 2:  # the process dies while the second batch is being captioned
            raise KeyboardInterrupt
        real_write(self, batch)

    monkeypatch.setattr(caption_io.CaptionWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        infer(tiny, photos, out, tiny_llava_dir)
    assert len(records(out / "captions.jsonl")) == 2  # the first batch of 2 is kept
    assert not list(out.glob("*.png"))
    monkeypatch.setattr(caption_io.CaptionWriter, "write", real_write)
    code, stdout, stderr = infer(tiny, photos, out, tiny_llava_dir)
    assert code == 0, stdout + stderr
    assert "captions: 4 made, 2 reused" in stdout
    keys = [(r["image_id"], r["task"]) for r in records(out / "captions.jsonl")]
    assert len(keys) == len(set(keys)) == 6
    assert len(list(out.glob("*.png"))) == len(PHOTOS)


def test_a_folder_that_is_not_a_captioning_model_stops_before_any_image(tiny, photos, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = infer(tiny, photos, out, str(tiny.sd15 / "vae"))
    assert code == 2 and "Traceback" not in stderr
    assert "captioning model" in stderr and "not an image-text-to-text model" in stderr, stderr
    assert not out.exists() or not any(out.iterdir())
    code, stdout, stderr = infer(tiny, photos, out, str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in stderr, stderr


def test_missing_processor_files_and_a_model_that_does_not_load_are_named(tmp_path, monkeypatch,
                                                                          tiny_llava_dir):  # noqa: F811
    import shutil

    from xpsr_jax.captions import CaptionInputError, batches
    from xpsr_jax.captions.on_demand import check_captioner_folder

    check_captioner_folder(tiny_llava_dir)  # the real thing passes
    no_processor = tmp_path / "no_processor"
    shutil.copytree(tiny_llava_dir, no_processor, ignore=shutil.ignore_patterns("preprocessor_config.json",
                                                                                 "processor_config.json"))
    with pytest.raises(CaptionInputError, match=r"lacks its processor files \(one of \['preprocessor_config.json'"):
        check_captioner_folder(str(no_processor))

    import transformers

    def refuse(*args, **kwargs):
        raise ValueError("Half precision is not supported on this device\nsecond line")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)
    settings = batches.CaptionSettings(task="highlevel", question="q", model_name=tiny_llava_dir)
    with pytest.raises(CaptionInputError, match=r"does not load as an image-text-to-text model in torch.float16 on "
                                                r"cpu: Half precision is not supported on this device$"):
        batches.load_captioner(tiny_llava_dir, "q", settings, "cpu", "fp16")


def test_a_prompt_file_that_is_not_utf8_fails_only_its_image_when_captioning(tmp_path, monkeypatch):
    """An official-layout test set with one broken prompt file: the captioner is asked for the
    images without prompts, the broken one is left to the main loop (which names it, one line)."""
    root = tmp_path / "testset"
    for folder in ("LR", "highlevel_prompt", "lowlevel_prompt_q"):
        (root / folder).mkdir(parents=True)
    for name in ("broken", "plain"):
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(root / "LR" / f"{name}.png")
    (root / "highlevel_prompt" / "broken.txt").write_bytes(b"\xff\xfe a caption in another encoding")
    asked = {}

    def fake_caption_missing(wanted, **_):  # the model's side is tested above; here: what it is asked
        asked.update({kind: sorted(p.stem for p in paths) for kind, paths in wanted.items()})
        return type("Result", (), {"captions": {}, "made": 0, "reused": 0})()

    monkeypatch.setattr(cli, "caption_missing", fake_caption_missing)
    files, official_root = cli.list_inputs(root)
    config = default_infer_config()
    config.captioner.model = "unused"
    prompts = PromptSource(official_root=official_root)
    targets = dict(zip(files, cli.output_paths(tmp_path / "out", files)))
    cli.caption_on_the_fly(files, targets, prompts, config, tmp_path / "out", overwrite=False)
    assert asked == {"highlevel": ["plain"], "lowlevel": ["plain"]}
    with pytest.raises(UnicodeDecodeError):
        prompts.prompts(root / "LR" / "broken.png")  # the main loop turns this into one error line


class StoppedBeforeSR(Exception):
    """Raised where infer.py would load the SR networks: the captions stage is what is tested."""


def caption_only(tiny, photos, out, llava, monkeypatch, *extra) -> tuple[int | None, str, str]:
    """infer.py --captioner through its command line up to the SR model load (None: it got there)."""
    def stop(*args, **kwargs):
        raise StoppedBeforeSR

    monkeypatch.setattr(cli.XPSRPipeline, "from_pretrained", stop)
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        try:
            code = infer_main(tiny, photos, out, llava, *extra)
        except StoppedBeforeSR:
            code = None
    return code, printed.getvalue(), errors.getvalue()


def infer_main(tiny, photos, out, llava, *extra) -> int:
    return cli.main(["--weights", str(tiny.xpsr), "--sd15", str(tiny.sd15), "--input", str(photos),
                     "--output", str(out), "--captioner", llava, "--config", str(REPO / "configs" / "infer.py:tiny"),
                     "--config.captioner.max_new_tokens=6", "--config.captioner.batch_size=2", *extra])


@pytest.fixture(scope="module")
def two_llavas(tiny_llava_dir, tmp_path_factory):  # noqa: F811
    """Two folders holding the tiny LLaVA, so one can be changed."""
    import shutil

    root = tmp_path_factory.mktemp("llavas")
    return [shutil.copytree(tiny_llava_dir, root / name) for name in ("a", "b")]


def test_captions_of_another_model_are_refused_not_reused(tiny, photos, tmp_path, monkeypatch, two_llavas):
    model_a, model_b = map(str, two_llavas)
    out = tmp_path / "out"
    code, stdout, stderr = caption_only(tiny, photos, out, model_a, monkeypatch)
    assert code is None and "captions: 6 made, 0 reused" in stdout, stdout + stderr
    made = (out / "captions.jsonl").read_text()

    # Another folder: its captions would be reused as B's ("6 reused"): one line instead, the file kept.
    code, stdout, stderr = caption_only(tiny, photos, out, model_b, monkeypatch, "--overwrite")
    assert code == 2 and "Traceback" not in stderr and "loading the captioning model" not in stdout
    assert f"holds highlevel captions made by the model {model_a!r}" in stderr and f"not by {model_b!r}" in stderr
    assert "use another --output, or remove" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    # The same folder now holding another model (here: another config) is caught by its fingerprint.
    config = json.loads((two_llavas[0] / "config.json").read_text())
    (two_llavas[0] / "config.json").write_text(json.dumps({**config, "note": "another model"}))
    code, stdout, stderr = caption_only(tiny, photos, out, model_a, monkeypatch, "--overwrite")
    assert code == 2 and f"made by the model in {model_a!r} when it held other files" in stderr, stderr
    assert (out / "captions.jsonl").read_text() == made
    assert len({r["model_fingerprint"] for r in records(out / "captions.jsonl")}) == 1


def test_captions_of_other_images_under_the_same_names_are_made_again(tiny, photos, tmp_path, monkeypatch,
                                                                     tiny_llava_dir):  # noqa: F811
    out = tmp_path / "out"
    assert caption_only(tiny, photos, out, tiny_llava_dir, monkeypatch)[0] is None
    first = {(r["image_id"], r["task"]): r for r in records(out / "captions.jsonl")}
    # lr2: the same names, chelsea another picture; astronaut's records as an older version wrote
    # them (no image hash): both are made again, coffee's reused.
    lr2 = tmp_path / "lr2"
    lr2.mkdir()
    for name in PHOTOS:
        (lr2 / f"{name}.png").write_bytes((photos / f"{name}.png").read_bytes())
    Image.open(photos / "chelsea.png").transpose(Image.FLIP_TOP_BOTTOM).save(lr2 / "chelsea.png")
    older = [{k: v for k, v in r.items() if k != "image_sha256" or r["image_id"] != "astronaut"}
             for r in records(out / "captions.jsonl")]
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in older))
    code, stdout, stderr = caption_only(tiny, lr2, out, tiny_llava_dir, monkeypatch, "--overwrite")
    assert code is None, stdout + stderr
    assert "4 record(s)" in stdout and "no longer match their image" in stdout
    assert "captions: 4 made, 2 reused" in stdout
    now = records(out / "captions.jsonl")
    keys = [(r["image_id"], r["task"]) for r in now]
    assert len(keys) == len(set(keys)) == 6  # the stale records are gone, not shadowed
    assert first[("coffee", "lowlevel")]["image_sha256"] == caption_io_sha256(photos / "coffee.png")
    assert all(r["image_sha256"] == caption_io_sha256(lr2 / f"{r['image_id']}.png") for r in now)
    assert {k: r["text"] for k, r in zip(keys, now) if k[0] == "coffee"} == {
        k: r["text"] for k, r in first.items() if k[0] == "coffee"}
    assert len(caption_io.load_captions(out / "captions.jsonl")) == 6  # no conflicting captions
    assert not (out / "captions.jsonl.tmp").exists()


def caption_io_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_captions_file_that_is_a_folder_is_refused_before_any_model_loads(tiny, photos, tmp_path,
                                                                           tiny_llava_dir):  # noqa: F811
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    (out / "captions.jsonl").mkdir(parents=True)
    environment = {k: v for k, v in os.environ.items() if k != "XPSR_DEBUG"}
    done = subprocess.run([sys.executable, "infer.py", "--weights", str(tiny.xpsr), "--sd15", str(tiny.sd15),
                           "--input", str(photos), "--output", str(out), "--captioner", tiny_llava_dir,
                           "--config", "configs/infer.py:tiny"], cwd=REPO, env={**environment, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"error: caption file {str(out / 'captions.jsonl')!r} is a folder, not a JSONL file; captions made on the "
        "fly are kept in that file: move it away or give another --output"]
    assert "loading the captioning model" not in done.stdout and list(out.iterdir()) == [out / "captions.jsonl"]


def test_a_link_loop_or_an_unwritable_captions_file_is_one_line_before_the_model_loads(
        tiny, photos, tmp_path, monkeypatch, tiny_llava_dir):  # noqa: F811
    import shutil
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    (out / "captions.jsonl").symlink_to("captions.jsonl")
    code, stdout, stderr = caption_only(tiny, photos, out, tiny_llava_dir, monkeypatch)
    assert code == 2 and "is a link to nothing or a link loop" in stderr, stderr
    (out / "captions.jsonl").unlink()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)]).returncode != 0:
        pytest.skip("chattr +i (an immutable folder) needs root on ext4")
    try:
        code, stdout, stderr = caption_only(tiny, photos, out, tiny_llava_dir, monkeypatch)
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert code == 2 and "Traceback" not in stderr and "loading the captioning model" not in stdout
    assert f"cannot write the caption file {str(out / 'captions.jsonl')!r} (Operation not permitted)" in stderr
