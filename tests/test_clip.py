"""CLIPTextEncoder: parity with transformers' CLIPTextModel, every checkpoint layout, the tokenizer."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tests.helpers.parity_utils import assert_parity, randomize_torch_parameters  # noqa: E402
from xpsr_jax.models.clip import CLIPTextConfig, CLIPTextEncoder  # noqa: E402
from xpsr_jax.models.tokenizer import load_clip_tokenizer, tokenize  # noqa: E402
from xpsr_jax.weights import WeightLoadError  # noqa: E402
from xpsr_jax.weights.convert import module_state_dict  # noqa: E402

VOCAB, BOS, EOS, LENGTH = 100, 98, 99, 77
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=LENGTH, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
# bf16 compute, fp32 params, vs the fp32 reference: measured max-abs 3.6e-2 (relative 1.1e-2) on
# outputs of magnitude ~3.4; bf16 keeps 8 mantissa bits.
BF16_ATOL = 0.11  # ~3x the measured error

# SD 1.5's text_encoder/config.json (transformers 4.22), verbatim.
SD15_TEXT_ENCODER_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}


@pytest.fixture(autouse=True)
def true_fp32_matmuls():
    """XLA:GPU runs fp32 matmuls in TF32 by default (measured 3e-3 off on an H200): parity needs fp32."""
    with jax.default_matmul_precision("highest"):
        yield


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(graphdef, state, input_ids):
    out = nnx.merge(graphdef, state)(input_ids, output_hidden_states=True)
    return out.last_hidden_state, out.hidden_states


def encode(model: CLIPTextEncoder, input_ids: np.ndarray):
    """(last_hidden_state, hidden_states) as numpy; one compilation per (config, dtype)."""
    graphdef, state = nnx.split(model)
    return jax.device_get(_encode_jit(graphdef, state, jnp.asarray(input_ids)))


def torch_encode(model, input_ids: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(input_ids.astype(np.int64)), output_hidden_states=True)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


def sample_ids() -> np.ndarray:
    """Row 0: random ids over the whole vocabulary; row 1: an SD-style prompt (BOS, words, EOS, pads)."""
    rng = np.random.default_rng(0)
    random_row = rng.integers(0, VOCAB, LENGTH)
    prompt = np.full(LENGTH, EOS)
    prompt[0], prompt[1:9] = BOS, rng.integers(0, BOS, 8)
    return np.stack([random_row, prompt])


def build_torch_clip(folder, *, hidden_act="quick_gelu", seed=0):
    """A tiny random CLIPTextModel saved by transformers (5.x: unprefixed keys, safetensors)."""
    config = transformers.CLIPTextConfig(**TINY, hidden_act=hidden_act)
    model = transformers.CLIPTextModel(config).eval()
    randomize_torch_parameters(model, seed=seed)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def quick_gelu_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_quick_gelu")
    return build_torch_clip(folder, hidden_act="quick_gelu", seed=1), folder


def write_sd15_style_checkpoint(torch_model, folder, source_folder, *, fmt: str) -> None:
    """transformers-4 / SD 1.5 layout: `text_model.*` keys plus the `position_ids` buffer."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source_folder / "config.json", folder / "config.json")
    state = {"text_model." + k: v.detach().clone().contiguous() for k, v in torch_model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(LENGTH).expand(1, -1).contiguous()
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")  # what save_pretrained(safe_serialization=False) wrote
    else:
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_matches_transformers_fp32(tmp_path, quick_gelu_clip, hidden_act):
    if hidden_act == "quick_gelu":
        torch_model, folder = quick_gelu_clip
    else:
        torch_model, folder = build_torch_clip(tmp_path, hidden_act=hidden_act, seed=2), tmp_path
    encoder = CLIPTextEncoder.from_pretrained(folder)
    assert encoder.config.hidden_act == hidden_act
    ids = sample_ids()
    last, hidden = encode(encoder, ids)
    ref_last, ref_hidden = torch_encode(torch_model, ids)
    assert_parity(last, ref_last, atol=1e-4, label=f"clip {hidden_act} fp32 last_hidden_state")
    assert len(hidden) == len(ref_hidden) == TINY["num_hidden_layers"] + 1
    for index, (ours, ref) in enumerate(zip(hidden, ref_hidden)):
        assert_parity(ours, ref, atol=1e-4, label=f"clip {hidden_act} hidden_states[{index}]")


def test_bf16_compute_within_tolerance(quick_gelu_clip):
    torch_model, folder = quick_gelu_clip
    encoder = CLIPTextEncoder.from_pretrained(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ids = sample_ids()
    last, _ = encode(encoder, ids)
    assert last.dtype == jnp.bfloat16
    assert encoder.text_model.encoder.layers[0].mlp.fc1.kernel.get_value().dtype == jnp.float32
    assert_parity(last, torch_encode(torch_model, ids)[0], atol=BF16_ATOL, label="clip bf16 compute")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_sd15_layout_with_position_ids_loads_identically(tmp_path, quick_gelu_clip, fmt):
    torch_model, folder = quick_gelu_clip
    write_sd15_style_checkpoint(torch_model, tmp_path, folder, fmt=fmt)
    legacy = CLIPTextEncoder.from_pretrained(tmp_path)
    current = CLIPTextEncoder.from_pretrained(folder)
    legacy_state, current_state = module_state_dict(legacy), module_state_dict(current)
    assert legacy_state.keys() == current_state.keys()
    for key in current_state:
        np.testing.assert_array_equal(legacy_state[key], current_state[key], err_msg=key)
    ids = sample_ids()
    np.testing.assert_array_equal(encode(legacy, ids)[0], encode(current, ids)[0])


def test_save_pretrained_round_trips_through_transformers(tmp_path, quick_gelu_clip):
    torch_model, folder = quick_gelu_clip
    CLIPTextEncoder.from_pretrained(folder).save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="np") as handle:
        assert all(key.startswith("text_model.") for key in handle.keys())  # released checkpoints' layout
    reloaded, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    original = torch_model.state_dict()
    assert reloaded.state_dict().keys() == original.keys()
    for key, tensor in reloaded.state_dict().items():
        assert tensor.dtype == original[key].dtype and torch.equal(tensor, original[key]), key
    assert reloaded.config.hidden_act == torch_model.config.hidden_act
    assert reloaded.config.eos_token_id == EOS  # harmless keys are written back, not dropped


def test_model_built_in_code_saves_a_folder_transformers_runs(tmp_path):
    config = CLIPTextConfig(**{k: v for k, v in TINY.items() if not k.endswith("token_id")})
    encoder = CLIPTextEncoder(config, rngs=nnx.Rngs(3))
    encoder.save_pretrained(tmp_path)
    reloaded, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert reloaded.config.hidden_size == config.hidden_size
    ids = sample_ids()
    assert_parity(encode(encoder, ids)[0], torch_encode(reloaded.eval(), ids)[0], atol=1e-4,
                  label="clip built in code -> transformers")


def test_eager_call_checks_input_and_matches_jit(quick_gelu_clip):
    _, folder = quick_gelu_clip
    encoder = CLIPTextEncoder.from_pretrained(folder)
    ids = sample_ids()
    eager = np.asarray(encoder(ids))
    np.testing.assert_allclose(eager, encode(encoder, ids)[0], atol=1e-5)
    assert eager.shape == (2, LENGTH, TINY["hidden_size"])
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        encoder(ids[0])
    with pytest.raises(ValueError, match="integer"):
        encoder(ids.astype(np.float32))
    with pytest.raises(ValueError, match="max_position_embeddings=77"):
        encoder(np.zeros((1, LENGTH + 1), np.int32))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        encoder(np.full((1, 4), VOCAB, np.int32))


def test_weights_for_another_config_fail_naming_the_tensors(tmp_path, quick_gelu_clip):
    _, folder = quick_gelu_clip
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=40)))
    with pytest.raises(WeightLoadError, match=r"text_model\.encoder\.layers\.0\.mlp\.fc1\.weight"):
        CLIPTextEncoder.from_pretrained(tmp_path)


def test_config_reads_sd15_and_rejects_unsupported_keys():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every SD 1.5 key is known: no "unknown key" warning
        config = CLIPTextConfig.from_dict(SD15_TEXT_ENCODER_CONFIG, source="sd15/config.json")
    assert config == CLIPTextConfig.stable_diffusion_v1()
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (768, 12, 64)
    assert config.to_dict()["projection_dim"] == 768  # the file's keys survive a save
    # A key missing from a file must mean what it means to transformers.
    sparse = CLIPTextConfig.from_dict({"model_type": "clip_text_model"})
    reference_defaults = transformers.CLIPTextConfig()
    for field in dataclasses.fields(sparse):
        if field.name != "raw":
            assert getattr(sparse, field.name) == getattr(reference_defaults, field.name), field.name

    def bad(match, **changes):
        with pytest.raises(ValueError, match=match):
            CLIPTextConfig.from_dict(dict(SD15_TEXT_ENCODER_CONFIG, **changes), source="cfg.json")

    bad(r"cfg\.json: attention_dropout=0\.1 is not supported", attention_dropout=0.1)
    bad(r"model_type='clip' is not supported", model_type="clip")
    bad(r"hidden_act='relu' is not supported; valid: \['gelu'", hidden_act="relu")
    bad(r"hidden_size=768 is not divisible by num_attention_heads=7", num_attention_heads=7)
    with pytest.warns(UserWarning, match="text_config"):
        CLIPTextConfig.from_dict(dict(SD15_TEXT_ENCODER_CONFIG, text_config={}))


# --- tokenizer -------------------------------------------------------------------------------

TOKENIZER_MERGES = ["p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>", "o f</w>"]


def write_tiny_tokenizer(folder) -> dict[str, int]:
    """A CLIP BPE tokenizer folder in the real on-disk format; returns its vocabulary."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [c + "</w>" for c in letters] + [m.replace(" ", "") for m in TOKENIZER_MERGES]
    vocab = {token: i for i, token in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TOKENIZER_MERGES) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(dict(special, model_max_length=LENGTH, tokenizer_class="CLIPTokenizer")))
    return vocab


def test_tokenize_pads_truncates_and_keeps_eos(tmp_path):
    vocab = write_tiny_tokenizer(tmp_path / "tokenizer")
    tokenizer = load_clip_tokenizer(tmp_path / "tokenizer")
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids = tokenize(tokenizer, ["A photo of a  CAT", "", "cat " * 200])
    assert ids.shape == (3, LENGTH) and ids.dtype == np.int32
    words = [vocab[w] for w in ("a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>")]
    np.testing.assert_array_equal(ids[0, :7], [bos, *words, eos])
    assert (ids[0, 7:] == tokenizer.pad_token_id).all()
    np.testing.assert_array_equal(ids[1, :2], [bos, eos])
    assert (ids[1, 2:] == tokenizer.pad_token_id).all()
    assert ids[2, 0] == bos and ids[2, -1] == eos and (ids[2, 1:-1] == vocab["cat</w>"]).all()
    assert tokenize(tokenizer, "a cat", max_length=8).shape == (1, 8)
    assert tokenize(tokenizer, []).shape == (0, LENGTH)
    with pytest.raises(TypeError, match="strings"):
        tokenize(tokenizer, ["a cat", 3])


def test_load_clip_tokenizer_names_missing_files(tmp_path):
    write_tiny_tokenizer(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['merges.txt'\]"):
        load_clip_tokenizer(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_clip_tokenizer(tmp_path / "nowhere")
