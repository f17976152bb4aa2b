"""The README's "Quick start from Python" snippet runs exactly as written."""

from __future__ import annotations

import re

import pytest

from conftest import REPO_ROOT


def quick_start_snippet() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README has no python block under 'Quick start from Python'"
    return match.group(1)


def test_readme_opens_with_the_two_commands():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert [line.split("#")[0].strip() for line in block] == ["make run", "make test"]
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci


def test_quick_start_is_at_most_15_lines():
    code_lines = [line for line in quick_start_snippet().splitlines() if line.strip()]
    assert len(code_lines) <= 15


@pytest.mark.slow
def test_quick_start_runs_as_written(capsys):
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(quick_start_snippet(), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "recall_at_1" in printed or "Recall@1" in printed
    metrics = namespace["metrics"]
    assert 0.0 <= metrics["map_at_r"] <= 1.0
    # 1 epoch of 20 steps already beats chance (0.1 for 10 balanced classes) by far.
    assert metrics["precision_at_1"] > 0.3
