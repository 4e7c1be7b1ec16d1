"""The web demo (`python -m xpsr_jax.demo`): recipes on shared weights, upload checks, the running
command driven through its API by gradio_client and through its page by a real headless Chromium."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers.tiny_llava import tiny_llava_dir  # noqa: F401  (session fixture)
from tests.helpers.web import REPO, WebServer, headless_chromium, python_module, save_screenshot
from xpsr_jax.compile_cache import enable_compile_cache, user_cache_dir
from xpsr_jax.configs.infer import get_config
from xpsr_jax.demo.service import DemoService, Settings, UploadError
from xpsr_jax.inference.pipeline import XPSRPipeline
from xpsr_jax.models.tiny import write_tiny_model

TINY_CONFIG = str(REPO / "configs" / "infer.py:tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def recipe(**changes):
    config = get_config("tiny")
    config.num_inference_steps = 2
    config.max_output_pixels = 200 * 200
    for key, value in changes.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def pipeline(tiny):
    return XPSRPipeline.from_pretrained(tiny.xpsr, sd15=tiny.sd15, config=recipe())


def lr_image(height=16, width=20, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_a_recipe_on_the_shared_weights_samples_like_a_pipeline_loaded_with_it(tiny, pipeline):
    other_recipe = recipe(sampler="ddim", guidance_scale=2.0, color_fix="wavelet")
    other = pipeline.with_config(other_recipe)
    assert other.states is pipeline.states and other.text_encoder_state is pipeline.text_encoder_state
    assert (pipeline.config.sampler, other.config.sampler) == ("ddpm", "ddim")
    lr = lr_image()
    enable_compile_cache(user_cache_dir())  # as the commands do: the second, identical program is read back
    shared = other([lr], ["a red house"], ["blurry"], seeds=[3])[0]
    loaded = XPSRPipeline.from_pretrained(tiny.xpsr, sd15=tiny.sd15, config=other_recipe)
    np.testing.assert_array_equal(shared, loaded([lr], ["a red house"], ["blurry"], seeds=[3])[0])
    assert pipeline.trace_count == 0  # the loaded recipe compiled nothing for the other one
    with pytest.raises(ValueError, match="dtype='bfloat16'"):
        pipeline.with_config(recipe(dtype="bfloat16"))


def test_uploads_and_settings_are_refused_with_a_message_naming_what_is_wrong(pipeline, tmp_path):
    service = DemoService(pipeline, output_dir=tmp_path)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    cases = [
        (lambda: service.read_upload(str(not_image), "holiday.png"), "holiday.png is not an image"),
        (lambda: service.read_upload(str(save(tmp_path / "small.png", lr_image(4, 6))), "small.png"),
         "small.png: image is 6x4 px; both sides must be at least 8 px"),
        (lambda: service.read_upload(str(save(tmp_path / "big.png", lr_image(60, 60))), "big.png"),
         "big.png: 60x60 px input makes a 240x240 px image .*over max_output_pixels=40,000; this demo.s limit: "
         "upload a smaller image"),
        (lambda: service.read_upload(None), "no image"),
        (lambda: Settings.parse("euler", 2, 4.5, 0, "adain", True, 16), "sampler: 'euler' is not one of ddpm"),
        (lambda: Settings.parse("ddpm", "x", 4.5, 0, "adain", True, 16), "steps: 'x' is not a number"),
        (lambda: Settings.parse("ddpm", 2.5, 4.5, 0, "adain", True, 16), "steps: 2.5 is not a whole number"),
        (lambda: Settings.parse("ddpm", 2, float("nan"), 0, "adain", True, 16), "guidance: nan is not a finite"),
        (lambda: Settings.parse("ddpm", 2, 4.5, -1, "adain", True, 16), r"seed: -1 is out of range; give an integer "
                                                                          r"in \[0, 4294967295\]"),
        (lambda: Settings.parse("ddpm", 2, 4.5, 2**32, "adain", True, 16), "seed: 4294967296 is out of range"),
        (lambda: Settings.parse("ddpm", 2, 4.5, 2**64, "adain", True, 16), "seed: 18446744073709551616 is out of"),
        (lambda: Settings.parse("ddpm", 2, 4.5, 10**400, "adain", True, 16), r"seed: 1000.*\.\.\. is out of range"),
        (lambda: Settings.parse("ddpm", 2, 10**400, 0, "adain", True, 16), r"guidance: 1000.*\.\.\. is not a finite"),
        (lambda: Settings.parse("ddpm", 2, 1e308, 0, "adain", True, 16).recipe(pipeline.config),
         r"guidance_scale=1e\+308 is invalid; valid: a finite number >= 0 and at most 3.403e\+38 \(float32"),
        (lambda: service.super_resolve(lr_image(), ["a", "house"], "blurry", service.default_settings()),
         "high-level prompt: give text, not list"),
        (lambda: service.super_resolve(lr_image(), "a house", {"x": 1}, service.default_settings()),
         "low-level prompt: give text, not dict"),
        (lambda: Settings.parse("ddpm", 0, 4.5, 0, "adain", True, 16).recipe(pipeline.config),
         "num_inference_steps=0 is invalid"),
        (lambda: service.caption(lr_image()), "no captioner"),
    ]
    for call, message in cases:
        with pytest.raises(UploadError, match=message):
            call()
    lr = service.read_upload(str(save(tmp_path / "ok.jpg", lr_image())), "ok.jpg")
    assert lr.shape == (16, 20, 3)


def test_a_huge_upload_is_refused_from_its_header_without_decoding(pipeline, tmp_path, monkeypatch):
    """A 9000 x 9000 px PNG is 1 MB: decoding and resizing it held the one-at-a-time queue for a
    minute before the size check; now the header says no (the decoder, patched to fail, never runs)."""
    from xpsr_jax.demo import service as service_module

    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((9000, 9000, 3), np.uint8)).save(path, compress_level=1)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an upload refused by its header")

    monkeypatch.setattr(service_module, "read_rgb", no_decoding)
    with pytest.raises(UploadError, match=r"huge.png: 9000x9000 px input makes a 36000x36000 px image .* over "
                                          "max_output_pixels=40,000"):
        DemoService(pipeline, output_dir=tmp_path).read_upload(str(path), "huge.png")


def test_a_recipe_that_overflows_is_an_error_naming_the_settings_not_a_black_image(pipeline, tmp_path):
    """guidance 1e30 is finite in float32, but the guided noise is not: the request fails with the
    cause, and no PNG is written."""
    service = DemoService(pipeline, output_dir=tmp_path)
    settings = Settings.parse("ddpm", 2, 1e30, 0, "adain", True, 16)
    with pytest.raises(UploadError, match=r"the sampled image holds NaN or inf values, so none was written; the "
                                          r"weights are finite, so the settings overflowed: guidance_scale=1e\+30"):
        service.super_resolve(lr_image(), "a house", "blurry", settings)
    assert not list(tmp_path.glob("*.png"))


@pytest.fixture(scope="module")
def demo_server(tiny, tiny_llava_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("demo")
    server = WebServer(python_module(
        "xpsr_jax.demo", "--weights", str(tiny.xpsr), "--sd15", str(tiny.sd15), "--captioner", tiny_llava_dir,
        "--config", TINY_CONFIG, "--config.num_inference_steps=2", "--config.max_output_pixels=40000",
        "--config.captioner.max_new_tokens=6"), tmp)
    with server:
        yield server


def predict(client, image_path, highlevel="a red house", lowlevel="blurry", seed=0):
    return client.predict(handle_file(str(image_path)), highlevel, lowlevel, "ddpm", 2, 4.5, seed, "adain", True, 16,
                          api_name="/super_resolve")


def test_the_demo_api_returns_x4_images_reuses_compiled_sizes_and_answers_bad_input(demo_server, tmp_path):
    client = Client(demo_server.url, verbose=False)
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == \
        {"/super_resolve", "/caption"}
    lr = lr_image()
    path = save(tmp_path / "house.png", lr)
    (before, after), png, status = predict(client, path)
    sr = np.asarray(Image.open(png))
    assert sr.shape == (64, 80, 3) and Path(png).name.endswith("-house-xpsr-x4-seed0.png")
    np.testing.assert_array_equal(np.asarray(Image.open(after).convert("RGB")), sr)
    np.testing.assert_array_equal(np.asarray(Image.open(before).convert("RGB")),
                                  np.asarray(Image.fromarray(lr).resize((80, 64), Image.BICUBIC)))
    assert status.startswith("20x16 px -> 80x64 px")

    # Same size and recipe, another seed: nothing compiles, and the seed changes the result.
    (_, after_seed1), _, status = predict(client, path, seed=1)
    assert "compiling" not in status, status
    assert not np.array_equal(np.asarray(Image.open(after_seed1).convert("RGB")), sr)

    # Two users at once: the queue serves both, in turn.
    jobs = [client.submit(handle_file(str(path)), "a cat", "noisy", "ddpm", 2, 4.5, seed, "adain", True, 16,
                          api_name="/super_resolve") for seed in (5, 6)]
    results = [job.result(timeout=300) for job in jobs]
    assert [np.asarray(Image.open(r[1])).shape for r in results] == [(64, 80, 3)] * 2

    # Prompts from the captioner: the caption endpoint, and empty prompts filled in.
    highlevel, lowlevel = client.predict(handle_file(str(path)), api_name="/caption")
    assert highlevel.strip() and lowlevel.strip()
    _, _, status = predict(client, path, highlevel="", lowlevel="")
    assert f'captioned prompts: "{highlevel}" / "{lowlevel}"' in status

    not_image = tmp_path / "holiday.png"
    not_image.write_bytes(b"GIF89a but not really")
    for bad, message in [(not_image, "holiday.png is not an image"),
                         (save(tmp_path / "tiny.png", lr_image(5, 5)), "both sides must be at least 8 px"),
                         (save(tmp_path / "huge.png", lr_image(64, 64)), "over max_output_pixels=40,000")]:
        with pytest.raises(AppError, match=message):
            predict(client, bad)
    oversized = tmp_path / "oversized.png"
    with oversized.open("wb") as handle:
        handle.truncate(65 * 2**20)  # sparse: over the page's 64 MB upload limit
    with pytest.raises(ValueError, match="exceeds the maximum file size of 67108864 bytes"):
        predict(client, oversized)
    with pytest.raises(AppError, match="steps: 'many' is not a number"):
        client.predict(handle_file(str(path)), "a", "b", "ddpm", "many", 4.5, 0, "adain", True, 16,
                       api_name="/super_resolve")
    # Through the API, values the page's controls never send: each is a message, not a traceback.
    for seed, message in [(2**64, "seed: 18446744073709551616 is out of range"),
                          (2**32, "seed: 4294967296 is out of range")]:
        with pytest.raises(AppError, match=message):
            predict(client, path, seed=seed)
    with pytest.raises(AppError, match=r"guidance_scale=1e\+308 is invalid"):
        client.predict(handle_file(str(path)), "a", "b", "ddpm", 2, 1e308, 0, "adain", True, 16,
                       api_name="/super_resolve")
    for highlevel, lowlevel, message in [(["a", "b"], "", "high-level prompt: give text, not list"),
                                         ("", {"text": "b"}, "low-level prompt: give text, not dict")]:
        with pytest.raises(AppError, match=message):
            predict(client, path, highlevel=highlevel, lowlevel=lowlevel)
    assert "Traceback" not in demo_server.output()


def test_a_browser_uploads_an_image_and_sees_the_before_after_slider(demo_server, tmp_path):
    photo = Image.open(REPO / "xpsr_jax" / "examples" / "hr" / "chelsea.png").convert("RGB").resize((32, 32),
                                                                                                    Image.BICUBIC)
    path = tmp_path / "chelsea-lr.png"
    photo.save(path)
    with headless_chromium(tmp_path, height=1100) as browser:
        browser.get(demo_server.url)
        wait = WebDriverWait(browser, 240)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#lr-input input[type=file]")).send_keys(str(path))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#lr-input img"))
        browser.find_element(By.CSS_SELECTOR, "#highlevel textarea").send_keys("a cat on a sofa")
        browser.find_element(By.CSS_SELECTOR, "#lowlevel textarea").send_keys("blurry, low resolution")
        browser.find_element(By.ID, "run").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#compare img")) == 2)
        status = wait.until(lambda b: b.find_element(By.ID, "status").text)
        assert status.startswith("32x32 px -> 128x128 px"), status
        sources = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#compare img")]
        with urllib.request.urlopen(sources[1]) as response:
            shown = Image.open(response)
            assert shown.size == (128, 128)
        assert browser.find_elements(By.CSS_SELECTOR, "#download a")  # the PNG to download
        save_screenshot(browser, "demo.png", tmp_path)


def test_the_demo_command_refuses_bad_weights_or_captioner_before_serving(tiny, tmp_path):
    for flags, message in [(["--weights", str(tmp_path / "missing")], "missing SD 1.5 subfolder(s)"),
                           (["--weights", str(tiny.xpsr), "--sd15", str(tiny.sd15), "--captioner", str(tiny.sd15)],
                            "captioning model")]:
        with pytest.raises(AssertionError, match="exited with 2") as failure:
            WebServer(python_module("xpsr_jax.demo", *flags, "--config", TINY_CONFIG), tmp_path).start()
        assert message in str(failure.value) and "Traceback" not in str(failure.value)

