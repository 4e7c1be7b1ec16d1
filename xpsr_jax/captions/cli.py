"""``python -m xpsr_jax.captions``: precompute MLLM prompts for LR/HR images.

    main(argv=None) -> int          parse, then run or merge
    run(config) -> pathlib.Path     caption one shard, resumably; returns its file

See ``build_parser`` (``--help``) for the options and examples.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

from ml_collections import config_dict

from xpsr_jax.captions import (
    batches,
    generate,  # torch-free until a model is needed
    io,
    provenance,
    transforms,
    work,
)
from xpsr_jax.captions.config import (
    DTYPES,
    QUESTION_PRESETS,
    QUESTIONS,
    SIMPLE_WORD_LIMIT,
    TASKS,
    get_config,
    question_for,
)
from xpsr_jax.cli_config import CommandParser, ConfigFlagError, load_config_file
from xpsr_jax.progress import progress_bar

EPILOG = """\
examples:
  # high-level prompts (LLaVA-1.5-7B) for LR and HR images
  python -m xpsr_jax.captions --task highlevel --model /models/llava-1.5-7b-hf \\
      --lr-dir data/LR --hr-dir data/HR --output captions.jsonl
  # low-level prompts with a Q-Instruct model in transformers format, same file
  python -m xpsr_jax.captions --task lowlevel --model /models/qinstruct-llava-hf \\
      --lr-dir data/LR --hr-dir data/HR --output captions.jsonl
  # one process per GPU, then merge the shard files
  for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python -m xpsr_jax.captions \\
      --shard $i --num-shards 4 --lr-dir data/LR --hr-dir data/HR \\
      --output captions.jsonl --model /models/llava-1.5-7b-hf & done; wait
  python -m xpsr_jax.captions --merge captions.shard-*-of-4.jsonl --output captions.jsonl

A killed run is resumed by running the same command again: records already in
the output file are skipped. Model folders are never downloaded.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; defaults come from ``config.get_config()``."""
    defaults = get_config()
    parser = CommandParser(
        prog="python -m xpsr_jax.captions",
        description="Caption LR/HR images with a vision-language model into a JSONL file "
        "(one record per image, source and task).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_argument_group("images and output")
    inputs.add_argument(
        "--lr-dir", help="folder of LR images (png/jpg/jpeg/webp/bmp; id = file stem)"
    )
    inputs.add_argument("--hr-dir", help="folder of HR images")
    inputs.add_argument(
        "--output",
        default=defaults.output,
        help="JSONL file, appended to (default: %(default)s); with --num-shards N > 1 each "
        "shard writes {stem}.shard-i-of-N.jsonl beside it",
    )
    model = parser.add_argument_group("model and question")
    model.add_argument(
        "--model",
        default=defaults.model,
        help="LOCAL folder of a transformers image-text-to-text model (default: %(default)s, "
        "which must be downloaded there beforehand)",
    )
    model.add_argument(
        "--task",
        choices=TASKS,
        default=defaults.task,
        help="which prompt kind to make; picks the default question: "
        + "; ".join(f"{task}: {q!r}" for task, q in QUESTIONS.items()),
    )
    model.add_argument("--question", help="ask this instead of the task's official question")
    model.add_argument("--question-preset", choices=QUESTION_PRESETS, default=defaults.question_preset,
                       help=f"simple: ask for at most {SIMPLE_WORD_LIMIT} words naming objects (highlevel) or "
                       f"distortions (lowlevel) and cut longer answers there (default: %(default)s)")
    model.add_argument("--caption-transform", default=defaults.caption_transform, metavar="SPEC",
                       help="transform the image the model sees (never the image file), comma-separated, in "
                       f"order: {transforms.FORMS}; e.g. downscale:64,upscale:256 (recorded in each record)")
    model.add_argument(
        "--prompt-template",
        help="prompt with {question} (\\n is a newline) for model folders without a chat "
        "template, e.g. 'USER: <image>\\n{question} ASSISTANT:'",
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                     help="default: %(default)s")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=defaults.temperature,
                     help="with --do-sample (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=defaults.top_p,
                     help="with --do-sample (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=defaults.seed,
                     help="torch seed for --do-sample (default: %(default)s)")
    gen.add_argument("--batch-size", type=int, default=defaults.batch_size,
                     help="images per generate call (default: %(default)s)")
    gen.add_argument("--dtype", choices=DTYPES, default=defaults.dtype,
                     help="auto: bf16 on GPU, fp32 on CPU (default: %(default)s)")
    gen.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    par = parser.add_argument_group("sharding and resuming")
    par.add_argument("--shard", type=int, default=defaults.shard,
                     help="this process's shard, 0..num-shards-1 (default: %(default)s)")
    par.add_argument("--num-shards", type=int, default=defaults.num_shards,
                     help="number of disjoint shards of the image list (default: %(default)s)")
    par.add_argument("--max-images", type=int,
                     help="stop after captioning this many images (smoke tests)")
    par.add_argument(
        "--merge", nargs="+", metavar="FILE",
        help="instead of captioning: merge these caption files (dedupe, check) into --output",
    )
    parser.add_argument("--config", metavar="FILE.py[:VARIANT]",
                        help="a config file whose get_config() sets any of these options (flags win)")
    return parser


def config_from_args(args: argparse.Namespace) -> config_dict.ConfigDict:
    """The locked run config: defaults (or a --config file's, loaded as every command loads
    configs), overridden by the parsed arguments."""
    config = get_config()
    defaults = get_config()
    if args.config:
        try:
            loaded = load_config_file(args.config)
        except ConfigFlagError as error:  # a missing file, or one whose get_config() raises
            raise io.CaptionInputError(str(error)) from error
        if not isinstance(loaded, (dict, config_dict.ConfigDict)):
            raise io.CaptionInputError(f"--config {args.config}: get_config() returned a {type(loaded).__name__}, "
                                       "not a ConfigDict")
        unknown = sorted(set(loaded) - set(config))
        if unknown:
            raise io.CaptionInputError(f"--config {args.config}: unknown caption keys {unknown}; valid: "
                                       f"{', '.join(sorted(config))}")
        for key in loaded:
            config[key] = loaded[key]
    for key in config:
        value = getattr(args, key)
        # The parser's defaults are get_config()'s: a flag overrides a --config file only if given
        # with another value.
        if value is not None and (not args.config or value != defaults[key]):
            setattr(config, key, value)
    if config.prompt_template is not None:
        # Shells pass "\n" literally; the template needs a real newline.
        config.prompt_template = config.prompt_template.replace("\\n", "\n")
    return config


def check_numbers(config: config_dict.ConfigDict) -> None:
    """Raises CaptionInputError for counts that cannot work."""
    for key in ("batch_size", "max_new_tokens"):
        if config[key] < 1:
            raise io.CaptionInputError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    if config.max_images is not None and config.max_images < 1:
        raise io.CaptionInputError(f"--max-images must be >= 1, got {config.max_images}")
    if config.question_preset not in QUESTION_PRESETS:
        raise io.CaptionInputError(f"--question-preset {config.question_preset!r} is not one of "
                                   f"{', '.join(QUESTION_PRESETS)}")
    # Checked here, not by generate() after the model has loaded.
    if config.do_sample and not (math.isfinite(config.temperature) and config.temperature > 0):
        raise io.CaptionInputError(f"--temperature must be a finite number > 0 with --do-sample, "
                                   f"got {config.temperature}")
    if config.do_sample and not 0 < config.top_p <= 1:
        raise io.CaptionInputError(f"--top-p must be in (0, 1] with --do-sample, got {config.top_p}")
    for key in ("question", "prompt_template"):
        if config[key] is not None and not is_unicode(config[key]):
            raise io.CaptionInputError(f"--{key.replace('_', '-')} {config[key]!r} is not valid text (bytes in "
                                       "another encoding than UTF-8)")


def is_unicode(text: str) -> bool:
    """False for command-line bytes that were not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def drop_stale_records(existing: list[dict], items: list[work.WorkItem], task: str, out: pathlib.Path) -> list[dict]:
    """`existing` without the records of images that changed since they were captioned (their
    `image_sha256` is not the file's now), rewritten into `out` when there were any, so those images
    are captioned again. Records without the hash (written by hand, or by an older version) are kept:
    the field is optional in this file format."""
    hashed = {io.record_key(r) for r in existing if r["task"] == task and r.get("image_sha256")}
    current = {(item.image_id, item.source, task): provenance.file_sha256(item.path) for item in items
               if (item.image_id, item.source, task) in hashed}
    kept, stale = provenance.split_stale(existing, current, require_hash=False)
    if stale:
        io.replace_records(out, kept)
        _say(f"{len(stale)} record(s) in {out} are of images that changed since (another file under the same "
             "name): dropped, captioned again")
    return kept


def _say(message: str) -> None:
    print(f"[xpsr_jax.captions] {message}", file=sys.stderr, flush=True)


def run(config: config_dict.ConfigDict) -> pathlib.Path:
    """Captions this shard's images not yet in its output file; returns that file.

    Each batch is appended and fsynced before the next one starts, so a killed
    run loses at most the batch in flight.
    """

    check_numbers(config)
    transform_spec = transforms.describe(transforms.parse_transforms(config.caption_transform))
    items = work.build_work_list({"lr": config.lr_dir, "hr": config.hr_dir})
    shard_items = work.select_shard(items, config.shard, config.num_shards)
    out = io.shard_output_path(config.output, config.shard, config.num_shards)
    question = question_for(config)
    existing = io.repair_partial_tail(out)
    batches.check_same_question(existing, config.task, question, out, transform_spec)
    generate.check_model_dir(config.model)
    fingerprint = provenance.model_fingerprint(config.model)
    provenance.check_same_model(existing, config.task, config.model, fingerprint, out)
    existing = drop_stale_records(existing, shard_items, config.task, out)
    todo = work.pending(shard_items, config.task, {io.record_key(r) for r in existing})
    _say(
        f"shard {config.shard}/{config.num_shards}: {len(shard_items)} of {len(items)} images, "
        f"{len(shard_items) - len(todo)} already in {out}, {len(todo)} to caption ({config.task})"
    )
    if config.max_images is not None:
        todo = todo[: config.max_images]
    if not todo:
        return out

    settings = batches.CaptionSettings(
        task=config.task, question=question, model_name=config.model, model_fingerprint=fingerprint,
        question_preset=config.question_preset, caption_transform=transform_spec, batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens, do_sample=config.do_sample, temperature=config.temperature,
        top_p=config.top_p, prompt_template=config.prompt_template)
    with io.CaptionWriter(out) as writer:  # opened before the model loads: an unwritable file fails first
        _say(f"loading {config.model}")
        captioner = batches.load_captioner(config.model, question, settings, config.device, config.dtype)
        if config.do_sample:
            generate.import_torch().manual_seed(config.seed)
        start = time.perf_counter()
        with progress_bar(total=len(todo), unit="img", desc=f"{config.task} captions") as bar:
            batches.caption_items(captioner, todo, settings, writer, bar)
    seconds = time.perf_counter() - start
    rate = len(todo) / seconds
    _say(f"wrote {len(todo)} captions to {out} in {seconds:.1f} s ({rate:.2f} img/s)")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input exits with status 2 and a message naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.merge:
            if args.lr_dir or args.hr_dir:
                raise io.CaptionInputError("--merge takes no --lr-dir/--hr-dir")
            count = io.merge_caption_files(args.merge, args.output)
            _say(f"merged {len(args.merge)} files into {args.output}: {count} records")
        else:
            run(config_from_args(args))
    except io.CaptionInputError as error:
        parser.error(str(error))
    return 0
