"""Figures of the book's shape: exported cells (median lines, share with two or more definitions, those not followed
by a test), code hidden from the docs (`#| export` outside the imports cell), the two engines' lengths, and citations of our private notes.
Run: python tools/book_stats.py"""
import ast
import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_lines(src: str) -> list[str]:
    return [l for l in src.split('\n') if l.strip() and not l.startswith('#|')]


def main():
    sizes, multi, hidden, untested = [], 0, 0, 0
    is_export = lambda c: (c is not None and c['cell_type'] == 'code' and bool(re.search(r'^#\|\s*exports?\s*$', ''.join(c['source']), re.M))
                           and not re.search(r'^(?:from|import) ', ''.join(c['source']), re.M))
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        code = [c for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
        untested += sum(is_export(a) and (b is None or is_export(b)) for a, b in zip(code, code[1:] + [None]))
        for c in json.loads(nb.read_text())['cells']:
            src = ''.join(c['source'])
            if c['cell_type'] != 'code' or not re.search(r'^#\|\s*exports?\s*$', src, re.M): continue
            sizes.append(len(code_lines(src)))
            multi += len(re.findall(r'^(?:async def|def|class) ', src, re.M)) >= 2
            if re.search(r'^#\|\s*export\s*$', src, re.M) and not re.search(r'^(?:from|import) ', src, re.M):
                hidden += len(code_lines(src))
    print(f'exported cells: {len(sizes)}, median {statistics.median(sizes):g} lines, '
          f'{multi / len(sizes):.0%} with two or more definitions, {hidden} lines hidden by `#| export`; '
          f'{untested} exported cells (imports cells aside) directly followed by another exported cell, not a test')
    for module, name in (('train', 'train'), ('finetune', 'finetune')):
        tree = ast.parse((ROOT/'pixpro_rs'/f'{module}.py').read_text())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
        print(f'{name}(): {fn.end_lineno - fn.lineno + 1} lines')
    spec = sum(len(re.findall(r'\bthe spec\b|spec section|\(spec[ ,)]', p.read_text(), re.I))
               for p in [*(ROOT/'nbs').glob('*.ipynb'), *(ROOT/'pixpro_rs').glob('*.py')])
    print(f"citations of 'the spec': {spec}")


if __name__ == '__main__': main()
