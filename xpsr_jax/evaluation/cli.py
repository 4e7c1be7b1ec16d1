"""``python -m xpsr_jax.evaluate``: score SR predictions with the paper's metrics.

    main(argv=None) -> int      0 on success; 2 with "error: ..." on stderr otherwise
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xpsr_jax.cli_config import CommandParser, report_error
from xpsr_jax.data.images import ImageReadError
from xpsr_jax.evaluation.pairing import PairingError
from xpsr_jax.evaluation.paper import PAPER_RESULTS, paper_results
from xpsr_jax.evaluation.report import markdown_table, unavailable_text, write_reports
from xpsr_jax.evaluation.runner import ALL_METRICS, evaluate_folders, parse_metric_names

EPILOG = """\
examples:
  # full-reference (RealSR / DRealSR style), all metrics that can run, reports in eval/
  python -m xpsr_jax.evaluate --pred out/RealSR --gt data/RealSR/HR --out eval/RealSR \\
      --paper --dataset RealSR
  # no-reference (RealLR200 style): only no-reference metrics
  python -m xpsr_jax.evaluate --pred out/RealLR200 --metrics musiq,maniqa_koniq,clipiqa
  # PSNR/SSIM on Y with a 4-pixel crop border
  python -m xpsr_jax.evaluate --pred out --gt hr --metrics psnr,ssim --crop-border 4

Images pair by file stem (0001.png <-> 0001.jpg). PSNR/SSIM are ours (BT.601 Y, basicsr
conventions). The other metrics run through pyiqa (pip install pyiqa) when it and its weights
are in the local caches; nothing is downloaded, and metrics that cannot run are listed with
the reason while the others still run.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m xpsr_jax.evaluate",
        description="PSNR/SSIM (Y channel) and pyiqa metrics over a folder of SR predictions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", required=True, help="folder of predicted (SR) images")
    parser.add_argument("--gt", help="folder of ground-truth HR images; omit for no-reference mode")
    parser.add_argument("--metrics", default="all",
                        help=f"comma-separated, or 'all' (default): {','.join(ALL_METRICS)}")
    parser.add_argument("--crop-border", type=int, default=0,
                        help="pixels cropped from each side for PSNR/SSIM (default 0)")
    parser.add_argument("--crop-gt-to-pred", action="store_true",
                        help="crop a ground truth larger than its prediction to the prediction's size (top "
                             "left), the SR convention for sides that are not multiples of the scale")
    parser.add_argument("--out", help="folder for per_image.csv, means.md and means.json")
    parser.add_argument("--paper", action="store_true",
                        help="print the paper's numbers for --dataset beside ours")
    parser.add_argument("--dataset", choices=list(PAPER_RESULTS), help="dataset for --paper")
    parser.add_argument("--device", help="torch device for pyiqa metrics (default: cuda if any)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.paper and args.dataset is None:
            raise ValueError(f"--paper needs --dataset, one of {', '.join(PAPER_RESULTS)}")
        if args.crop_border < 0:
            raise ValueError(f"--crop-border must be >= 0, got {args.crop_border}")
        metrics = parse_metric_names(args.metrics)
        if args.out:  # before any metric runs: a report folder that cannot be made is one line, now
            try:
                Path(args.out).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ValueError(f"--out {args.out}: cannot create the report folder ({error.strerror or error}; "
                                 "is a file in the way?)") from None
        result = evaluate_folders(args.pred, args.gt, metrics, crop_border=args.crop_border,
                                  device=args.device, progress=not args.no_progress,
                                  crop_gt_to_pred=args.crop_gt_to_pred)
        if args.paper:
            result.paper, result.dataset = paper_results(args.dataset), args.dataset
    except (PairingError, ImageReadError, ValueError) as error:
        report_error(error)
        return 2
    print(f"{len(result.per_image)} images, {result.settings['mode']}")
    print(markdown_table(result))
    if result.unavailable:
        print("metrics not computed:\n" + unavailable_text(result), file=sys.stderr)
    if args.out:
        paths = write_reports(args.out, result)
        print("reports: " + ", ".join(str(path) for path in paths.values()))
    if result.skipped:
        print(f"{len(result.skipped)} image(s) not scored:", file=sys.stderr)
        for reason in result.skipped.values():
            print(f"  {reason}", file=sys.stderr)
        return 1
    return 0
