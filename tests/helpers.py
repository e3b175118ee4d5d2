"""What the cross-component tests share: running commands from the repository root, the two-process launcher,
a run killed mid-way, randomised BatchNorm layers."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ['accelerate', 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
              '--mixed_precision', 'no', '--dynamo_backend', 'no']


def run(args, cwd=ROOT, timeout=600, **kw):
    "Run a command (one thread per process: tests run side by side on small machines) and capture its output."
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def rows(run_dir):
    "The metrics.jsonl rows of a run folder."
    return [json.loads(l) for l in (Path(run_dir)/'metrics.jsonl').read_text().splitlines()]


def kill_after(args, run_dir, n_rows, timeout=300):
    "Start `args` (writing to `run_dir`), SIGKILL it once metrics.jsonl has `n_rows` rows; fails if it ended first."
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, f = time.time() + timeout, Path(run_dir)/'metrics.jsonl'
    while time.time() < deadline and proc.poll() is None:
        if f.exists() and len(f.read_text().splitlines()) >= n_rows: break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    "Random BN affine parameters and running statistics, so that every residual branch (bn3 gamma != 0) counts."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model
