#!/usr/bin/env bash
# Build the docs site into _docs/: with Quarto on PATH, nbdev's own `nbdev_docs`; without it (our machines,
# CI), the same chapters in the reading order of nbs/sidebar.yml with Sphinx + myst-nb + sphinx-book-theme.
# Open _docs/index.html, or serve it: python -m http.server -d _docs 8000
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v quarto >/dev/null 2>&1; then
  nbdev_docs
else
  python tools/nbdocs.py sphinx
fi
