"""The conventions the tree relies on: papermill's `parameters` tag survives nbdev_clean and the jupytext twin."""
import json
import subprocess
from pathlib import Path

import jupytext
import nbformat
from jupytext.config import load_jupytext_config

ROOT = Path(__file__).resolve().parents[1]


def tagged_notebook():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("arch = 'resnetrs50'  # backbone")
    cell.metadata.update(tags=['parameters'], collapsed=True, scrolled=False)
    nb.cells = [cell, nbformat.v4.new_code_cell('print(arch)', execution_count=3)]
    return nb


def test_nbdev_clean_keeps_the_parameters_tag(tmp_path):
    path = tmp_path/'params.ipynb'
    nbformat.write(tagged_notebook(), path)
    subprocess.run(['nbdev_clean', '--fname', str(path)], cwd=ROOT, check=True)
    cells = json.loads(path.read_text())['cells']
    assert cells[0]['metadata'] == {'tags': ['parameters']}, 'nbdev_clean must keep tags and only tags'
    assert cells[1]['execution_count'] is None


def test_jupytext_twin_keeps_the_parameters_tag():
    config = load_jupytext_config(str(ROOT))
    text = jupytext.writes(tagged_notebook(), fmt='py:percent', config=config)
    assert '# %% tags=["parameters"]' in text and 'collapsed' not in text
    assert jupytext.reads(text, fmt='py:percent').cells[0].metadata == {'tags': ['parameters']}


def test_quarto_project_file_is_shared():
    "nbdev looks for nbs/_quarto.yml; the design keeps _quarto.yml at the top: one file, linked."
    link = ROOT/'nbs'/'_quarto.yml'
    assert link.is_symlink() and link.resolve() == (ROOT/'_quarto.yml').resolve()
    assert 'sidebar.yml' in (ROOT/'_quarto.yml').read_text()
