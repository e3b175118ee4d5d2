"""The experiments' command line: bad flags refused in one line before any work, and the committed results file."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run as run_command

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    return run_command([sys.executable, '-m', 'pixpro_rs.experiments', *args], timeout=timeout)


@pytest.mark.parametrize('flags,word', [
    (['--scale', 'huge', '--output', '{tmp}/x.json'], "invalid scale='huge'"),
    (['--output', '/no/such/folder/x.json'], 'invalid output='),
    (['--output', '{tmp}'], 'invalid output='),
    (['--output', '{tmp}/x.json', '--threads', '0'], 'invalid threads=0'),
    (['--study', 'both', '--output', '{tmp}/x.json'], "invalid study='both'"),
    (['--study', 'recipes', '--output', '{tmp}/x.json', '--jobs', '0'], 'invalid jobs=0'),
    (['--output', '{tmp}/x.json', '--jobs', '2'], 'invalid jobs=2'),
])
def test_bad_flags_exit_2_in_one_line(flags, word, tmp_path):
    r = run(*(f.format(tmp=tmp_path) for f in flags))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and lines[0].startswith('pixpro_rs.experiments: error:'), r.stderr
    assert not (tmp_path/'x.json').exists()


def test_committed_results_say_how_they_were_made():
    res = json.loads((ROOT/'nbs'/'claims_results.json').read_text())
    assert res['scale'] == 'full' and res['command'].startswith('python -m pixpro_rs.experiments --scale full')
    assert res['machine'] and res['torch'] and res['wall_s'] > 0
    for r in res['rows']:
        assert {'arm', 'seed', 'miou', 'pixel_acc', 'chance_pixel_acc'} <= set(r)
    assert {r['arm'] for r in res['rows'] if not r['ablation']} >= {'random init', 'PixPro', 'supervised'}


def test_committed_recipe_study_says_how_it_was_made():
    from pixpro_rs.experiments import ADDITIVE
    res = json.loads((ROOT/'nbs'/'recipe_results.json').read_text())
    assert (res['study'], res['scale']) == ('recipes', 'full')
    assert res['command'].startswith('python -m pixpro_rs.experiments --study recipes --scale full')
    assert res['machine'] and res['torch'] and res['wall_s'] > 0
    assert [r['row'] for r in res['rows']] == [name for s in res['scale_values']['seeds'] for name, _, _ in ADDITIVE]
    for r in res['rows']:
        assert 0 <= r['top1'] <= 1 and r['top1'] in (r['top1_raw'], r['top1_ema']) and r['steps'] > 0


def _children(pid):
    "The pids of the spawned worker processes whose parent is `pid` (Linux /proc)."
    kids = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
            cmd = (stat.parent/'cmdline').read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b'spawn_main' in cmd:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_killed_study_leaves_no_workers(tmp_path):
    "SIGTERM to a study with 2 jobs: its worker processes end with it instead of training on as orphans."
    p = subprocess.Popen([sys.executable, '-m', 'pixpro_rs.experiments', '--study', 'recipes', '--scale', 'smoke',
                          '--output', str(tmp_path/'r.json'), '--jobs', '2', '--threads', '1'],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.monotonic() + 120, []
    while len(workers) < 2 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2); workers = _children(p.pid)
    assert len(workers) == 2, f'the study did not start its 2 workers (rc {p.poll()})'
    p.send_signal(signal.SIGTERM); p.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(Path(f'/proc/{w}').exists() for w in workers) and time.monotonic() < deadline: time.sleep(0.2)
    alive = [w for w in workers if Path(f'/proc/{w}').exists()]
    for w in alive: os.kill(w, signal.SIGKILL)  # leave nothing behind, then fail
    assert not alive, f'workers {alive} outlived the killed study'
