#!/usr/bin/env bash
# Execute notebooks in place (so their outputs, figures and show_doc entries are committed for the docs),
# then bring everything in step. Usage: bash tools/execute.sh nbs/01_resnet_rs.ipynb [more.ipynb ...]
# A twin in nbs_py/ given instead of a notebook is synced to its notebook first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash tools/execute.sh nbs/NAME.ipynb ..." >&2; exit 2; }
for f in "$@"; do
  case "$f" in
    *.py) jupytext --sync -q "$f"; nb="nbs/$(basename "${f%.py}").ipynb" ;;
    *) jupytext --sync -q "$f"; nb="$f" ;;
  esac
  nbdev_export   # the notebook may import what an earlier cell of another chapter exports
  if ! (cd "$(dirname "$nb")" && jupyter nbconvert --to notebook --execute --inplace \
          --ExecutePreprocessor.timeout=3600 "$(basename "$nb")" > /tmp/execute.$$.log 2>&1); then
    grep -v 'without encryption' /tmp/execute.$$.log >&2; echo "execution of $nb failed" >&2; exit 1
  fi
  nbdev_clean --fname "$nb"
  jupytext --sync -q "$nb"
done
nbdev_export
