"""Is the tree in step with the notebooks? Part of the test command.

The notebooks are the source. This check runs the tools that derive everything else from them and fails if any
of them changed a file:
- `nbdev_export` must leave `pixpro_rs/` unchanged (nobody edited the package by hand, nobody forgot to export);
- `nbdev_clean` must leave `nbs/` unchanged (notebooks are committed clean);
- every notebook has its jupytext twin in `nbs_py/`, with the same content, and no twin lacks its notebook;
- README.md equals what `nbs/index.ipynb` renders to;
- `nbs/sidebar.yml` lists every notebook of `nbs/` exactly once;
- every notebook names its kernel (`kernelspec`), so Jupyter opens it without asking which kernel to use;
- no test cell mixes imports with other code (nbdev's doc processing executes every cell that imports).
The derived files are left rewritten, so after a failure `git diff` shows the fix; commit it after a look.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
from jupytext.config import load_jupytext_config

sys.path.insert(0, str(Path(__file__).parent))
import nbdocs  # noqa: E402

ROOT = nbdocs.ROOT


def snapshot(*folders: str) -> dict[str, str]:
    "sha256 of every file under `folders` (relative paths as keys)."
    out = {}
    for folder in folders:
        for f in sorted((ROOT/folder).rglob('*')):
            if f.is_file() and '__pycache__' not in f.parts and '.ipynb_checkpoints' not in f.parts:
                out[str(f.relative_to(ROOT))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def twin_problems() -> list[str]:
    "Notebooks whose jupytext twin is missing or differs, and twins without a notebook."
    config = load_jupytext_config(str(ROOT))
    problems = []
    nbs = sorted((ROOT/'nbs').glob('*.ipynb'))
    for nb_path in nbs:
        twin = ROOT/'nbs_py'/(nb_path.stem + '.py')
        expected = jupytext.writes(jupytext.read(nb_path), fmt='py:percent', config=config)
        if not twin.exists(): problems.append(f'{twin.relative_to(ROOT)} is missing (twin of {nb_path.name})')
        elif twin.read_text() != expected: problems.append(f'{twin.relative_to(ROOT)} differs from {nb_path.name}')
    stems = {p.stem for p in nbs}
    problems += [f'{t.relative_to(ROOT)} has no notebook in nbs/' for t in sorted((ROOT/'nbs_py').glob('*.py'))
                 if t.stem not in stems]
    return problems


def import_cell_problems() -> list[str]:
    "nbdev's doc processing runs every cell that imports something: imports belong in cells of their own."
    problems = []
    for nb_path in sorted((ROOT/'nbs').glob('*.ipynb')):
        for i, cell in enumerate(nbformat.read(nb_path, as_version=4).cells):
            if cell.cell_type != 'code' or re.search(r'^\s*#\|\s*(export|exports|exporti|hide)\b', cell.source, re.M):
                continue
            code = [l for l in cell.source.splitlines() if l.strip() and not l.lstrip().startswith('#')]
            imports = [l for l in code if re.match(r'(import|from)\s+\S+', l)]
            if imports and len(imports) < len(code):
                problems.append(f'{nb_path.name} cell {i} mixes imports ({imports[0]!r}) with other code; '
                                'nbdev runs import cells when building the docs: move the import to an imports cell')
    return problems


KERNELSPEC = {'display_name': 'python3', 'language': 'python', 'name': 'python3'}  # nbdev_clean's form of it


def kernelspec_problems() -> list[str]:
    "Notebooks without the python3 kernelspec (nbdev_clean keeps it, and sets display_name to the kernel's name)."
    problems = []
    for nb_path in sorted((ROOT/'nbs').glob('*.ipynb')):
        ks = nbformat.read(nb_path, as_version=4).metadata.get('kernelspec')
        if ks != KERNELSPEC:
            problems.append(f'{nb_path.name} has kernelspec {ks!r}, not {KERNELSPEC!r}: Jupyter would ask for a kernel')
    return problems


def sidebar_problems() -> list[str]:
    order = nbdocs.chapters()
    on_disk = sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb'))
    problems = [f'nbs/sidebar.yml lists {n} twice' for n in set(order) if order.count(n) > 1]
    problems += [f'nbs/sidebar.yml lists {n}, which is not in nbs/' for n in order if n not in on_disk]
    problems += [f'nbs/{n} is missing from nbs/sidebar.yml' for n in on_disk if n not in order]
    return problems


def main() -> int:
    problems = []
    before = snapshot('pixpro_rs')
    subprocess.run(['nbdev_export'], cwd=ROOT, check=True)
    problems += [f'nbdev_export changed {f}' for f in changed(before, snapshot('pixpro_rs'))]
    before = snapshot('nbs')
    subprocess.run(['nbdev_clean'], cwd=ROOT, check=True)
    problems += [f'nbdev_clean changed {f}' for f in changed(before, snapshot('nbs'))]
    problems += twin_problems()
    problems += sidebar_problems()
    problems += kernelspec_problems()
    problems += import_cell_problems()
    if problems:   # doc processing would fail on an import cell that runs other code: report that first
        print('The tree is not in step with the notebooks:', *problems, sep='\n  ')
        return 1
    nbdocs.proc()
    if (ROOT/'README.md').read_text() != nbdocs.readme_text():
        problems.append('README.md is not what nbs/index.ipynb renders to')
    if problems:
        print('The tree is not in step with the notebooks:', *problems, sep='\n  ')
        print('Fix: run `bash tools/sync.sh`, look at `git diff`, commit.')
        return 1
    print('tree in step: package, clean notebooks, jupytext twins, sidebar, kernelspecs, README')
    return 0


if __name__ == '__main__':
    sys.exit(main())
