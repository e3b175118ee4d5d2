"""The benchmark's command line: the CPU smoke run CI keeps working, its JSON record, and clear errors."""
import json
import sys

import pytest

from pixpro_rs.bench import make_jpeg_folder

from helpers import ROOT, run as run_command


def run(*args, timeout=900):
    return run_command([sys.executable, '-m', 'pixpro_rs.bench', *args], timeout=timeout)


def test_smoke_run_prints_table_and_writes_json(tmp_path):
    out = tmp_path/'bench.json'
    r = run('--preset', 'smoke', '--num_workers', '0', '--json', str(out))
    assert r.returncode == 0, r.stderr
    assert '| resnetrs_tiny 64px b4 fp32 |' in r.stdout and '| resnetrs_tiny 64px b4 bf16 |' in r.stdout
    d = json.loads(out.read_text())
    assert d['machine']['cpu_cores'] >= 1 and d['machine']['torch']
    assert [s['mixed_precision'] for s in d['steps']] == ['no', 'bf16']
    for s in d['steps']:
        assert s['error'] is None and s['images_per_s'] > 0 and s['loss'] < 0
        assert all(s[k] >= 0 for k in ('copy_s', 'forward_s', 'backward_s', 'optimizer_s', 'ema_s'))
        assert s['forward_s'] > 0 and s['peak_memory_gib'] > 0
    assert d['steps'][0]['speedup'] == 1.0
    assert d['data'][0]['pairs_per_s'] > 0 and d['data'][0]['num_workers'] == 0


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    "A folder of 10 JPEG files (fewer than a batch of the data benchmark or of --batch_size 16), an empty one, a file."
    d = tmp_path_factory.mktemp('bench')
    (d/'a_file').write_text('not a folder'); (d/'empty').mkdir()
    return dict(small=str(make_jpeg_folder(d/'small', 10, unique=10)), file=str(d/'a_file'), empty=str(d/'empty'))


BAD = [  # (flags, the flag's name, a word of the message); {small}, {file}... are the fixture's paths
    (['--batch_size', '4,x'], 'batch_size', "'4,x'"), (['--image_size', '0'], 'image_size', 'integers >= 1'),
    (['--batch_size', '-1'], 'batch_size', "'-1'"), (['--steps', '0'], 'steps', 'integer >= 1'),
    (['--warmup', '-1'], 'warmup', 'integer >= 0'), (['--train_workers', '-2'], 'train_workers', "'-2'"),
    (['--train_steps', '0'], 'train_steps', "'0'"), (['--train_steps', '5'], 'train_steps', 'more than the 5'),
    (['--num_workers', 'a'], 'num_workers', "'a'"), (['--device', 'gpu'], 'device', "'gpu'"),
    (['--device', 'cuda:7'], 'device', "'cuda:7'"), (['--arch', 'resnet51'], 'arch', 'resnetrs50'),
    (['--mixed_precision', 'fp32'], 'mixed_precision', "'no', 'bf16', 'fp16'"),
    (['--mixed_precision', 'fp16', '--device', 'cpu'], 'mixed_precision', 'on a cpu device'),
    (['--precision', 'bf16'], 'precision', 'unrecognized'), (['--data_workers', '0'], 'data_workers', 'unrecognized'),
    (['--method', 'byol'], 'method', "'pixcontrast'"),
    (['--channels_last', 'maybe'], 'channels_last', 'maybe'), (['--preset', 'huge'], 'preset', "'smoke'"),
    (['--train_workers', '0', '--image_size', '32'], 'image_size', 'C5 map'),
    (['--num_workers', '0', '--data_dir', '/no/such/folder'], 'data_dir', 'does not exist'),
    (['--num_workers', '0', '--data_dir', '{file}'], 'data_dir', 'this is a file'),
    (['--num_workers', '0', '--data_dir', '{empty}'], 'data_dir', 'none found'),
    (['--num_workers', '0', '--data_dir', '{small}'], 'data_dir', 'at least 128 images for two batches of 64'),
    (['--train_workers', '0', '--batch_size', '16', '--data_dir', '{small}'], 'data_dir', 'it holds 10'),
    (['--json', '{file}/x.json'], 'json', 'writable folder'), (['--json', '/no/such/folder/x.json'], 'json', 'writable'),
    (['--json', '{empty}'], 'json', 'this is a folder'), (['--bogus', '1'], 'bogus', 'unrecognized'),
]


@pytest.mark.parametrize('flags, name, word', BAD, ids=[' '.join(f) for f, _, _ in BAD])
def test_bad_flags_exit_2_with_one_line(folders, flags, name, word):
    "Each bad flag is refused before the first measurement: exit code 2, one line naming it, no traceback."
    if name == 'device':
        import torch
        if torch.cuda.device_count() > 7: pytest.skip('this machine has a cuda:7')
    r = run('--preset', 'smoke', *(f.format(**folders) for f in flags))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith('pixpro_rs.bench: error: '), r.stderr
    assert name in r.stderr and word in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert r.stdout == ''  # no table, and (the line above) no benchmark line: refused before any step ran


def test_bad_flags_write_no_json(tmp_path):
    r = run('--mixed_precision', 'fp32', '--json', str(tmp_path/'x.json'))
    assert r.returncode == 2 and 'fp32' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('extra', [[], ['--crops']])
def test_ab_pipeline_compares_two_checkouts(extra):
    "The before/after tool of the benchmark chapter, on this checkout against itself: one round, one batch."
    root = str(ROOT)
    r = run_command([sys.executable, f'{root}/tools/ab_pipeline.py', root, root, '--rounds', '1', '--batches', '1', *extra],
                    timeout=600)
    assert r.returncode == 0, r.stderr
    line = [l for l in r.stdout.splitlines() if l.startswith('round  1:')]
    assert line and 'new/old' in line[0], r.stdout
    assert 'median ratio new/old' in r.stdout.splitlines()[-1], r.stdout
