"""The official XPSR folder layout, read in one place: test sets (infer.py, training validation,
the MLLM study) and training sets (the TFDS builder's `official` config).

    ROOT/LR/<rel>.png     ROOT/highlevel_prompt/<rel>.txt      (caption of the LR image)
    ROOT/HR/<rel>.png     ROOT/lowlevel_prompt_q/<rel>.txt     (quality description of the LR image)
                          ROOT/highlevel_prompt_GT/<rel>.txt   (of the HR image; training sets)
                          ROOT/lowlevel_prompt_q_GT/<rel>.txt  (of the HR image; training sets)

`<rel>` is the image's path below LR/ (or HR/) without its suffix. The low-level folder rule,
`lowlevel_prompt_folder`: `lowlevel_prompt_q/` (what the release's loader and test script read)
wins; without it, the only other `lowlevel_prompt*/` folder (e.g. `lowlevel_prompt/`); several
others are ambiguous and refused; `..._GT` folders count only for the HR image. A prompt is the
file's first line with leading spaces removed (the release's `readlines()[0].lstrip()`).
"""

from __future__ import annotations

from pathlib import Path

LR_FOLDER = "LR"
HR_FOLDER = "HR"
HIGHLEVEL_FOLDER = "highlevel_prompt"
LOWLEVEL_PREFIX = "lowlevel_prompt"
LOWLEVEL_FOLDER = "lowlevel_prompt_q"
GT_SUFFIX = "_GT"  # prompts of the HR image
PROMPT_KINDS = ("highlevel", "lowlevel")


def is_official_layout(folder: Path) -> bool:
    """A folder with an `LR/` subfolder is read as the official layout."""
    return folder.is_dir() and (folder / LR_FOLDER).is_dir()


def lowlevel_prompt_folder(root: Path, of_hr: bool = False) -> str | None:
    """The low-level prompt folder of `root` (see the module docstring), None when there is none;
    ValueError naming the candidates when several other folders could be meant."""
    suffix = GT_SUFFIX if of_hr else ""
    preferred = LOWLEVEL_FOLDER + suffix
    candidates = sorted(p.name for p in root.iterdir()
                        if p.is_dir() and p.name.startswith(LOWLEVEL_PREFIX)
                        and p.name.endswith(GT_SUFFIX) == of_hr)
    if preferred in candidates or not candidates:
        return preferred if candidates else None
    if len(candidates) > 1:
        raise ValueError(f"{root}: several low-level prompt folders {candidates} and no {preferred}/; "
                         f"rename the one to use to {preferred}/")
    return candidates[0]


def prompt_folder(root: Path, kind: str, of_hr: bool = False) -> str | None:
    """The folder holding `kind` ("highlevel" / "lowlevel") prompts of the LR (or HR) images."""
    if kind == "highlevel":
        return HIGHLEVEL_FOLDER + (GT_SUFFIX if of_hr else "")
    if kind == "lowlevel":
        return lowlevel_prompt_folder(root, of_hr)
    raise ValueError(f"prompt kind {kind!r}; valid: {', '.join(PROMPT_KINDS)}")


def prompt_path(root: Path, folder: str, relative: Path) -> Path:
    """The prompt file of the image at `root/LR/relative` (or `root/HR/relative`)."""
    return root / folder / relative.with_suffix(".txt")


def read_prompt(path: Path) -> str:
    """The file's first line, leading spaces removed; "" for an empty file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].lstrip() if lines else ""

