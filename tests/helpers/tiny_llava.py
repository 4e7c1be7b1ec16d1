"""A tiny random LLaVA in transformers' on-disk format, for the caption tests.

``build_tiny_llava(folder) -> str`` writes a ``LlavaForConditionalGeneration``
(1-layer CLIP vision tower on 32x32 images, 1-layer Llama) plus a
``LlavaProcessor`` (word-level tokenizer with an ``<image>`` token and a
LLaVA-1.5 style chat template, ``CLIPImageProcessor``) with
``save_pretrained``, so the caption command loads it exactly like a real
checkpoint through ``AutoProcessor`` / ``AutoModelForImageTextToText``.
Nothing is downloaded. ``tiny_llava_dir`` is a session fixture around it.
"""

from __future__ import annotations

import pathlib

import pytest

IMAGE_SIZE = 32
PATCH_SIZE = 8
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Words of the chat prompt and questions, plus filler the model can emit.
WORDS = (
    "USER ASSISTANT please provide a descriptive summary of the content this image "
    "describe and evaluate quality is sharp blurry noisy clean dog cat sky tree "
    "house car red green blue bright dark low high detail texture"
).split()
PUNCTUATION = [".", ",", ":", "!", "?", "'"]
# Same layout as llava-hf/llava-1.5-7b-hf: "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS + PUNCTUATION)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_tiny_llava(folder: str | pathlib.Path) -> str:
    """Writes the tiny model + processor into ``folder``; returns the folder as str."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _build_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=CHAT_TEMPLATE,
    )

    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Peaky random logits: greedy argmax is far from ties, so batch size
        # cannot flip a token through float rounding.
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    folder = pathlib.Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> str:
    """Folder holding the tiny random LLaVA, built once per test session."""
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def record_caption_inputs(monkeypatch) -> list:
    """Every image handed to a captioning model from now on, as a numpy array, in order: the
    pixels the processor gets (Captioner.caption passes them straight to it)."""
    import numpy as np

    from xpsr_jax.captions import generate

    seen = []
    original = generate.Captioner.caption

    def caption(self, images, *args, **kwargs):
        seen.extend(np.asarray(image) for image in images)
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(generate.Captioner, "caption", caption)
    return seen
