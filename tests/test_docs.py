"""The docs site, built as a user builds it and looked at in a real (headless) browser.

`bash tools/docs.sh` builds `_docs/` (Sphinx here: Quarto is not installable on our machines). The site is served on
loopback and opened in Debian's Chromium through Playwright: the home page shows the project title, the sidebar
links every chapter of nbs/sidebar.yml and each link opens a page with that chapter's title, no page shows a Python
traceback, every image loads, and search finds a page. The browser has no network: every request that leaves the
served site is refused (and recorded), so the site must be complete offline. On every chapter: each equation is
typeset by the site's own MathJax (no TeX delimiters left in the prose); every link on an API name points into the
site, and each `page.html#anchor` in the site names an element of that page; no Quarto attribute text (`{target=`)
shows; nothing is wider than the page (signatures wrap, figures keep their size and scroll in their output box);
each API entry (show_doc) is a section listed in the page contents. Screenshots land in `test-artifacts/`.
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


OFFSITE = []   # requests the browser tried to make outside the served site (all refused)


@pytest.fixture(scope='module')
def page(site):
    exe = chromium_path()
    from playwright.sync_api import sync_playwright
    def offline(route):   # the reader has no network: only the site itself answers
        if route.request.url.startswith(site + '/'): return route.continue_()
        OFFSITE.append(route.request.url)
        return route.abort()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
        ctx.route('**/*', offline)
        pg = ctx.new_page()
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


# Collected on each chapter page once MathJax has finished: what the checks below assert on.
SURVEY_JS = r"""async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const W = document.documentElement.clientWidth;
  const name = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
                     (typeof el.className === 'string' && el.className ? '.' + el.className.trim().split(/\s+/).join('.') : '');
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const prose = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode())
    if (!n.parentElement.closest('pre, code, script, style, mjx-container, .highlight')) prose.push(n.textContent);
  const tex = prose.join(' ').match(/.{0,30}(\$\$|\\\(|\\\)|\\\[|\\\]).{0,30}/gs) || [];
  const maths = [...document.querySelectorAll('.math')];
  const wide = [];
  for (const el of document.querySelectorAll('body *')) {   // wider than the page, unless held in a scroll box
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.right <= W + 1) continue;
    let held = false;
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement)
      if (getComputedStyle(a).overflowX !== 'visible' && a.getBoundingClientRect().right <= W + 1) { held = true; break; }
    if (!held) wide.push(name(el) + ' right edge ' + Math.round(r.right) + ' px');
  }
  const api = [...document.querySelectorAll('section')].filter(s => s.querySelector(':scope > div.api-signature'))
    .map(s => [s.id, s.querySelector(':scope > :is(h1, h2, h3, h4, h5, h6)').innerText.replace(/#$/, '').trim()]);
  return {
    math: maths.length,
    untypeset: maths.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 60)),
    tex: tex.slice(0, 5),
    scripts: [...document.scripts].map(s => s.src).filter(s => s && !s.startsWith(location.origin)),
    hrefs: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    quarto_attrs: document.body.innerText.includes('{target='),
    page_width: document.documentElement.scrollWidth, viewport: W,
    wide: wide.slice(0, 5),
    signatures: document.querySelectorAll('div.api-signature pre').length,
    wrapped: [...document.querySelectorAll('div.api-signature pre')].filter(p => p.scrollWidth > p.clientWidth + 1)
      .map(p => p.innerText.slice(0, 40) + ': ' + p.scrollWidth + ' px wide in ' + p.clientWidth),
    shrunk: [...document.querySelectorAll('.cell_output img')]
      .filter(i => i.naturalWidth && i.getBoundingClientRect().width < i.naturalWidth - 1)
      .map(i => i.src.split('/').pop() + ' at ' + Math.round(100 * i.getBoundingClientRect().width / i.naturalWidth) + ' %'),
    api,
    toc: [...document.querySelectorAll('.bd-sidebar-secondary nav a[href]')].map(a => a.getAttribute('href')),
  };
}"""


@pytest.fixture(scope='module')
def survey(site, page):
    "Chapter page name -> what SURVEY_JS found there (the browser offline)."
    out = {}
    for name in nbdocs.chapters():
        html = Path(name).stem + '.html'
        page.goto(f'{site}/{html}')
        page.wait_for_load_state('load')
        out[html] = page.evaluate(SURVEY_JS)
    return out


def test_offline_nothing_fetched_elsewhere(survey):
    assert OFFSITE == [], f'the site asks the network for {sorted(set(OFFSITE))[:10]}'
    assert {p: r['scripts'] for p, r in survey.items() if r['scripts']} == {}


def test_equations_typeset_offline(survey, page, site):
    with_math = {p: r for p, r in survey.items() if r['math']}
    assert len(with_math) >= 3, f'equations found only on {list(with_math)}: the survey finds no math'
    assert {p: r['untypeset'][:3] for p, r in with_math.items() if r['untypeset']} == {}, 'equations left as TeX'
    assert {p: r['tex'] for p, r in survey.items() if r['tex']} == {}, 'TeX delimiters left in the prose'
    first = next(iter(with_math))
    page.goto(f'{site}/{first}')
    page.wait_for_function('() => document.querySelector(".math mjx-container")')
    page.locator('.math mjx-container').first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS/'docs-math.png'))


def test_api_links_are_local_and_resolve(survey, site):
    host = nbdocs.doc_url()
    online = {p: [h for h in r['hrefs'] if h.startswith(host)] for p, r in survey.items()}
    assert {p: hs[:3] for p, hs in online.items() if hs} == {}, f'links to {host} (Quarto page names) left'
    ids = {f'{site}/{p}': set(r['ids']) for p, r in survey.items()}
    local = [h for r in survey.values() for h in r['hrefs'] if '#' in h and h.split('#')[0] in ids]
    api_links = [h for p, r in survey.items() for h in r['hrefs'] if '#' in h and h.split('#')[0] != f'{site}/{p}']
    assert len(api_links) > 50, f'only {len(api_links)} links between chapters: the API links are gone?'
    broken = sorted({h for h in local if h.split('#', 1)[1] and h.split('#', 1)[1] not in ids[h.split('#')[0]]})
    assert broken == [], f'{len(broken)} links name an anchor their page lacks: {broken[:10]}'


def test_no_quarto_attribute_text(survey):
    assert [p for p, r in survey.items() if r['quarto_attrs']] == [], 'raw {target=...} text shows'


def test_nothing_wider_than_the_page(survey):
    problems = {}
    for p, r in survey.items():
        found = r['wide'] + r['wrapped'] + r['shrunk']   # too wide; signatures not wrapped; figures shrunk
        if r['page_width'] > r['viewport']: found.append(f"the page is {r['page_width']} px wide in {r['viewport']}")
        if found: problems[p] = found[:5]
    assert problems == {}, 'wider than the page, or shrunk to fit'
    assert sum(r['signatures'] for r in survey.values()) > 0, 'no API signature (div.api-signature) found'


def test_api_entries_in_page_contents(survey):
    nbs = {n: nbformat.read(nbdocs.PROC/n, as_version=4) for n in nbdocs.chapters()}
    expected = {Path(n).stem + '.html': a for n, a in nbdocs.api_index(nbs).items()}
    assert sum(map(len, expected.values())) > 50, 'the processed notebooks have almost no show_doc entries'
    for p, r in survey.items():
        assert len(r['api']) >= len(expected[p]), f'{p}: {len(r["api"])} API sections for {len(expected[p])} entries'
        missing = sorted(expected[p] - set(r['ids']))
        assert missing == [], f'{p}: API entries without their nbdev anchor: {missing[:10]}'
        absent = [name for sid, name in r['api'] if '#' + sid not in r['toc']]
        assert absent == [], f'{p}: API entries missing from the page contents: {absent[:10]}'
