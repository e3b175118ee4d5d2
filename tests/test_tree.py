"""The conventions the tree relies on: papermill's `parameters` tag and the notebooks' kernelspec survive nbdev_clean
and the jupytext twin."""
import json
import os
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


def test_kernelspec_survives_nbdev_clean_and_jupytext_sync(tmp_path):
    "Jupyter opens a notebook without asking for a kernel only if it names one: the tools of the tree keep it."
    (tmp_path/'jupytext.toml').write_text((ROOT/'jupytext.toml').read_text())
    (tmp_path/'nbs').mkdir(); (tmp_path/'nbs_py').mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell('# A chapter'), nbformat.v4.new_code_cell('x = 1')]
    nb.metadata.update(kernelspec=dict(display_name='Python 3', language='python', name='python3'),
                       language_info=dict(name='python', version='3.11.2'))
    path = tmp_path/'nbs'/'chapter.ipynb'
    nbformat.write(nb, path)
    subprocess.run(['nbdev_clean', '--fname', str(path)], cwd=ROOT, check=True)
    kernelspec = {'display_name': 'python3', 'language': 'python', 'name': 'python3'}  # nbdev_clean's form
    meta = json.loads(path.read_text())['metadata']
    assert meta['kernelspec'] == kernelspec and 'language_info' not in meta  # the Python version is the machine's
    subprocess.run(['jupytext', '--sync', '-q', str(path)], cwd=tmp_path, check=True)
    twin = tmp_path/'nbs_py'/'chapter.py'
    assert 'kernelspec' not in twin.read_text()  # the twin carries no notebook metadata
    twin.write_text(twin.read_text() + '\n# %%\ny = 2\n')
    later = path.stat().st_mtime + 10
    os.utime(twin, (later, later))  # the twin is the newer file: the sync takes the cells from it
    subprocess.run(['jupytext', '--sync', '-q', str(twin)], cwd=tmp_path, check=True)
    synced = json.loads(path.read_text())
    assert synced['metadata']['kernelspec'] == kernelspec and ''.join(synced['cells'][-1]['source']) == 'y = 2'


def test_quarto_project_file_is_shared():
    "nbdev looks for nbs/_quarto.yml; the design keeps _quarto.yml at the top: one file, linked."
    link = ROOT/'nbs'/'_quarto.yml'
    assert link.is_symlink() and link.resolve() == (ROOT/'_quarto.yml').resolve()
    assert 'sidebar.yml' in (ROOT/'_quarto.yml').read_text()
