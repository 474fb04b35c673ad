"""The shape a reader relies on, counted: each training loop is its algorithm (main() at most 90
lines, a script at most 230), the formatter's layout and no line over 100 characters, a README that
is an entry point. The shared modules have no line budget: one only made people pack statements
(STYLE.md, 19)."""

import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ["dpo_offline.py", "dpo_semionline.py", "grpo.py", "group_dpo.py"]
BUDGETS = {"README.md": 250}


def lines(name):
    return open(os.path.join(ROOT, name)).read().splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_script_shape(script):
    tree = ast.parse("\n".join(lines(script)))
    main = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert len(main) == 1 and main[0].end_lineno - main[0].lineno + 1 <= 90
    assert len(lines(script)) <= 230


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_readme_budget(name):
    assert len(lines(name)) <= BUDGETS[name], f"{name}: {len(lines(name))} lines"


def test_formatted_and_checked():
    """`ruff format --check` and `ruff check` (ruff.toml: 100 columns, pycodestyle, pyflakes)."""
    for command in (["format", "--check"], ["check"]):
        p = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT,
                           capture_output=True, text=True)  # fmt: skip
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_no_study_at_the_top_level():
    """Experiments live in results/ and scripts/, not beside the code."""
    assert not os.path.exists(os.path.join(ROOT, "study"))
    assert os.path.isfile(os.path.join(ROOT, "scripts", "study.sh"))
