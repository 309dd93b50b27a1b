"""scripts/serve.py stops once: Ctrl-C reaches both serve.sh and serve.py, and serve.sh
passes it on as a SIGTERM, so serve.py sees two stop signals close together. The second
must not interrupt the stop the first one began (it once left the worker and the gateway
running, and serve.py exited without printing "stopped")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

# In a child process: pytest's own signal handlers stay untouched.
TWO_SIGNALS = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import serve

serve.stop_on_signals()
try:
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
    time.sleep(5)
    print("no Stop raised")
except serve.Stop as first:
    print(f"stopping after {first}", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # serve.sh passing the Ctrl-C on
    time.sleep(0.2)
    print("stopped", flush=True)
"""


def test_a_second_stop_signal_does_not_cut_the_stop_short() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TWO_SIGNALS, str(SCRIPTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["stopping after SIGINT", "stopped"], done.stdout


def test_after_a_stop_signal_both_stop_signals_are_ignored() -> None:
    check = (
        "import signal, sys; sys.path.insert(0, sys.argv[1]); import serve\n"
        "serve.stop_on_signals()\n"
        "try:\n    serve._stop_on_signal(signal.SIGTERM, None)\nexcept serve.Stop:\n    pass\n"
        "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN,"
        " signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)"
    )
    done = subprocess.run(
        [sys.executable, "-c", check, str(SCRIPTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.split() == ["True", "True"], done.stderr
