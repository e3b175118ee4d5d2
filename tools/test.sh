#!/usr/bin/env bash
# The project's test command (the README's): tree in step, every notebook, then the cross-component tests.
#   bash tools/test.sh            everything, `#| slow` cells included (what CI runs)
#   FAST=1 bash tools/test.sh     skip `#| slow` cells and tests marked slow (for quick local iterations)
# Cells flagged `#| cuda` / `#| multigpu` run only with hardware: add them with NBDEV_FLAGS="slow cuda".
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
# Every temporary file of the run (notebooks' scratch folders, pytest's tmp_path, worker processes) goes under one
# folder that is removed at the end, pass or fail: repeated runs must not fill the disk.
export TMPDIR="$(mktemp -d "${TMPDIR:-/tmp}/pixpro_test.XXXXXX")"
trap 'rm -rf "$TMPDIR"' EXIT
echo "== 1/3 tree in step with the notebooks"
python tools/check_tree.py
echo "== 2/3 nbdev_test over all notebooks"
flags=${NBDEV_FLAGS:-slow}
if [ -n "${FAST:-}" ]; then flags=""; fi
nbdev_test --n_workers "${NBDEV_WORKERS:-2}" --timing ${flags:+--flags "$flags"}
echo "== 3/3 pytest tests/"
pytest_args=(-q -rs tests)
if [ -n "${FAST:-}" ]; then pytest_args+=(-m "not slow"); fi
python -m pytest "${pytest_args[@]}"
echo "== all tests passed in $((SECONDS - start)) s"
