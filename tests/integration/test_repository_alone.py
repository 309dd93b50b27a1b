"""The repository stands on its own: a clone with nothing beside it passes its unit tests.

Users clone the repository alone. This clones the committed state of this checkout into a
temporary folder that holds nothing else, and runs the unit tests there with this venv, so
a test, script or doc that reads something outside the repository (say ``../shared``)
fails here.

Marked integration only so that it runs after the unit tests, not inside them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
UNIT_TESTS_TIMEOUT_S = 840


def git(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_lone_clone_passes_its_unit_tests(tmp_path: Path) -> None:
    head = git("-C", REPO, "rev-parse", "HEAD")
    assert head.returncode == 0, f"{REPO} is not a git checkout: {head.stderr}"
    clone = tmp_path / "alone" / "kafka-rerank"
    cloned = git("clone", "--quiet", "--no-hardlinks", REPO, clone)
    assert cloned.returncode == 0, cloned.stderr
    assert [p.name for p in clone.parent.iterdir()] == ["kafka-rerank"]  # nothing beside it

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KAFKA_BOOTSTRAP")}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # The clone's own code, not this checkout's (the venv's editable install points here).
    where = subprocess.run(
        [sys.executable, "-c", "import consumer; print(consumer.__file__)"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(clone), where.stdout + where.stderr

    unit = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "not integration", "-q", "-p", "no:cacheprovider"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=UNIT_TESTS_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    summary = unit.stdout.strip().splitlines()[-1] if unit.stdout.strip() else ""
    assert unit.returncode == 0, unit.stdout[-6000:] + unit.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
