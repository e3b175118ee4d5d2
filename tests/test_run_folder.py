"""Run folders under adversity, across processes: a second run into a live run's folder, SIGTERM (preemption) and
SIGKILL in the middle of a save, a data folder that changed, failed starts, file modes. Both engines."""
import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pixpro_rs.finetune as ft
from pixpro_rs.train import list_checkpoints, load_checkpoint
from pixpro_rs.train import main as train_main

from helpers import ROOT, rows, run

TINY = ['--arch', 'resnetrs_tiny', '--image_size', '64', '--batch_size', '4', '--synthetic_length', '32',
        '--synthetic_size', '64', '--num_workers', '0', '--progress', 'false']
TRAIN = [sys.executable, '-m', 'pixpro_rs.train', *TINY]
ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}


def start(args, **kw):
    "A run in the background, in its own process group (as a batch system starts a job)."
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def wait_rows(proc, run_dir, n, timeout=300):
    "Wait until metrics.jsonl has `n` rows; fails if the process ended first."
    deadline, f = time.time() + timeout, Path(run_dir)/'metrics.jsonl'
    while time.time() < deadline:
        assert proc.poll() is None, f'the run ended first: {proc.communicate()[1][-2000:]}'
        if f.exists() and len(f.read_text().splitlines()) >= n: return
        time.sleep(0.05)
    raise AssertionError('timed out')


def weights(ckpt):
    return load_checkpoint(ckpt)['model']


def test_live_folder_is_locked(tmp_path):
    """A second run into a live run's folder exits 2 naming the holder, even with --overwrite, and touches nothing;
    after the holder is killed, its stale lock is taken over with a warning."""
    out = tmp_path/'run'
    live = start(TRAIN + ['--epochs', '100', '--output_dir', str(out)])
    try:
        wait_rows(live, out, 2)
        before = sorted(p.name for p in (out/'checkpoints').iterdir()) if (out/'checkpoints').exists() else []
        config = (out/'config.json').read_text()
        r = run(TRAIN + ['--epochs', '100', '--output_dir', str(out), '--overwrite', 'true'])  # a real second process
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert f'locked by pid {live.pid}' in r.stderr and 'Traceback' not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        for extra in ([], ['--lr', '2', '--overwrite', 'true']):
            code, err = in_process([*TINY, '--epochs', '100', '--output_dir', str(out), *extra])
            assert code == 2 and f'locked by pid {live.pid}' in err, (extra, err[-2000:])
        assert live.poll() is None, 'the live run was disturbed'
        assert (out/'config.json').read_text() == config
        assert set(before) <= set(p.name for p in (out/'checkpoints').iterdir()) if before else True
    finally:
        os.killpg(live.pid, signal.SIGKILL); live.wait()
    r = run(TRAIN + ['--epochs', '100', '--max_steps', '3', '--output_dir', str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'stale lock of pid {live.pid}' in r.stderr, r.stderr[-2000:]
    assert not (out/'.lock').exists()


def test_sigterm_saves_and_resumes_exactly(tmp_path):
    """SIGTERM to the whole process group (workers included, as SLURM sends it) mid-epoch: the run saves a checkpoint
    at the current step, exits 143 with one line; the same command then ends with the uninterrupted run's weights."""
    a, b = tmp_path/'a', tmp_path/'b'
    args = TRAIN + ['--epochs', '2', '--save_every', '1']
    assert run(args + ['--output_dir', str(a)]).returncode == 0
    proc = start(args + ['--output_dir', str(b), '--num_workers', '2'])
    wait_rows(proc, b, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    step = len(rows(b))
    assert 3 <= step < 8 and f'stopped by SIGTERM after step {step}' in err and 'Traceback' not in err, err[-2000:]
    assert [p.name for p in list_checkpoints(b)] == [f'step-{step:08d}.pt']  # mid-epoch: saved because of the signal
    r = run(args + ['--output_dir', str(b), '--num_workers', '2'])
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x['loss'] for x in rows(b)] == [x['loss'] for x in rows(a)]
    wa, wb = weights(list_checkpoints(a)[-1]), weights(list_checkpoints(b)[-1])
    for k, v in wa.items(): assert torch.equal(v, wb[k]), k


def test_sigkill_during_save_then_start(tmp_path):
    """A run killed inside `torch.save` leaves a temporary file; the next start sweeps it and resumes from the last
    complete checkpoint."""
    out = tmp_path/'run'
    assert run(TRAIN + ['--epochs', '2', '--max_steps', '8', '--output_dir', str(out)]).returncode == 0  # step 8 saved
    die_in_save = ('import os, signal, sys, torch\n'
                   'save = torch.save\n'
                   'def dying(obj, f, *a, **k): save(obj, f, *a, **k); os.kill(os.getpid(), signal.SIGKILL)\n'
                   'torch.save = dying\n'
                   'from pixpro_rs.train import main\n'
                   'sys.exit(main(sys.argv[1:]))\n')
    r = run([sys.executable, '-c', die_in_save, *TINY, '--epochs', '2', '--output_dir', str(out)])
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    orphans = list((out/'checkpoints').glob('.step-*.tmp'))
    assert len(orphans) == 1, list((out/'checkpoints').iterdir())
    r = run(TRAIN + ['--epochs', '2', '--output_dir', str(out)])
    assert r.returncode == 0 and 'resuming at step 8' in r.stdout, r.stdout + r.stderr[-2000:]
    assert not list(out.rglob('*.tmp'))
    assert [p.name for p in list_checkpoints(out)] == ['step-00000016.pt']


def write_images(folder, n, start=0, size=72):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder/f'{i:03d}.png')


def test_changed_data_folder_refused(tmp_path):
    "A folder that grew between a run and its resume is refused by name; a removed file too."
    data, out = tmp_path/'images', tmp_path/'run'
    write_images(data, 8)
    args = [sys.executable, '-m', 'pixpro_rs.train', *TINY, '--data', str(data), '--max_steps', '1', '--output_dir', str(out)]
    assert run(args).returncode == 0
    write_images(data, 8, start=8)
    r = run(args[:-4] + ['--max_steps', '2', '--output_dir', str(out)])
    assert r.returncode == 2 and 'invalid data=' in r.stderr and 'data_files: 8 -> 16' in r.stderr, r.stderr
    for i in range(8, 16): (data/f'{i:03d}.png').unlink()
    (data/'000.png').rename(data/'100.png')
    r = run(args[:-4] + ['--max_steps', '2', '--output_dir', str(out)])
    assert r.returncode == 2 and 'data_digest' in r.stderr and 'data_files' not in r.stderr, r.stderr
    assert [p.name for p in list_checkpoints(out)] == ['step-00000001.pt']


def in_process(argv):
    "`pixpro-train ARGV` in this process (no interpreter start-up): exit code and stderr."
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()): code = train_main(argv)
    return code, err.getvalue()


def test_failed_start_leaves_folder_reusable(tmp_path):
    """A start that fails a check (batch larger than the data, a seed >= 2^64, an empty image folder) writes nothing:
    into a new folder, and into the folder of a run, which the corrected command then resumes."""
    (tmp_path/'empty').mkdir()
    fresh, used = tmp_path/'fresh', tmp_path/'used'
    bad = [(['--batch_size', '64'], 'batch_size'), (['--seed', str(2**64)], 'seed'), (['--data', str(tmp_path/'empty')], 'data')]
    for argv, word in bad:
        code, err = in_process([*TINY, '--max_steps', '1', '--output_dir', str(fresh), *argv])
        assert code == 2 and f'invalid {word}=' in err, err[-2000:]
        assert not fresh.exists(), argv
    assert in_process([*TINY, '--max_steps', '1', '--output_dir', str(fresh)])[0] == 0  # the corrected command
    assert in_process([*TINY, '--max_steps', '1', '--output_dir', str(used)])[0] == 0
    config = (used/'config.json').read_text()
    for argv, word in bad:
        assert in_process([*TINY, '--max_steps', '2', '--output_dir', str(used), *argv])[0] == 2
        assert (used/'config.json').read_text() == config and [x['step'] for x in rows(used)] == [1]
    r = run(TRAIN + ['--max_steps', '2', '--output_dir', str(used)])
    assert r.returncode == 0 and 'resuming at step 1' in r.stdout, r.stdout + r.stderr[-2000:]


def test_files_follow_the_umask(tmp_path):
    "With umask 022 every file of the run is 0644 (readable by teammates), with 077 it is 0600."
    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        out = tmp_path/f'run{mask:o}'
        r = subprocess.run(TRAIN + ['--max_steps', '1', '--output_dir', str(out)], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, preexec_fn=lambda m=mask: os.umask(m))
        assert r.returncode == 0, r.stderr[-2000:]
        files = [p for p in out.rglob('*') if p.is_file() and 'tensorboard' not in p.parts]
        assert {p.name for p in files} >= {'config.json', 'metrics.jsonl', 'metrics.csv', 'encoder.safetensors', 'step-00000001.pt'}
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(mode) for p in files}


def test_sigterm_and_ctrl_c_messages(tmp_path):
    "SIGTERM while starting and Ctrl-C before any checkpoint: one line each, and no claim of a checkpoint that is not there."
    out = tmp_path/'run'
    proc = start(TRAIN + ['--epochs', '100', '--output_dir', str(out)])
    wait_rows(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and 'no checkpoint was written' in err and 'Traceback' not in err, err[-2000:]
    assert not (out/'.lock').exists()


def test_finetune_saves_before_it_evaluates(tmp_path, monkeypatch):
    """An evaluation that fails (an unreadable validation set, an OOM) loses nothing: the checkpoint of that step is
    on disk, and the resumed run evaluates it first and ends as an uninterrupted run does."""
    cfg = ft.FinetuneConfig(arch='resnetrs_tiny', data='synthetic', image_size=32, batch_size=8, epochs=2,
                            warmup_epochs=1, synthetic_length=48, synthetic_size=48, num_workers=0, progress=False)
    whole = ft.finetune(cfg, output_dir=str(tmp_path/'a'))
    evaluate = ft.evaluate
    def failing(*a, **k): raise MemoryError('out of memory during evaluation')
    monkeypatch.setattr(ft, 'evaluate', failing)
    with pytest.raises(MemoryError): ft.finetune(cfg, output_dir=str(tmp_path/'b'))
    assert [p.name for p in list_checkpoints(tmp_path/'b')] == ['step-00000006.pt']  # the epoch's checkpoint was written
    assert not (tmp_path/'b'/'.lock').exists()
    monkeypatch.setattr(ft, 'evaluate', evaluate)
    again = ft.finetune(cfg, output_dir=str(tmp_path/'b'))
    pick = lambda r: [(m['step'], m['loss'], m.get('top1'), m.get('top1_ema')) for m in r.metrics]
    assert pick(again) == pick(whole)
    for (k, a), b in zip(whole.ema.state_dict().items(), again.ema.state_dict().values()): assert torch.equal(a, b), k


def test_finetune_lock_and_bad_init(tmp_path):
    "Fine-tuning shares the lock, and a bad --init is refused before anything is written."
    args = [sys.executable, '-m', 'pixpro_rs.finetune', '--arch', 'resnetrs_tiny', '--data', 'synthetic', '--image_size', '32',
            '--batch_size', '8', '--synthetic_length', '48', '--synthetic_size', '48', '--num_workers', '0',
            '--progress', 'false']
    junk = tmp_path/'junk.pt'; junk.write_bytes(b'not a checkpoint')
    r = run(args + ['--init', str(junk), '--output_dir', str(tmp_path/'run')])
    assert r.returncode == 2 and 'junk.pt' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path/'run').exists()
    live = start(args + ['--epochs', '50', '--output_dir', str(tmp_path/'run')])
    try:
        wait_rows(live, tmp_path/'run', 1)
        r = run(args + ['--overwrite', 'true', '--output_dir', str(tmp_path/'run')])
        assert r.returncode == 2 and f'locked by pid {live.pid}' in r.stderr, r.stderr[-2000:]
    finally:
        os.killpg(live.pid, signal.SIGKILL); live.wait()


def test_full_disk_is_named(tmp_path):
    "A disk that fills up while a checkpoint is written: exit 1, one line naming the file and the lack of space."
    disk = tmp_path/'disk'; disk.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', str(disk)], capture_output=True).returncode:
        pytest.skip('cannot mount a small tmpfs here (needs root)')
    try:
        r = run(TRAIN + ['--max_steps', '1', '--output_dir', str(disk/'run')])
        assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
        line = r.stderr.strip().splitlines()[-1]
        assert 'no space left on device' in line and 'step-00000001.pt' in line and 'Traceback' not in r.stderr, r.stderr
        assert not list((disk/'run').rglob('*.tmp')) and not (disk/'run'/'.lock').exists()
    finally:
        subprocess.run(['umount', str(disk)])


def test_yaml_no_is_mixed_precision_no(tmp_path):
    "YAML 1.1 reads `mixed_precision: no` as False; it means 'no'."
    (tmp_path/'p.yaml').write_text('mixed_precision: no\nmax_steps: 1\n')
    r = run(TRAIN + ['--config', str(tmp_path/'p.yaml'), '--output_dir', str(tmp_path/'run')])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path/'run'/'config.json').read_text())['mixed_precision'] == 'no'


@pytest.mark.parametrize('command', ['pixpro-train', 'pixpro-finetune', 'pixpro-segment'])
@pytest.mark.parametrize('where', ['file', 'file/run'])
def test_output_dir_that_is_a_file_exit_2(tmp_path, command, where):
    "An output_dir that is a file, or lies under one, is refused in one line naming output_dir (exit 2); the file is untouched."
    (tmp_path/'file').write_text('keep')
    r = run([command, '--output_dir', str(tmp_path/where)])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and 'invalid output_dir=' in lines[0], (r.returncode, r.stderr[-2000:])
    assert (tmp_path/'file').read_text() == 'keep' and sorted(p.name for p in tmp_path.iterdir()) == ['file']
