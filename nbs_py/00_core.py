# %% [markdown]
# # Conventions
#
# > One glossary of names, one way to reject bad input, one way to write a file that must not be half-written.

# %%
#| default_exp core

# %%
#| export
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

# %%
#| hide
from fastcore.test import test_eq, test_fail
from nbdev.showdoc import show_doc

# %% [markdown]
# Every chapter of this book builds one module of the `pixpro_rs` package. Before the first model, this short chapter
# fixes three things the later chapters lean on:
#
# 1. **a glossary**: the *same* name for the same quantity in the notebooks, the command line, the papermill
#    `parameters` cell, the configuration saved inside every checkpoint and these docs;
# 2. **clear errors**: a bad value is rejected early, by a message that names the parameter, the value it got and
#    the values it accepts, instead of a traceback from deep inside PyTorch twenty minutes into a run;
# 3. **atomic writes**: a checkpoint is either the old file or the complete new one, never a torn half, even when the
#    process is killed while writing.
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
    'gpu_augment': "colour jitter, grayscale, blur, solarize and normalisation as batched ops on the training device; workers only crop and flip",
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

def check_positive(name:str, value:float) -> float:
    "Return `value` if it is a finite number > 0, else raise `ConfigError`."
    return check_range(name, value, 0, None, low_open=True)


# %%
test_eq(check_range('threshold', 0.7, 0, 10, low_open=True), 0.7)
test_eq(check_range('threshold', 10, 0, 10, low_open=True), 10)
test_fail(lambda: check_range('threshold', 0, 0, 10, low_open=True),
          contains="invalid threshold=0: expected a number in (0, 10]")
test_fail(lambda: check_range('threshold', float('nan'), 0, 10, low_open=True), contains='threshold=nan')
test_fail(lambda: check_range('gamma', '2', 0), contains="gamma='2'")
test_fail(lambda: check_range('gamma', True, 0), contains="gamma=True")
test_eq(check_positive('lr', 1e-3), 1e-3)
test_fail(lambda: check_positive('lr', 0.0), contains="invalid lr=0.0: expected a number in (0, inf)")
test_fail(lambda: check_positive('batch_size', -8), contains="batch_size=-8")


# %% [markdown]
# ## Writing files atomically
#
# A multi-day run writes a checkpoint every few epochs. If the process dies while `torch.save` is writing, a plain
# write leaves a truncated file *in place of the last good checkpoint*, and the run cannot resume. The cure is
# standard: write to a temporary file in the same folder, flush it to disk, then `os.replace` it onto the target.
# The rename is atomic on POSIX file systems, so a reader sees the old file or the new one, never a mixture.

# %%
#| exports
def atomic_write(path:str|Path,  # destination file
                 write:Callable[[Path], None],  # writes the content to the temporary path it is given
                ) -> Path:
    "Write `path` atomically: `write(tmp)` fills a temporary file next to it, which then replaces `path`."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, 'rb+') as f: os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
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
# ## Summary
#
# - One glossary (`GLOSSARY`) names every parameter; the CLI, the papermill parameters, recipes and checkpoints use
#   exactly these names.
# - `check_choice`, `check_range` and `check_positive` turn a bad value into a `ConfigError` that names the parameter,
#   the value and what is allowed.
# - `atomic_write` makes "the last good checkpoint survives a crash" a property of the code, not of luck.
