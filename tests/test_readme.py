"""The README's Python snippets run exactly as written (tests/test_readme_cli.py: its commands).

A snippet preceded by an HTML comment containing "not run" (a signature listing, or one
that needs the reader's own files) is only compiled.
"""

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


def python_snippets() -> list[tuple[str, str, bool]]:
    """(section heading, code, runnable) of every ```python block of the README, in order."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    snippets, heading = [], "top"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            before = next((l for l in reversed(lines[:i]) if l.strip()), "")
            end = lines.index("```", i + 1)
            runnable = not (before.startswith("<!--") and "not run" in before)
            snippets.append((heading, "\n".join(lines[i + 1:end]) + "\n", runnable))
            i = end
        i += 1
    return snippets


def test_every_python_snippet_compiles():
    snippets = python_snippets()
    assert snippets and snippets[0][0] == "Quick start from Python"
    for heading, code, _ in snippets:
        compile(code, f"README.md ({heading})", "exec")


@pytest.mark.slow
@pytest.mark.parametrize(
    "heading, code",
    [(h, c) for h, c, runnable in python_snippets()[1:] if runnable],
    ids=lambda value: value if len(value) < 40 else None,
)
def test_python_snippet_runs(heading, code, monkeypatch):
    """Snippets after the quick start run in the checkout, each in a fresh namespace."""
    monkeypatch.chdir(REPO_ROOT)
    exec(compile(code, f"README.md ({heading})", "exec"), {"__name__": "__readme__"})


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
