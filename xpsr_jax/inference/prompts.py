"""Where an image's two prompts come from: the official folder layout, a captions JSONL, or flags.

Official layout (the release's test sets, read by `xpsr_jax.data.official_layout`, the rule
training validation and the TFDS builder share): `ROOT/LR/NAME.png` with
`ROOT/highlevel_prompt/NAME.txt` and `ROOT/lowlevel_prompt_q/NAME.txt`. A captions JSONL (the
`xpsr_jax.captions` format) is keyed by image id = file stem, with the LR image's captions
(`source` "lr"). Captions made on the fly (infer.py --captioner) are the last resort:
`add_made_captions`.
"""

from __future__ import annotations

import os
from pathlib import Path

from xpsr_jax.captions.io import load_captions
from xpsr_jax.data.official_layout import (
    HIGHLEVEL_FOLDER,
    LOWLEVEL_PREFIX,
    lowlevel_prompt_folder,
    prompt_path,
    read_prompt,
)

CAPTIONER_HINT = "or --captioner DIR to have an MLLM make the missing prompts"


class MissingPromptError(LookupError):
    """No prompt of the requested kind for an image (the message names the image and where)."""


class PromptSource:
    """`source.prompts(image_path) -> (highlevel caption, lowlevel description)`; raises
    MissingPromptError naming the image and the missing file or record."""

    def __init__(self, *, official_root: Path | None = None, captions: str | os.PathLike | None = None,
                 highlevel: str | None = None, lowlevel: str | None = None, caption_source: str = "lr"):
        self.official_root = official_root
        self.captions = load_captions(captions) if captions else None
        self.captions_path = captions
        self.highlevel, self.lowlevel = highlevel, lowlevel
        self.caption_source = caption_source
        self.made: dict[tuple[str, str, str], str] = {}  # (image id, "lr", kind) -> caption made on the fly
        self.lowlevel_folder = None
        if official_root is not None:
            self.lowlevel_folder = lowlevel_prompt_folder(official_root)

    def describe(self) -> str:
        parts = []
        if self.captions is not None:
            parts.append(f"captions {self.captions_path}")
        if self.official_root is not None:
            parts.append(f"official layout {self.official_root}")
        if self.highlevel is not None or self.lowlevel is not None:
            parts.append("command line")
        if self.made:
            parts.append("the captioner")
        return ", ".join(parts) or "none"

    def add_made_captions(self, captions) -> None:
        """Captions made on the fly, keyed (image id, "lr", kind): used where no other source has one."""
        self.made.update(captions)

    def _official(self, image: Path, folder: str | None, kind: str) -> str | None:
        if self.official_root is None:
            return None
        if folder is None:
            raise MissingPromptError(f"{image}: no {kind} prompt: {self.official_root} has no "
                                     f"{LOWLEVEL_PREFIX}*/ folder")
        path = prompt_path(self.official_root, folder, Path(image.name))
        if not path.is_file():
            raise MissingPromptError(f"{image}: no {kind} prompt: {path} does not exist")
        return read_prompt(path)

    def _one(self, image: Path, kind: str, flag_value: str | None, folder: str | None) -> str:
        if flag_value is not None:
            return flag_value
        if self.captions is not None:
            key = (image.stem, self.caption_source, kind)
            if key in self.captions:
                return self.captions[key]
            if self.official_root is None:
                raise MissingPromptError(f"{image}: no {kind} prompt: {self.captions_path} has no record for "
                                         f"image_id {image.stem!r} (source {self.caption_source!r}); "
                                         f"{CAPTIONER_HINT}")
        value = self._official(image, folder, kind)
        if value is None:
            raise MissingPromptError(f"{image}: no {kind} prompt: give --captions, --{kind}-prompt or the "
                                     f"official folder layout; {CAPTIONER_HINT}")
        return value

    def _kind(self, image: Path, kind: str) -> str:
        flag, folder = (self.highlevel, HIGHLEVEL_FOLDER) if kind == "highlevel" else \
            (self.lowlevel, self.lowlevel_folder)
        try:
            return self._one(image, kind, flag, folder)
        except MissingPromptError:
            if (image.stem, "lr", kind) in self.made:
                return self.made[(image.stem, "lr", kind)]
            raise

    def missing_kinds(self, image: Path) -> list[str]:
        """The prompt kinds no source has for `image` ("highlevel", "lowlevel")."""
        missing = []
        for kind in ("highlevel", "lowlevel"):
            try:
                self._kind(image, kind)
            except MissingPromptError:
                missing.append(kind)
        return missing

    def prompts(self, image: Path) -> tuple[str, str]:
        return self._kind(image, "highlevel"), self._kind(image, "lowlevel")
