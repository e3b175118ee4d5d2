#!/usr/bin/env bash
# Bring everything derived from the notebooks in step with them:
# jupytext twins (nbs_py/, newest side wins), the package (nbdev_export), clean notebooks (nbdev_clean),
# README.md (from nbs/index.ipynb). Run it after editing a notebook or its twin, before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
nbs=(nbs/*.ipynb)
if [ ${#nbs[@]} -gt 0 ]; then jupytext --sync -q "${nbs[@]}"; fi
for py in nbs_py/*.py; do   # a twin written first, before its notebook exists
  [ -e "nbs/$(basename "${py%.py}").ipynb" ] || jupytext --sync -q "$py"
done
nbdev_export
nbdev_clean
jupytext --sync -q nbs/*.ipynb
python tools/nbdocs.py readme
