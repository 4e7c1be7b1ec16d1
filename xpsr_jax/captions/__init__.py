"""Precomputed MLLM prompts (captions) for XPSR training data.

``python -m xpsr_jax.captions`` asks a vision-language model (LLaVA-1.5-7B for
high-level, a Q-Instruct model for low-level prompts) about every LR/HR image
and appends one JSONL record per (image_id, source, task). Readers:

    load_captions(path_or_paths) -> {(image_id, source, task): text}
    merge_caption_files(paths, out) -> int

Importing this package needs no torch; only captioning does.
"""

from xpsr_jax.captions.io import CaptionInputError, load_captions, merge_caption_files

__all__ = ["CaptionInputError", "load_captions", "merge_caption_files"]
