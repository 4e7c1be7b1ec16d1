"""A small CLIP BPE tokenizer folder, written from scratch (nothing is downloaded).

    write_tiny_clip_tokenizer(folder) -> Path     vocab.json, merges.txt, tokenizer_config.json,
                                                  special_tokens_map.json

The vocabulary is the 256 byte-level base tokens, their 256 end-of-word forms, a handful of
merges and CLIP's two special tokens, so any text tokenizes (mostly one token per character)
with `transformers.CLIPTokenizer` / `xpsr_jax.models.load_clip_tokenizer`. The files have the
format of SD 1.5's `tokenizer/` folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# A few merges so that BPE merging is exercised ("the", "and", "of", "image", ...).
MERGES = ("t h", "th e</w>", "i n", "a n", "an d</w>", "o f</w>", "i m", "im a", "ima g",
          "imag e</w>", "c a", "ca p")
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def tiny_clip_vocab() -> dict[str, int]:
    """token -> id: base byte tokens, their `</w>` forms, the merged tokens, then BOS and EOS."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def write_tiny_clip_tokenizer(folder: str | os.PathLike) -> Path:
    """Write the tokenizer files into `folder` (created if needed) and return it as a Path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tiny_clip_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": MAX_LENGTH, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))
    return folder
