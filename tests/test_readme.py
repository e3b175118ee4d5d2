"""README.md is generated from nbs/index.ipynb (the docs home page); `tools/check_tree.py`, the first step of the test
command, checks that it is in step. Here: what the README must say, and the notebook-to-markdown adapter."""
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import nbdocs  # noqa: E402


def test_readme_has_the_two_commands_and_the_chapters():
    text = (ROOT/'README.md').read_text()
    assert text.count('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"') >= 1
    assert 'bash tools/test.sh' in text and 'papermill nbs/train.ipynb' in text
    main_job = [l for l in text.splitlines() if l.startswith('python3 -m venv') and 'papermill nbs/train.ipynb' in l]
    assert main_job, 'the main job is one line that also makes the environment (it must work alone on a fresh machine)'
    assert 'mkdir -p runs' in main_job[0] and '--log-output' in main_job[0], main_job  # papermill makes no folders
    for name in nbdocs.chapters():
        if name != 'index.ipynb': assert f'(nbs/{name})' in text, f'the chapter map does not link {name}'


def test_plain_turns_front_matter_and_cell_options(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_raw_cell('---\ntitle: A title\ndescription: One line.\n---\n'),
                nbformat.v4.new_code_cell('#| echo: false\nshow_doc(f)'),
                nbformat.v4.new_code_cell('#| exports\nx = 1')]
    out = nbdocs.plain(nb)
    assert out.cells[0].source == '# A title\n\n> One line.\n'
    assert out.cells[1].metadata['tags'] == ['remove-input'] and out.cells[1].source == 'show_doc(f)'
    assert out.cells[2].source == 'x = 1' and out.cells[2].metadata['tags'] == []
