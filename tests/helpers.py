"""What the cross-component tests share: running commands from the repository root, the two-process launcher."""
import json
import os
import subprocess
from pathlib import Path

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
