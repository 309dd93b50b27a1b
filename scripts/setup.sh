#!/usr/bin/env bash
# Sets up everything the demo and the tests need, reusing what is already there:
#   - this checkout's Python venv, .venv (git-ignored; RERANK_VENV overrides it): the
#     project is installed there in editable mode, so another clone never runs this one's
#     code (torch from PyPI is a multi-GB CUDA build: the venv is kept between runs),
#   - the project and its Python dependencies (pip's cache is kept between runs),
#   - the Kafka broker's jars (fetched once with Maven by deploy/local/kafka, shared by
#     every checkout in ~/.cache/kafka-rerank; RERANK_CACHE_DIR overrides it).
# Safe to run again and again; a warm run takes a few seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/paths.sh"

say() { echo "[setup] $*"; }
die() {
    echo "[setup] error: $*" >&2
    exit 1
}
is_python311() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

# PYTHON when set; else python3, or a python3.1x beside an older python3 (Ubuntu 22.04).
PYTHON_BIN="${PYTHON:-}"
if [[ -z $PYTHON_BIN ]]; then
    for candidate in python3 python3.11 python3.12 python3.13; do
        if is_python311 "$candidate"; then
            PYTHON_BIN="$candidate"
            break
        fi
    done
fi
is_python311 "${PYTHON_BIN:-python3}" ||
    die "Python 3.11 or newer is needed as '${PYTHON_BIN:-python3}' (set PYTHON=...)"

if [[ ! -x "$VENV/bin/python" ]]; then
    # Debian and Ubuntu ship ensurepip, which venv needs for pip, in a separate package;
    # without it venv fails half way and leaves a venv with no pip behind.
    if ! "$PYTHON_BIN" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        version="$("$PYTHON_BIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        die "$PYTHON_BIN cannot create a venv: ensurepip is missing (Debian/Ubuntu: apt install python$version-venv)"
    fi
    say "creating venv $VENV"
    [[ -e $VENV ]] && venv_existed=1 || venv_existed=""
    if ! "$PYTHON_BIN" -m venv "$VENV"; then
        [[ -n $venv_existed ]] || rm -rf "$VENV"
        die "creating the venv $VENV with $PYTHON_BIN failed"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 ||
    die "the venv $VENV has no pip; remove it (rm -rf $VENV) or point RERANK_VENV elsewhere"

# The project is installed in editable mode so console scripts point at this checkout;
# dependencies already present are left alone, so a warm run needs no downloads.
# setuptools' "Editable installation" notice (a box of some ten lines on every run) only
# says what editable mode is: not shown.
say "installing the project and its dependencies into $VENV"
PYTHONWARNINGS="ignore:Editable installation" \
    "$VENV/bin/python" -m pip install -q --no-build-isolation -e "${ROOT}[worker,dev,demo]"

say "fetching the Kafka broker (cached after the first time)"
"$ROOT/deploy/local/kafka" fetch

say "ready: venv $VENV"
