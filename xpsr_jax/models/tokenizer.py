"""Loading SD's CLIP tokenizer (a diffusers `tokenizer/` folder) and turning prompts into ids.

    tokenizer = load_clip_tokenizer("sd15/tokenizer")
    ids = tokenize(tokenizer, ["a photo of a cat", ""])   # np.int32 (2, 77): BOS ... EOS pad pad

Prompts are padded to `max_length` with the tokenizer's pad token (SD 1.5: `<|endoftext|>`)
and truncated to it; the last kept token of a truncated prompt is still EOS, as in diffusers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The files a CLIP BPE tokenizer folder cannot do without (special tokens come from
# tokenizer_config.json / special_tokens_map.json and default to CLIP's when absent).
REQUIRED_TOKENIZER_FILES = ("vocab.json", "merges.txt")
CLIP_MAX_LENGTH = 77


def load_clip_tokenizer(folder: str | os.PathLike):
    """`load_clip_tokenizer(folder) -> transformers.CLIPTokenizer` from vocab.json + merges.txt (+ configs).

    Reads only local files. Raises FileNotFoundError naming the folder and the missing files.
    """
    from transformers import CLIPTokenizer  # lazy: importing transformers takes seconds

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found (expected a diffusers `tokenizer/` "
                                f"folder with {list(REQUIRED_TOKENIZER_FILES)})")
    missing = [name for name in REQUIRED_TOKENIZER_FILES if not (folder / name).is_file()]
    if missing and not (folder / "tokenizer.json").is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"{folder}: not a CLIP tokenizer folder; missing {missing} (found: {found})")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, texts: str | Sequence[str], max_length: int = CLIP_MAX_LENGTH) -> np.ndarray:
    """`tokenize(tokenizer, texts, max_length=77) -> np.int32 (len(texts), max_length)` token ids.

    A single string counts as a batch of one. Every row is BOS, the prompt's tokens, EOS, then
    pad tokens; prompts too long are truncated so that EOS is the last token.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = [(i, type(t).__name__) for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"tokenize: texts must be strings; got (index, type) {bad[:5]}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"tokenize: max_length={max_length!r} must be an integer >= 2 (room for BOS and EOS)")
    if not texts:
        return np.zeros((0, max_length), np.int32)
    encoded = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return np.asarray(encoded["input_ids"], dtype=np.int32)
