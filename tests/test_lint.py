"""Project tooling: ruff is clean, the CI script parses, and the two make targets do what the README says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    """A tool installed by requirements-dev.txt, from this interpreter's environment first."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: `pip install -r requirements-dev.txt` installs it")
    return found


def test_ruff_is_clean() -> None:
    result = subprocess.run([tool("ruff"), "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_config_catches_a_known_problem(tmp_path: Path) -> None:
    # Guards the check above: the project's config must flag an unused import (F401) and a long line (E501).
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\nVALUE = '" + "x" * 130 + "'\n")
    result = subprocess.run([tool("ruff"), "check", "--no-cache", "--output-format", "concise",
                             "--config", str(ROOT / "pyproject.toml"), str(sample)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "F401" in result.stdout and "E501" in result.stdout


def test_ci_script_parses_and_fails_fast() -> None:
    script = ROOT / ".ci" / "run"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    assert "set -euo pipefail" in script.read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(("target", "expected"), [
    ("run", ["-m venv .venv", "pip install -q -r requirements.txt", "-m streamlit run app/streamlit_app.py",
             "--server.port=8501"]),
    ("test", ["-m venv .venv", "pip install -q -r requirements-dev.txt", "-m pytest -q"]),
])
def test_make_targets_build_the_venv_then_run(tmp_path: Path, target: str, expected: list[str]) -> None:
    # A dry run in a copy holding only the Makefile and requirements: what a fresh clone would execute.
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    result = subprocess.run(["make", "-n", target], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    positions = [result.stdout.find(fragment) for fragment in expected]
    assert -1 not in positions, f"missing {expected[positions.index(-1)]!r} in:\n{result.stdout}"
    assert positions == sorted(positions), f"steps out of order:\n{result.stdout}"
