"""Docs and README from the processed notebooks, without Quarto.

nbdev's `proc_nbs()` turns `nbs/` into `_proc/` (front matter as a raw YAML cell, `show_doc` cells added and
executed, `#| hide` cells removed). Quarto would render `_proc/`; it cannot be installed on our machines, so this
module renders the same notebooks:

- `python tools/nbdocs.py readme`: `_proc/index.ipynb` -> README.md (GitHub markdown, through nbconvert);
- `python tools/nbdocs.py sphinx`: every chapter of `nbs/sidebar.yml`, in that order -> `_docs/` (Sphinx, myst-nb,
  sphinx-book-theme; left sidebar, search, figures, API entries).

The adapter is small: the YAML front matter becomes a title and a summary quote; `#| echo: false` becomes the
`remove-input` tag, `#| output: false` `remove-output`, `#| include: false` `remove-cell`; other `#|` lines are
dropped from the code a reader sees. Three things make the site a complete, offline book:

- each `show_doc` entry (a code cell whose markdown output Quarto would paste in as is, `#| output: asis`) becomes a
  markdown cell, so its `###` heading is a real section (in the page contents, with nbdev's anchor as its id:
  `runlock.acquire`), its docstring's math is typeset, its signature block wraps (class `api-signature`) and its
  source link carries a class instead of Quarto's raw `{target=... style=...}` text;
- nbdev's links on API names (`https://<doc_host><doc_baseurl>/core.html#configerror`, Quarto page names) point to
  the chapter that documents the name here (`00_core.ipynb#configerror`, resolved by myst to the page's anchor);
- MathJax ships with the site (`sphinx-mathjax-offline`, a dev dependency) instead of coming from a CDN.
"""
from __future__ import annotations

import configparser
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS, PROC, SRC, DOCS = ROOT/'nbs', ROOT/'_proc', ROOT/'_sphinx', ROOT/'_docs'


def chapters() -> list[str]:
    "Notebook file names in reading order, from nbs/sidebar.yml (the one source of the order)."
    side = yaml.safe_load((NBS/'sidebar.yml').read_text())
    def flat(items):
        for it in items:
            if isinstance(it, str): yield it
            elif isinstance(it, dict) and 'contents' in it: yield from flat(it['contents'])
            elif isinstance(it, dict) and 'href' in it: yield it['href']
    return list(flat(side['website']['sidebar']['contents']))


def proc() -> Path:
    "Run nbdev's doc processing (executes only export, import and show_doc cells) into `_proc/`."
    from nbdev.serve import proc_nbs
    # runs/ holds training runs (checkpoints of hundreds of MB) made when the train notebook runs inside nbs/
    return Path(proc_nbs(n_workers=0, skip_folder_re=r'^([_.]|runs$)'))


_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*)$')


def _front_matter(cell) -> dict:
    text = cell.source.strip()
    if cell.cell_type != 'raw' or not text.startswith('---'): return {}
    return yaml.safe_load(text.strip('-').strip()) or {}


def nbdev_page(name: str) -> str:
    "The page nbdev/Quarto gives a notebook (`00_core.ipynb` -> `core`), as in nbdev's doclinks (`_nbpath2html`)."
    return re.sub(r'^\d+[a-zA-Z0-9]*_', '', Path(name).stem.lower())


def doc_url() -> str:
    "Where nbdev's links on API names point: `doc_host` + `doc_baseurl` of settings.ini."
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT/'settings.ini')
    d = cfg['DEFAULT']
    return d.get('doc_host', '').rstrip('/') + '/' + d.get('doc_baseurl', '').strip('/')


_SHOW_DOC = re.compile(r'^\s*(#\|.*|show_doc\(.*\)\s*)$')
_API_HEADING = re.compile(r'^(#{1,6})[ \t]+([\w.]+)[ \t]*$', re.M)
_FENCE = re.compile(r'^(```+|~~~+).*?^\1[ \t]*$', re.M | re.S)


def api_anchor(name: str) -> str:
    "nbdev's anchor for an API name (`RunLock.acquire` -> `runlock.acquire`); conf.py's heading slugs use it too."
    return name.lower()


def heading_slug(title: str) -> str:
    "myst's heading anchors (conf.py): an API name keeps nbdev's anchor (`api_anchor`), other titles GitHub's slug."
    from myst_parser.slugs import github_slugify
    t = title.strip()
    return api_anchor(t) if re.fullmatch(r'[\w.]+', t) else github_slugify(title)


def _md(out) -> str | None:
    md = out.get('data', {}).get('text/markdown')
    return (''.join(md) if isinstance(md, list) else md) if md is not None else None


def is_show_doc(cell) -> bool:
    "A cell that only calls `show_doc` and has its markdown output (nbdev adds one per exported name)."
    lines = [l for l in cell.source.splitlines() if l.strip()]
    return (cell.cell_type == 'code' and any('show_doc(' in l for l in lines)
            and all(_SHOW_DOC.match(l) for l in lines) and any(_md(o) for o in cell.get('outputs', [])))


def api_entry(md: str) -> str:
    "show_doc's markdown as MyST: no opening rule, a classed source link, a wrapping signature, plain headings."
    md = re.sub(r'\A\s*---\s*\n', '', md)
    # Quarto's `[source](url){target="_blank" style="float:right; ..."}` before the heading -> a paragraph of class
    # api-source after it (pixpro.css sets it at the right), so the link belongs to its entry's section
    src = re.search(r'^\[source\]\(([^)\s]+)\)(\{[^}\n]*\})?[ \t]*\n', md, re.M)
    if src: md = md[:src.start()] + md[src.end():]
    md = re.sub(r'^(```+ *python)', r'{.api-signature}\n\1', md, flags=re.M)
    def heading(m):   # `_` in a name would start emphasis (`_parser.error`, `__init__`)
        h = f"{{.api-entry}}\n{m.group(1)} {m.group(2).replace('_', chr(92) + '_')}"
        return h + (f'\n\n{{.api-source}}\n[source]({src.group(1)}){{target="_blank" rel="noopener"}}' if src else '')
    md = _API_HEADING.sub(heading, md, count=1)
    return re.sub(r'\{target="[^"]*" style="[^"]*"\}', '', md)   # any other Quarto attributes


def api_index(nbs: dict) -> dict[str, set[str]]:
    "Notebook name -> the anchors of its API entries (show_doc headings)."
    out = {}
    for name, nb in nbs.items():
        out[name] = {api_anchor(m.group(2)) for c in nb.cells if is_show_doc(c)
                     for o in c.outputs if _md(o) for m in _API_HEADING.finditer(_md(o))}
    return out


def local_links(md: str, index: dict[str, set[str]], base: str | None = None) -> str:
    """nbdev's links on API names (`<base>/core.html#configerror`, Quarto's page names) -> the local chapter that
    documents the name (`00_core.ipynb#configerror`): the page's notebook with that entry, else the entry of the
    class of a method, else the page without anchor. In code blocks, where markdown is not rendered, the link
    goes back to the plain name nbdev made it from."""
    base = re.escape((base or doc_url()).rstrip('/'))
    link = re.compile(r'\[([^\]]*)\]\(' + base + r'/([\w.-]+?)\.html(?:#([^)\s]*))?\)')
    def target(page, anchor):
        cands = [n for n in index if nbdev_page(n) == page] or [n for n in index if Path(n).stem == page]
        if not cands: return None
        for a in ([anchor, anchor.rsplit('.', 1)[0]] if anchor else []):
            for n in cands:
                if a in index[n]: return f'{n}#{a}'
        return cands[0]
    def sub(m):
        t = target(m.group(2), m.group(3))
        return f'[{m.group(1)}]({t})' if t else m.group(0)
    parts, pos = [], 0
    for f in _FENCE.finditer(md):   # inside fences: the name as nbdev found it
        parts += [link.sub(sub, md[pos:f.start()]), link.sub(lambda m: m.group(1), f.group(0))]
        pos = f.end()
    return ''.join(parts + [link.sub(sub, md[pos:])])


def plain(nb, index: dict[str, set[str]] | None = None) -> nbformat.NotebookNode:
    """A processed nbdev notebook as plain Jupyter: title + summary cells, Quarto cell options as tags, show_doc
    entries as markdown cells. With `index` (from `api_index`), links on API names point to the local chapters."""
    nb = copy.deepcopy(nb)
    cells = []
    for cell in nb.cells:
        fm = _front_matter(cell)
        if fm:
            text = f"# {fm.get('title', '')}\n"
            if fm.get('description'): text += f"\n> {fm['description']}\n"
            cells.append(nbformat.v4.new_markdown_cell(text))
            continue
        if cell.cell_type == 'markdown' and 'AUTOGENERATED' in cell.source and len(cell.source) < 80: continue
        if cell.cell_type == 'code':
            lines, opts = cell.source.splitlines(), {}
            keep = []
            for line in lines:
                m = _DIRECTIVE.match(line)
                if m: opts[m.group(1)] = m.group(2).strip()
                else: keep.append(line)
            cell.source = '\n'.join(keep).strip('\n')
            tags = set(cell.metadata.get('tags', []))
            if opts.get('echo') == 'false': tags.add('remove-input')
            if opts.get('output') == 'false': tags.add('remove-output')
            if opts.get('include') == 'false': tags.add('remove-cell')
            if not cell.source.strip() and not cell.get('outputs'): continue
            if is_show_doc(cell):   # the entry itself, as Quarto pastes it in: a markdown cell
                if tags & {'remove-cell', 'remove-output'}: continue
                if 'remove-input' not in tags:
                    cells.append(nbformat.v4.new_code_cell(cell.source, metadata={'tags': ['remove-output']}))
                for out in cell.outputs:
                    if _md(out): cells.append(nbformat.v4.new_markdown_cell(api_entry(_md(out))))
                continue
            cell.metadata['tags'] = sorted(tags)
        cells.append(cell)
    if index is not None:
        for cell in cells:
            if cell.cell_type == 'markdown': cell.source = local_links(cell.source, index)
    nb.cells = cells
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nb.metadata['language_info'] = {'name': 'python', 'pygments_lexer': 'ipython3'}
    return nb


def readme_text(proc_dir: Path = PROC) -> str:
    "README.md's text: the processed index notebook as GitHub markdown, chapter links pointing into nbs/."
    from nbconvert import MarkdownExporter
    nb = plain(nbformat.read(proc_dir/'index.ipynb', as_version=4))
    nb.cells = [c for c in nb.cells if 'remove-cell' not in c.metadata.get('tags', [])]
    for c in nb.cells:
        if 'remove-input' in c.metadata.get('tags', []): c.source = ''
    body, _ = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
    body = re.sub(r'\]\(((?!https?:|/|#)[\w./-]+\.ipynb)\)', r'](nbs/\1)', body)
    body = re.sub(r'\n{3,}', '\n\n', body).strip() + '\n'
    header = '<!-- Generated from nbs/index.ipynb by `bash tools/sync.sh`; edit the notebook, not this file. -->\n\n'
    return header + body


_CONF = '''# Generated by tools/nbdocs.py: Sphinx configuration for the offline build of the pixpro_rs book.
project = "pixpro_rs"
html_title = "pixpro_rs"
author = "pixpro_rs developers"
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
# MathJax from the site's own _static/mathjax (sphinx-mathjax-offline), not from a CDN: the book reads offline.
extensions = ["myst_nb", "sphinx.ext.mathjax", "sphinx-mathjax-offline"]
myst_enable_extensions = ["attrs_inline", "attrs_block", "dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# API entries keep nbdev's anchors as ids (`runlock.acquire`); other headings get GitHub's slugs
myst_heading_slug_func = "nbdocs.heading_slug"
nb_execution_mode = "off"
nb_merge_streams = True
suppress_warnings = ["myst.header", "misc.highlighting_failure", "mystnb.unknown_mime_type"]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_theme_options = {"show_toc_level": 3, "home_page_in_toc": True, "use_download_button": False}
html_static_path = ["_static"]
html_css_files = ["pixpro.css"]
html_show_sourcelink = False
'''

_CSS = '''/* API entries (show_doc): the source link at the right of the heading, the signature wrapped to the page width
   (a signature with a long default, e.g. config_parser's glossary, would otherwise be one line thousands of px wide) */
section.api-entry > h3 { font-size: 1.45rem; font-family: var(--pst-font-family-monospace); }
p.api-source { text-align: right; font-size: smaller; margin: -1.9rem 0 0.3rem; }
div.api-signature pre { white-space: pre-wrap; overflow-wrap: anywhere; }
/* figures at their own size (wide ones scroll in their output box) instead of shrunk to the text column */
.cell_output img { max-width: none; }
.cell_output { overflow-x: auto; }
'''


def sphinx_source(proc_dir: Path = PROC, src: Path = SRC) -> list[str]:
    "Write the Sphinx source tree: adapted notebooks, conf.py, static files. Returns the document names in order."
    if src.exists(): shutil.rmtree(src)
    (src/'_static').mkdir(parents=True)
    order = chapters()
    missing = [n for n in order if not (proc_dir/n).exists()]
    if missing: raise SystemExit(f"nbs/sidebar.yml names notebooks that do not exist: {missing}")
    docnames = []
    nbs = {name: nbformat.read(proc_dir/name, as_version=4) for name in order}
    index = api_index(nbs)
    for name in order:
        nb = plain(nbs[name], index)
        if name == 'index.ipynb':
            rest = [Path(n).stem for n in order if n != 'index.ipynb']
            toc = '```{toctree}\n:hidden:\n:maxdepth: 1\n\n' + '\n'.join(rest) + '\n```\n'
            nb.cells.append(nbformat.v4.new_markdown_cell(toc))
        nbformat.write(nb, src/name)
        docnames.append(Path(name).stem)
    (src/'conf.py').write_text(_CONF)
    (src/'_static'/'pixpro.css').write_text(_CSS)
    return docnames


def sphinx(out: Path = DOCS) -> Path:
    "Build the site into `_docs/`: process the notebooks, adapt them, run sphinx-build."
    proc()
    sphinx_source()
    if out.exists(): shutil.rmtree(out)
    html = SRC/'_build'/'html'   # myst-nb also writes _build/jupyter_execute beside it
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-q', '-j', '1', str(SRC), str(html)]
    subprocess.run(cmd, check=True)
    shutil.move(html, out)
    return out


if __name__ == '__main__':
    what = sys.argv[1] if len(sys.argv) > 1 else ''
    if what == 'readme':
        proc()
        (ROOT/'README.md').write_text(readme_text())
    elif what == 'sphinx':
        print(f"docs site written to {sphinx()}/index.html")
    else:
        raise SystemExit("usage: python tools/nbdocs.py readme|sphinx")
