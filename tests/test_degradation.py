"""Tests for the Real-ESRGAN degradation (xpsr_jax.data.degradation / kernels)."""

import dataclasses
import json
import math

import cv2
import numpy as np
import pytest
from scipy import stats

from xpsr_jax.data import degradation as deg
from xpsr_jax.data.degradation import __main__ as degradation_cli
from xpsr_jax.data.degradation import apply as degradation_apply
from xpsr_jax.data import kernels as kern


def _textured(size, seed=0, width=None):
    """uint8 RGB test image with edges, gradients and texture."""
    rng = np.random.default_rng(seed)
    width = width or size
    noise = cv2.GaussianBlur(rng.uniform(0, 1, (size, width, 3)).astype(np.float32), (0, 0), 1.5)
    ramp = np.linspace(0.1, 0.9, width, dtype=np.float32)[None, :, None]
    image = 0.6 * ramp + 0.4 * noise
    image[size // 3 : size // 2] = 0.95  # a hard edge
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def _float(image_u8):
    return image_u8.astype(np.float32) / 255.0


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


def _draw(family, seed, size):
    return kern.sample_mixed_kernel(
        np.random.default_rng(seed),
        size=size,
        families=(family,),
        probs=(1.0,),
        sigma_range=(0.2, 3.0),
        rotation_range=(-math.pi, math.pi),
        betag_range=(0.5, 4.0),
        betap_range=(1.0, 2.0),
    )


@pytest.mark.parametrize("family", kern.KERNEL_FAMILIES)
def test_family_kernels_normalised_sized_and_symmetric(family):
    for seed, size in [(0, 7), (1, 13), (2, 21)]:
        draw = _draw(family, seed, size)
        k = draw.kernel
        assert k.shape == (size, size) and draw.size == size
        assert kern.KERNEL_FAMILIES[draw.family] == family
        assert k.sum() == pytest.approx(1.0, abs=1e-5)
        assert k.min() >= 0
        np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)  # every family: centro-symmetric
        assert np.unravel_index(np.argmax(k), k.shape) == (size // 2, size // 2)
        if family.endswith("aniso"):
            assert draw.rotation != 0.0 and draw.sigma_x != draw.sigma_y
        else:
            np.testing.assert_allclose(k, k.T, atol=1e-7)
            np.testing.assert_allclose(k, np.rot90(k), atol=1e-7)
            assert draw.sigma_x == draw.sigma_y and draw.rotation == 0.0
        has_beta = family.startswith(("generalized", "plateau"))
        assert (draw.beta > 0) == has_beta


def test_anisotropic_kernel_is_not_transpose_symmetric_and_matches_gaussian_pdf():
    size, sx, sy, theta = 15, 3.0, 1.0, 0.4
    k = kern.gaussian_kernel(size, sx, sy, theta)
    assert np.abs(k - k.T).max() > 1e-3
    grid = kern.mesh_grid(size)
    pdf = stats.multivariate_normal([0, 0], kern.covariance_matrix(sx, sy, theta)).pdf(grid)
    np.testing.assert_allclose(k, pdf / pdf.sum(), rtol=1e-4, atol=1e-7)
    # x runs along columns: with rotation 0 a wide sigma_x spreads along rows' direction.
    k0 = kern.gaussian_kernel(size, sx, sy, 0.0)
    c = size // 2
    assert k0[c, c + 3] > 10 * k0[c + 3, c]


def test_generalized_and_plateau_shapes():
    gauss = kern.gaussian_kernel(11, 2.0)
    beta_one = kern.generalized_gaussian_kernel(11, 2.0, None, 0.0, 1.0)
    np.testing.assert_allclose(beta_one, gauss, atol=1e-7)
    c = 5
    # beta > 1 flattens the top and cuts the tails relative to the Gaussian.
    flat = kern.generalized_gaussian_kernel(11, 2.0, None, 0.0, 3.0)
    assert flat[c, c + 1] / flat[c, c] > gauss[c, c + 1] / gauss[c, c]
    assert flat[c, 0] < gauss[c, 0]
    plateau = kern.plateau_kernel(11, 2.0, None, 0.0, 2.0)
    profile = plateau[c, c:]
    assert np.all(np.diff(profile) < 0)


def test_sinc_kernel_normalised_circular_and_low_pass():
    for cutoff in (math.pi / 3, math.pi / 2):
        k = kern.circular_lowpass_kernel(cutoff, 21)
        assert k.shape == (21, 21)
        assert k.sum() == pytest.approx(1.0, abs=1e-5)
        c = 10
        # Equal radius, different angles: (0, 5) and (3, 4) are both 5 away.
        assert k[c, c + 5] == pytest.approx(k[c + 3, c + 4], abs=1e-7)
        np.testing.assert_allclose(k, k.T, atol=1e-7)
        np.testing.assert_allclose(k, np.rot90(k), atol=1e-7)
        x = kern.mesh_grid(21)[..., 0]

        def response(w):
            return float(np.sum(k * np.cos(w * x)))

        assert response(0.5 * cutoff) > 0.85
        assert abs(response(1.6 * cutoff)) < 0.15


def test_pad_kernel_centres_and_keeps_mass():
    k = kern.gaussian_kernel(7, 1.0)
    padded = kern.pad_kernel(k, 21)
    assert padded.shape == (21, 21)
    np.testing.assert_array_equal(padded[7:14, 7:14], k)
    assert padded.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="20x20"):
        kern.pad_kernel(kern.gaussian_kernel(9, 1.0), 20)


def test_kernel_sampler_follows_configured_distribution():
    cfg = deg.default_degradation_config()
    rng = np.random.default_rng(0)
    draws = [deg.sample_blur_kernel(rng, cfg.stage1, cfg) for _ in range(1500)]
    sinc = [d for d in draws if d.is_sinc]
    assert len(sinc) / len(draws) == pytest.approx(0.1, abs=0.03)
    for d in sinc:
        low = math.pi / 3 if d.size < 13 else math.pi / 5
        assert low <= d.sinc_cutoff <= math.pi and d.sigma_x == kern.NOT_APPLICABLE
    family = [d for d in draws if not d.is_sinc]
    counts = np.bincount([d.family for d in family], minlength=6) / len(family)
    np.testing.assert_allclose(counts, cfg.stage1.kernel_probs, atol=0.04)
    assert {d.size for d in draws} == set(range(7, 22, 2))
    assert all(0.2 <= d.sigma_x <= 3.0 and 0.2 <= d.sigma_y <= 3.0 for d in family)
    # Beta: below or above 1 with equal odds (reference), so plateau betas in
    # (1, 2) are exactly 1 half the time.
    betag = np.array([d.beta for d in family if d.family in (2, 3)])
    betap = np.array([d.beta for d in family if d.family in (4, 5)])
    assert betag.min() >= 0.5 and betag.max() <= 4.0
    assert np.mean(betag < 1) == pytest.approx(0.5, abs=0.12)
    assert np.mean(betap == 1.0) == pytest.approx(0.5, abs=0.12) and betap.max() <= 2.0


# --------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------


def test_gaussian_noise_std_matches_sigma_and_gray_is_shared():
    flat = np.full((128, 128, 3), 0.5, np.float32)
    rng = np.random.default_rng(0)
    for sigma in (5.0, 20.0):
        noisy = deg.add_gaussian_noise(flat, sigma, gray=False, rng=rng)
        assert np.std(noisy - flat) == pytest.approx(sigma / 255, rel=0.05)
        assert np.abs(noisy[..., 0] - noisy[..., 1]).max() > 0
    gray = deg.add_gaussian_noise(flat, 20.0, gray=True, rng=rng)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    assert np.std(gray - flat) == pytest.approx(20 / 255, rel=0.05)
    clipped = deg.add_gaussian_noise(np.ones_like(flat), 30.0, gray=False, rng=rng)
    assert clipped.max() <= 1.0 and clipped.dtype == np.float32


def test_poisson_noise_variance_scales_with_intensity_and_scale():
    # 256 distinct levels -> 256 photon levels: var = scale^2 * x / 256.
    levels = np.arange(256, dtype=np.float32) / 255
    image = np.broadcast_to(levels[None, :, None], (512, 256, 3)).copy()
    rng = np.random.default_rng(0)
    cols = np.arange(60, 200)
    for scale in (0.5, 1.0, 2.0):
        noise = deg.add_poisson_noise(image, scale, gray=False, rng=rng) - image
        measured = noise[:, cols].transpose(1, 0, 2).reshape(len(cols), -1).var(axis=1)
        expected = scale**2 * levels[cols] / 256
        assert np.mean(measured / expected) == pytest.approx(1.0, abs=0.06)
    gray = deg.add_poisson_noise(image, 1.0, gray=True, rng=rng)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])


def test_poisson_photon_count_follows_distinct_levels():
    # 3 distinct levels -> 2^ceil(log2 3) = 4 photon levels: var = scale^2 * x / 4.
    levels = np.array([64, 128, 192], np.float32) / 255
    image = np.repeat(levels, 128)[:, None, None] * np.ones((1, 128, 3), np.float32)
    noise = deg.add_poisson_noise(image, 0.1, gray=False, rng=np.random.default_rng(0)) - image
    for i, level in enumerate(levels):
        measured = noise[i * 128 : (i + 1) * 128].var()
        assert measured == pytest.approx(0.01 * level / 4, rel=0.1)


def test_jpeg_lower_quality_gives_larger_error():
    image = _float(_textured(64, seed=1))
    errors = [np.abs(deg.jpeg_compress(image, q) - image).mean() for q in (30, 60, 95)]
    assert errors[0] > errors[1] > errors[2] > 0
    out = deg.jpeg_compress(image, 95)
    assert out.shape == image.shape and out.dtype == np.float32
    # RGB order is kept: a pure red image stays red.
    red = np.zeros((16, 16, 3), np.float32)
    red[..., 0] = 1.0
    assert deg.jpeg_compress(red, 90)[..., 0].mean() > 0.9


def test_usm_sharpens_edges_and_keeps_flat_regions():
    flat = np.full((64, 64, 3), 0.4, np.float32)
    np.testing.assert_allclose(deg.usm_sharpen(flat), flat, atol=1e-6)
    image = _float(_textured(64))
    sharp = deg.usm_sharpen(image)
    lap = lambda x: np.abs(cv2.Laplacian(x, cv2.CV_32F)).mean()  # noqa: E731
    assert lap(sharp) > lap(image)
    assert 0.0 <= sharp.min() and sharp.max() <= 1.0


def test_ops_match_pytorch_reference():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    image = _float(_textured(48, seed=2, width=40))
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None]

    def to_np(t):
        return t[0].permute(1, 2, 0).numpy()

    def filter2d(t, kernel):  # BasicSR filter2D
        k = kernel.shape[-1]
        padded = functional.pad(t, (k // 2,) * 4, mode="reflect")
        weight = torch.from_numpy(kernel.astype(np.float32))[None, None].repeat(3, 1, 1, 1)
        return functional.conv2d(padded, weight, groups=3)

    for mode in deg.RESIZE_MODES:
        for size in [(17, 23), (70, 61)]:
            ref = to_np(functional.interpolate(tensor, size=size, mode=mode))
            np.testing.assert_allclose(deg.resize(image, size, mode), ref, atol=1e-5)

    kernel = kern.gaussian_kernel(13, 2.5, 0.8, 0.7)
    ref = to_np(filter2d(tensor, kern.pad_kernel(kernel, 21)))
    np.testing.assert_allclose(deg.blur(image, kernel), ref, atol=1e-5)

    usm_kernel = cv2.getGaussianKernel(51, 0)
    usm_kernel = usm_kernel @ usm_kernel.T
    blurred = filter2d(tensor, usm_kernel)
    residual = tensor - blurred
    soft = filter2d((residual.abs() * 255 > 10).float(), usm_kernel)
    sharp = torch.clip(tensor + 0.5 * residual, 0, 1)
    ref = to_np(soft * sharp + (1 - soft) * tensor)
    np.testing.assert_allclose(deg.usm_sharpen(image), ref, atol=1e-5)


# --------------------------------------------------------------------------
# Plans, params, degrade
# --------------------------------------------------------------------------


def test_plan_frequencies_follow_config():
    cfg = deg.default_degradation_config()
    rng = np.random.default_rng(1)
    params = [deg.degradation_params(deg.sample_degradation_plan(cfg, rng)) for _ in range(1000)]

    def rate(key, value=1.0):
        return np.mean([p[key] == value for p in params])

    assert rate("blur1_applied") == 1.0
    assert rate("blur2_applied") == pytest.approx(0.8, abs=0.04)
    assert rate("final_sinc_applied") == pytest.approx(0.8, abs=0.04)
    assert rate("final_jpeg_first") == pytest.approx(0.5, abs=0.05)
    assert rate("noise1_type", 0.0) == pytest.approx(0.5, abs=0.05)
    assert rate("noise2_gray") == pytest.approx(0.4, abs=0.05)
    for s, probs in ((1, (0.2, 0.7, 0.1)), (2, (0.3, 0.4, 0.3))):
        freqs = [rate(f"resize{s}_direction", float(i)) for i in range(3)]
        np.testing.assert_allclose(freqs, probs, atol=0.05)
    for p in params:
        assert 30 <= p["jpeg1_quality"] <= 95 and p["jpeg1_quality"] == int(p["jpeg1_quality"])
        lo, hi = (0.15, 1.0) if p["resize1_direction"] == 1 else (1.0, 1.5)
        assert lo <= p["resize1_scale"] <= hi
        if p["noise2_type"] == 0:
            assert 1 <= p["noise2_gaussian_sigma"] <= 25 and p["noise2_poisson_scale"] == -1
        else:
            assert 0.05 <= p["noise2_poisson_scale"] <= 2.5 and p["noise2_gaussian_sigma"] == -1
        if p["blur2_applied"] == 0:
            assert p["blur2_kernel_size"] == -1 and p["blur2_family"] == -1
    # Setting a probability changes what is drawn.
    cfg.stage2.blur_prob = 0.0
    cfg.final.sinc_prob = 0.0
    plan = deg.sample_degradation_plan(cfg, rng)
    assert plan.stage2.kernel is None and plan.final.sinc is None


def test_apply_plan_runs_the_reference_sequence(monkeypatch):
    cfg = deg.default_degradation_config()
    calls = []

    def spy(name, fn):
        def wrapped(img, *args, **kwargs):
            calls.append((name, img.shape[:2]))
            return fn(img, *args, **kwargs)

        monkeypatch.setattr(degradation_apply, name, wrapped)  # the references the plan runner calls

    ops = ("usm_sharpen", "blur", "resize", "jpeg_compress")
    ops += ("add_gaussian_noise", "add_poisson_noise")
    for name in ops:
        spy(name, getattr(deg, name))
    rng = np.random.default_rng(0)
    plan = deg.sample_degradation_plan(cfg, rng)
    while plan.stage2.kernel is None or plan.final.sinc is None or plan.stage1.resize_scale == 1.0:
        plan = deg.sample_degradation_plan(cfg, rng)
    image = _float(_textured(64))
    size1 = (math.floor(64 * plan.stage1.resize_scale),) * 2
    size2 = (int(16 * plan.stage2.resize_scale),) * 2
    noise1 = deg.NOISE_TYPES[plan.stage1.noise_type]
    noise2 = deg.NOISE_TYPES[plan.stage2.noise_type]
    head = [
        ("usm_sharpen", (64, 64)), ("blur", (64, 64)), ("resize", (64, 64)),
        (f"add_{noise1}_noise", size1), ("jpeg_compress", size1), ("blur", size1),
        ("resize", size1), (f"add_{noise2}_noise", size2),
    ]  # fmt: skip
    tails = {
        True: [("jpeg_compress", size2), ("resize", size2), ("blur", (16, 16))],
        False: [("resize", size2), ("blur", (16, 16)), ("jpeg_compress", (16, 16))],
    }
    outputs = {}
    for jpeg_first, tail in tails.items():
        calls.clear()
        final = dataclasses.replace(plan.final, jpeg_first=jpeg_first)
        forced = dataclasses.replace(plan, final=final)
        noise_rng = np.random.default_rng(1)
        outputs[jpeg_first] = deg.apply_degradation_plan(image, forced, cfg, noise_rng)
        assert calls == head + tail
        assert outputs[jpeg_first].shape == (16, 16, 3)
    assert not np.array_equal(outputs[True], outputs[False])


def test_degrade_shape_dtype_and_fixed_param_keys():
    cfg = deg.default_degradation_config()
    lr, _ = deg.degrade(_textured(64, width=48), cfg, seed=0, example_id=0)
    assert lr.shape == (16, 12, 3) and lr.dtype == np.uint8
    hr = _textured(16)
    branch_keys = ("blur2_applied", "final_sinc_applied", "noise1_type", "final_jpeg_first")
    seen = set()
    for example_id in range(40):
        lr, params = deg.degrade(hr, cfg, seed=3, example_id=example_id)
        assert lr.shape == (4, 4, 3) and lr.dtype == np.uint8
        assert tuple(params) == deg.DEGRADATION_PARAM_KEYS
        assert all(type(v) is float for v in params.values())
        seen |= {(key, params[key]) for key in branch_keys}
    # The key set stayed fixed across every branch of the draw.
    assert len(seen) == 8


def test_degrade_is_deterministic_per_seed_and_id():
    cfg = deg.default_degradation_config()
    hr = _textured(64, seed=5)
    lr_a, params_a = deg.degrade(hr, cfg, seed=7, example_id=11)
    lr_b, params_b = deg.degrade(hr.copy(), cfg, seed=7, example_id=11)
    np.testing.assert_array_equal(lr_a, lr_b)
    assert params_a == params_b
    lr_c, params_c = deg.degrade(hr, cfg, seed=7, example_id=12)
    lr_d, params_d = deg.degrade(hr, cfg, seed=8, example_id=11)
    assert not np.array_equal(lr_a, lr_c) and params_a != params_c
    assert not np.array_equal(lr_a, lr_d) and params_a != params_d
    # The plan does not depend on the image: same (seed, id), other image, same params.
    _, params_other = deg.degrade(_textured(64, seed=6), cfg, seed=7, example_id=11)
    assert params_other == params_a


def test_degrade_512_crop_bitwise_stable_across_cv2_threads():
    cfg = deg.default_degradation_config()
    hr = _textured(512, seed=9)
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        lr_single, _ = deg.degrade(hr, cfg, seed=0, example_id=4)
        cv2.setNumThreads(max(2, threads))
        lr_multi, _ = deg.degrade(hr, cfg, seed=0, example_id=4)
    finally:
        cv2.setNumThreads(threads)
    assert lr_single.shape == (128, 128, 3) and lr_single.dtype == np.uint8
    np.testing.assert_array_equal(lr_single, lr_multi)
    # Still the same picture: the LR resembles the downscaled HR.
    reference = cv2.resize(hr, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.corrcoef(reference.ravel(), lr_single.astype(np.float32).ravel())[0, 1] > 0.5


def test_degrade_rejects_bad_inputs():
    cfg = deg.default_degradation_config()
    with pytest.raises(ValueError, match="uint8"):
        deg.degrade(_float(_textured(64)), cfg, seed=0, example_id=0)
    with pytest.raises(ValueError, match="62x64"):
        deg.degrade(_textured(62, width=64), cfg, seed=0, example_id=0)
    with pytest.raises(ValueError, match="example_id"):
        deg.degrade(_textured(64), cfg, seed=0, example_id=-1)


# --------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------


def test_default_config_has_official_values_and_validates():
    cfg = deg.default_degradation_config()
    deg.validate_degradation_config(cfg)
    assert cfg.stage2.blur_prob == 0.8 and cfg.final.sinc_prob == 0.8
    assert cfg.stage1.resize_range == (0.15, 1.5) and cfg.stage2.gaussian_sigma_range == (1.0, 25.0)
    with pytest.raises(AttributeError):
        cfg.stage1.blur_sigma = (0.1, 1.0)  # locked: a mistyped key is an error


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("stage2.kernel_probs", (0.5, 0.25, 0.12, 0.03, 0.12, 0.03), "summing to 1"),
        ("stage1.kernel_families", ("iso", "gauss", "a", "b", "c", "d"), "distinct names"),
        ("stage1.jpeg_quality_range", (30.0, 120.0), "high <= 100"),
        ("stage2.resize_range", (1.1, 1.2), "low <= 1.0 <= high"),
        ("final.sinc_prob", 1.5, "[0.0, 1.0]"),
        ("kernel_size_range", (8, 21), "odd sizes"),
        ("final.resize_modes", ("area", "nearest"), "distinct names"),
    ],
)
def test_config_validation_names_key_and_value(key, value, message):
    cfg = deg.default_degradation_config()
    section, _, name = key.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
    with pytest.raises(ValueError) as error:
        deg.validate_degradation_config(cfg)
    text = str(error.value)
    assert f"'{key}'" in text and repr(value) in text and message in text
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        deg.degrade(_textured(16), cfg, seed=0, example_id=0)


def test_config_validation_reports_missing_keys():
    cfg = deg.default_degradation_config()
    cfg.unlock()
    del cfg.stage1["gray_noise_prob"]
    with pytest.raises(ValueError, match=r"stage1\.gray_noise_prob"):
        deg.validate_degradation_config(cfg)


def test_cli_writes_lr_and_prints_params(tmp_path, capsys):
    src, dst = tmp_path / "hr.png", tmp_path / "lr.png"
    cv2.imwrite(str(src), _textured(66, width=64))  # 66 rows: cropped to 64
    degradation_cli.main(["--image", str(src), "--out", str(dst), "--seed", "1", "--example-id", "2"])
    lr = cv2.imread(str(dst))
    assert lr.shape == (16, 16, 3)
    params = json.loads(capsys.readouterr().out)
    assert tuple(params) == deg.DEGRADATION_PARAM_KEYS
