"""The package's architecture as contracts: the layers and acyclic siblings of setup.cfg checked by
import-linter, and imports at the top of files except the deliberate lazy ones."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
# Heavy or optional dependencies that may be imported inside a function, with a `# lazy:` reason.
LAZY_ALLOWED = ("torch", "transformers", "tensorflow_datasets", "pyiqa", "gradio", "diffusers")


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
    assert len(found) <= 12, f"{len(found)} lazy imports: keep them few"
