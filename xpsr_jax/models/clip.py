"""The CLIP text encoder of Stable Diffusion (transformers' `CLIPTextModel`) in Flax NNX.

    from xpsr_jax.models.tokenizer import load_clip_tokenizer, tokenize

    encoder = CLIPTextEncoder.from_pretrained("sd15", subfolder="text_encoder")  # or dtype=jnp.bfloat16
    ids = tokenize(load_clip_tokenizer("sd15/tokenizer"), ["a photo of a cat"])   # (B, 77) int32
    context = encoder(ids)                          # (B, 77, 768): the UNet's cross-attention context

Output = the final-LayerNorm'd last hidden state, as SD 1.5 uses it. Attention is causal and,
as in transformers when no `attention_mask` is passed (what SD does), padding tokens are NOT
masked: they attend causally like any other token.

"Clip skip" (use an earlier layer): `encoder(ids, output_hidden_states=True)` returns
`CLIPTextOutput(last_hidden_state, hidden_states)`, `hidden_states` being the embeddings
followed by every layer's output (num_hidden_layers + 1 arrays, none final-normed), as in
transformers. diffusers' `clip_skip=n` is
`encoder.text_model.final_layer_norm(out.hidden_states[-(n + 1)])`.

Weights: every file layout of this model loads: `text_model.*` keys (transformers 4 and every
released SD checkpoint, optionally with the `position_ids` buffer) and the unprefixed keys that
transformers 5 writes for a freshly built model. `save_pretrained` writes `text_model.*` keys,
which both transformers generations load.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xpsr_jax.models.attention import dot_product_attention, validate_backend
from xpsr_jax.models.layers import LayerNorm, linear
from xpsr_jax.models.model_config import ModelConfig
from xpsr_jax.weights import PretrainedMixin

_PREFIX = "text_model."


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> the functions they stand for.
HIDDEN_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
    """The keys of a transformers `text_encoder/config.json` that shape the network.

    Defaults are transformers' `CLIPTextConfig` defaults, so a file that omits a key means what
    it means to transformers; `CLIPTextConfig.stable_diffusion_v1()` is SD 1.5's text encoder
    (OpenAI CLIP ViT-L/14: width 768, 12 layers, 12 heads).
    """

    # Keys the format has that this implementation builds at one value only.
    fixed_keys: ClassVar[dict[str, Any]] = {
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "dropout": 0.0,
    }
    # Keys that do not change the last hidden state: accepted at any value, kept in `raw`.
    harmless_keys: ClassVar[frozenset[str]] = frozenset({
        "architectures", "projection_dim", "bos_token_id", "eos_token_id", "pad_token_id",
        "initializer_range", "initializer_factor", "torch_dtype", "dtype", "transformers_version",
        "output_attentions", "output_hidden_states", "return_dict", "use_bfloat16",
    })

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def stable_diffusion_v1(cls) -> "CLIPTextConfig":
        """SD 1.x's text encoder (openai/clip-vit-large-patch14's text tower)."""
        return cls(hidden_size=768, intermediate_size=3072, num_attention_heads=12)

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config") -> "CLIPTextConfig":
        relevant = {key: value for key, value in raw.items() if key not in cls.harmless_keys}
        config = super().from_dict(relevant, source=source)
        return dataclasses.replace(config, raw=dict(raw))

    def to_dict(self) -> dict:
        out = super().to_dict()
        # transformers needs these to pick the class when the config was built in code
        out.setdefault("model_type", "clip_text_model")
        out.setdefault("architectures", ["CLIPTextModel"])
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, source: str) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}: {key}={value!r} must be an integer >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{source}: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act={self.hidden_act!r} is not supported; "
                             f"valid: {sorted(HIDDEN_ACTIVATIONS)}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"{source}: layer_norm_eps={self.layer_norm_eps!r} must be > 0")


class CLIPTextOutput(NamedTuple):
    """`last_hidden_state` (B, L, hidden), final-normed; `hidden_states`: embeddings + each layer."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, config: CLIPTextConfig, *, attention_backend: str, rngs: nnx.Rngs, dtype: Any,
                 param_dtype: Any):
        width = config.hidden_size
        dense = functools.partial(linear, width, width, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads = config.num_attention_heads
        self.attention_backend = attention_backend
        self.q_proj = dense()
        self.k_proj = dense()
        self.v_proj = dense()
        self.out_proj = dense()

    def __call__(self, x: jax.Array) -> jax.Array:
        split = lambda t: t.reshape(*t.shape[:2], self.num_heads, -1)  # noqa: E731
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                    backend=self.attention_backend, is_causal=True)
        return self.out_proj(out.reshape(*out.shape[:2], -1))


class CLIPMLP(nnx.Module):
    """fc1 -> activation (`config.hidden_act`) -> fc2."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        dense = functools.partial(linear, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.hidden_act = config.hidden_act
        self.fc1 = dense(config.hidden_size, config.intermediate_size)
        self.fc2 = dense(config.intermediate_size, config.hidden_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(HIDDEN_ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm block: x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

    def __init__(self, config: CLIPTextConfig, *, attention_backend: str, rngs: nnx.Rngs, dtype: Any,
                 param_dtype: Any):
        norm = functools.partial(LayerNorm, config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype,
                                 param_dtype=param_dtype)
        self.self_attn = CLIPAttention(config, attention_backend=attention_backend, rngs=rngs, dtype=dtype,
                                       param_dtype=param_dtype)
        self.layer_norm1 = norm()
        self.mlp = CLIPMLP(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm2 = norm()

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, attention_backend: str, rngs: nnx.Rngs, dtype: Any,
                 param_dtype: Any):
        self.layers = nnx.List([
            CLIPEncoderLayer(config, attention_backend=attention_backend, rngs=rngs, dtype=dtype,
                             param_dtype=param_dtype)
            for _ in range(config.num_hidden_layers)
        ])

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """All residual-stream states: [input, after layer 1, ..., after the last layer].

        The layers are identical, so they run as one `lax.scan` over their weights stacked at
        call time: one layer's ops in the program instead of num_hidden_layers copies (less
        tracing, lowering and XLA compile), while each layer keeps its own parameters, so the
        checkpoint layout (`encoder.layers.N.*`) is unchanged."""
        graphdefs_states = [nnx.split(layer) for layer in self.layers]
        graphdef = graphdefs_states[0][0]
        if len(self.layers) < 2 or any(other != graphdef for other, _ in graphdefs_states[1:]):
            states = [x]
            for layer in self.layers:
                states.append(layer(states[-1]))
            return states
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(state for _, state in graphdefs_states))

        def one_layer(hidden, layer_state):
            hidden = nnx.merge(graphdef, layer_state)(hidden)
            return hidden, hidden

        _, outputs = jax.lax.scan(one_layer, x, stacked)
        return [x, *(outputs[i] for i in range(len(self.layers)))]


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding + learned absolute position embedding (positions 0..L-1)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        embed = functools.partial(nnx.Embed, features=config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.token_embedding = embed(config.vocab_size)
        self.position_embedding = embed(config.max_position_embeddings)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nnx.Module):
    """embeddings -> encoder layers -> final_layer_norm (transformers' `text_model`)."""

    def __init__(self, config: CLIPTextConfig, *, attention_backend: str, rngs: nnx.Rngs, dtype: Any,
                 param_dtype: Any):
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.encoder = CLIPEncoder(config, attention_backend=attention_backend, rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype)
        self.final_layer_norm = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype,
                                          param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        states = self.encoder(self.embeddings(input_ids))
        return CLIPTextOutput(self.final_layer_norm(states[-1]), tuple(states))


class CLIPTextEncoder(nnx.Module, PretrainedMixin):
    """`CLIPTextEncoder(config, *, rngs, dtype=float32, param_dtype=float32, attention_backend="auto")`.

    `encoder(input_ids) -> last_hidden_state` for int `input_ids` (B, L), L <= max_position_embeddings
    (SD: 77, padded by the tokenizer); returns (B, L, hidden_size) in `dtype`.
    `encoder(input_ids, output_hidden_states=True) -> CLIPTextOutput` (see the module docstring).
    `dtype` is the compute dtype (bf16 with fp32 params works; LayerNorm statistics and the
    attention softmax stay fp32).
    """

    config_class: ClassVar[type] = CLIPTextConfig
    weights_stem: ClassVar[str] = "model"
    # The non-persistent `position_ids` buffer that older transformers saved (SD 1.5's files have it).
    state_dict_ignore: ClassVar[tuple[str, ...]] = (r"(text_model\.)?embeddings\.position_ids",)

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, attention_backend: str = "auto"):
        self.config = config
        self.text_model = CLIPTextTransformer(config, attention_backend=validate_backend(attention_backend),
                                              rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    @staticmethod
    def rename_legacy_key(key: str) -> str:
        """transformers 5 saves a freshly built CLIPTextModel without the `text_model.` prefix."""
        return key if key.startswith(_PREFIX) else _PREFIX + key

    def _check_input_ids(self, input_ids: Any) -> None:
        shape, dtype = np.shape(input_ids), getattr(input_ids, "dtype", None)
        if len(shape) != 2 or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"CLIPTextEncoder: input_ids must be an integer array (batch, length); "
                             f"got shape {shape}, dtype {dtype}")
        if shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"CLIPTextEncoder: input_ids have {shape[1]} tokens, more than "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        if not isinstance(input_ids, jax.core.Tracer) and shape[0] * shape[1]:
            # Out-of-range ids would silently embed as NaN under jnp.take; check when values are known.
            low, high = int(np.min(input_ids)), int(np.max(input_ids))
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"CLIPTextEncoder: token ids must lie in [0, {self.config.vocab_size}); "
                                 f"got values in [{low}, {high}]")

    def __call__(self, input_ids: jax.Array, *, output_hidden_states: bool = False):
        self._check_input_ids(input_ids)
        out = self.text_model(jnp.asarray(input_ids))
        return out if output_hidden_states else out.last_hidden_state
