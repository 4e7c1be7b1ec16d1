"""`python -m xpsr_jax.study`: a blind comparison of SR methods by people, as in the paper's
supplement Table 1.

    python -m xpsr_jax.study serve --lr LR --method XPSR=out/xpsr --method SeeSR=out/seesr --db votes.sqlite
    python -m xpsr_jax.study report --db votes.sqlite --out study-report

`serve` checks that every method has a result for every LR image (by file name without extension),
that the address is free, and that the database is new (or an empty file) or of the same study
(the same method names over the same images: a fingerprint of each folder's images is recorded)
and takes a write, then serves the voting page. Each vote is committed to SQLite before the page
hears back, so stopping or killing the server loses nothing that was acknowledged; serving again
with the same --db resumes.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import socket
import sys
from collections.abc import Mapping, Sequence

from xpsr_jax.cli_config import CommandParser, report_error
from xpsr_jax.study.app import serve
from xpsr_jax.study.catalog import Catalog, parse_method
from xpsr_jax.study.report import summarize, write_report
from xpsr_jax.study.store import LR_SOURCE, Source, StudyError, VoteStore

EXTRA_HINT = "pip install 'xpsr-jax[demo]' (or pip install -e '.[demo]' in a checkout)"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m xpsr_jax.study",
                                     description="A blind user study of SR methods: a voting page, and its report.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,report}")
    serve_parser = commands.add_parser("serve", help="serve the voting page",
                                       description="Serve the blind voting page (Gradio) on 127.0.0.1.")
    serve_parser.add_argument("--lr", required=True, help="folder of the LR images shown beside the results")
    serve_parser.add_argument("--method", action="append", required=True, metavar="NAME=DIR",
                              help="a method's results, one file per LR image with the same name (repeat: at "
                                   "least two); names never reach the page")
    serve_parser.add_argument("--db", required=True, help="the SQLite file of the votes (made if missing or "
                                                          "empty; an existing one must be of the same study)")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1; 0.0.0.0 serves "
                                                                  "the network)")
    serve_parser.add_argument("--port", type=int, default=7861, help="port (default 7861)")
    report_parser = commands.add_parser("report", help="selection rates with 95%% intervals, as Table 1",
                                        description="Selection rate per method with 95%% Wilson intervals, "
                                                    "participants, votes and per-image counts: report.md, "
                                                    "report.json and selection_rates.png.")
    report_parser.add_argument("--db", required=True, help="the study's SQLite file")
    report_parser.add_argument("--out", default="study-report", help="output folder (default study-report)")
    return parser


def run_serve(args) -> int:
    methods: dict[str, str] = {}
    for spec in args.method:
        name, folder = parse_method(spec)
        if name in methods:
            raise StudyError(f"--method {spec!r}: the name {name!r} is given twice")
        methods[name] = folder
    if not 0 < args.port < 65536:
        raise StudyError(f"--port {args.port}: give a port in 1..65535")
    if importlib.util.find_spec("gradio") is None:
        raise StudyError(f"the voting page needs Gradio: {EXTRA_HINT}")
    check_address(args.host, args.port)
    catalog = Catalog.scan(args.lr, methods)
    resized = catalog.size_mismatches()
    if resized:
        print(f"note: {len(resized)} image(s) have results of different sizes between methods (shown resized to "
              f"the largest): {', '.join(resized[:10])}", flush=True)
    sources = catalog.sources()
    for names in identical_methods(sources):
        print(f"note: --method {', '.join(names)} have identical images: participants cannot tell them apart (a "
              "control for position bias, or one folder given twice?)", flush=True)
    store = VoteStore.open(args.db, methods=catalog.methods, images=catalog.images, sources=sources)
    for note in store.notes:
        print(f"note: {note}", flush=True)
    votes = store.totals()["votes"]
    print(f"study of {len(catalog.methods)} methods x {len(catalog.images)} images; {votes} vote(s) in {args.db} "
          f"so far; on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    try:
        serve(catalog, store, host=args.host, port=args.port)
    except OSError as error:
        raise StudyError(f"cannot serve on {args.host}:{args.port}: {error}") from None
    except KeyboardInterrupt:
        pass
    return 0


def identical_methods(sources: Mapping[str, Source]) -> list[list[str]]:
    """Groups of methods whose images are the same files' bytes (by fingerprint)."""
    groups: dict[str, list[str]] = {}
    for name, source in sources.items():
        if name != LR_SOURCE:
            groups.setdefault(source.fingerprint, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def check_address(host: str, port: int) -> None:
    """Refuses an address this machine cannot listen on (a host name it does not have, a port in
    use) before the study's database is opened. Gradio binds it again moments later."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
            probe.bind(address)
    except OSError as error:
        other = "--port" if error.errno == errno.EADDRINUSE else "--host (an address of this machine) or --port"
        raise StudyError(f"cannot serve on {host}:{port}: {error.strerror or error}; give another {other}") from None


def run_report(args) -> int:
    report = summarize(VoteStore.read(args.db))
    if importlib.util.find_spec("matplotlib") is None:
        raise StudyError(f"the report's chart needs matplotlib: {EXTRA_HINT}")
    paths = write_report(report, args.out)
    for rate in report.methods:
        print(f"{rate.method:>16}: {rate.votes:5d} votes" + (f", {100 * rate.rate:5.1f}% (95% CI "
              f"{100 * rate.ci95[0]:.1f}-{100 * rate.ci95[1]:.1f}%)" if rate.rate is not None else ""))
    print(f"{report.participants} participant(s), {report.votes} vote(s); wrote {', '.join(str(p) for p in paths)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_serve(args) if args.command == "serve" else run_report(args)
    except (StudyError, OSError) as error:
        report_error(error)
        return 2
    except KeyboardInterrupt:  # Ctrl+C before serving (a long fingerprint): no traceback
        return 130
