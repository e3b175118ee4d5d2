"""The experiments' command line: bad flags refused in one line before any work, and the committed results file."""
import json
import sys
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
