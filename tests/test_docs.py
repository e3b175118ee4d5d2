"""The docs site, built as a user builds it and looked at in a real (headless) browser.

`bash tools/docs.sh` builds `_docs/` (Sphinx here: Quarto is not installable on our machines). The site is served on
loopback and opened in Debian's Chromium through Playwright: the home page shows the project title, the sidebar
links every chapter of nbs/sidebar.yml and each link opens a page with that chapter's title, no page shows a Python
traceback, every image loads, and search finds a page. Screenshots land in `test-artifacts/`.
In CI (env CI set) a missing browser fails the test; elsewhere it skips.
"""
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import nbdocs  # noqa: E402

ARTIFACTS = ROOT/'test-artifacts'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']


def chromium_path():
    path = shutil.which('chromium') or shutil.which('chromium-browser')
    if path: return path
    msg = "Debian's chromium is not installed (apt-get install -y chromium); .ci/run installs it"
    if os.environ.get('CI'): pytest.fail(msg)
    pytest.skip(msg)


def chapter_titles():
    "Chapter file name -> title (the first markdown cell's `# ` heading), in reading order."
    out = {}
    for name in nbdocs.chapters():
        nb = nbformat.read(ROOT/'nbs'/name, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == 'markdown')
        out[name] = first.source.splitlines()[0].lstrip('#').strip()
    return out


@pytest.fixture(scope='module')
def site():
    subprocess.run(['bash', 'tools/docs.sh'], cwd=ROOT, check=True)
    docs = ROOT/'_docs'
    assert (docs/'index.html').exists()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(docs))
    class Quiet(handler.func):
        def log_message(self, *args): pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(docs)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


@pytest.fixture(scope='module')
def page(site):
    exe = chromium_path()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={'width': 1280, 'height': 900})
        yield pg
        browser.close()


def check_page(pg, what):
    "No traceback in the text, every image loaded."
    text = pg.inner_text('body')
    assert 'Traceback (most recent call last)' not in text, f'{what} shows a Python traceback'
    assert pg.locator('.output.error, .output.traceback').count() == 0, f'{what} shows an error output'
    pg.wait_for_load_state('load')
    broken = pg.eval_on_selector_all('img', 'imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)')
    assert broken == [], f'{what}: images that did not load: {broken}'


def plain_quotes(text):
    "Undo Sphinx's smart quotes, so titles compare with the notebooks' plain ones."
    return text.translate(str.maketrans({'\u2018': "'", '\u2019': "'", '\u201c': '"', '\u201d': '"'}))


def test_home_and_every_chapter(site, page):
    ARTIFACTS.mkdir(exist_ok=True)
    titles = chapter_titles()
    page.goto(site + '/index.html')
    assert page.locator('h1').first.inner_text().strip().rstrip('#').strip() == 'pixpro_rs'
    check_page(page, 'the home page')
    page.screenshot(path=str(ARTIFACTS/'docs-home.png'), full_page=False)

    links = page.eval_on_selector_all('nav.bd-docs-nav a.reference',
                                      'as => as.map(a => [a.innerText.trim(), a.getAttribute("href")])')
    links = [[plain_quotes(t), href] for t, href in links]  # Sphinx typesets ' as a typographic apostrophe
    by_text = dict(links)
    chapters = [n for n in titles if n != 'index.ipynb']
    assert chapters, 'nbs/sidebar.yml lists no chapter'
    assert [t for t, _ in links if t in titles.values()][-len(chapters):] == [titles[n] for n in chapters], \
        f'sidebar links {links} are not the chapters {titles} in reading order'
    for name in chapters:
        title = titles[name]
        assert title in by_text, f'the sidebar has no link to {name} ({title!r}); it has {links}'
        page.goto(site + '/' + by_text[title].lstrip('./'))
        h1 = plain_quotes(page.locator('h1').first.inner_text().strip().rstrip('#').strip())
        assert h1 == title, f'{name}: page title {h1!r}, expected {title!r}'
        check_page(page, name)
        page.screenshot(path=str(ARTIFACTS/f'docs-{Path(name).stem}.png'), full_page=False)


def test_search_finds_a_chapter(site, page):
    page.goto(site + '/search.html?q=glossary')
    page.wait_for_selector('#search-results li', timeout=20_000)
    hits = page.inner_text('#search-results')
    assert 'Conventions' in hits
