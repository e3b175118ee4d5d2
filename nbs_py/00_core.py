# %% [markdown]
# # Conventions
#
# > One glossary of names, one way to reject bad input, one way to write a file that must not be half-written.

# %%
#| default_exp core

# %%
#| export
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import tempfile
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

try: import fcntl
except ImportError: fcntl = None  # not POSIX (Windows): `RunLock` is unavailable, the rest works

# %%
#| hide
from fastcore.test import test_eq, test_fail
from nbdev.showdoc import show_doc
import gc, signal, subprocess, sys

# %% [markdown]
# Every chapter of this book builds one module of the `pixpro_rs` package. Before the first model, this short chapter
# fixes four things the later chapters lean on:
#
# 1. **a glossary**: the *same* name for the same quantity in the notebooks, the command line, the papermill
#    `parameters` cell, the configuration saved inside every checkpoint and these docs;
# 2. **clear errors**: a bad value is rejected early, by a message that names the parameter, the value it got and
#    the values it accepts, instead of a traceback from deep inside PyTorch twenty minutes into a run;
# 3. **atomic writes**: a checkpoint is either the old file or the complete new one, never a torn half, even when the
#    process is killed while writing or the disk fills up;
# 4. **one run per folder**: a lock that stops a second run from writing into the folder of a live one.
#
# It also explains how a chapter is laid out, so the reader knows what to expect from the rest of the book.

# %% [markdown]
# ## How a chapter reads
#
# Each notebook follows the same rhythm, borrowed from nbdev's own notebooks and from *Dive into Deep Learning*:
#
# - a title with a one-line summary, then the idea in words, the equation, and a figure made by code in the chapter;
# - small exported cells (`#| export`), each followed by a test cell that asserts something that *could* fail
#   (a known answer, a shape, an invariant);
# - our own commentary, when we depart from a paper or from the reference code, set apart as a quote:
#
# > **Ours.** Like this: the reason, and a test that would have caught the problem.
#
# Cells that need minutes of CPU time are flagged `#| slow`; cells that need a GPU `#| cuda`, several GPUs
# `#| multigpu`. `nbdev_test` skips flagged cells unless asked (`--flags slow`); the project's test command runs the
# `slow` cells too, so a flag never hides a broken cell. The notebooks are the source of the package: `nbdev_export`
# writes `pixpro_rs/*.py` and nobody edits those files by hand. Every notebook also has a plain-text twin in
# `nbs_py/` (jupytext, percent format) for review diffs and editing in any editor.

# %% [markdown]
# ## The glossary
#
# The names below are used everywhere. A new parameter earns an entry here before it appears in a function
# signature, a CLI flag or a recipe.

# %%
#| exports
GLOSSARY: dict[str, str] = {
    # model
    'arch': "backbone name, e.g. 'resnetrs50' ... 'resnetrs420' or 'resnet50' (torchvision's, the PixPro paper's)",
    'num_classes': "size of the classifier; 0 builds a backbone without classifier",
    'image_size': "side in pixels of each augmented view (224 gives a 7x7 C5 map, 160 gives 5x5)",
    'init': "weights a supervised run starts from: 'scratch', or a PixPro checkpoint (its online encoder), an encoder.safetensors or a backbone file",
    # data
    'data': "'synthetic' (the embedded SyntheticScenes) or a path to a folder of images",
    'batch_size': "images per device per step; the global batch is batch_size x processes x accumulation",
    'num_workers': "DataLoader worker processes per device",
    'seed': "the one seed every random draw derives from (per epoch, rank and worker)",
    # PixPro
    'method': "pretext task: 'pixpro', 'pixcontrast' or 'instance'",
    'threshold': "T, positive pixel pairs are those closer than T bin diagonals (paper: 0.7)",
    'gamma': "sharpness exponent of the PPM similarity (paper: 2)",
    'ppm_layers': "layers in the PPM transform g: 0 (identity), 1 (1x1 conv, paper) or 2",
    'instance_weight': "alpha, weight of the instance branch added to the pixel loss (released scripts: 0)",
    'tau': "temperature of PixContrast (paper: 0.3)",
    'momentum': "base EMA momentum of the target network, raised to 1 by a cosine schedule (paper: 0.99)",
    # optimisation
    'recipe': "a named recipe that supplies defaults, e.g. 'pixpro_r50_100ep'",
    'epochs': "passes over the data",
    'lr': "base learning rate for a global batch of 256; scaled linearly with the global batch",
    'weight_decay': "L2 penalty on weights with more than one dimension (LARS excludes BN and biases)",
    'max_steps': "stop after this many optimiser steps (0: no limit), for smoke tests",
    'mixed_precision': "'no', 'bf16' or 'fp16' (Accelerate's names)",
    # recipes (see the recipes chapter)
    'name': "the recipe's registry key",
    'devices': "devices of the recipe's reference layout; global batch = batch_size x devices",
    'warmup_epochs': "epochs of linear lr warm-up",
    'warmup_start_factor': "the warm-up starts at this fraction of the lr (PixPro: 0.01)",
    'final_lr': "the lr at the end of the cosine (PixPro: 1e-6)",
    'optimizer': "'lars', 'sgd' or 'sgd_nesterov'",
    'optimizer_momentum': "SGD momentum of the optimiser (0.9), not the target network's momentum",
    'trust_coefficient': "LARS eta: updates are eta x ||w|| (x lr)",
    'stochastic_depth': "drop-path rate of the residual branches (0: off)",
    'dropout': "dropout before the classifier",
    'label_smoothing': "label smoothing of the cross-entropy",
    'ema_decay': "decay of the EMA of weights used for evaluation (0: none)",
    'randaugment_ops': "RandAugment operations per image",
    'randaugment_magnitude': "RandAugment magnitude on TF's 0-10+ scale",
    'source': "where the recipe's values come from",
    'ours': "fields that are our choice rather than the source's, with the reason",
    # run management
    'output_dir': "folder for checkpoints, metrics and the resolved config",
    'save_every': "write a checkpoint every this many epochs (and always at the end)",
    'resume': "'auto' (continue the run found in output_dir, if any), 'never', or a checkpoint file to continue from",
    'overwrite': "start afresh in an output_dir that holds a different run (its checkpoints are deleted)",
    'grad_accum': "micro-batches per optimiser step (gradient accumulation)",
    'synthetic_length': "number of SyntheticScenes images when data='synthetic'",
    'synthetic_size': "side in pixels of the SyntheticScenes images when data='synthetic'",
    'keep_checkpoints': "how many of the newest checkpoints to keep in output_dir",
    'progress': "show a progress bar on the main process",
    # speed (they change how fast a run goes, not what it computes, beyond rounding)
    'channels_last': "NHWC memory format for the model and the views (faster convolutions on GPUs)",
    'compile': "compile the online and target networks with torch.compile",
    'gpu_augment': "colour jitter, grayscale, blur, solarize and normalisation as batched ops on the training device; workers only crop and flip (default: on when training on CUDA)",
    'prefetch_factor': "batches each DataLoader worker loads ahead",
}

# %%
test_eq(len(GLOSSARY), len(set(GLOSSARY)))
assert all(k == k.lower() and ' ' not in k for k in GLOSSARY), "glossary names are snake_case"
assert all(v.strip() for v in GLOSSARY.values())


# %% [markdown]
# ## Rejecting bad input early
#
# A configuration error should read like a sentence a user can act on: *which* parameter, *what* it got, *what* it
# accepts. `ConfigError` is a `ValueError` (so callers that catch `ValueError` keep working) that carries those
# three parts; the command-line entry points turn it into exit code 2.

# %%
#| exports
class ConfigError(ValueError):
    "A bad value for a named parameter; the message names the parameter, the value and what is allowed."
    def __init__(self,
                 name:str,  # parameter name, as in the glossary
                 value:Any,  # the value that was given
                 allowed:str,  # what would have been accepted, in words
                ):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"invalid {name}={value!r}: expected {allowed}")


# %%
e = ConfigError('arch', 'resnet51', "one of 'resnet50', 'resnetrs50'")
test_eq(str(e), "invalid arch='resnet51': expected one of 'resnet50', 'resnetrs50'")
assert isinstance(e, ValueError) and e.name == 'arch'


# %% [markdown]
# Three checks cover almost every parameter of the book: a value from a fixed set, a number inside an interval,
# and a positive number. Each returns the value, so a check reads as an assignment: `lr = check_positive('lr', lr)`.

# %%
#| exports
def check_choice(name:str,  # parameter name
                 value:Any,  # value to check
                 choices:Iterable,  # the allowed values
                ) -> Any:
    "Return `value` if it is one of `choices`, else raise `ConfigError` listing them."
    choices = list(choices)
    if value not in choices: raise ConfigError(name, value, 'one of ' + ', '.join(repr(c) for c in choices))
    return value


# %%
test_eq(check_choice('method', 'pixpro', ['pixpro', 'pixcontrast']), 'pixpro')
test_fail(lambda: check_choice('method', 'byol', ['pixpro', 'pixcontrast']),
          contains="invalid method='byol': expected one of 'pixpro', 'pixcontrast'")


# %% [markdown]
# Intervals follow the mathematical notation in the message, so `(0, 10]` means "above 0, at most 10". A number
# that is not finite (NaN, infinity) never passes: `nan < 10` is `False` in Python, and a comparison-only check
# would let it through in one direction.

# %%
#| exports
def check_range(name:str,  # parameter name
                value:float,  # number to check
                low:float|None=None,  # lower bound (None: unbounded)
                high:float|None=None,  # upper bound (None: unbounded)
                low_open:bool=False,  # exclude `low` itself
                high_open:bool=False,  # exclude `high` itself
               ) -> float:
    "Return `value` if it is a finite number inside the interval, else raise `ConfigError` naming the interval."
    lo = '(-inf' if low is None else ('(' if low_open else '[') + f'{low:g}'
    hi = 'inf)' if high is None else f'{high:g}' + (')' if high_open else ']')
    allowed = f'a number in {lo}, {hi}'
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, value, allowed)
    if low is not None and (value <= low if low_open else value < low): raise ConfigError(name, value, allowed)
    if high is not None and (value >= high if high_open else value > high): raise ConfigError(name, value, allowed)
    return value


# %%
test_eq(check_range('threshold', 0.7, 0, 10, low_open=True), 0.7)
test_eq(check_range('threshold', 10, 0, 10, low_open=True), 10)
test_fail(lambda: check_range('threshold', 0, 0, 10, low_open=True),
          contains="invalid threshold=0: expected a number in (0, 10]")
test_fail(lambda: check_range('threshold', float('nan'), 0, 10, low_open=True), contains='threshold=nan')
test_fail(lambda: check_range('gamma', '2', 0), contains="gamma='2'")
test_fail(lambda: check_range('gamma', True, 0), contains="gamma=True")


# %%
#| exports
def check_positive(name:str, value:float) -> float:
    "Return `value` if it is a finite number > 0, else raise `ConfigError`."
    return check_range(name, value, 0, None, low_open=True)


# %%
test_eq(check_positive('lr', 1e-3), 1e-3)
test_fail(lambda: check_positive('lr', 0.0), contains="invalid lr=0.0: expected a number in (0, inf)")
test_fail(lambda: check_positive('batch_size', -8), contains="batch_size=-8")

# %% [markdown]
# One choice is checked the same way by every engine and command: `mixed_precision`, with the glossary's values.
# fp16 needs a CUDA device (its loss scaling exists for GPUs); bf16 runs on CPUs too.

# %%
#| exports
MIXED_PRECISIONS = ('no', 'bf16', 'fp16')  # the glossary's `mixed_precision` values (Accelerate's names)

def check_mixed_precision(value:str,  # the requested `mixed_precision`
                          device_type:str,  # 'cuda', 'cpu', ...: where it would run
                         ) -> str:
    "`value` if it is one of `MIXED_PRECISIONS` and `device_type` can run it, else `ConfigError`."
    check_choice('mixed_precision', value, MIXED_PRECISIONS)
    if value == 'fp16' and device_type != 'cuda':
        raise ConfigError('mixed_precision', 'fp16', f"'no' or 'bf16' on a {device_type} device (fp16 needs a CUDA device)")
    return value


# %%
test_eq(check_mixed_precision('bf16', 'cpu'), 'bf16')
test_eq(check_mixed_precision('fp16', 'cuda'), 'fp16')
test_fail(lambda: check_mixed_precision('fp16', 'cpu'), contains="'no' or 'bf16' on a cpu device")
test_fail(lambda: check_mixed_precision('fp32', 'cpu'), contains="invalid mixed_precision='fp32': expected one of 'no', 'bf16', 'fp16'")

# %% [markdown]
# ## Writing files atomically
#
# A multi-day run writes a checkpoint every few epochs. If the process dies while `torch.save` is writing, a plain
# write leaves a truncated file *in place of the last good checkpoint*, and the run cannot resume. The cure is
# standard: write to a temporary file in the same folder, flush it to disk, then `os.replace` it onto the target.
# The rename is atomic on POSIX file systems, so a reader sees the old file or the new one, never a mixture.
#
# Two more things go wrong on shared clusters, and `atomic_write` handles both:
#
# - **permissions.** `tempfile.mkstemp` creates its file readable by its owner only (mode 0600), and the rename keeps
#   that mode: a teammate who reads the metrics or loads a checkpoint of a run in a shared project folder gets
#   "permission denied", although every other file of the run follows the umask. So the temporary file gets the
#   mode a plain `open(path, 'w')` would have given it, `0o666 & ~umask` (0644 under the usual umask 022), before
#   the rename.
# - **a full disk.** `torch.save` into a full file system fails with `RuntimeError: [enforce fail at
#   inline_container.cc] unexpected pos 576 vs 534`, which says nothing about the disk. When the write fails with
#   `ENOSPC`/`EDQUOT`, or when the folder's free space without the partial file is less than what had been
#   written plus 1 MiB (the disk, not the writer, was the limit), `atomic_write` raises
#   `OSError(ENOSPC, 'no space left on device while writing <file> ...')`, chained to the original error. Other
#   errors propagate unchanged. In both cases the temporary file is removed and the previous file is untouched.
#   The free space is measured *before* the partial file is removed: a writer that failed may still hold it open
#   (torch does, until its exception is gone), and then removing it frees nothing yet, which would make a disk with
#   room look full.

# %%
#| exports
_TMP_SUFFIX = '.tmp'  # atomic_write's temporary files are named .{target}.{8 random characters}.tmp (mkstemp)
_SPACE_MARGIN = 1 << 20  # bytes: free space below written + this after a failed write means the disk was full

def _umask() -> int:
    "The process umask, read without changing it (Linux: /proc/self/status), else by setting and restoring it."
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'): return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError): pass
    m = os.umask(0o022); os.umask(m)  # racy only against another thread changing the umask meanwhile
    return m


# %%
old_umask = os.umask(0o027)
try: test_eq(_umask(), 0o027); test_eq(_umask(), 0o027)  # read twice: reading does not change it
finally: test_eq(os.umask(old_umask), 0o027)


# %%
#| exports
def _out_of_space(e:BaseException,  # what the write raised
                  tmp:Path,  # the partial file, not yet removed
                 ) -> tuple[bool, int, int]:  # (the disk was full, bytes written, bytes free)
    "Whether a failed write ran out of disk space: by its errno, or by the folder's free space (torch's errors have no errno)."
    try: written = tmp.stat().st_size
    except OSError: written = 0
    try: free = shutil.disk_usage(tmp.parent).free  # measured while the partial file still holds its blocks
    except OSError: free = -1
    nospace = {errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC)}
    # without the partial file the folder would have free + written bytes; below written + margin, the disk was full
    return (isinstance(e, OSError) and e.errno in nospace) or 0 <= free < _SPACE_MARGIN, written, free


# %%
with tempfile.TemporaryDirectory() as d:
    part = Path(d)/'.last.pt.abcd1234.tmp'; part.write_bytes(b'half')
    full, written, free = _out_of_space(OSError(errno.ENOSPC, 'No space left on device'), part)
    test_eq((full, written), (True, 4)); assert free >= 0
    real_disk_usage = shutil.disk_usage
    try:
        shutil.disk_usage = lambda f: real_disk_usage(f)._replace(free=0)
        test_eq(_out_of_space(RuntimeError('unexpected pos 576 vs 534'), part), (True, 4, 0))  # no errno: the free space says
        shutil.disk_usage = lambda f: real_disk_usage(f)._replace(free=10 * _SPACE_MARGIN)
        test_eq(_out_of_space(ValueError('not a disk problem'), part), (False, 4, 10 * _SPACE_MARGIN))
    finally: shutil.disk_usage = real_disk_usage
    test_eq(_out_of_space(ValueError('x'), Path(d)/'gone.tmp')[:2], (False, 0))  # no partial file: 0 bytes written


# %%
#| exports
def atomic_write(path:str|Path,  # destination file
                 write:Callable[[Path], None],  # writes the content to the temporary path it is given
                ) -> Path:
    "Write `path` atomically: `write(tmp)` fills a temporary file next to it, which then replaces `path` with the umask's mode."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix=_TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, 'rb+') as f: os.fsync(f.fileno())  # network file systems may report ENOSPC only here
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600; a plain open() would follow the umask
        os.replace(tmp, path)
    except Exception as e:
        full, written, free = _out_of_space(e, tmp)
        tmp.unlink(missing_ok=True)
        if not full: raise
        quota = ' (disk quota exceeded)' if isinstance(e, OSError) and e.errno == getattr(errno, 'EDQUOT', None) else ''
        raise OSError(errno.ENOSPC, f'no space left on device while writing {path}{quota}: {written:,} bytes written, '
                      f'{max(free, 0):,} bytes left free in {path.parent} ({type(e).__name__}: {e})') from e
    except BaseException:  # KeyboardInterrupt, SystemExit: clean up, re-raise as is
        tmp.unlink(missing_ok=True)
        raise
    return path


# %% [markdown]
# The test writes a file, then makes a second write fail half-way: the first content must survive untouched and no
# temporary file may be left behind.

# %%
with tempfile.TemporaryDirectory() as d:
    p = Path(d)/'ckpt'/'last.bin'
    atomic_write(p, lambda t: t.write_bytes(b'good'))
    test_eq(p.read_bytes(), b'good')
    def torn(t):
        t.write_bytes(b'ha')
        raise RuntimeError('killed while writing')
    test_fail(lambda: atomic_write(p, torn), contains='killed while writing')
    test_eq(p.read_bytes(), b'good')
    test_eq([f.name for f in p.parent.iterdir()], ['last.bin'])

# %% [markdown]
# **The mode follows the umask**, as for any other file the process creates: 0644 under umask 022 (teammates can
# read the run), 0600 under 077 (a private run stays private). `_umask()` reads the umask without changing it.

# %%
old_umask = os.umask(0o022)
try:
    test_eq(_umask(), 0o022)
    with tempfile.TemporaryDirectory() as d:
        for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(umask)
            p = atomic_write(Path(d)/f'm{umask:o}.bin', lambda t: t.write_bytes(b'x'))
            test_eq(oct(p.stat().st_mode & 0o777), oct(mode))
finally: os.umask(old_umask)

# %% [markdown]
# **A full disk** gives an error that says so. The first test makes `write` fail with `ENOSPC`, as Python's own
# file writes do; the second imitates `torch.save`'s error (a `RuntimeError` without errno) on a folder whose free
# space is reported as zero; the third checks that an unrelated error, on a disk with room, comes through unchanged.

# %%
with tempfile.TemporaryDirectory() as d:
    p = atomic_write(Path(d)/'last.bin', lambda t: t.write_bytes(b'good'))
    def enospc(t):
        t.write_bytes(b'half')
        raise OSError(errno.ENOSPC, 'No space left on device')
    try: atomic_write(p, enospc); raise AssertionError('no error')
    except OSError as e:
        test_eq(e.errno, errno.ENOSPC); assert isinstance(e.__cause__, OSError)
        assert str(e).startswith(f'[Errno 28] no space left on device while writing {p}: 4 bytes written'), e
    def unexpected_pos(t):
        t.write_bytes(b'half')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')
    real_disk_usage = shutil.disk_usage
    shutil.disk_usage = lambda f: real_disk_usage(f)._replace(free=0)
    try: test_fail(lambda: atomic_write(p, unexpected_pos), contains=f'no space left on device while writing {p}')
    finally: shutil.disk_usage = real_disk_usage
    bad = ValueError('not a disk problem')
    def other(t): raise bad
    try: atomic_write(p, other)
    except ValueError as e: assert e is bad
    test_eq(p.read_bytes(), b'good'); test_eq(sorted(f.name for f in Path(d).iterdir()), ['last.bin'])

# %% [markdown]
# The same on a real full disk, where the machine allows it: a 4 MiB `tmpfs` (mounting one needs root; the cell
# says so and skips itself elsewhere). A plain write of 8 MB and `torch.save` of 10 MB fail with the clear message,
# the previous checkpoint survives, and no partial file is left. A writer that fails for its own reason after 2.5
# MB, with room to spare and its file still open, gets its own error back: measured after removing the open file,
# the free space (1.5 MiB) would have looked like a full disk.

# %%
with tempfile.TemporaryDirectory() as d:
    try: r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', d], capture_output=True, text=True)
    except OSError as e: r = subprocess.CompletedProcess([], 1, '', str(e))
    if r.returncode != 0: print('skipped: cannot mount a tmpfs here:', ((r.stderr or r.stdout).strip().splitlines() or ['?'])[0])
    else:
        try:
            import torch
            p = atomic_write(Path(d)/'last.pt', lambda t: torch.save({'step': 1}, t))
            before = p.read_bytes()
            writers = {'write_bytes': lambda t: t.write_bytes(b'x' * 8_000_000),
                       'torch.save': lambda t: torch.save(torch.zeros(2_500_000), t)}
            for name, w in writers.items():
                test_fail(lambda: atomic_write(p, w), contains=f'no space left on device while writing {p}')
                test_eq(p.read_bytes(), before); test_eq([f.name for f in Path(d).iterdir()], ['last.pt'])
            try: atomic_write(p, writers['torch.save'])
            except OSError as e: print(e); print('  caused by', repr(e.__cause__)[:90])
            held = []
            def bug(t):
                f = open(t, 'wb'); f.write(b'x' * 2_500_000); f.flush(); held.append(f)
                raise RuntimeError('a bug, not the disk')
            try: atomic_write(p, bug); raise AssertionError('no error')
            except RuntimeError as e: test_eq(str(e), 'a bug, not the disk')
            finally:
                for f in held: f.close()
            test_eq(p.read_bytes(), before); test_eq([f.name for f in Path(d).iterdir()], ['last.pt'])
        finally: gc.collect(); subprocess.run(['umount', '-l', d], check=True)  # -l: even if torch still holds a file


# %% [markdown]
# ## One run per folder
#
# A run's folder holds its checkpoints, its metrics and its resolved configuration, and `resume='auto'` continues
# whatever run it finds there. Two live runs in one folder, say the same job submitted twice on a SLURM cluster, or
# a requeued job that starts while its preempted predecessor is still flushing, would overwrite each other's
# checkpoints and interleave their metrics, and nothing would say so until the numbers make no sense days later.
# `RunLock` makes the folder belong to one process: the run's main process takes an exclusive lock on
# `output_dir/.lock` for its whole life, and a second run is refused at once with a message that says who holds it.
#
# The lock is `flock(2)`: the kernel drops it when its holder dies, however it dies (SIGKILL, OOM killer, node
# preemption), so a crashed run never blocks its own restart. What survives a crash is the lock *file* and its JSON
# (pid, host, start time); the next run takes the lock over and warns, naming the run that did not release it.
# Releasing deletes the file while the lock is still held; a process that opened the file just before and then gets
# the lock on the deleted file notices (its descriptor no longer matches the path) and tries again. On network file
# systems `flock` works across nodes on NFS (emulated with POSIX locks) and on Lustre mounted with `-o flock`.

# %%
#| exports
class RunLock:
    "An exclusive lock on a run folder (`folder/.lock`), held by the run's main process; a context manager."
    def __init__(self,
                 folder:str|Path,  # the run's output_dir; created by `acquire` if missing
                ):
        self.folder = Path(folder)
        self.path = self.folder/'.lock'
        self.fd:int|None = None  # the open lock file while held
        self.created = False  # whether acquire created the folder (release then removes it if empty)

    def _read(self, fd:int) -> dict:
        "The JSON a holder wrote into the lock file ({} when empty or unreadable)."
        try: h = json.loads(os.pread(fd, 1 << 16, 0).decode() or '{}')
        except (OSError, ValueError): h = None
        return h if isinstance(h, dict) else {'pid': '?', 'host': '?', 'started': '? (unreadable lock file)'}

    def acquire(self) -> RunLock:
        "Take the lock, or raise `ConfigError` naming the pid, host and start time of the run that holds it."
        if fcntl is None: raise OSError(errno.ENOSYS, 'RunLock needs fcntl.flock (a POSIX system)')
        if self.fd is not None: raise RuntimeError(f'{self.path} is already held by this RunLock')
        try: self.folder.mkdir(parents=True); self.created = True
        except FileExistsError: self.created = False
        except OSError as e: raise ConfigError('output_dir', str(self.folder), f'a folder we can create ({e.strerror})') from None
        if not self.folder.is_dir(): raise ConfigError('output_dir', str(self.folder), 'a folder (this is a file)')
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                h = self._read(fd); os.close(fd); self._remove_folder()
                raise ConfigError('output_dir', str(self.folder),
                    f"a folder no other run is using: it is locked by pid {h.get('pid', '?')} on host "
                    f"{h.get('host', '?')} since {h.get('started', '?')} ({self.path})") from None
            except BaseException: os.close(fd); self._remove_folder(); raise
            try: same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError: same = False
            if same: break
            os.close(fd)  # we locked a file its holder deleted on release: open the new one
        old = self._read(fd)
        if old:
            warnings.warn(f"{self.path}: took over the stale lock of pid {old.get('pid', '?')} on host "
                          f"{old.get('host', '?')} since {old.get('started', '?')} (that run ended without releasing it)", stacklevel=2)
        me = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                         'started': datetime.now().astimezone().isoformat(timespec='seconds')})
        os.ftruncate(fd, 0); os.pwrite(fd, me.encode() + b'\n', 0)
        self.fd = fd
        return self

    def _remove_folder(self):
        "Remove the folder if `acquire` created it and it is empty (a refused or finished run leaves no trace)."
        if self.created:
            try: self.folder.rmdir()
            except OSError: pass

    def release(self):
        "Delete the lock file (still holding the lock), unlock, and remove the folder if acquire created it and it is empty."
        if self.fd is None: return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)): os.unlink(self.path)
        except FileNotFoundError: pass
        fcntl.flock(self.fd, fcntl.LOCK_UN); os.close(self.fd); self.fd = None
        self._remove_folder()

    def __enter__(self) -> RunLock: return self.acquire()
    def __exit__(self, *exc): self.release()
    def __repr__(self): return f"RunLock({str(self.folder)!r}, {'held' if self.fd is not None else 'not held'})"


# %% [markdown]
# **Two locks on one folder in one process** conflict too: `flock` locks belong to an *open file description*, and
# each `RunLock` opens the file anew. The refusal names this process's pid; releasing removes the lock file and the
# folder the lock created, and a refused `acquire` that created the folder would leave nothing either.

# %%
with tempfile.TemporaryDirectory() as d:
    run = Path(d)/'runs'/'r1'
    with RunLock(run) as lock:
        assert lock.created and lock.path.exists()
        h = json.loads(lock.path.read_text())
        test_eq((h['pid'], h['host']), (os.getpid(), socket.gethostname()))
        test_fail(lambda: RunLock(run).acquire(), contains=f'locked by pid {os.getpid()} on host {socket.gethostname()}')
        test_fail(lambda: RunLock(run).acquire(), contains="invalid output_dir=")
        test_eq(sorted(f.name for f in run.iterdir()), ['.lock'])
    assert not run.exists()  # the lock created it, it is empty: removed
    (Path(d)/'file').write_text('x')  # a file where the folder should be, or above it: refused by name, untouched
    test_fail(lambda: RunLock(Path(d)/'file').acquire(), contains="invalid output_dir=")
    test_fail(lambda: RunLock(Path(d)/'file').acquire(), contains="(this is a file)")
    test_fail(lambda: RunLock(Path(d)/'file'/'run').acquire(), contains="a folder we can create")
    test_eq((Path(d)/'file').read_text(), 'x')
    run.mkdir(); (run/'metrics.jsonl').write_text('{}\n')
    lock = RunLock(run).acquire(); assert not lock.created
    lock.release(); lock.release()  # a second release does nothing
    test_eq([f.name for f in run.iterdir()], ['metrics.jsonl'])  # the lock file is gone, the folder and its files stay

# %% [markdown]
# **Another process** holding the lock refuses this one, with its pid in the message. When that process is killed
# with SIGKILL (no `release`, no `finally`), the kernel drops its lock; its lock file stays, and the next `RunLock`
# takes it over with a warning that names the dead run.

# %%
with tempfile.TemporaryDirectory() as d:
    run = Path(d)/'r2'
    code = ('import sys; from pixpro_rs.core import RunLock; l = RunLock(sys.argv[1]).acquire(); '
            'print("locked", flush=True); sys.stdin.read()')
    with subprocess.Popen([sys.executable, '-c', code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        try:
            test_eq(child.stdout.readline().strip(), 'locked')
            test_fail(lambda: RunLock(run).acquire(), contains=f'locked by pid {child.pid} on host')
        finally: child.kill()
    test_eq(child.returncode, -signal.SIGKILL)
    assert (run/'.lock').exists()  # the dead holder's file and JSON survive; its lock does not
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        lock = RunLock(run).acquire()
    test_eq(len(w), 1); assert f'took over the stale lock of pid {child.pid}' in str(w[0].message), w[0].message
    test_eq(json.loads(lock.path.read_text())['pid'], os.getpid())
    lock.release(); assert not (run/'.lock').exists()
    (run/'.lock').write_text(json.dumps({'pid': 123, 'host': 'node7', 'started': '2026-01-01T00:00:00+00:00'}))
    with warnings.catch_warnings(record=True) as w:  # a stale file with content and no holder at all
        warnings.simplefilter('always')
        with RunLock(run): pass
    assert 'stale lock of pid 123 on host node7 since 2026-01-01' in str(w[0].message)
    (run/'.lock').write_text('garbage')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with RunLock(run): pass
    assert 'stale lock of pid ?' in str(w[0].message) and not (run/'.lock').exists()

# %% [markdown]
# ## Sweeping what a killed write left
#
# `atomic_write` removes its temporary file on any exception, but a process killed with SIGKILL (the OOM killer, a
# SLURM job past its time limit, a preempted node) runs no cleanup: a half-written `.ckpt_0042.pt.k3j9x_2a.tmp` of
# several gigabytes stays in the run folder, and every further preemption adds one. `sweep_temporary` removes
# exactly these files, the names `tempfile.mkstemp` gives with `atomic_write`'s prefix and suffix
# (`.{target}.{8 random characters}.tmp`), in the run folder and its direct subfolders (`checkpoints/`), and leaves
# everything else alone. A temporary file may belong to a write in progress, so only the holder of the folder's
# `RunLock` may sweep, before it starts writing.

# %%
#| exports
_TMP_RE = re.compile(r'\..+\.[a-z0-9_]{8}' + re.escape(_TMP_SUFFIX))  # tempfile's names: 8 of [a-z0-9_]

def sweep_temporary(folder:str|Path,  # a run folder whose `RunLock` the caller holds
                   ) -> list[Path]:  # the files removed
    "Remove the temporary files of interrupted `atomic_write`s in `folder` and its direct subfolders."
    folder, removed = Path(folder), []
    if not folder.is_dir(): return removed
    for d in [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        for f in sorted(d.iterdir()):
            if _TMP_RE.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                f.unlink(missing_ok=True); removed.append(f)
    return removed


# %% [markdown]
# The test makes a real orphan: a child process runs `atomic_write` and SIGKILLs itself half-way through `write`.
# Unrelated files that merely look similar (`.keep`, `x.tmp`, `.a.tmp`, a name with 7 random characters) and
# anything two folders deep stay.

# %%
with tempfile.TemporaryDirectory() as d:
    run = Path(d)/'run'; (run/'checkpoints'/'deep').mkdir(parents=True)
    code = ('import os, signal, sys; from pixpro_rs.core import atomic_write; '
            'atomic_write(sys.argv[1], lambda t: (t.write_bytes(b"half"), os.kill(os.getpid(), signal.SIGKILL)))')
    r = subprocess.run([sys.executable, '-c', code, str(run/'checkpoints'/'ckpt_0001.pt')])
    test_eq(r.returncode, -signal.SIGKILL)
    orphans = list((run/'checkpoints').glob('.ckpt_0001.pt.*.tmp')); test_eq(len(orphans), 1)
    fake = run/'.metrics.jsonl.ab_cd123.tmp'; fake.write_text('x')
    keep = ['.keep', 'x.tmp', '.a.tmp', '.last.pt.abcdefg.tmp', 'last.pt']
    for n in keep: (run/n).write_text('x')
    deep = run/'checkpoints'/'deep'/'.x.pt.abcd1234.tmp'; deep.write_text('x')
    with RunLock(run):
        test_eq(sweep_temporary(run), [fake] + orphans)
    test_eq(sorted(f.name for f in run.iterdir() if f.is_file()), sorted(keep))
    assert deep.exists() and not any((run/'checkpoints').glob('*.tmp'))
    test_eq(sweep_temporary(run), []); test_eq(sweep_temporary(Path(d)/'missing'), [])

# %% [markdown]
# ## Summary
#
# - One glossary (`GLOSSARY`) names every parameter; the CLI, the papermill parameters, recipes and checkpoints use
#   exactly these names.
# - `check_choice`, `check_range` and `check_positive` turn a bad value into a `ConfigError` that names the parameter,
#   the value and what is allowed.
# - `atomic_write` makes "the last good checkpoint survives a crash" a property of the code, not of luck; its files
#   follow the umask like any other, and a full disk says "no space left on device" and names the file.
# - `RunLock(output_dir)` gives a run folder to one live run: a second one is refused with the holder's pid, host
#   and start time; the lock of a killed run is taken over with a warning.
# - `sweep_temporary(output_dir)` removes the temporary files that killed writes left behind, and nothing else.
#
# ## Exercises
#
# 1. Add a parameter of your own to `GLOSSARY` (say `crop_min`, the lower end of the crop's area range) and write its
#    check with `check_range`, including the message a user sees for `crop_min=1.5`. Which chapters would have to use
#    the name for the habit "one name everywhere" to hold?
# 2. Write a checkpoint with `atomic_write` from a child process that is killed (`SIGKILL`) halfway, as the test above
#    does, and verify that the previous file at the same path is intact and that `sweep_temporary` finds the orphan.
# 3. Start two Python processes that both call `RunLock(folder).acquire()` on the same folder. Read the refusal of the
#    second; then kill the first with `SIGKILL` and acquire again: what does the warning say?
# 4. `atomic_write` calls `os.fsync` before the rename. Remove it, and explain which failure (a power cut, a full
#    network disk) could then leave a complete-looking but empty checkpoint behind.
