#!/usr/bin/env bash
# The encoder alone on the long-document mix, before (BEFORE: a worktree of the commit
# before the change, with this benchmark copied in) and after (this checkout), alternating,
# one shell on this development machine.
set -u
BEFORE=${BEFORE:?a worktree of the commit before}
PY=${PY:-python}
for round in 1 2; do
  for tree in "$BEFORE" "$PWD"; do
    echo "== $tree ($(git -C "$tree" log -1 --format=%h) plus working tree), round $round"
    (cd "$tree" && "$PY" -m benchmarks.window_encoding --pairs 1024 --rounds 5)
  done
done
