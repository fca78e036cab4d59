"""No import cycles in ``msvit`` or ``msvit_kernels`` (deferred imports inside functions included),
and every module imports in a fresh interpreter."""

import subprocess
import sys
import textwrap
from pathlib import Path

from import_graph import find_cycle, import_graph, module_files

ROOT = Path(__file__).resolve().parents[1]


def test_the_packages_have_no_import_cycle():
    graph = import_graph(ROOT)
    assert {"msvit.train.loop", "msvit.train.segment", "msvit_kernels"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_a_cycle_through_a_deferred_import(tmp_path):
    package = tmp_path / "msvit"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import helper\n")
    (package / "b.py").write_text(
        textwrap.dedent("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from . import c
        def helper():
            from . import a  # deferred: still a cycle
        """)
    )
    (package / "c.py").write_text("from msvit import b\n")
    graph = import_graph(tmp_path)
    assert graph["msvit.b"] == {"msvit.a"} and graph["msvit.c"] == {"msvit.b"}
    assert find_cycle(graph) in (["msvit.a", "msvit.b", "msvit.a"], ["msvit.b", "msvit.a", "msvit.b"])


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in module_files(ROOT) if not n.endswith("__main__")]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
