"""`python -m xpsr_jax.demo`: the XPSR web demo (Gradio) on 127.0.0.1.

    python -m xpsr_jax.demo --weights XPSR --sd15 SD15 [--captioner LLAVA_DIR] [--port 7860]

Everything is checked before the page starts (weights, config, captioner folder, the Gradio extra);
bad input then gets a message in the page. The inference config (`--config configs/infer.py`,
`--config.KEY=VALUE`) gives the defaults of the page's controls and the rest of the recipe.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from xpsr_jax.captions.io import CaptionInputError
from xpsr_jax.cli_config import CommandParser, parse_command_line, report_error
from xpsr_jax.compile_cache import DEFAULT as DEFAULT_CACHE
from xpsr_jax.compile_cache import use_compile_cache, user_cache_dir
from xpsr_jax.demo.app import serve
from xpsr_jax.demo.service import DemoService, PromptCaptioner
from xpsr_jax.examples import write_lr_images
from xpsr_jax.files import image_files
from xpsr_jax.inference.cli import DEFAULT_CONFIG, apply_captioner_flags
from xpsr_jax.inference.config import validate_infer_config
from xpsr_jax.inference.pipeline import WeightsFolderError, XPSRPipeline
from xpsr_jax.models.single_file import add_single_file_arguments

EXTRA_HINT = "pip install 'xpsr-jax[demo]' (or pip install -e '.[demo]' in a checkout)"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m xpsr_jax.demo", description="XPSR super-resolution in the browser: upload, compare "
        "bicubic x4 with XPSR on a slider, download the PNG.",
        epilog="Config: --config configs/infer.py[:validation|tiny] and --config.KEY=VALUE overrides set the "
               "page's defaults and the rest of the recipe; --config.max_output_pixels limits uploads.")
    parser.add_argument("--weights", required=True, help="an XPSR release folder (unet/, controlnet/) or an orbax "
                        "inference checkpoint")
    parser.add_argument("--sd15", help="SD 1.5 folder, or the single file v1-5-pruned-emaonly.safetensors "
                        "(default: --weights when it has the SD 1.5 subfolders)")
    add_single_file_arguments(parser)
    parser.add_argument("--captioner", metavar="DIR", help="an image-text-to-text model folder (LLaVA-1.5 -hf): "
                        "a 'caption' button, and empty prompts are written by it")
    parser.add_argument("--lowlevel-captioner", metavar="DIR", help="a second model for the low-level prompts "
                        "(Q-Instruct); default: --captioner answers both")
    parser.add_argument("--caption-transform", metavar="SPEC", help="what the captioner sees, e.g. downscale:64")
    parser.add_argument("--examples", metavar="DIR", help="a folder of LR images offered as examples (default: "
                        "the packaged sample images at 1/4 size)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this "
                        "machine only; 0.0.0.0 serves the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--config", metavar="FILE.py[:VARIANT]", help="inference config (default configs/infer.py)")
    return parser


def example_inputs(folder: str | None, work: Path) -> list[str]:
    """The example LR images: `folder`'s images as they are, or the packaged HR samples downscaled
    x1/4 (bicubic) into `work`, so that an example's SR output is the sample's own size."""
    if folder is not None:
        return [str(path) for path in image_files(folder, "--examples")]
    return [str(path) for path in write_lr_images(work)]


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_command_line(build_parser(), argv, default=DEFAULT_CONFIG)
    if importlib.util.find_spec("gradio") is None:
        report_error(ModuleNotFoundError(f"the demo needs Gradio: {EXTRA_HINT}"))
        return 2
    try:
        apply_captioner_flags(args, config)
        validate_infer_config(config)
        if not 0 < args.port < 65536:
            raise ValueError(f"--port {args.port}: give a port in 1..65535")
        # The captioner (PyTorch) loads first, before JAX claims the device's memory.
        captioner = PromptCaptioner.load(config.captioner) if config.captioner.model else None
        use_compile_cache(config.get("compile_cache", DEFAULT_CACHE), user_cache_dir())
        pipeline = XPSRPipeline.from_pretrained(args.weights, sd15=args.sd15, config=config, tokenizer=args.tokenizer,
                                                sd15_config=args.sd15_config)
        service = DemoService(pipeline, captioner=captioner)
        examples = example_inputs(args.examples, service.output_dir / "examples")
    except (ValueError, FileNotFoundError, WeightsFolderError, CaptionInputError) as error:
        report_error(error)
        return 2
    print(f"XPSR demo on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    try:
        serve(service, examples=examples, host=args.host, port=args.port)
    except OSError as error:  # the port is taken, the address is not this machine's, ...
        report_error(OSError(f"cannot serve on {args.host}:{args.port}: {error}"))
        return 2
    except KeyboardInterrupt:
        pass
    return 0
