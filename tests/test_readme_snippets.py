"""Every Python block of the README and of the user pages under docs/ runs as written (on CPU, with
the shipped model and bundled data). docs/design.md is not a user page: its blocks are signatures."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "design.md")]
BLOCKS = [
    (page.relative_to(ROOT).as_posix(), code)
    for page in PAGES
    for code in re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.M | re.S)
]


def test_the_readme_has_python_examples():
    assert sum(page == "README.md" for page, _ in BLOCKS) >= 2


@pytest.mark.parametrize(("page", "code"), BLOCKS, ids=[f"{page}-block{i + 1}" for i, (page, _) in enumerate(BLOCKS)])
def test_a_documented_block_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes (an export package, pictures) stays out of the checkout
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, page, "exec"), {"__name__": "readme"})
    assert printed.getvalue().strip(), f"every example in {page} prints what it shows"
