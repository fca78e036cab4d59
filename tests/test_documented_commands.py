"""The ``msvit train`` commands the README, the pages under docs/ and the Makefile show parse with today's flags."""

import re
import shlex
from pathlib import Path

import pytest

from msvit.train import parse_args

ROOT = Path(__file__).resolve().parents[1]


def train_commands(text: str):
    """The arguments after ``msvit train`` of every (continued) command line in ``text``."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        match = re.search(r"msvit train (.*)", line)
        if match and not line.lstrip().startswith("#"):  # a shell comment shows no full command
            yield shlex.split(match.group(1).split("#")[0].replace("$(VENV)", ".venv"))


# docs/design.md is left out: it names commands in prose (`msvit train --model <timm swin name>`).
USER_PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "design.md")
DOCUMENTS = [ROOT / "README.md", ROOT / "Makefile", *USER_PAGES]
COMMANDS = [args for path in DOCUMENTS for args in train_commands(path.read_text())]


def test_the_documents_show_both_tasks():
    assert len(COMMANDS) >= 4
    assert any(a[:2] == ["--task", "segmentation"] for a in COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_a_documented_command_parses(argv):
    if any("/path/to" in a for a in argv):
        pytest.skip("placeholder paths")
    if "--help" in argv:
        with pytest.raises(SystemExit) as stop:
            parse_args(argv)
        assert stop.value.code == 0
        return
    assert parse_args(argv).epochs >= 1
