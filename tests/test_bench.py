"""The benchmark's command line: the CPU smoke run CI keeps working, its JSON record, and clear errors."""
import json
import subprocess
import sys


def run(*args, timeout=900):
    return subprocess.run([sys.executable, '-m', 'pixpro_rs.bench', *args], capture_output=True, text=True, timeout=timeout)


def test_smoke_run_prints_table_and_writes_json(tmp_path):
    out = tmp_path/'bench.json'
    r = run('--preset', 'smoke', '--data_workers', '0', '--json', str(out))
    assert r.returncode == 0, r.stderr
    assert '| resnetrs_tiny 64px b4 fp32 |' in r.stdout and '| resnetrs_tiny 64px b4 bf16 |' in r.stdout
    d = json.loads(out.read_text())
    assert d['machine']['cpu_cores'] >= 1 and d['machine']['torch']
    assert [s['precision'] for s in d['steps']] == ['fp32', 'bf16']
    for s in d['steps']:
        assert s['error'] is None and s['images_per_s'] > 0 and s['loss'] < 0
        assert all(s[k] >= 0 for k in ('copy_s', 'forward_s', 'backward_s', 'optimizer_s', 'ema_s'))
        assert s['forward_s'] > 0 and s['peak_memory_gib'] > 0
    assert d['steps'][0]['speedup'] == 1.0
    assert d['data'][0]['pairs_per_s'] > 0 and d['data'][0]['num_workers'] == 0


def test_bad_flags_exit_2_with_one_line(tmp_path):
    for args, word in ((['--arch', 'resnet51'], 'resnet51'), (['--precision', 'fp16'], 'fp16'),
                       (['--channels_last', 'maybe'], 'maybe')):
        r = run(*args, '--json', str(tmp_path/'x.json'))
        assert r.returncode == 2 and word in r.stderr and 'Traceback' not in r.stderr, r.stderr
        assert not (tmp_path/'x.json').exists()
