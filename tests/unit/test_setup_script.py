"""``scripts/setup.sh`` on a machine it cannot set up: one clear line, nothing half made.

Every case stops before pip runs, so no test here installs anything or needs a network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup.sh"


def run_setup(venv: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SETUP)],
        env={**os.environ, "RERANK_VENV": str(venv), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], complaint: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert complaint in done.stderr
    assert "installing" not in done.stdout  # it stopped before pip


def test_an_old_python_is_named(tmp_path: Path) -> None:
    done = run_setup(tmp_path / "venv", PYTHON="false")

    assert_one_line_error(done, "Python 3.11 or newer is needed as 'false'")
    assert not (tmp_path / "venv").exists()


def test_a_python_without_ensurepip_leaves_no_half_made_venv(tmp_path: Path) -> None:
    # Debian and Ubuntu move ensurepip to the pythonX.Y-venv package; a stand-in that
    # fails to import, ahead of the standard library on sys.path, is the same to setup.sh.
    shadow = tmp_path / "shadow" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ensurepip is not installed')\n")

    done = run_setup(tmp_path / "venv", PYTHON=sys.executable, PYTHONPATH=str(shadow.parent))

    assert_one_line_error(done, "ensurepip is missing (Debian/Ubuntu: apt install python3.")
    assert not (tmp_path / "venv").exists()


def test_a_venv_without_pip_is_named_not_used(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)

    done = run_setup(venv)

    assert_one_line_error(done, f"the venv {venv} has no pip")


def test_the_venv_belongs_to_the_checkout(tmp_path: Path) -> None:
    """Without RERANK_VENV, set-up uses the checkout's own .venv: two clones never share
    one (an editable install in a shared venv ran the other clone's code)."""
    checkout = tmp_path / "clone"
    (checkout / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "paths.sh"):
        (checkout / "scripts" / name).write_text((ROOT / "scripts" / name).read_text())
    venv = checkout / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "RERANK_VENV"}

    done = subprocess.run(
        ["bash", str(checkout / "scripts" / "setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert_one_line_error(done, f"the venv {venv} has no pip")
