"""`python -m xpsr_jax.experiments.mllm_ablation`: the paper's MLLM study (supplement Table 3) as
one command. For each setting: captions of the LR made by the MLLM the setting names (what it sees
and how it is asked), SR with those captions, evaluation; then one table in the layout of Table 3
with the paper's numbers beside ours, as Markdown and JSON.

    python -m xpsr_jax.experiments.mllm_ablation --lr DRealSR/LR --gt DRealSR/HR --dataset DRealSR \\
        --weights XPSR --sd15 SD15 --captioner /models/llava-1.5-7b-hf \\
        --lowlevel-captioner /models/qinstruct-llava-hf --out ablation \\
        --settings original,llava13b=/models/llava-1.5-13b-hf,simple,downscale64,upscale256,blur,jpeg

Settings (only the captions change; the SR network always sees the original LR):
    original            the captioner(s) on the LR as it is
    llava13b=DIR        another (larger) high-level captioner
    simple              at most 20 words naming objects / distortions
    downscale64         the MLLM sees the LR downscaled to 64 px (shorter side)
    upscale256          ... upscaled to 256 px
    blur[=SIGMA]        ... Gaussian-blurred (sigma 2 px by default)
    jpeg[=QUALITY]      ... JPEG-compressed (quality 30 by default)

Each stage is resumable: `OUT/SETTING/sr/` holds the outputs and `captions.jsonl` (infer.py's own
resume: finished images and made captions are kept), `OUT/SETTING/metrics.json` the scores; a rerun
skips the settings whose outputs are all there and whose metrics are written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xpsr_jax.captions.io import list_images
from xpsr_jax.evaluation.iqa import IQA_METRICS
from xpsr_jax.evaluation.paper import MLLM_ABLATION_METRICS, PAPER_MLLM_ABLATION
from xpsr_jax.evaluation.runner import evaluate_folders
from xpsr_jax.inference import cli as infer_cli

SETTING_NAMES = ("original", "llava13b", "simple", "downscale64", "upscale256", "blur", "jpeg")
DEFAULT_SETTINGS = "original,simple,downscale64,upscale256,blur,jpeg"
LABELS = {"original": "original (captions of the LR)", "llava13b": "+ LLaVA-13b captions",
          "simple": "+ simple description (<= 20 words)", "downscale64": "+ captions of the LR downscaled to 64 px",
          "upscale256": "+ captions of the LR upscaled to 256 px", "blur": "+ captions of a Gaussian-blurred LR",
          "jpeg": "+ captions of a JPEG-compressed LR"}
HEADERS = {"ssim": "SSIM", "lpips": "LPIPS", "fid": "FID", "maniqa_koniq": "MANIQA", "musiq": "MUSIQ"}


def parse_settings(spec: str, captioner: str) -> dict[str, dict]:
    """'original,llava13b=DIR,blur=3' -> {name: {captioner, caption_transform, question_preset}}."""
    settings = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in SETTING_NAMES:
            raise ValueError(f"--settings {item!r}: unknown setting; valid: {', '.join(SETTING_NAMES)} "
                             "(llava13b=DIR, blur=SIGMA, jpeg=QUALITY take a value)")
        setting = {"captioner": captioner, "caption_transform": "", "question_preset": "official"}
        if name == "llava13b":
            if not value:
                raise ValueError("--settings llava13b needs the model folder: llava13b=DIR")
            setting["captioner"] = value
        elif value and name not in ("blur", "jpeg"):
            raise ValueError(f"--settings {item!r}: {name} takes no value")
        elif name == "simple":
            setting["question_preset"] = "simple"
        elif name == "downscale64":
            setting["caption_transform"] = "downscale:64"
        elif name == "upscale256":
            setting["caption_transform"] = "upscale:256"
        elif name == "blur":
            setting["caption_transform"] = f"gaussian_blur:{value or 2}"
        elif name == "jpeg":
            setting["caption_transform"] = f"jpeg:{value or 30}"
        if name in settings:
            raise ValueError(f"--settings names {name!r} twice")
        settings[name] = setting
    if not settings:
        raise ValueError("--settings names no setting")
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xpsr_jax.experiments.mllm_ablation",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--lr", required=True, help="folder of LR images (a plain folder: no prompts needed)")
    parser.add_argument("--gt", help="folder of HR references, paired by file stem (full-reference metrics)")
    parser.add_argument("--dataset", choices=tuple(PAPER_MLLM_ABLATION), help="print the paper's numbers beside ours")
    parser.add_argument("--weights", required=True, help="XPSR weights, as for infer.py")
    parser.add_argument("--sd15", help="the SD 1.5 base, as for infer.py (a folder or the single file)")
    parser.add_argument("--tokenizer", help="with a single-file --sd15, as for infer.py")
    parser.add_argument("--captioner", required=True, help="the high-level (and, alone, low-level) MLLM folder")
    parser.add_argument("--lowlevel-captioner", help="the low-level MLLM folder (Q-Instruct); default: --captioner")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated (default: %(default)s)")
    parser.add_argument("--metrics", default=",".join(MLLM_ABLATION_METRICS),
                        help="metrics to compute (default: %(default)s); those that cannot run are named")
    parser.add_argument("--config", default=infer_cli.DEFAULT_CONFIG, metavar="FILE.py[:VARIANT]",
                        help="inference config for every setting (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an inference config override for every setting (as --config.KEY=VALUE of infer.py)")
    parser.add_argument("--out", required=True, help="output folder: one subfolder per setting, table.md, table.json")
    return parser


def sr_done(lr_files: list[Path], sr_dir: Path) -> bool:
    return all(infer_cli.is_finished_output(sr_dir / f"{path.stem}.png") for path in lr_files)


def run_setting(name: str, setting: dict, args, lr_files: list[Path], metrics: list[str]) -> dict:
    folder = Path(args.out) / name
    sr_dir, metrics_path = folder / "sr", folder / "metrics.json"
    if sr_done(lr_files, sr_dir) and metrics_path.is_file():
        print(f"[{name}] done before: skipped", flush=True)
        return json.loads(metrics_path.read_text())
    if sr_done(lr_files, sr_dir):
        print(f"[{name}] SR outputs done before; evaluating", flush=True)
    else:
        print(f"[{name}] captions ({setting['caption_transform'] or 'the LR as it is'}, "
              f"{setting['question_preset']} questions) and SR", flush=True)
        argv = ["--weights", args.weights, "--input", args.lr, "--output", str(sr_dir), "--config", args.config,
                "--captioner", setting["captioner"], "--caption-transform", setting["caption_transform"],
                f"--config.captioner.question_preset={setting['question_preset']}",
                *(f"--config.{item}" for item in args.set)]
        argv += ["--sd15", args.sd15] if args.sd15 else []
        argv += ["--tokenizer", args.tokenizer] if args.tokenizer else []
        # llava13b replaces the high-level captioner only; the low-level one stays the study's.
        lowlevel = args.lowlevel_captioner or (args.captioner if setting["captioner"] != args.captioner else None)
        argv += ["--lowlevel-captioner", lowlevel] if lowlevel else []
        code = infer_cli.main(argv)
        if code != 0 or not sr_done(lr_files, sr_dir):
            raise RuntimeError(f"[{name}] infer.py exited with status {code}; its errors are above. Rerun the same "
                               "command to resume")
    result = evaluate_folders(sr_dir, args.gt, metrics, progress=False)
    record = {"setting": name, "means": result.means, "unavailable": result.unavailable,
              "images": len(result.per_image), "captioner": setting["captioner"],
              "caption_transform": setting["caption_transform"], "question_preset": setting["question_preset"]}
    tmp = metrics_path.with_name(metrics_path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(metrics_path)
    return record


def table(records: list[dict], metrics: list[str], dataset: str | None) -> str:
    def cells(values):
        return " | ".join("n/a" if value is None else f"{value:.4f}" if value < 10 else f"{value:.2f}"
                          for value in values)

    names = [HEADERS.get(m, m) for m in metrics]
    header = "| setting | " + " | ".join(names) + " |"
    rule = "|---|" + "---:|" * len(metrics)
    if dataset:
        header += f" paper ({dataset}): " + " / ".join(HEADERS[m] for m in MLLM_ABLATION_METRICS) + " |"
        rule += "---|"
    lines = [header, rule]
    for record in records:
        line = f"| {LABELS[record['setting']]} | {cells(record['means'].get(m) for m in metrics)} |"
        if dataset:
            paper = PAPER_MLLM_ABLATION[dataset].get(record["setting"])
            line += " " + (" / ".join(f"{v:g}" for v in paper) if paper else "") + " |"
        lines.append(line)
    unavailable = {}
    for record in records:
        unavailable.update(record["unavailable"])
    if unavailable:
        lines += ["", "Not computed: " + "; ".join(f"{m}: {why}" for m, why in unavailable.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = parse_settings(args.settings, args.captioner)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if m not in ("psnr", "ssim", *IQA_METRICS)]
        if unknown:
            raise ValueError(f"--metrics: unknown {unknown}; valid: psnr, ssim, {', '.join(IQA_METRICS)}")
        lr_files = list_images(args.lr)
        if not lr_files:
            raise ValueError(f"--lr {args.lr}: no images")
        records = [run_setting(name, setting, args, lr_files, metrics) for name, setting in settings.items()]
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    text = table(records, metrics, args.dataset)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps({"dataset": args.dataset, "metrics": metrics, "rows": records,
                                                "paper": PAPER_MLLM_ABLATION.get(args.dataset)}, indent=1))
    print(text + f"\nwrote {out / 'table.md'} and {out / 'table.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
