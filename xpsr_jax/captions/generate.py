"""Captioning with a transformers image-text-to-text model (PyTorch).

Any model folder that ``AutoProcessor`` + ``AutoModelForImageTextToText`` load
works (LLaVA-1.5 in its ``-hf`` format is the default). torch is an optional
extra of this package, so it is imported inside the functions here.

Public API:
    import_torch() -> module
    resolve_device(name) -> str
    resolve_dtype(name, device) -> torch.dtype
    check_model_dir(path) -> pathlib.Path
    Captioner.load(model_dir, question, device, dtype, prompt_template=None) -> Captioner
    Captioner.caption(images, max_new_tokens, do_sample, temperature, top_p) -> list[str]
"""

from __future__ import annotations

import pathlib
import sys

from packaging.version import Version

from xpsr_jax.captions.io import CaptionInputError

INSTALL_HINT = "pip install 'xpsr-jax[torch]'"
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def import_torch():
    """``torch``, or SystemExit with the install command when it is missing."""
    try:
        import torch  # lazy: optional dependency (the `torch` extra), named in the error
    except ImportError:
        sys.exit(f"xpsr_jax.captions needs PyTorch and transformers: {INSTALL_HINT}")
    return torch


def resolve_device(name: str | None) -> str:
    """``name``, or ``"cuda"`` when a GPU is visible else ``"cpu"``."""
    torch = import_torch()
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CaptionInputError(f"--device {name!r}: torch sees no CUDA GPU; use --device cpu")
    return name


def resolve_dtype(name: str, device: str):
    """torch dtype for ``name`` in auto|bf16|fp16|fp32.

    ``auto``: bf16 on a GPU (fp16 where the GPU lacks bf16), fp32 on CPU, where
    half-precision matmuls are slow or missing.
    """
    torch = import_torch()
    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise CaptionInputError(f"--dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return getattr(torch, _DTYPES[name])


def check_model_dir(path: str) -> pathlib.Path:
    """The local model folder; nothing is ever downloaded, so it must exist."""
    folder = pathlib.Path(path)
    if not (folder / "config.json").is_file():
        what = "has no config.json" if folder.is_dir() else "is a file, not a folder" if folder.exists() else \
            "does not exist"
        raise CaptionInputError(
            f"captioning model folder {path!r} {what}. Weights are never downloaded here: fetch "
            f"them beforehand, e.g. `hf download llava-hf/llava-1.5-7b-hf --local-dir {path}`, "
            "and give that folder"
        )
    return folder


def _dtype_kwarg(dtype) -> dict:
    """The dtype keyword of from_pretrained: ``dtype`` from transformers 4.56 on."""
    import transformers  # lazy: seconds to import; only the caption models need it

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


class Captioner:
    """A processor + model pair that answers one fixed question about images."""

    def __init__(self, processor, model, prompt: str, device: str, dtype):
        self.processor = processor
        self.model = model
        self.prompt = prompt
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, model_dir, question, device, dtype, prompt_template=None) -> Captioner:
        """Loads ``model_dir`` (local files only) onto ``device`` in ``dtype``.

        ``prompt_template`` (with ``{question}``) replaces the processor's chat
        template, for model folders that ship none.
        """
        import_torch()
        from transformers import (  # lazy: as above
            AutoModelForImageTextToText,
            AutoProcessor,
        )

        check_model_dir(model_dir)
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        # Decoder-only generation continues from the last position: pad on the left.
        processor.tokenizer.padding_side = "left"
        prompt = build_prompt(processor, question, prompt_template, model_dir)
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, local_files_only=True, **_dtype_kwarg(dtype)
        )
        model = model.to(device).eval()
        return cls(processor, model, prompt, device, dtype)

    def caption(
        self, images, max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0
    ) -> list[str]:
        """Answers for a batch of PIL images, in order: new tokens only, stripped."""
        torch = import_torch()
        inputs = self.processor(
            images=list(images), text=[self.prompt] * len(images), padding=True, return_tensors="pt"
        ).to(self.device, self.dtype)
        options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            options.update(temperature=temperature, top_p=top_p)
        pad_id = self.processor.tokenizer.pad_token_id
        if pad_id is not None:
            options["pad_token_id"] = pad_id
        with torch.inference_mode():
            output_ids = self.model.generate(**inputs, **options)
        new_ids = output_ids[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_ids, skip_special_tokens=True)
        return [text.strip() for text in texts]


def build_prompt(processor, question: str, prompt_template: str | None, model_dir: str) -> str:
    """The full model prompt for ``question``: the template if given, else the chat template."""
    if prompt_template is not None:
        if "{question}" not in prompt_template:
            raise CaptionInputError(f"--prompt-template {prompt_template!r} lacks '{{question}}'")
        return prompt_template.replace("{question}", question)
    if getattr(processor, "chat_template", None) is None:
        raise CaptionInputError(
            f"model folder {model_dir!r} has no chat template; pass one with --prompt-template, "
            "e.g. 'USER: <image>\\n{question} ASSISTANT:' for LLaVA-1.5"
        )
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)
