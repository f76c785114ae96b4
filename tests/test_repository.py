"""Repository habits: the README's commands are what CI runs; module docstrings."""

import ast
import glob
import os
import re

from conftest import REPO


def readme_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [line for b in blocks for line in b.splitlines() if line.strip()]


def test_ci_runs_the_readme_set_up_and_test_commands():
    ci = open(os.path.join(REPO, ".ci", "run")).read().splitlines()
    commands = readme_commands()
    setup = next(c for c in commands if "pip install -e" in c)
    test = next(c for c in commands if "pytest" in c)
    assert setup in ci and test in ci
    assert ci.index(setup) < ci.index(test)
    assert "python3 -m venv" in setup  # a fresh environment, nothing by hand


def test_every_module_has_a_docstring():
    files = glob.glob(os.path.join(REPO, "fairseq_kd", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(REPO, "kd_bench", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(REPO, "tests", "*.py"))
    files += glob.glob(os.path.join(REPO, "examples", "**", "*.py"), recursive=True)
    missing = [f for f in files if not ast.get_docstring(ast.parse(open(f).read()))]
    assert not missing, missing
