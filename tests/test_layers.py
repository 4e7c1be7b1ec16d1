"""The package's architecture as contracts: the layers and acyclic siblings of setup.cfg checked by
import-linter, and imports at the top of files except the deliberate lazy ones."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
# Heavy or optional dependencies that may be imported inside a function, with a `# lazy:` reason.
LAZY_ALLOWED = ("torch", "transformers", "tensorflow_datasets", "pyiqa", "gradio", "diffusers", "matplotlib")


def test_import_linter_contracts_are_kept():
    done = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--config", str(REPO / "setup.cfg"), "--no-cache"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "0 broken" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def function_level_imports(root: pathlib.Path):
    """(file, line, module, source line) of every import inside a function or class body."""
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                yield path.relative_to(REPO), node.lineno, module or "", lines[node.lineno - 1]


def test_imports_sit_at_the_top_except_deliberate_lazy_ones():
    found = list(function_level_imports(REPO / "xpsr_jax"))
    bad = [f"{path}:{line}: {source.strip()}" for path, line, module, source in found
           if module.split(".")[0] not in LAZY_ALLOWED or "# lazy:" not in source]
    assert not bad, "imports inside functions that are not a commented lazy import of a heavy dependency:\n" + \
        "\n".join(bad)
    # 12 for torch/transformers/TFDS/pyiqa/diffusers, 3 for the [demo] extra's Gradio and matplotlib.
    assert len(found) <= 15, f"{len(found)} lazy imports: keep them few"


def test_the_core_and_the_commands_do_not_import_the_demo_extra():
    """Gradio and matplotlib (the [demo] extra) load only when a page is served or a chart drawn:
    every command, the demo's and study's included, imports and answers --help without them."""
    modules = ["xpsr_jax", "xpsr_jax.inference.cli", "xpsr_jax.training.loop", "xpsr_jax.export.cli",
               "xpsr_jax.evaluation.cli", "xpsr_jax.experiments.mllm_ablation", "xpsr_jax.demo.cli",
               "xpsr_jax.study.cli"]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'gradio', 'gradio_client', 'matplotlib'})\n"
            "assert not loaded, loaded\n"
            "import xpsr_jax.study.cli as study\n"
            "try:\n    study.main(['serve', '--help'])\nexcept SystemExit as done:\n    assert done.code == 0\n"
            "assert 'gradio' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "--method NAME=DIR" in done.stdout
