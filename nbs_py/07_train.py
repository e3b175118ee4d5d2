# %% [markdown]
# # Training
#
# > The pretraining engine: one `train(config)` for the papermill notebook, the command line and `accelerate launch`; config -> accelerator -> data -> model -> optimiser and schedules -> loop -> checkpoints, with exact resume and clear failures.

# %%
#| default_exp train

# %%
#| export
from __future__ import annotations

if __name__ == '__main__' and not __package__ and '__file__' in globals():  # run as a file: `accelerate launch pixpro_rs/train.py`
    __package__ = 'pixpro_rs'  # PEP 366: the package's relative imports below then work

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm.std import tqdm

from pixpro_rs.core import (GLOSSARY, ConfigError, RunLock, atomic_write, check_choice, check_mixed_precision, check_positive,
                            check_range, sweep_temporary)
from pixpro_rs.augment import PixProAugment
from pixpro_rs.data import ImageFiles, SyntheticScenes, data_fingerprint, hold_worker_sigterm, make_loader
from pixpro_rs.gpu_augment import BatchAugment, ViewLoader, make_crop_loader
from pixpro_rs.pixpro import METHODS, OnlineNet, PixPro, momentum_horizon
from pixpro_rs.recipes import LARS, get_recipe, lars_param_groups, lr_at, scaled_lr, set_lr
from pixpro_rs.resnet_rs import MODEL_NAMES, CheckpointError, build_meta, create_model

# %%
#| hide
import contextlib
import io
import subprocess
import tempfile

import torchvision

import matplotlib.pyplot as plt
from fastcore.test import test_close, test_eq, test_fail
from nbdev.showdoc import show_doc
from pixpro_rs.pixpro import momentum_at
from pixpro_rs.recipes import steps_per_epoch
from pixpro_rs.resnet_rs import load_pretrained
from safetensors import safe_open
from safetensors.torch import load_file
from accelerate.utils import is_tensorboard_available


# %% [markdown]
# The earlier chapters built the pieces: the backbone (`create_model`), two views with exact coordinates
# (`make_loader`), the PixPro model with its EMA target (`PixPro`), LARS and the schedules (`LARS`, `lr_at`) and
# the named recipes. This chapter puts them into the one loop every run goes through, from the 3-minute CPU demo to
# a 400-epoch ImageNet run on several machines. It always runs in the same order:
#
# 1. **config**: a `TrainConfig` of glossary names, resolved against a named recipe and checked *before any work*;
# 2. **accelerator**: Hugging Face Accelerate chooses the device, starts the processes' communication and handles
#    mixed precision; the same code runs on one CPU, N CPU processes (gloo), one GPU or many machines;
# 3. **data**: `make_loader` gives each process its own shard, with augmentations that depend only on the seed;
# 4. **model**: `PixPro` around `create_model(arch)`; only its online half (`OnlineNet`) goes into
#    `DistributedDataParallel`, the EMA target stays outside;
# 5. **optimiser and schedules**: LARS with the linear-scaled learning rate, warm-up + cosine per iteration, and the
#    momentum schedule that lives inside the model (its step counter is a buffer);
# 6. **loop**: loss, learning rate, momentum and images/s for each step, to a progress bar and to CSV/JSONL files;
# 7. **checkpoints**: written atomically, resumable exactly.
#
# The reference code (zdaxie/PixPro) has the same loop. Three things in it are fragile, and we fix them (each with a
# test below). Its resume restarts the momentum schedule at 0.99, because the schedule's position is not saved. A
# checkpoint killed halfway through writing replaces the good one. And a NaN loss trains on silently until the
# weights are all NaN.

# %% [markdown]
# ## The configuration
#
# One dataclass holds every parameter of a run, under the glossary's names: the same names are the papermill
# parameters of `nbs/train.ipynb`, the command-line flags, the keys of a `params.yaml` and the config saved in every
# checkpoint. Parameters left at `None` take the named `recipe`'s value, so `recipe='pixpro_r50_400ep'` alone is the
# paper's run and any single value can still be overridden.

# %%
#| exports
@dataclass
class TrainConfig:
    "Every parameter of a PixPro pretraining run (glossary names); `None` means: the recipe's value."
    recipe: str = 'pixpro_demo_cpu'  # named recipe supplying the defaults below
    arch: str|None = None  # backbone
    data: str = 'synthetic'  # 'synthetic' or a folder of images (searched recursively)
    epochs: int|None = None  # passes over the data
    batch_size: int|None = None  # images per device per micro-batch
    image_size: int|None = None  # side of each view
    lr: float|None = None  # base lr per 256 images
    weight_decay: float|None = None  # LARS weight decay
    momentum: float|None = None  # base EMA momentum of the target
    threshold: float|None = None  # T of the positive pairs
    gamma: float|None = None  # PPM sharpness
    ppm_layers: int|None = None  # layers of the PPM transform
    instance_weight: float|None = None  # alpha of the instance branch
    method: str|None = None  # 'pixpro', 'pixcontrast' or 'instance'
    tau: float = 0.3  # temperature of PixContrast (the paper's 0.3)
    output_dir: str|None = None  # None: runs/<recipe>-<arch>-seed<seed>
    seed: int = 0  # initialisation, data order and augmentations
    num_workers: int = 2  # DataLoader workers per process
    mixed_precision: str = 'no'  # 'no', 'bf16' or 'fp16'
    max_steps: int = 0  # stop after this many optimiser steps (0: run all epochs)
    save_every: int = 1  # checkpoint every this many epochs (and at the end)
    resume: str = 'auto'  # 'auto', 'never' or a checkpoint file
    overwrite: bool = False  # replace a different run found in output_dir
    grad_accum: int = 1  # micro-batches per optimiser step
    synthetic_length: int = 256  # scenes in data='synthetic'
    synthetic_size: int = 128  # side of the synthetic scenes
    keep_checkpoints: int = 1  # newest checkpoints kept in output_dir (each is complete: written atomically)
    progress: bool = True  # a progress bar on the main process
    channels_last: bool = False  # NHWC memory format for the model and the views
    compile: bool = False  # torch.compile the online and target networks
    gpu_augment: bool|None = None  # workers crop and flip, the device does the rest (None: on when training on CUDA)
    prefetch_factor: int = 2  # batches each DataLoader worker loads ahead

RECIPE_FIELDS = ('arch', 'epochs', 'batch_size', 'image_size', 'lr', 'weight_decay', 'momentum', 'threshold', 'gamma',
                 'ppm_layers', 'instance_weight', 'method')
PARAMETERS = tuple(f.name for f in dataclasses.fields(TrainConfig))

# %% [markdown]
# Every name is in the glossary, and the recipe supplies exactly the fields that are `None` by default:

# %%
test_eq([p for p in PARAMETERS if p not in GLOSSARY], [])
test_eq(tuple(f.name for f in dataclasses.fields(TrainConfig) if f.default is None and f.name not in ('output_dir', 'gpu_augment')), RECIPE_FIELDS)
assert all(hasattr(get_recipe('pixpro_r50_100ep'), f) for f in RECIPE_FIELDS)

# %% [markdown]
# `resolve_config` turns a `TrainConfig` into the plain dictionary the run uses and saves: every value concrete,
# every value checked, plus what follows from them: the global batch and the learning rate scaled to it by the
# linear rule. The checks cover what would otherwise fail late or silently: an unknown name, a non-positive lr or
# batch size, a threshold outside $(0, 10]$, a missing data folder, and an image size whose C5 map is smaller
# than 2x2 (the C5 shape comes from a forward pass on PyTorch's `meta` device, which costs no memory and no
# arithmetic, so it is right for any architecture). Each error is a `ConfigError` that names the parameter and
# what is allowed; the command line turns it into exit code 2.

# %%
#| exports
_INTS = {'epochs': 1, 'batch_size': 1, 'image_size': 1, 'ppm_layers': 0, 'seed': 0, 'num_workers': 0,
         'max_steps': 0, 'save_every': 1, 'grad_accum': 1, 'synthetic_length': 1, 'synthetic_size': 32,
         'keep_checkpoints': 1, 'prefetch_factor': 1}  # integer parameters and their least value
BOOLS = ('overwrite', 'progress', 'channels_last', 'compile', 'gpu_augment')  # boolean parameters

def _int(name:str, value:Any, low:int) -> int:
    if isinstance(value, float) and value.is_integer(): value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(name, value, f'an integer >= {low}')
    return value


# %%
test_eq((_int('epochs', 3, 1), _int('epochs', 3., 1)), (3, 3))  # a YAML `3.0` is an integer
for v in (True, 2.5, '3', 0): test_fail(lambda: _int('epochs', v, 1), contains='an integer >= 1')


# %%
#| exports
def _bool(name:str, value:Any) -> bool:
    if isinstance(value, str) and value.lower() in ('true', 'false', '1', '0', 'yes', 'no'):
        value = value.lower() in ('true', '1', 'yes')
    if not isinstance(value, bool): raise ConfigError(name, value, 'True or False')
    return value


# %%
test_eq([_bool('progress', v) for v in (True, 'False', 'yes', '0')], [True, False, True, False])
test_fail(lambda: _bool('progress', 'maybe'), contains="invalid progress='maybe'")
test_fail(lambda: _bool('progress', 1), contains='True or False')


# %%
#| exports
def _merged(config, cls:type, names, overrides:dict) -> dict:
    "The defaults of the dataclass `cls`, then `config` (a `cls`, a dict or None), then `overrides`; unknown names refused."
    params = dataclasses.asdict(config) if isinstance(config, cls) else dict(config or {})
    params.update(overrides)
    for k in params: check_choice('parameter', k, names)
    if params.get('mixed_precision') is False: params['mixed_precision'] = 'no'  # YAML 1.1 reads `no` as False
    return {**dataclasses.asdict(cls()), **params}


# %%
merged = _merged({'lr': 2., 'mixed_precision': False}, TrainConfig, PARAMETERS, {'seed': 3})
test_eq((merged['lr'], merged['seed'], merged['mixed_precision'], merged['recipe']), (2., 3, 'no', 'pixpro_demo_cpu'))
test_fail(lambda: _merged(None, TrainConfig, PARAMETERS, {'gammma': 2.}), contains="invalid parameter='gammma'")


# %%
#| exports
def _check_run(p:dict,  # merged parameters, changed in place
               bools:tuple,  # the engine's boolean parameters
              ) -> dict:
    "The checks every engine shares: the seed's range, the precision, the switches and the resume choice."
    if p['seed'] >= 2**64: raise ConfigError('seed', p['seed'], 'an integer in [0, 2**64)')
    check_mixed_precision(p['mixed_precision'], 'cuda' if torch.cuda.is_available() else 'cpu')
    for k in bools: p[k] = _bool(k, p[k])
    if not isinstance(p['resume'], (str, Path)) or (p['resume'] not in ('auto', 'never') and not Path(p['resume']).is_file()):
        raise ConfigError('resume', p['resume'], "'auto', 'never' or an existing checkpoint file")
    p['resume'] = str(p['resume'])
    return p


# %%
checked = _check_run(_merged(None, TrainConfig, PARAMETERS, {'progress': 'no', 'gpu_augment': False}), BOOLS)
test_eq((checked['progress'], checked['gpu_augment'], checked['resume']), (False, False, 'auto'))
test_fail(lambda: _check_run(_merged(None, TrainConfig, PARAMETERS, {'gpu_augment': False, 'resume': 3}), BOOLS),
          contains='invalid resume=3')


# %%
#| exports
def c5_size(arch:str, image_size:int) -> int:
    "Side of the C5 map of `arch` for `image_size` views, from a forward pass on the meta device."
    with torch.device('meta'):
        return build_meta(arch, num_classes=0).eval().forward_features(torch.empty(1, 3, image_size, image_size)).shape[-1]


# %%
test_eq((c5_size('resnetrs50', 96), c5_size('resnetrs_tiny', 64), c5_size('resnet50', 224)), (3, 2, 7))


# %%
#| exports
def default_output_dir(recipe:str, arch:str, seed:int) -> str:
    return f'runs/{recipe}-{arch}-seed{seed}'


# %%
test_eq(default_output_dir('pixpro_r50_400ep', 'resnet50', 7), 'runs/pixpro_r50_400ep-resnet50-seed7')


# %%
#| exports
def resolve_config(config:TrainConfig|dict|None=None,  # the parameters (None: all defaults)
                   world_size:int=1,  # processes of the run (for the global batch)
                   **overrides,  # parameters overriding `config`'s
                  ) -> dict:
    "Every parameter concrete and checked, plus the derived values (global batch, scaled lr...). Raises `ConfigError`."
    p = _merged(config, TrainConfig, PARAMETERS, overrides)
    recipe = get_recipe(p['recipe'], kind='pixpro')
    for k in RECIPE_FIELDS:
        if p[k] is None: p[k] = getattr(recipe, k)
    for k, low in _INTS.items(): p[k] = _int(k, p[k], low)
    check_choice('arch', p['arch'], MODEL_NAMES)
    check_choice('method', p['method'], METHODS)
    for k in ('lr', 'gamma', 'tau'): check_positive(k, p[k])
    for k in ('weight_decay', 'instance_weight'): check_range(k, p[k], 0)
    check_range('momentum', p['momentum'], 0, 1)
    check_range('threshold', p['threshold'], 0, 10, low_open=True)
    check_choice('ppm_layers', p['ppm_layers'], [0, 1, 2])
    if p['gpu_augment'] is None: p['gpu_augment'] = torch.cuda.is_available()  # the fast path where it is fast
    _check_run(p, BOOLS)
    if not isinstance(p['data'], (str, Path)) or not str(p['data']) or (p['data'] != 'synthetic' and not Path(p['data']).is_dir()):
        raise ConfigError('data', p['data'], "'synthetic' or an existing folder of images")  # '' would be the current folder
    p['data'] = str(p['data'])
    side = c5_size(p['arch'], p['image_size'])
    if side < 2: raise ConfigError('image_size', p['image_size'], f'a size giving a C5 map of at least 2x2 ({side}x{side} here): 64 or more')
    p['output_dir'] = str(p['output_dir'] or default_output_dir(p['recipe'], p['arch'], p['seed']))
    p.update(warmup_epochs=recipe.warmup_epochs, warmup_start_factor=recipe.warmup_start_factor, final_lr=recipe.final_lr,
             optimizer_momentum=recipe.optimizer_momentum, trust_coefficient=recipe.trust_coefficient,
             c5_size=side, world_size=int(world_size), global_batch=p['batch_size'] * p['grad_accum'] * int(world_size))
    p['global_lr'] = scaled_lr(p['lr'], p['global_batch'])
    return p


# %%
c = resolve_config()
test_eq((c['arch'], c['image_size'], c['batch_size'], c['global_batch'], c['c5_size']), ('resnetrs50', 96, 16, 16, 3))
test_eq(c['output_dir'], 'runs/pixpro_demo_cpu-resnetrs50-seed0')
c = resolve_config(recipe='pixpro_r50_400ep', world_size=8)
test_eq((c['arch'], c['epochs'], c['global_batch'], c['global_lr'], c['threshold']), ('resnet50', 400, 1024, 4.0, 0.7))
test_eq(resolve_config(TrainConfig(arch='resnetrs101'), lr=2, grad_accum=2)['global_lr'], 2 * 32 / 256)

# %% [markdown]
# Each bad configuration fails with the parameter's name and what would have been accepted:

# %%
bad = [dict(arch='resnet51'), dict(recipe='pixpro_r50_200ep'), dict(recipe='supervised_rs50_160_350ep'),
       dict(method='byol'), dict(lr=0), dict(lr=-1.), dict(batch_size=0), dict(batch_size=2.5), dict(threshold=0),
       dict(threshold=10.5), dict(data='/no/such/folder'), dict(image_size=32), dict(mixed_precision='fp8'),
       dict(resume='/no/such.pt'), dict(epochs=0), dict(ppm_layers=3), dict(momentum=1.5), dict(gammma=2.), dict(data=''),
       dict(seed=2**64), dict(seed=-1), dict(tau=0)]
for kw in bad:
    name = next(iter(kw))
    try: resolve_config(**kw); raise AssertionError(f'accepted {kw}')
    except ConfigError as e:
        test_eq(e.name, 'parameter' if name == 'gammma' else name)
        print(e)
test_eq(resolve_config(mixed_precision=False)['mixed_precision'], 'no')  # `mixed_precision: no` in a YAML file
test_eq(resolve_config(method='pixcontrast', tau=0.2)['tau'], 0.2)  # PixContrast's temperature is a parameter too

# %% [markdown]
# ## Checkpoints
#
# A checkpoint holds everything that the rest of the run depends on: the whole `PixPro` state (online networks,
# target networks, BN statistics, and the `step` and `total_steps` buffers that position the momentum schedule),
# the optimiser's momentum buffers, the step counter, the resolved config, the metrics so far and the random
# number generators' states. It is a plain dictionary of tensors, numbers and strings, so it loads with
# `torch.load(weights_only=True)`, which does not run code from the file. `save_checkpoint` writes to a temporary
# file beside the target and renames it (`atomic_write`): a run killed while writing leaves the previous checkpoint
# as it was, never half a file.
#
# > **Ours.** The reference saves with plain `torch.save` over its only checkpoint file, and without the momentum
# > schedule's position: a resumed run starts the target's momentum at 0.99 again.

# %%
#| exports
CHECKPOINT_FORMAT = 'pixpro_rs.train/1'

def rng_state() -> dict:
    "The states of Python's, NumPy's and torch's generators, as `weights_only`-loadable values."
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


# %%
buf = io.BytesIO(); torch.save(rng_state(), buf); buf.seek(0)
test_eq(sorted(torch.load(buf, weights_only=True)), ['cuda', 'numpy', 'python', 'torch'])  # loads without running code


# %%
#| exports
def set_rng_state(state:dict):
    "Restore what `rng_state` saved."
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available(): torch.cuda.set_rng_state_all(state['cuda'])


# %%
saved = rng_state()
drawn = (random.random(), float(np.random.rand()), float(torch.rand(())))
set_rng_state(saved)
test_eq((random.random(), float(np.random.rand()), float(torch.rand(()))), drawn)  # the same draws again


# %%
#| exports
def checkpoint_path(output_dir:str|Path, step:int) -> Path:
    return Path(output_dir)/'checkpoints'/f'step-{step:08d}.pt'


# %%
test_eq(checkpoint_path('runs/a', 7), Path('runs/a/checkpoints/step-00000007.pt'))


# %%
#| exports
def checkpoint_step(path:str|Path) -> int|None:
    "The step in a checkpoint's name `step-<step>.pt` (None for any other name)."
    name = Path(path).name
    digits = name[len('step-'):-len('.pt')] if name.startswith('step-') and name.endswith('.pt') else ''
    return int(digits) if digits.isdigit() else None


# %%
test_eq(checkpoint_step(checkpoint_path('runs/a', 7)), 7)
test_eq(checkpoint_step('step-00000007.pt.unreadable'), None)


# %%
#| exports
def list_checkpoints(output_dir:str|Path) -> list[Path]:
    "The run's checkpoints, oldest first: ordered by their step, not by their names' spelling."
    found = [p for p in (Path(output_dir)/'checkpoints').glob('step-*.pt') if checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


# %%
ck = Path(tempfile.mkdtemp())
(ck/'checkpoints').mkdir()
for n in ('step-00000010.pt', 'step-9.pt', 'step-x.pt', 'step-00000002.pt.unreadable'): (ck/'checkpoints'/n).touch()
test_eq([p.name for p in list_checkpoints(ck)], ['step-9.pt', 'step-00000010.pt'])  # by step, not by spelling
test_eq(list_checkpoints(ck/'elsewhere'), [])


# %%
#| exports
def save_checkpoint(path:str|Path, state:dict) -> Path:
    "Write `state` atomically (temporary file + rename)."
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


# %%
test_eq(save_checkpoint(checkpoint_path(ck, 3), {'x': torch.arange(3)}), checkpoint_path(ck, 3))
test_eq(torch.load(checkpoint_path(ck, 3), weights_only=True)['x'], torch.arange(3))
test_eq([checkpoint_step(p) for p in list_checkpoints(ck)], [3, 9, 10])
assert not any(p.name.startswith('.') for p in (ck/'checkpoints').iterdir())  # no temporary file left


# %%
#| exports
def load_checkpoint(path:str|Path,
                    format:str=CHECKPOINT_FORMAT,  # the engine's format tag (fine-tuning has its own)
                   ) -> dict:
    "Load a checkpoint with `weights_only=True`; a file that is not one of `format` raises `CheckpointError` naming it."
    path = Path(path)
    try: state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e: raise CheckpointError(f'{path}: not a readable checkpoint ({type(e).__name__}: {e})') from None
    if not isinstance(state, dict) or state.get('format') != format:
        kind = {CHECKPOINT_FORMAT: 'training'}.get(format, format.split('/')[0].split('.')[-1])
        raise CheckpointError(f'{path}: not a pixpro_rs {kind} checkpoint (no format {format!r})')
    return state


# %%
d = Path(tempfile.mkdtemp())
torch.manual_seed(3); random.random(); np.random.rand()
st = {'format': CHECKPOINT_FORMAT, 'rng': rng_state(), 'x': torch.arange(3), 'config': {'lr': 1.0}, 'metrics': [{'loss': -1.5}]}
expect = (random.random(), float(np.random.rand()), float(torch.rand(())))
save_checkpoint(checkpoint_path(d, 7), st)
torch.manual_seed(0); random.seed(0); np.random.seed(0)
back = load_checkpoint(list_checkpoints(d)[0])
set_rng_state(back['rng'])
test_eq((random.random(), float(np.random.rand()), float(torch.rand(()))), expect)  # the generators continue exactly
test_eq(list_checkpoints(d), [d/'checkpoints'/'step-00000007.pt'])
(d/'junk.pt').write_bytes(b'not a checkpoint')
test_fail(lambda: load_checkpoint(d/'junk.pt'), contains='junk.pt')
def boom(tmp): Path(tmp).write_bytes(b'half'); raise KeyboardInterrupt
try: atomic_write(checkpoint_path(d, 7), boom)
except KeyboardInterrupt: pass
test_eq(load_checkpoint(checkpoint_path(d, 7))['config'], {'lr': 1.0})  # the killed write left the old file intact
test_eq(sorted(p.name for p in (d/'checkpoints').iterdir()), ['step-00000007.pt'])  # and no temporary file
save_checkpoint(d/'checkpoints'/'step-123456789.pt', st)  # past 10^8 steps the names grow a digit
test_eq([checkpoint_step(p) for p in list_checkpoints(d)], [7, 123456789])

# %% [markdown]
# ## The run folder
#
# A run folder is what a multi-day run leaves behind, and the engine treats it as the user's most valuable file.
# Five rules keep it trustworthy; each has a test below or in `tests/test_train.py`.
#
# 1. **One run per folder.** The main process holds an exclusive lock on `output_dir` (`RunLock`, the conventions
#    chapter) for the run's whole life. A second run started into a live run's folder exits with code 2 and names
#    the holder (pid, host, start time). A lock left by a process that died is taken over with a warning.
# 2. **The folder's run is the run of its checkpoints.** Starting again resumes when the command describes the same
#    run as the folder's `config.json` *and* as the checkpoint it would resume from (two files that can only disagree
#    after an accident, which is then refused rather than resumed under the wrong config). The identity includes the
#    images: the number of files and a digest of their relative paths and sizes (`data_files`, `data_digest`), so a
#    folder that grew or shrank is refused by name instead of silently changing the step count.
# 3. **Check everything, then write.** Every check that can fail (the config, the data, the batch against the data,
#    the folder's run, the checkpoint, the model) runs before the first byte is written into `output_dir`; a corrected
#    command is never refused because of a failed start. A folder whose run never saved a checkpoint holds nothing
#    to lose, so a different config simply replaces it.
# 4. **Keep the right checkpoints.** After writing a checkpoint the engine deletes the older ones beyond
#    `keep_checkpoints`, ordered by step, and never the one it just wrote. `resume='auto'` takes the newest checkpoint
#    that *loads*; a newer one that does not (a disk error, a truncated copy) is named in a warning and set aside as
#    `<name>.unreadable`, never deleted. Checkpoints newer than an explicitly resumed one belong to the abandoned
#    continuation and are set aside as `<name>.superseded`. Temporary files of writes killed half-way are swept
#    when a run starts.
# 5. **Preemption is a checkpoint, not a loss.** SLURM and Kubernetes announce the end of a job with SIGTERM. The
#    engine finishes the current step, saves a checkpoint at it, and stops with `Preempted` (exit code 143 on the
#    command line, 128 + the signal's number, as a shell reports it); the same command resumes exactly. All
#    processes stop at the same step: the request travels with the losses every step gathers anyway.
#
# > **Ours.** The reference code writes one checkpoint file in place, has no lock and no run identity, and ends on
# > SIGTERM wherever it is.
#
# `run_differences` compares two resolved configs. Only parameters that do not change the result may differ
# (workers, checkpoint frequency, `max_steps`, the speed switches). A run with a different number of processes is
# a different run (its global batch differs). A parameter the saved config lacks was added to the engine after that
# run was written, which therefore ran with the parameter's default: that is the value it is compared with.

# %%
#| exports
RUN_ONLY = ('output_dir', 'resume', 'overwrite', 'max_steps', 'num_workers', 'save_every', 'keep_checkpoints', 'progress',
            'channels_last', 'compile', 'prefetch_factor', 'gpu_augment')  # speed switches: rounding, not the run

def run_differences(old:dict, new:dict,
                    defaults:dict|None=None,  # the config class's defaults: a parameter `old` lacks counts as its default
                   ) -> list[str]:
    "The parameters in which two resolved configs describe different runs."
    old = {**(defaults or {}), **old}  # a run written before a parameter existed ran with its default
    keys = sorted((set(old) | set(new)) - set(RUN_ONLY))
    return [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys if old.get(k) != new.get(k)]


# %%
a = resolve_config(); b = resolve_config(max_steps=3, num_workers=0, output_dir='elsewhere')
test_eq(run_differences(a, b), [])
test_eq(run_differences(a, resolve_config(lr=2.)), ['global_lr: 1.0 -> 0.125', 'lr: 16.0 -> 2.0'])
older = {k: v for k, v in a.items() if k != 'grad_accum'}  # a run written before `grad_accum` existed
test_eq(run_differences(older, a), ['grad_accum: None -> 1'])
test_eq(run_differences(older, a, dataclasses.asdict(TrainConfig())), [])
test_eq(run_differences(older, resolve_config(grad_accum=2), dataclasses.asdict(TrainConfig()))[-1], 'grad_accum: 1 -> 2')


# %% [markdown]
# The images' identity: for folders, the file count and digest of all of them together (the data chapter's
# `data_fingerprint`, relative to their common folder); for generated data such as `SyntheticScenes`, which the
# config's parameters already describe, just the count.

# %%
#| exports
def data_identity(*datasets) -> dict:
    "`data_files` and `data_digest` of a run's datasets: their folders' fingerprint, or the size of generated data."
    if not all(hasattr(d, 'files') for d in datasets): return dict(data_files=sum(map(len, datasets)), data_digest=None)
    root = os.path.commonpath([str(d.root) for d in datasets])
    return data_fingerprint([f for d in datasets for f in d.files], root)


# %%
test_eq(data_identity(SyntheticScenes(8, 32), SyntheticScenes(4, 32)), dict(data_files=12, data_digest=None))
imgs = Path(tempfile.mkdtemp())
for n in ('a.png', 'b/c.png'): (imgs/n).parent.mkdir(exist_ok=True); (imgs/n).write_bytes(b'x' * 10)
ident = data_identity(ImageFiles(imgs))
test_eq(ident['data_files'], 2)
(imgs/'b'/'c.png').write_bytes(b'x' * 11)
assert data_identity(ImageFiles(imgs))['data_digest'] != ident['data_digest']  # a resized file changes the digest


# %% [markdown]
# `prepare_output_dir` applies rules 2-4 *reading only*, on every process: it returns a `RunPlan` (the checkpoint to
# resume from, already loaded, and what to clear or set aside) or raises. `start_output_dir` carries the plan out on
# the main process once every other check has passed too.

# %%
#| exports
@dataclass
class RunPlan:
    "What `prepare_output_dir` decided; nothing is written before `start_output_dir` carries it out."
    resume: Path|None  # the checkpoint to continue from (None: start at step 0)
    state: dict|None  # its content, loaded once (`restore` empties it once the weights are in place)
    fresh: bool  # clear the folder's checkpoints and metrics first (overwrite=True, or a run that saved no checkpoint)
    set_aside: tuple = ()  # (checkpoint, reason) pairs renamed to `<name>.<reason>`: 'unreadable' or 'superseded'


# %%
test_eq(RunPlan(None, None, False), RunPlan(None, None, False, ()))  # compared by value; nothing set aside by default


# %%
#| exports
def _refuse_if_different(old:dict, c:dict, defaults:dict, name:str, value:str, allowed:str):
    "`ConfigError` if the saved config `old` is not the run `c`; a changed image folder is named as such."
    diff = run_differences(old, c, defaults)
    if diff and all(d.startswith('data_') for d in diff):
        raise ConfigError('data', c['data'], f'the images the run in {value} started with; the folder changed: ' + '; '.join(diff))
    if diff: raise ConfigError(name, value, allowed + '; '.join(diff))


# %%
test_eq(_refuse_if_different(a, b, {}, 'output_dir', 'here', ''), None)  # `a` and `b` above differ in run-only parameters
test_fail(lambda: _refuse_if_different(a, resolve_config(lr=2.), {}, 'output_dir', 'here', 'the same run; '),
          contains="invalid output_dir='here': expected the same run; global_lr: 1.0 -> 0.125")
test_fail(lambda: _refuse_if_different({**a, 'data_files': 3}, {**a, 'data_files': 4}, {}, 'output_dir', 'here', ''),
          contains="invalid data='synthetic'")


# %%
#| exports
def _read_config(out:Path) -> dict|None:
    "The folder's `config.json` (None if there is none)."
    if not (out/'config.json').exists(): return None
    try: return json.loads((out/'config.json').read_text())
    except (OSError, ValueError) as e: raise ConfigError('output_dir', str(out), f'a folder with a readable config.json ({e}), or overwrite=True') from None


# %%
rd = Path(tempfile.mkdtemp())
test_eq(_read_config(rd), None)
(rd/'config.json').write_text('{"lr": 1.0}'); test_eq(_read_config(rd), {'lr': 1.0})
(rd/'config.json').write_text('{"lr": 1.'); test_fail(lambda: _read_config(rd), contains='a readable config.json')


# %%
#| exports
def _newest_loadable(out:Path, ckpts:list[Path], format:str) -> tuple[Path, dict, list]:
    "The newest checkpoint that loads, its state, and the (path, error) of newer ones that do not."
    bad = []
    for path in reversed(ckpts):
        try: return path, load_checkpoint(path, format), bad
        except CheckpointError as e: bad.append((path, e))
    raise CheckpointError(f'{out}: none of its {len(ckpts)} checkpoints loads ({bad[0][1]}); resume from a file with '
                          'resume=PATH, or start afresh with overwrite=True')


# %%
nl = Path(tempfile.mkdtemp())
paths = [save_checkpoint(checkpoint_path(nl, s), {'format': CHECKPOINT_FORMAT, 'step': s}) for s in (1, 2)]
paths[1].write_bytes(b'truncated')
newest, newest_state, unloadable = _newest_loadable(nl, paths, CHECKPOINT_FORMAT)
test_eq((newest, newest_state['step'], [p for p, _ in unloadable]), (paths[0], 1, [paths[1]]))
test_fail(lambda: _newest_loadable(nl, paths[1:], CHECKPOINT_FORMAT), contains='none of its 1 checkpoints loads')


# %%
#| exports
def prepare_output_dir(c:dict,  # resolved config, with `data_identity`'s keys
                       format:str=CHECKPOINT_FORMAT,  # format tag of the engine's checkpoints
                       defaults:dict|None=None,  # the config class's defaults (None: `TrainConfig`'s), see `run_differences`
                      ) -> RunPlan:
    "Decide, reading only, between a fresh start, a resume and a refusal (`ConfigError`, `CheckpointError`)."
    out = Path(c['output_dir'])
    defaults = {**(dataclasses.asdict(TrainConfig()) if defaults is None else defaults),  # a run from before the
                'data_files': c.get('data_files'), 'data_digest': c.get('data_digest')}  # fingerprint: not compared
    if out.exists() and not out.is_dir(): raise ConfigError('output_dir', str(out), 'a folder (this is a file)')
    ckpts, explicit = list_checkpoints(out), c['resume'] not in ('auto', 'never')
    state = load_checkpoint(c['resume'], format) if explicit else None
    if explicit: _refuse_if_different(state['config'], c, defaults, 'resume', c['resume'], 'a checkpoint of this same run; it differs in ')
    if c['overwrite']:
        if explicit and Path(c['resume']).resolve().parent == (out/'checkpoints').resolve():
            raise ConfigError('overwrite', True, f'False when resuming from {c["resume"]}: overwrite would delete it')
        return RunPlan(Path(c['resume']) if explicit else None, state, True)
    old, different = _read_config(out), 'a new folder, the folder of this same run, or overwrite=True; it holds a different run: '
    if not ckpts: return RunPlan(Path(c['resume']) if explicit else None, state, old is not None)  # nothing here to lose
    if c['resume'] == 'never':
        raise ConfigError('output_dir', str(out), 'an empty folder (it holds a run and resume=never), or overwrite=True')
    if old is not None: _refuse_if_different(old, c, defaults, 'output_dir', str(out), different)
    if explicit: return RunPlan(Path(c['resume']), state, False,
                                tuple((p, 'superseded') for p in ckpts if checkpoint_step(p) > state['step']))
    path, state, bad = _newest_loadable(out, ckpts, format)
    _refuse_if_different(state['config'], c, defaults, 'output_dir', str(out), f'{different}(in {path.name}) ')
    for p, e in bad: warnings.warn(f'{p} does not load ({e}); resuming from {path.name}, the newest that does. '
                                   f'{p.name} is set aside as {p.name}.unreadable')
    return RunPlan(path, state, False, tuple((p, 'unreadable') for p, _ in bad))


# %%
f = Path(tempfile.mkdtemp())/'file'; f.write_text('')  # a file where the run's folder should be
test_fail(lambda: prepare_output_dir(resolve_config(output_dir=str(f))), contains='a folder (this is a file)')
test_fail(lambda: prepare_output_dir(resolve_config(output_dir=str(nl), resume='never')), contains='resume=never')


# %%
#| exports
def start_output_dir(c:dict,  # resolved config
                     plan:RunPlan,  # from `prepare_output_dir`
                     files:tuple=('metrics.jsonl', 'metrics.csv', 'encoder.safetensors'),  # what a fresh start clears
                    ) -> Path:
    "Carry out `plan` (main process, lock held, every check passed): clear, sweep, set aside, write config.json."
    out = Path(c['output_dir'])
    out.mkdir(parents=True, exist_ok=True)
    if plan.fresh:
        shutil.rmtree(out/'checkpoints', ignore_errors=True)
        for f in files: (out/f).unlink(missing_ok=True)
    sweep_temporary(out)  # half-written files of killed runs
    for p, why in plan.set_aside:
        if why == 'superseded': warnings.warn(f'{p} is newer than the checkpoint resumed from; set aside as {p.name}.superseded')
        p.rename(p.with_name(f'{p.name}.{why}'))
    return atomic_write(out/'config.json', lambda t: Path(t).write_text(json.dumps(c, indent=1)))


# %%
so = Path(tempfile.mkdtemp())/'run'
for s in (1, 2): save_checkpoint(checkpoint_path(so, s), {'step': s})
(so/'metrics.csv').write_text('old')
test_eq(start_output_dir({'output_dir': str(so), 'lr': 1.}, RunPlan(None, None, False, ((checkpoint_path(so, 2), 'unreadable'),))),
        so/'config.json')
test_eq(sorted(p.name for p in (so/'checkpoints').iterdir()), ['step-00000001.pt', 'step-00000002.pt.unreadable'])
test_eq(json.loads((so/'config.json').read_text()), {'output_dir': str(so), 'lr': 1.})
start_output_dir({'output_dir': str(so)}, RunPlan(None, None, True))  # a fresh start clears checkpoints and metrics
test_eq(sorted(p.name for p in so.iterdir()), ['config.json'])


# %%
#| exports
def prune_checkpoints(output_dir:str|Path,
                      keep:int,  # checkpoints to keep, `written` included
                      written:Path,  # the checkpoint just written: never deleted
                     ) -> list[Path]:
    "Delete the checkpoints older than `written` (by step) beyond the newest `keep - 1`; returns what was deleted."
    older = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) < checkpoint_step(written)]
    doomed = older[:max(len(older) - (keep - 1), 0)]
    for p in doomed: p.unlink(missing_ok=True)
    return doomed


# %%
pr = Path(tempfile.mkdtemp())
for s in (10, 20, 30): save_checkpoint(checkpoint_path(pr, s), {'step': s})
test_eq(prune_checkpoints(pr, 2, checkpoint_path(pr, 30)), [checkpoint_path(pr, 10)])
test_eq([checkpoint_step(p) for p in list_checkpoints(pr)], [20, 30])
test_eq(prune_checkpoints(pr, 1, checkpoint_path(pr, 30)), [checkpoint_path(pr, 20)])

# %% [markdown]
# The rules on a hand-made folder. A checkpoint written after an explicit resume from an older one survives the
# pruning; a truncated newest checkpoint is skipped (with a warning) for the one before it, and set aside; a folder
# that saved nothing accepts a different run; a config.json and a checkpoint that disagree are refused.

# %%
d = Path(tempfile.mkdtemp())/'run'
cfg = {**resolve_config(output_dir=str(d)), 'data_files': 256, 'data_digest': None}
def ckpt(step, config=cfg): return save_checkpoint(checkpoint_path(d, step), {'format': CHECKPOINT_FORMAT, 'step': step, 'config': config})
test_eq(prepare_output_dir(cfg), RunPlan(None, None, False))  # a new folder
start_output_dir(cfg, prepare_output_dir(cfg))
test_eq(prepare_output_dir({**cfg, 'lr': 2.}).fresh, True)  # config.json, but no checkpoint: a new config replaces it
for s in (10, 20, 30): ckpt(s)
test_eq(prune_checkpoints(d, 1, checkpoint_path(d, 15)), [checkpoint_path(d, 10)])  # 15 written after resuming at 10
test_eq([checkpoint_step(p) for p in list_checkpoints(d)], [20, 30])  # nothing newer than 15 is deleted ...
plan = prepare_output_dir({**cfg, 'resume': str(checkpoint_path(d, 20))})
test_eq(plan.set_aside, ((checkpoint_path(d, 30), 'superseded'),))  # ... but set aside by an explicit resume from 20
checkpoint_path(d, 30).write_bytes(checkpoint_path(d, 30).read_bytes()[:100])  # truncated
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always'); plan = prepare_output_dir(cfg)
test_eq((plan.resume, plan.state['step'], plan.set_aside), (checkpoint_path(d, 20), 20, ((checkpoint_path(d, 30), 'unreadable'),)))
assert 'step-00000030.pt does not load' in str(w[0].message)
start_output_dir(cfg, plan)
test_eq(sorted(p.name for p in (d/'checkpoints').iterdir()), ['step-00000020.pt', 'step-00000030.pt.unreadable'])
test_fail(lambda: prepare_output_dir({**cfg, 'lr': 2.}), contains='lr: 16.0 -> 2.0')
test_fail(lambda: prepare_output_dir({**cfg, 'data_files': 300}), contains='data_files: 256 -> 300')
ckpt(40, {**cfg, 'lr': 2.})  # a checkpoint of another run beside this config.json: refused, not resumed
test_fail(lambda: prepare_output_dir(cfg), contains='(in step-00000040.pt)')


# %% [markdown]
# ## The loop
#
# `train` is the whole run. Its body follows the seven steps of the introduction; the comments number them.
# Three details deserve a word.
#
# **Gradient accumulation** splits a step's batch into `grad_accum` micro-batches. The target is updated by the
# *first* micro-batch of a step, before its target forward, so every micro-batch of the step sees the same target:
# the step equals one large batch (up to BN's per-batch statistics). The gradients of the first `grad_accum - 1`
# micro-batches stay local (`accelerator.no_sync`); the last one triggers DDP's all-reduce.
#
# **A non-finite loss** is checked after the loss of every rank is gathered, before the optimiser steps: all ranks
# stop at the same step with a `NonFiniteLossError` naming the step and the last good checkpoint, and the weights of
# that checkpoint were never touched by the bad step.
#
# **The momentum horizon** $K$ is the reference's: `momentum_horizon` (the PixPro chapter) divides the number of
# images by the global batch and multiplies by the epochs before rounding down, 125,113 for the paper's ImageNet run,
# while the learning rate's schedule, like the reference's scheduler, counts whole epochs of (drop-last) steps,
# 125,100. The target's momentum therefore ends a hair below 1, exactly as in the reference.
#
# **Resume** continues at the checkpoint's step, in the middle of an epoch if that is where it was saved: the
# sampler skips the batches already seen, which is exact because the order and every augmentation derive from
# `(seed, epoch, index)` alone (the data chapter). The metrics files are rewritten from the checkpoint's metrics, so
# the steps a killed run did after its last checkpoint do not appear twice.

# %%
#| exports
class NonFiniteLossError(RuntimeError):
    "The loss became NaN or infinite; the message names the step and the last good checkpoint."


# %%
#| exports
class TrainResult(NamedTuple):
    "What `train` returns."
    output_dir: Path  # the run's folder
    checkpoint: Path|None  # the final checkpoint
    metrics: list[dict]  # one row per optimiser step
    model: PixPro  # the trained model (online and target networks), on the training device
    config: dict  # the resolved config


# %%
test_eq(TrainResult._fields, ('output_dir', 'checkpoint', 'metrics', 'model', 'config'))  # the order callers unpack

# %%
#| exports
METRIC_COLUMNS = ('step', 'epoch', 'loss', 'pixel', 'instance', 'lr', 'momentum', 'images_per_s', 'data_s', 'time_s')

def _write_metrics(out:Path, metrics:list[dict], columns:tuple=METRIC_COLUMNS):
    "metrics.jsonl and metrics.csv (of `columns`) from the full list, atomically."
    atomic_write(out/'metrics.jsonl', lambda t: Path(t).write_text(''.join(json.dumps(m) + '\n' for m in metrics)))
    def csv_(t):
        with open(t, 'w', newline='') as f:
            w = csv.DictWriter(f, columns, extrasaction='ignore'); w.writeheader(); w.writerows(metrics)
    atomic_write(out/'metrics.csv', csv_)


# %%
wm = Path(tempfile.mkdtemp())
_write_metrics(wm, [{'step': 1, 'loss': 0.5, 'extra': [1, 2]}, {'step': 2, 'loss': 0.25, 'extra': [3]}])
test_eq([json.loads(l)['extra'] for l in (wm/'metrics.jsonl').read_text().splitlines()], [[1, 2], [3]])  # every key
rows = list(csv.DictReader((wm/'metrics.csv').read_text().splitlines()))
test_eq((list(rows[0]), rows[1]['loss']), (list(METRIC_COLUMNS), '0.25'))  # only the columns


# %%
#| exports
def build_dataset(c:dict):
    "The training images of a resolved config: `SyntheticScenes` or an `ImageFiles` folder."
    return SyntheticScenes(c['synthetic_length'], c['synthetic_size']) if c['data'] == 'synthetic' else ImageFiles(c['data'])


# %%
ds = build_dataset({'data': 'synthetic', 'synthetic_length': 5, 'synthetic_size': 32})
test_eq((type(ds), len(ds)), (SyntheticScenes, 5))
test_eq(build_dataset({'data': str(imgs)}).files, ImageFiles(imgs).files)


# %%
#| exports
def build_model(c:dict,
                total_steps:int,  # K, the momentum schedule's horizon (`momentum_horizon`)
               ) -> PixPro:
    "The PixPro model of a resolved config, initialised from its seed (the same on every process)."
    torch.manual_seed(c['seed'])
    zero_gamma = {'zero_init_residual': True} if c['arch'] == 'resnet50' else {}  # as the reference's ResNet-50
    return PixPro(create_model(c['arch'], num_classes=0, **zero_gamma), method=c['method'], threshold=c['threshold'],
                  gamma=c['gamma'], ppm_layers=c['ppm_layers'], instance_weight=c['instance_weight'],
                  momentum=c['momentum'], tau=c['tau'], total_steps=total_steps)


# %% [markdown]
# > **Ours, as the reference.** The reference's ResNet starts the last BN of every residual branch at $\gamma = 0$
# > (`contrast/resnet.py` in zdaxie/PixPro, `ResNet.__init__`, the loop after the comment "zero gamma for batch
# > norm"), so each block starts as the identity. torchvision's `resnet50` starts them at 1 unless asked with
# > `zero_init_residual=True`, which `build_model` does: PixPro's ResNet-50 starts as the reference's, online and
# > target alike. The ResNet-RS family starts at 0 by its own definition (the ResNet-RS chapter).

# %%
r50 = build_model(resolve_config(recipe='pixpro_r50_100ep'), 10)
bn3 = [m.bn3.weight for m in r50.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
test_eq(len(bn3), 2 * 16)  # 16 blocks in the online encoder, 16 in the target
assert all((w == 0).all() for w in bn3)
assert all((m.bn2.weight == 1).all() for m in r50.modules() if isinstance(m, torchvision.models.resnet.Bottleneck))
test_eq(build_model(resolve_config(arch='resnetrs_tiny', method='pixcontrast', tau=0.2), 10).tau, 0.2)


# %% [markdown]
# `speed_up` holds the two switches that change how fast a step runs but not what it computes (beyond rounding):
# `channels_last` stores weights and views as NHWC, the layout GPU convolution kernels prefer, and `compile` hands
# each network to `torch.compile`. Compilation happens in place (`nn.Module.compile`, or the backbone's
# `forward_features`, the method PixPro calls), so parameter names, checkpoints and DDP stay as they were. The third
# switch, `gpu_augment`, is in `train` below: it swaps the loader for the GPU augmentation chapter's crop loader
# (a forward reference: that chapter comes later in the book). Their effects are measured in the performance
# chapter; the tests check that they leave the numbers alone.

# %%
#| exports
def speed_up(model:PixPro,  # on its training device
             channels_last:bool=False,  # NHWC weights (the views must be NHWC too: `to_memory_format`)
             compile:bool=False,  # torch.compile each network, in place
            ) -> PixPro:
    "Switch a PixPro model to channels_last and/or compile its networks in place; names and state dict are unchanged."
    if channels_last: model.to(memory_format=torch.channels_last)
    if compile:  # in place: no `_orig_mod.` prefix in the state dict, DDP wraps the modules as before
        for m in [model.encoder, model.projector if model.method != 'instance' else None, model.ppm,
                  getattr(model, 'instance_projector', None), getattr(model, 'predictor', None), *model.target.values()]:
            if m is None: continue
            if hasattr(m, 'forward_features'): m.forward_features = torch.compile(m.forward_features)  # what PixPro calls
            else: m.compile()
    return model


# %%
cfg = resolve_config(arch='resnetrs_tiny', image_size=64, batch_size=4)
plain, fast = build_model(cfg, 10), speed_up(build_model(cfg, 10), channels_last=True)
test_eq(list(fast.state_dict()), list(plain.state_dict()))
assert fast.encoder.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)


# %%
#| exports
def to_memory_format(x:Tensor, channels_last:bool) -> Tensor:
    "A batch of views in the memory format of the model (`channels_last` or contiguous NCHW)."
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# %%
g = torch.Generator().manual_seed(0)
x1, x2 = torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)
k1, k2 = torch.tensor([[0., 0., .6, .6]] * 4), torch.tensor([[.2, .2, .9, .9]] * 4)
assert to_memory_format(x1, True).is_contiguous(memory_format=torch.channels_last)
test_close(fast(to_memory_format(x1, True), to_memory_format(x2, True), k1, k2).loss, plain(x1, x2, k1, k2).loss, eps=1e-4)

# %%
#| slow
compiled = speed_up(build_model(cfg, 10), compile=True)  # compiling takes a minute or two on a CPU
test_eq(list(compiled.state_dict()), list(plain.state_dict()))
test_close(compiled(x1, x2, k1, k2).loss, build_model(cfg, 10)(x1, x2, k1, k2).loss, eps=1e-4)


# %%
#| exports
def _make_accelerator(c:dict):
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=c['mixed_precision'],
                       log_with='tensorboard' if is_tensorboard_available() else None, project_dir=c['output_dir'])


# %%
accel = _make_accelerator(resolve_config(output_dir=str(Path(tempfile.mkdtemp())/'acc')))
test_eq((accel.num_processes, accel.mixed_precision, accel.device.type), (1, 'no', 'cuda' if torch.cuda.is_available() else 'cpu'))

# %% [markdown]
# **The run's guard.** `RunGuard` holds rule 1 and rule 5 of the run folder for the run's whole life. On entering,
# the main process takes the folder's lock (the others learn its answer, so every process fails alike) and SIGTERM
# gets a handler. While the run is setting up, SIGTERM stops it at once (nothing has been trained that a checkpoint
# could keep); during the loop it only raises a flag that the loop reads at the end of the step; after the loop it is
# ignored, since the run is finishing anyway. A batch system's SIGTERM also reaches the DataLoader workers: during the
# loop they ignore it (`hold_worker_sigterm`, the data chapter) and their parent ends them after saving.

# %%
#| exports
EXIT_PREEMPTED = 143  # the command line's exit code after SIGTERM: 128 + 15, as a shell reports a SIGTERM

class Preempted(RuntimeError):
    "SIGTERM stopped the run; the message names the checkpoint saved at the current step (the same command resumes)."


# %%
test_eq(EXIT_PREEMPTED, 128 + signal.SIGTERM)


# %%
#| exports
class RunGuard:
    "For a run's whole life: the main process holds `RunLock(output_dir)`; SIGTERM becomes a request to stop."
    def __init__(self, output_dir:str|Path, accelerator):
        self.out, self.accelerator, self.lock, self.previous = Path(output_dir), accelerator, None, None
        self.phase, self.requested = 'setup', False  # 'setup' -> 'loop' -> 'finish'

    def __enter__(self):
        error = None
        if self.accelerator.is_main_process:
            try: self.lock = RunLock(self.out).acquire()
            except ConfigError as e: error = (e.name, e.value, e.allowed)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            error = broadcast_object_list([error])[0]
        if error: raise ConfigError(*error)
        self.pid = os.getpid()
        if threading.current_thread() is threading.main_thread():  # Python lets only the main thread set handlers
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame):
        if os.getpid() != self.pid or self.phase == 'finish': return  # a forked worker, or a run about to end anyway
        self.requested = True
        if self.phase == 'setup': raise Preempted('stopped by SIGTERM while starting; this start wrote no checkpoint')

    def __exit__(self, kind, exc, tb):
        hold_worker_sigterm(False)  # DataLoader workers die on SIGTERM again (see the data chapter)
        if self.previous is not None: signal.signal(signal.SIGTERM, self.previous)
        if self.lock is not None: self.lock.release()
        loop, self.loop = getattr(self, 'loop', None), None  # no reference cycle keeps the loop's workers alive
        if kind is KeyboardInterrupt and not str(exc):  # Ctrl-C: say where the run stopped and what is on disk
            where = f'in step {loop.step + 1}' if loop and self.phase != 'setup' else 'while starting'
            saved = loop.checkpoint if loop else None
            raise KeyboardInterrupt(f'{where}; ' + (f'the newest checkpoint is {saved}' if saved else 'no checkpoint was written')) from None


# %% [markdown]
# A second guard on a locked folder is refused with the holder's pid; during the loop SIGTERM only raises the flag,
# while setting up it stops the run; leaving the guard frees the folder.

# %%
class _Single: is_main_process, num_processes = True, 1  # what RunGuard asks of an Accelerator
d, before = Path(tempfile.mkdtemp())/'guarded', signal.getsignal(signal.SIGTERM)
with RunGuard(d, _Single()) as guard:
    test_fail(lambda: RunGuard(d, _Single()).__enter__(), contains=f'locked by pid {os.getpid()}')
    if guard.previous is not None:  # handlers can be set (the main thread)
        guard.phase = 'loop'; os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)
        test_eq(guard.requested, True)
        guard.phase = 'setup'
        test_fail(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(1)), contains='stopped by SIGTERM while starting')
        guard.phase = 'loop'
with RunGuard(d, _Single()): pass  # free again
test_eq(signal.getsignal(signal.SIGTERM), before)  # the previous handler is back
assert not d.exists()  # the lock made the folder and took it away again


# %% [markdown]
# ## One skeleton for every engine
#
# Pretraining and fine-tuning (a later chapter) differ in their data, model, loss and optimiser, and in nothing else:
# both resolve a config, guard the folder, count the steps, resume, write checkpoints, gather the losses, log and
# export. Those shared steps live here as small named units, so that each engine reads as the seven steps and no
# step is written twice. The loop nests the micro-batches of gradient accumulation inside the optimiser steps, as
# nanoGPT's `train.py` does:
#
# ```python
# for step in loop:                                   # optimiser steps, from the resume point; stops on SIGTERM
#     for micro, batch in loop.micro_batches():       # grad_accum micro-batches, resuming mid-epoch
#         with loop.accumulate(wrapped, micro): ...   # no gradient all-reduce but on the last one
#     values = loop.gather(parts)                     # every process's losses (+ stop request); NaN check
#     optimizer.step(); loop.log(...)                 # count the step, one metrics row
#     if loop.save_due: loop.save(model=..., ...)     # epoch ends, the end, SIGTERM
# ```
#
# `plan_steps` counts the optimiser steps and gives the lr schedule's arguments; `restore` loads a checkpoint's parts;
# `open_output_dir` carries out the folder's plan once every process has read it; `announce` prints the run's one
# line; `export_weights` writes the weights for transfer.

# %%
#| exports
def plan_steps(c:dict,  # resolved config
               loader,  # this process's loader of micro-batches
               num_images:int,  # images in the training set (for the message)
               world_size:int,  # processes
              ) -> tuple[int, int, dict]:  # steps per epoch, total steps, `lr_at`'s keyword arguments
    "Optimiser steps per epoch and in all, and the lr schedule; `ConfigError` if the data make less than one step."
    steps_per_epoch = len(loader) // c['grad_accum']
    if steps_per_epoch == 0:
        raise ConfigError('batch_size', c['batch_size'], f'small enough for one step: {num_images} images for '
                          f'{c["global_batch"]} per step (batch_size x grad_accum x {world_size} processes)')
    total = c['epochs'] * steps_per_epoch
    return steps_per_epoch, total, dict(base_lr=c['global_lr'], total_steps=total, final_lr=c['final_lr'],
                                        warmup_steps=c['warmup_epochs'] * steps_per_epoch, start_factor=c['warmup_start_factor'])


# %%
class _Tiny: grad_accum, batch_size, global_batch, epochs, global_lr, final_lr, warmup_epochs, warmup_start_factor = 2, 4, 8, 3, 0.5, 0., 1, 0.01
c_ = {k: getattr(_Tiny, k) for k in dir(_Tiny) if not k.startswith('_')}
test_eq(plan_steps(c_, range(9), 36, 1)[:2], (4, 12))  # 9 micro-batches: 4 steps of 2, the ninth left out
test_eq(plan_steps(c_, range(9), 36, 1)[2]['warmup_steps'], 4)
test_fail(lambda: plan_steps(c_, range(1), 4, 1), contains='4 images for 8 per step')


# %%
#| exports
def restore(plan:RunPlan, accelerator, **parts) -> tuple[int, list[dict]]:  # the step reached and its metrics
    "Load the plan's checkpoint into `parts` (model=..., optimizer=...), with the RNG and loss-scaler states."
    state, plan.state = plan.state, None  # the weights live in the parts from now on, not twice in memory
    if state is None: return 0, []
    for k, obj in parts.items(): obj.load_state_dict(state[k])
    set_rng_state(state['rng'])
    if state.get('scaler') and accelerator.scaler is not None: accelerator.scaler.load_state_dict(state['scaler'])
    return state['step'], [m for m in state['metrics'] if m['step'] <= state['step']]


# %%
lin = nn.Linear(2, 2); plan = RunPlan(None, {'step': 3, 'metrics': [{'step': 3}, {'step': 4}], 'rng': rng_state(),
                                             'lin': nn.Linear(2, 2).state_dict()}, False)
test_eq(restore(plan, _Single(), lin=lin), (3, [{'step': 3}]))  # rows after the checkpoint's step are dropped
test_eq(plan.state, None)


# %%
#| exports
def open_output_dir(c:dict, plan:RunPlan, accelerator, metrics:list[dict],
                    files:tuple,  # what a fresh start clears (`start_output_dir`)
                    columns:tuple,  # the metrics.csv columns
                   ):
    "Once every process has read the folder, the main process carries out `plan` and rewrites the metrics files."
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        start_output_dir(c, plan, files); _write_metrics(Path(c['output_dir']), metrics, columns)


# %%
class _Main(_Single):  # a one-process Accelerator on the CPU
    device = torch.device('cpu')
    def wait_for_everyone(self): pass
od = Path(tempfile.mkdtemp())/'run'
open_output_dir({'output_dir': str(od)}, RunPlan(None, None, True), _Main(), [{'step': 1, 'loss': 0.5}], ('metrics.csv',), ('step', 'loss'))
test_eq(sorted(p.name for p in od.iterdir()), ['config.json', 'metrics.csv', 'metrics.jsonl'])
test_eq((od/'metrics.csv').read_text().splitlines(), ['step,loss', '1,0.5'])


# %%
#| exports
def announce(head:str, c:dict, accelerator, total_steps:int, step:int, resumed:Path|None,
             per:int=256,  # the batch size `c['lr']` is given for (`scaled_lr`'s reference batch)
            ):
    "The run's one line on the main process: processes, global batch, lr, steps, and where it resumes."
    if not accelerator.is_main_process: return
    n = accelerator.num_processes
    print(f"{head}: {n} process(es) on {accelerator.device.type}, global batch {c['global_batch']} = {c['batch_size']} x "
          f"{c['grad_accum']} x {n}, lr {c['lr']:g} per {per} -> {c['global_lr']:g}, {total_steps} steps"
          + (f', resuming at step {step} from {resumed}' if resumed else ''), flush=True)


# %%
class _Other: is_main_process, num_processes = False, 2  # a process other than the main one
said, said_elsewhere = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(said): announce('resnet50 pixpro on synthetic', resolve_config(grad_accum=2), _Main(), 100, 40, Path('c.pt'))
with contextlib.redirect_stdout(said_elsewhere): announce('x', resolve_config(), _Other(), 100, 0, None)
test_eq(said.getvalue(), 'resnet50 pixpro on synthetic: 1 process(es) on cpu, global batch 32 = 16 x 2 x 1, '
                         'lr 16 per 256 -> 2, 100 steps, resuming at step 40 from c.pt\n')
test_eq(said_elsewhere.getvalue(), '')
said = io.StringIO()
with contextlib.redirect_stdout(said): announce('fcn', dict(resolve_config(), lr=0.01, global_lr=0.01), _Main(), 9, 0, None, per=16)
assert 'lr 0.01 per 16 -> 0.01, 9 steps' in said.getvalue()  # a recipe whose lr is given for another batch says so


# %%
#| exports
def export_weights(path:Path, module:nn.Module, metadata:dict, accelerator) -> Path|None:
    "`module`'s weights as safetensors (timm's names) with `metadata`, atomically, on the main process."
    if not accelerator.is_main_process: return None
    from safetensors.torch import save_file
    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return atomic_write(path, lambda t: save_file(sd, str(t), metadata={k: str(v) for k, v in metadata.items()}))


# %%
lin2 = nn.Linear(2, 3)
sf = export_weights(Path(tempfile.mkdtemp())/'w.safetensors', lin2, {'arch': 'linear', 'epochs': 2}, _Main())
with safe_open(str(sf), 'pt') as fh: test_eq((sorted(fh.keys()), fh.metadata()), (['bias', 'weight'], {'arch': 'linear', 'epochs': '2'}))
test_eq(load_file(str(sf))['weight'], lin2.weight.detach())
test_eq(export_weights(sf, lin2, {}, _Other()), None)  # other processes write nothing


# %%
#| exports
def to_device(model:nn.Module, accelerator) -> nn.Module:
    "SyncBN when the processes are GPUs (CPU tensors cannot use it), then the model on the process's device."
    if accelerator.num_processes > 1 and accelerator.device.type == 'cuda': model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(accelerator.device)


# %%
bn = nn.Sequential(nn.BatchNorm2d(2))
test_eq(type(to_device(bn, _Main())[0]), nn.BatchNorm2d)
class _TwoCpus(_Main): num_processes = 2
test_eq(type(to_device(bn, _TwoCpus())[0]), nn.BatchNorm2d)  # SyncBN only across GPUs


# %% [markdown]
# `Loop` is the loop's state and its shared steps: the position (resumable in the middle of an epoch: the sampler
# skips the micro-batches already seen), the timing of each step and of its waits for data, the gathering of every
# process's losses with the stop request, the non-finite check, the metrics row (to `metrics.jsonl`, TensorBoard and
# the progress bar), and the checkpoints with their pruning. It also tells the guard where the run is, so Ctrl-C can
# name the newest checkpoint.

# %%
#| exports
class Loop:
    "The optimiser steps of a run, shared by the engines: position, micro-batches, timing, stop and NaN checks, metrics, checkpoints."
    def __init__(self, c:dict, accelerator, guard:RunGuard,
                 loader,  # micro-batches, with `set_epoch(epoch, skip=...)`
                 steps_per_epoch:int, total_steps:int,
                 step:int=0, metrics:list|None=None,  # where a resumed run stands (`restore`)
                 resumed:Path|None=None,  # the checkpoint it resumed from
                 format:str=CHECKPOINT_FORMAT,  # the checkpoints' format tag
                 columns:tuple=METRIC_COLUMNS,  # metrics.csv's columns
                ):
        self.c, self.accelerator, self.guard, self.loader, self.format, self.columns = c, accelerator, guard, loader, format, columns
        self.steps_per_epoch, self.step, self.metrics = steps_per_epoch, step, metrics if metrics is not None else []
        self.end, self.out = min(total_steps, c['max_steps'] or total_steps), Path(c['output_dir'])
        self.checkpoint, self.saved, self.stop, self._batches = resumed, (step if resumed else None), False, None
        self.bar = tqdm(total=self.end, initial=step, disable=not (accelerator.is_main_process and c['progress']),
                        dynamic_ncols=True, mininterval=2 if sys.stderr.isatty() else 30)  # notebooks, logs: every 30 s
        guard.loop = self

    def __iter__(self):
        "The steps still to run (numbered from 0); after SIGTERM, `Preempted` once the step's checkpoint is saved."
        self.guard.phase, self.t_start = 'loop', time.perf_counter()
        hold_worker_sigterm(True)  # a SIGTERM to the whole job leaves the workers to finish the step
        while self.step < self.end and not self.stop:
            self.t_step, self.data_s = time.perf_counter(), 0.0
            yield self.step
        hold_worker_sigterm(False); self._batches = None; self.bar.close()
        if self.stop and self.step < self.end:
            raise Preempted(f'stopped by SIGTERM after step {self.step}, saved in {self.checkpoint}; run the same command to resume')
        self.guard.phase = 'finish'


# %%
guard_ = type('Guard', (), {'requested': False, 'phase': 'setup'})()
lp = Loop(resolve_config(output_dir=str(Path(tempfile.mkdtemp())), max_steps=5, progress=False), _Main(), guard_, [], 4, 12)
test_eq((lp.end, lp.step, lp.checkpoint), (5, 0, None)); assert guard_.loop is lp
yielded = []
for s in lp: yielded.append(s); lp.step += 1  # what `log` does
test_eq((yielded, guard_.phase), ([0, 1, 2, 3, 4], 'finish'))


# %%
#| exports
def _micro_batches(self:Loop):
    "This step's `grad_accum` micro-batches as (index, batch); a new epoch, or a resume, positions the sampler."
    epoch, skip = divmod(self.step, self.steps_per_epoch)
    if self._batches is None or skip == 0:
        self._batches = None  # the previous epoch's iterator ends first
        self.loader.set_epoch(epoch, skip=skip * self.c['grad_accum'])  # the loader counts micro-batches
        self._batches = iter(self.loader)
    self.epoch, t0 = epoch, time.perf_counter()
    for micro in range(self.c['grad_accum']):
        batch = next(self._batches)
        self.data_s += time.perf_counter() - t0
        yield micro, batch
        t0 = time.perf_counter()

def _accumulate(self:Loop, wrapped:nn.Module, micro:int):
    "DDP's `no_sync` for every micro-batch but the step's last, whose backward all-reduces the gradients."
    return self.accelerator.no_sync(wrapped) if micro < self.c['grad_accum'] - 1 else nullcontext()

Loop.micro_batches, Loop.accumulate = _micro_batches, _accumulate


# %%
class _Batches(list):  # a loader: set_epoch(epoch, skip) then iteration from the skip
    def set_epoch(self, epoch, skip=0): self.skip = skip
    def __iter__(self): return iter(self[self.skip:])
mb = Loop.__new__(Loop)
mb.step, mb.steps_per_epoch, mb.c, mb._batches, mb.data_s, mb.loader = 4, 3, {'grad_accum': 2}, None, 0., _Batches(range(6))
test_eq(list(mb.micro_batches()), [(0, 2), (1, 3)])  # epoch 1 after its first step of 2 micro-batches
mb.step = 5; test_eq(list(mb.micro_batches()), [(0, 4), (1, 5)])  # the same epoch goes on
mb.accelerator = type('A', (), {'no_sync': lambda self, m: 'no_sync'})()
test_eq(mb.accumulate(None, 0), 'no_sync'); assert isinstance(mb.accumulate(None, 1), nullcontext)


# %%
#| exports
def _gather(self:Loop, parts:Tensor) -> list[float]:
    "Every process's loss `parts` [P] and stop request; `NonFiniteLossError` on a non-finite loss; the means."
    ranks = self.accelerator.gather(torch.cat([parts.float(), parts.new_tensor([float(self.guard.requested)])])[None])
    self.loss_per_process = ranks[:, 0].tolist()  # ranks: [processes, P + 1]
    if not torch.isfinite(ranks).all():
        raise NonFiniteLossError(f'non-finite loss in step {self.step + 1} (epoch {self.epoch}), per process '
                                 f'{self.loss_per_process}; the last good checkpoint is {self.checkpoint or "none (no checkpoint yet)"}. '
                                 'A run resumes only with its own config: start a new run (another output_dir) with a '
                                 'lower lr or mixed_precision="no", or check the data.')
    *means, stop = ranks.mean(0).tolist()
    self.stop = stop > 0  # some process was sent SIGTERM: every process stops after this step
    return means

Loop.gather = _gather


# %%
class _Gather:  # one process: gather returns its input
    def gather(self, x): return x
loop = Loop.__new__(Loop)
loop.accelerator, loop.step, loop.epoch, loop.checkpoint = _Gather(), 6, 1, None
loop.guard = type('G', (), {'requested': False})()
test_eq(loop.gather(torch.tensor([0.5, 0.25])), [0.5, 0.25]); assert not loop.stop
loop.guard.requested = True
loop.gather(torch.tensor([0.5, 0.25])); assert loop.stop  # a SIGTERM anywhere stops every process after the step
test_fail(lambda: loop.gather(torch.tensor([float('nan'), 0.])), contains='non-finite loss in step 7 (epoch 1)')


# %%
#| exports
def _log(self:Loop, **values) -> dict:
    "Count the step and record its row: `values`, images/s, data wait and time, to the files, trackers and bar."
    self.step += 1
    row = dict(step=self.step, epoch=self.step / self.steps_per_epoch, **values,
               images_per_s=self.c['global_batch'] / (time.perf_counter() - self.t_step), data_s=self.data_s,
               time_s=time.perf_counter() - self.t_start, loss_per_process=self.loss_per_process)
    self.metrics.append(row)
    if self.accelerator.is_main_process:
        with open(self.out/'metrics.jsonl', 'a') as f: f.write(json.dumps(row) + '\n')
        self.accelerator.log({k: row[k] for k in (*values, 'images_per_s')}, step=self.step)
        self.bar.set_postfix({k: f'{v:.4g}' for k, v in (*values.items(), ('img_s', row['images_per_s']))}, refresh=False)
        self.bar.update()
    return row

Loop.log = _log

# %%
lg = Loop.__new__(Loop)
lg.step, lg.steps_per_epoch, lg.c, lg.accelerator, lg.metrics = 2, 4, {'global_batch': 8}, _Other(), []
lg.t_step = lg.t_start = time.perf_counter(); lg.data_s, lg.loss_per_process = 0.1, [0.5]
row = lg.log(loss=0.5)
test_eq((row['step'], row['epoch'], row['loss'], row['data_s'], lg.metrics), (3, 0.75, 0.5, 0.1, [row]))
assert row['images_per_s'] > 0


# %%
#| exports
def _evaluation_due(self:Loop) -> bool:
    "The run's last step, or the end of every `save_every`-th epoch: a checkpoint (and, fine-tuning, an evaluation)."
    epochs, rest = divmod(self.step, self.steps_per_epoch)
    return self.step == self.end or (rest == 0 and epochs % self.c['save_every'] == 0)

def _save_due(self:Loop) -> bool:
    "A checkpoint is due: `evaluation_due`, or a SIGTERM."
    return self.evaluation_due or self.stop

Loop.evaluation_due, Loop.save_due = property(_evaluation_due), property(_save_due)


# %%
def due(step, end=12, steps_per_epoch=4, save_every=2, stop=False):  # a Loop's position, nothing else
    loop = Loop.__new__(Loop)
    loop.step, loop.end, loop.steps_per_epoch, loop.c, loop.stop = step, end, steps_per_epoch, {'save_every': save_every}, stop
    return loop.evaluation_due, loop.save_due
test_eq([s for s in range(1, 13) if due(s)[0]], [8, 12])  # the end of every 2nd epoch, and the last step
test_eq(due(5, stop=True), (False, True))  # after a SIGTERM: a checkpoint, no evaluation


# %%
#| exports
def _save(self:Loop, **parts) -> Path:
    "Checkpoint this step (`parts`' state dicts, config, metrics, RNG) on the main process, prune, and wait for all."
    path = checkpoint_path(self.out, self.step)
    if self.accelerator.is_main_process:
        scaler = self.accelerator.scaler
        save_checkpoint(path, {'format': self.format, 'step': self.step, 'config': self.c, 'metrics': self.metrics,
                               'rng': rng_state(), 'scaler': scaler.state_dict() if scaler is not None else {},
                               **{k: v.state_dict() if hasattr(v, 'state_dict') else v for k, v in parts.items()}})
        _write_metrics(self.out, self.metrics, self.columns)
        prune_checkpoints(self.out, self.c['keep_checkpoints'], path)
    self.accelerator.wait_for_everyone()
    self.checkpoint, self.saved = path, self.step
    return path

Loop.save = _save


# %% [markdown]
# A loop over a list of six micro-batches, two per step, three steps per epoch, resumed at step 4 (the second step of
# epoch 1): it positions the sampler at the epoch's third micro-batch, counts and times the steps, wants a checkpoint
# at the end of the epoch, and stops early with `Preempted` when a SIGTERM was requested, after its checkpoint.

# %%
class _Acc(_Single):
    scaler = None
    def gather(self, x): return x
    def wait_for_everyone(self): pass
    def log(self, *a, **k): pass
d = Path(tempfile.mkdtemp())
cfg = {**resolve_config(output_dir=str(d), grad_accum=2, max_steps=0, progress=False), 'epochs': 2, 'keep_checkpoints': 1}
guard = RunGuard(d, _Acc())
loop = Loop(cfg, _Acc(), guard, _Batches(range(6)), steps_per_epoch=3, total_steps=6, step=4, metrics=[{'step': 4}])
seen = []
for step in loop:
    seen.append((step, [b for _, b in loop.micro_batches()]))
    loss, = loop.gather(torch.tensor([0.5]))
    loop.log(loss=loss)
    if loop.save_due: loop.save(w=torch.ones(1))
test_eq(seen, [(4, [2, 3]), (5, [4, 5])])  # skip = 1 step x 2 micro-batches; then the epoch's last step
test_eq([m['step'] for m in loop.metrics], [4, 5, 6]); test_eq(loop.saved, 6)
test_eq(load_checkpoint(loop.checkpoint)['w'], torch.ones(1))
test_eq(guard.phase, 'finish')
loop = Loop({**cfg, 'epochs': 4}, _Acc(), guard, _Batches(range(6)), 3, 12, step=6)
guard.requested = True  # SIGTERM arrived during step 7
def preempted():
    for step in loop:
        list(loop.micro_batches()); loop.gather(torch.tensor([0.5])); loop.log(loss=0.5)
        if loop.save_due: loop.save()
test_fail(preempted, contains='stopped by SIGTERM after step 7, saved in')
test_eq([checkpoint_step(p) for p in list_checkpoints(d)], [7])
test_fail(lambda: loop.gather(torch.tensor([float('nan')])), contains='non-finite loss in step 8')


# %% [markdown]
# With these steps, `train` reads as the seven steps of the chapter's introduction; the comments number them.

# %%
#| exports
def build_loader(c:dict, dataset, accelerator):
    "This process's loader of view pairs; with `gpu_augment` the workers crop and the device does the pixel work."
    workers, device = c['num_workers'], accelerator.device
    kw = dict(image_size=c['image_size'], num_workers=workers, seed=c['seed'], rank=accelerator.process_index,
              world_size=accelerator.num_processes, labels=False, pin_memory=device.type == 'cuda',
              persistent_workers=workers > 0, prefetch_factor=c['prefetch_factor'] if workers > 0 else None)
    if not c['gpu_augment']: return make_loader(dataset, c['batch_size'], **kw)
    batch_augment = BatchAugment(PixProAugment(c['image_size'])).to(device)  # the same crops and decisions (seeds)
    if c['compile']: batch_augment.compile()
    return ViewLoader(make_crop_loader(dataset, c['batch_size'], **kw), batch_augment, device)


# %%
class _Proc: device, process_index, num_processes = torch.device('cpu'), 0, 1
lc = resolve_config(arch='resnetrs_tiny', image_size=64, batch_size=4, num_workers=0, synthetic_length=8, synthetic_size=64)
for gpu in (False, True):
    ld = build_loader({**lc, 'gpu_augment': gpu}, build_dataset(lc), _Proc())
    ld.set_epoch(0)
    v1, v2, c1, c2 = next(iter(ld))[:4]
    test_eq((len(ld), v1.shape, v2.shape, c1.shape), (2, (4, 3, 64, 64), (4, 3, 64, 64), (4, 4)))


# %%
#| exports
def train(config:TrainConfig|dict|None=None,  # the run's parameters (None: the defaults, the CPU demo)
          **overrides,  # parameters overriding `config`'s, e.g. `train(arch='resnetrs101')`
         ) -> TrainResult:
    "Pretrain with PixPro: config -> accelerator -> data -> model -> optimiser/schedules -> loop -> checkpoints."
    c = resolve_config(config, **overrides)  # 1. config: everything checked before anything is written
    accelerator = _make_accelerator(c)  # 2. accelerator: the device, the processes, the precision
    c, world = resolve_config(config, world_size=accelerator.num_processes, **overrides), accelerator.num_processes
    with RunGuard(c['output_dir'], accelerator) as guard:  # the folder locked for the run's life; SIGTERM stops at a step
        dataset = build_dataset(c); c.update(data_identity(dataset))  # 3. data: this process's shard
        loader = build_loader(c, dataset, accelerator)
        steps_per_epoch, total_steps, schedule = plan_steps(c, loader, len(dataset), world)
        plan = prepare_output_dir(c)  # resume, fresh start or refusal: still nothing written
        horizon = momentum_horizon(len(dataset), world, c['batch_size'] * c['grad_accum'], c['epochs'])
        model = speed_up(to_device(build_model(c, horizon), accelerator), c['channels_last'], c['compile'])  # 4. model
        online = OnlineNet(model)  # what DDP wraps; the target stays outside
        optimizer = LARS(lars_param_groups(online, c['weight_decay']), lr=c['global_lr'],  # 5. optimiser
                         momentum=c['optimizer_momentum'], trust_coefficient=c['trust_coefficient'])
        step, metrics = restore(plan, accelerator, model=model, optimizer=optimizer)
        open_output_dir(c, plan, accelerator, metrics, ('metrics.jsonl', 'metrics.csv', 'encoder.safetensors'), METRIC_COLUMNS)
        online, optimizer = accelerator.prepare(online, optimizer)
        if accelerator.is_main_process:
            accelerator.init_trackers('tensorboard', config={k: v for k, v in c.items() if isinstance(v, (int, float, str, bool))})
        announce(f"{c['arch']} {c['method']} on {c['data']}", c, accelerator, total_steps, step, plan.resume)
        loop = Loop(c, accelerator, guard, loader, steps_per_epoch, total_steps, step, metrics, plan.resume)
        for step in loop:  # 6. the loop: optimiser steps of grad_accum micro-batches each
            set_lr(optimizer, lr := lr_at(step, **schedule))
            parts = torch.zeros(3, device=accelerator.device)  # the step's loss, pixel and instance parts
            for micro, batch in loop.micro_batches():
                v1, v2, c1, c2 = (t.to(accelerator.device, non_blocking=True) for t in batch[:4])
                v1, v2 = (to_memory_format(v, c['channels_last']) for v in (v1, v2))  # [B, 3, S, S] each
                with loop.accumulate(online, micro):
                    with accelerator.autocast():
                        o = model(v1, v2, c1, c2, update_target=micro == 0, online=online)  # the target moves once a step
                    accelerator.backward(o.loss / c['grad_accum'])
                parts += torch.stack([o.loss, o.pixel, o.instance]).detach().float() / c['grad_accum']
                if micro == 0: m = o.momentum
            loss, pixel, instance = loop.gather(parts)
            optimizer.step(); optimizer.zero_grad(set_to_none=True)
            loop.log(loss=loss, pixel=pixel, instance=instance, lr=lr, momentum=m)
            if loop.save_due: loop.save(model=model, optimizer=optimizer)
        if loop.saved != loop.step: loop.save(model=model, optimizer=optimizer)  # 7. the end: the final checkpoint
        export_weights(loop.out/'encoder.safetensors', model.encoder, {'arch': c['arch']}, accelerator)  # for transfer
        del online, optimizer, loader  # drop every reference to DDP/gloo objects before the process group ends
        accelerator.end_training()
    return TrainResult(loop.out, loop.checkpoint, loop.metrics, model, c)


# %% [markdown]
# ### A tiny run
#
# The smallest backbone of the family (`resnetrs_tiny`), 64-pixel views (a 2x2 C5 map), 32 synthetic scenes in
# batches of 4: 8 steps per epoch, two epochs, a few seconds on a CPU. The metrics record, for every step, the lr
# that `lr_at` gives and the momentum that `momentum_at` gives; the checkpoints and the encoder's weights are on
# disk.

# %%
tiny = TrainConfig(arch='resnetrs_tiny', image_size=64, batch_size=4, epochs=2, synthetic_length=32, synthetic_size=64,
                   num_workers=0, progress=False)
tmp = Path(tempfile.mkdtemp())
r = train(tiny, output_dir=str(tmp/'a'))
test_eq(len(r.metrics), 16)
sched = dict(base_lr=16 * 4 / 256, total_steps=16, warmup_steps=8, start_factor=0.01, final_lr=1e-6)
test_close([m['lr'] for m in r.metrics], [lr_at(k, **sched) for k in range(16)], eps=1e-12)
test_close([m['momentum'] for m in r.metrics], [momentum_at(k, 16, 0.99) for k in range(16)], eps=1e-12)
assert all(math.isfinite(m['loss']) and -4 <= m['loss'] <= 4 for m in r.metrics)
test_eq([p.name for p in list_checkpoints(r.output_dir)], ['step-00000016.pt'])  # the newest only (keep_checkpoints=1)
test_eq(int(r.model.step), 16)
test_eq(sorted(p.name for p in r.output_dir.iterdir()), ['checkpoints', 'config.json', 'encoder.safetensors', 'metrics.csv',
        'metrics.jsonl'] + (['tensorboard'] if is_tensorboard_available() else []))  # TensorBoard logs when it is installed
test_eq(len((r.output_dir/'metrics.jsonl').read_text().splitlines()), 16)
backbone = create_model('resnetrs_tiny', num_classes=0)
load_pretrained(backbone, r.output_dir/'encoder.safetensors')
for k, v in backbone.state_dict().items(): test_eq(v, r.model.encoder.state_dict()[k].cpu())

# %% [markdown]
# Figure 1 draws the tiny run's metrics rows: the loss of each step, and the two schedules the loop applies, the
# learning rate (linear warm-up over the first epoch from 1 % of its peak, then cosine to 1e-6) and the target's
# momentum (cosine from 0.99 to 1 over the horizon $K = 16$).

# %%
steps = [m['step'] for m in r.metrics]
fig, axs = plt.subplots(1, 3, figsize=(11, 2.8))
for ax, key in zip(axs, ('loss', 'lr', 'momentum')):
    ax.plot(steps, [m[key] for m in r.metrics], marker='.'); ax.set(xlabel='step', title=key); ax.grid(alpha=.3)
fig.suptitle('Figure 1: a tiny run (resnetrs_tiny, 2 epochs of 8 steps): loss, learning rate, target momentum')
fig.tight_layout()

# %% [markdown]
# ### Resume is exact
#
# A run stopped after 5 steps (in the middle of epoch 0, by `max_steps`) and started again in the same folder
# continues from its checkpoint: the losses of every step and the final weights, online and target, equal those of
# the uninterrupted run above, bit for bit; so does a run resumed from a checkpoint file given by `resume`. (The test
# in `tests/test_train.py` does the same with a process killed by SIGKILL.)

# %%
part = train(tiny, output_dir=str(tmp/'b'), max_steps=5)
test_eq(len(part.metrics), 5); test_eq([p.name for p in list_checkpoints(part.output_dir)], ['step-00000005.pt'])
rest = train(tiny, output_dir=str(tmp/'b'))
test_eq([m['loss'] for m in rest.metrics], [m['loss'] for m in r.metrics])
for (k, a), b in zip(r.model.state_dict().items(), rest.model.state_dict().values()): test_eq(a, b)
again = train(tiny, output_dir=str(tmp/'b'))  # already complete: nothing to do
test_eq(len(again.metrics), 16); test_eq(again.checkpoint, rest.checkpoint)
mine = tmp/'my-weights.pt'  # resume from an explicit file, under any name, into another folder
shutil.copy(train(tiny, output_dir=str(tmp/'b3'), max_steps=5).checkpoint, mine)
elsewhere = train(tiny, output_dir=str(tmp/'b2'), resume=str(mine))
test_eq([m['loss'] for m in elsewhere.metrics], [m['loss'] for m in r.metrics])

# %% [markdown]
# ### Gradient accumulation is one large batch
#
# With `grad_accum=2` one optimiser step sees two micro-batches of 4. The test redoes that step by hand: the first
# micro-batch updates the target, the second does not, each backpropagates half its loss, then one LARS step at the
# global batch's learning rate (8 images: 16 x 8 / 256 = 0.5 x the warm-up's start factor). The weights after the
# step are those of the engine's run.

# %%
acc = train(tiny, output_dir=str(tmp/'accum'), grad_accum=2, max_steps=1)
c = acc.config
test_eq((c['global_batch'], c['global_lr'], len(acc.metrics)), (8, 0.5, 1))
loader = make_loader(build_dataset(c), 4, image_size=64, seed=0, labels=False)
n_steps = len(loader) // 2 * c['epochs']
ref = build_model(c, n_steps)
for i, (v1, v2, c1, c2) in zip(range(2), loader):
    (ref(v1, v2, c1, c2, update_target=i == 0).loss / 2).backward()
lr0 = lr_at(0, base_lr=0.5, total_steps=n_steps, warmup_steps=n_steps // c['epochs'], start_factor=0.01, final_lr=1e-6)
LARS(lars_param_groups(OnlineNet(ref), c['weight_decay']), lr=lr0).step()
test_eq(int(ref.step), 1)
for (k, a), b in zip(ref.named_parameters(), acc.model.parameters()): test_close(a.detach(), b.detach(), eps=1e-6)

# %% [markdown]
# ### The speed switches change rounding, not the run
#
# With `gpu_augment` the workers only crop and flip, and the colour operations run batched on the training device
# (the GPU augmentation chapter). It is on by default when training on CUDA: on an H200 the CPU path left ResNet-50
# data-bound at 1,130 images/s against 2,050 with it (the benchmark chapter); `gpu_augment=False` is the CPU path.
# On a CPU the default is off (both paths run on the same cores there). With `channels_last` the model and views are NHWC. The crops and every random
# decision come from the same per-sample seeds, so a run with both switches sees the same views up to float
# rounding and its losses follow the plain run's. Being speed switches, they may change between a run and its resume.

# %%
fast = train(tiny, output_dir=str(tmp/'fast'), max_steps=4, gpu_augment=True, channels_last=True)
plain = train(tiny, output_dir=str(tmp/'plain'), max_steps=4)
test_close([m['loss'] for m in fast.metrics], [m['loss'] for m in plain.metrics], eps=1e-3)
assert 'gpu_augment' in RUN_ONLY and fast.config['gpu_augment']
test_eq(plain.config['gpu_augment'], torch.cuda.is_available())  # the default: on exactly when training on CUDA
test_eq(len(train(tiny, output_dir=str(tmp/'fast'), max_steps=6).metrics), 6)  # resumed without the switches

# %% [markdown]
# ### A folder holding another run, a NaN
#
# Starting with another learning rate in the folder of run `a` is refused, naming the difference; `overwrite=True`
# starts afresh. A loss that becomes NaN (injected here by wrapping `PixPro.forward`) stops the run at that step, the
# message names the step and the last good checkpoint, and that checkpoint loads with finite weights.

# %%
test_fail(lambda: train(tiny, output_dir=str(tmp/'a'), lr=8.), contains='lr: 16.0 -> 8.0')
test_eq(len(train(tiny, output_dir=str(tmp/'a'), lr=8., max_steps=2, overwrite=True).metrics), 2)
test_eq([p.name for p in list_checkpoints(tmp/'a')], ['step-00000002.pt'])
test_fail(lambda: train(tiny, output_dir=str(tmp/'a'), resume='never'), contains='resume=never')

forward = PixPro.forward
def nan_at_step_11(self, *args, **kw):
    o = forward(self, *args, **kw)
    return o._replace(loss=o.loss * float('nan')) if int(self.step) == 11 else o  # step is already k + 1 here
PixPro.forward = nan_at_step_11
try:
    train(tiny, output_dir=str(tmp/'c'))
    raise AssertionError('the NaN went unnoticed')
except NonFiniteLossError as e:
    print(e); assert 'step 11' in str(e) and 'step-00000008.pt' in str(e)
finally: PixPro.forward = forward
test_eq([p.name for p in list_checkpoints(tmp/'c')], ['step-00000008.pt'])
good = load_checkpoint(tmp/'c'/'checkpoints'/'step-00000008.pt')
assert all(torch.isfinite(v).all() for v in good['model'].values() if v.is_floating_point())
test_eq(good['step'], 8)

# %% [markdown]
# ### Which checkpoints stay
#
# Resumed explicitly from step 8 of a folder that holds steps 8 and 16, a run writes step 12: the pruning keeps it
# (the older rule, by file name, deleted the checkpoint just written), and step 16, the continuation that the resume
# abandoned, is set aside as `step-00000016.pt.superseded`. Then the newest checkpoint is truncated, as a disk error or
# an interrupted copy would leave it: `resume='auto'` warns, naming it, sets it aside as `.unreadable`, resumes from
# step 8, and the run ends with the losses of the uninterrupted run.

# %%
keep = tmp/'keep'
train(tiny, output_dir=str(keep), keep_checkpoints=2)
test_eq([checkpoint_step(p) for p in list_checkpoints(keep)], [8, 16])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    train(tiny, output_dir=str(keep), keep_checkpoints=2, resume=str(checkpoint_path(keep, 8)), max_steps=12)
test_eq([checkpoint_step(p) for p in list_checkpoints(keep)], [8, 12])
assert (keep/'checkpoints'/'step-00000016.pt.superseded').exists() and any('superseded' in str(x.message) for x in w)
p12 = checkpoint_path(keep, 12); p12.write_bytes(p12.read_bytes()[:4096])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    again = train(tiny, output_dir=str(keep), keep_checkpoints=2)
print(next(str(x.message) for x in w if 'does not load' in str(x.message))[:160])
test_eq([m['loss'] for m in again.metrics], [m['loss'] for m in r.metrics])
test_eq(sorted(p.name for p in (keep/'checkpoints').iterdir()),
        ['step-00000008.pt', 'step-00000012.pt.unreadable', 'step-00000016.pt', 'step-00000016.pt.superseded'])

# %% [markdown]
# ## The command line
#
# `python -m pixpro_rs.train`, the console script `pixpro-train`, `accelerate launch -m pixpro_rs.train` and
# `accelerate launch pixpro_rs/train.py` all run `main`. Its flags are the parameters' names (`--arch resnetrs101
# --batch_size 64`), their help is the glossary, and `--config params.yaml` reads a YAML file of the same names
# (flags given on the command line win). Whatever ends a run, it ends with one line on stderr, never a traceback,
# and an exit code a job script can act on:
#
# | exit code | what happened | what to do |
# |---|---|---|
# | 0 | the run is complete (or was already) | |
# | 1 | a non-finite loss (the line names the step and the last good checkpoint), or the system failed: a full disk (named, with the file), an unreadable file | fix the cause; a new run for a NaN |
# | 2 | bad input: a parameter, a file, a folder holding another run or locked by a live one | correct the command |
# | 130 | Ctrl-C; the line names the newest checkpoint, or says there is none | the same command resumes |
# | 143 | SIGTERM (preemption): a checkpoint was saved at the current step | the same command resumes exactly |

# %%
#| exports
_TYPES = {f.name: (bool if f.name in BOOLS else int if f.name in _INTS else
                   float if f.name in ('lr', 'weight_decay', 'momentum', 'threshold', 'gamma', 'instance_weight', 'tau') else str)
          for f in dataclasses.fields(TrainConfig)}

def _flag_bool(s:str) -> bool:
    try: return _bool('flag', s)
    except ConfigError: raise argparse.ArgumentTypeError(f'expected true or false, got {s!r}') from None


# %%
test_eq([_TYPES[k] for k in ('lr', 'epochs', 'progress', 'arch', 'tau')], [float, int, bool, str, float])
test_eq((_flag_bool('yes'), _flag_bool('False')), (True, False))
test_fail(lambda: _flag_bool('maybe'), contains="expected true or false, got 'maybe'")


# %%
#| exports
def config_parser(cls:type,  # the config dataclass: one flag per field
                  prog:str, description:str,
                  types:dict,  # field -> type (bool, int, float or str)
                  glossary:dict=GLOSSARY,  # field -> help text
                  recipe_fields:tuple=RECIPE_FIELDS,  # fields whose default is the recipe's value
                 ) -> argparse.ArgumentParser:
    "A command line parser with one flag per field of `cls` and a `--config PARAMS.yaml`."
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument('--config', metavar='PARAMS.yaml', help='a YAML file of parameters (the same names); flags override it')
    for f in dataclasses.fields(cls):
        t = types[f.name]
        p.add_argument(f'--{f.name}', type=_flag_bool if t is bool else t, default=None, metavar=t.__name__.upper(),
                       help=f'{glossary[f.name]} (default: {"the recipe" if f.name in recipe_fields else f.default})')
    return p


# %%
@dataclass
class _Two:
    lr: float|None = None
    seed: int = 0
two = config_parser(_Two, 'two', 'A test parser.', {'lr': float, 'seed': int}, {'lr': 'the lr', 'seed': 'the seed'}, ('lr',))
test_eq(vars(two.parse_args(['--seed', '3', '--config', 'p.yaml'])), {'config': 'p.yaml', 'lr': None, 'seed': 3})
test_eq(' '.join(two.format_help().split()).count('(default: the recipe)'), 1)  # lr's; seed's is 0


# %%
#| exports
def cli_parser() -> argparse.ArgumentParser:
    "The command line's parser: one flag per `TrainConfig` field, with the glossary as help."
    return config_parser(TrainConfig, 'pixpro-train', 'PixPro pretraining (pixpro_rs). Parameters left out take the '
                         'recipe\'s values; see the training chapter of the docs.', _TYPES)


# %%
help_text = cli_parser().format_help()
for name in PARAMETERS: assert f'--{name}' in help_text, name


# %%
#| exports
def read_params(path:str|Path,
                names:tuple=PARAMETERS,  # the parameters a file may set
               ) -> dict:
    "Parameters from a YAML file of `TrainConfig` names; errors name the file."
    path = Path(path)
    try: params = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e: raise ConfigError('config', str(path), f'a readable YAML file ({e})') from None
    if params is None: return {}
    if not isinstance(params, dict): raise ConfigError('config', str(path), 'a YAML mapping of parameter names to values')
    for k in params: check_choice(f'parameter in {path}', k, names)
    return params


# %%
yp = Path(tempfile.mkdtemp())/'p.yaml'
yp.write_text('arch: resnetrs_tiny\nepochs: 2\n'); test_eq(read_params(yp), {'arch': 'resnetrs_tiny', 'epochs': 2})
yp.write_text(''); test_eq(read_params(yp), {})
yp.write_text('- 1\n'); test_fail(lambda: read_params(yp), contains='a YAML mapping')
yp.write_text('arch: x\n'); test_fail(lambda: read_params(yp, ('seed',)), contains="invalid parameter in " + str(yp))
test_fail(lambda: read_params(yp.with_name('none.yaml')), contains='a readable YAML file')


# %%
#| exports
def run_command(argv:list[str]|None,
                parser:argparse.ArgumentParser,  # from `config_parser`
                run:Callable[[dict], Any],  # runs the job from the parameters
                names:tuple=PARAMETERS,  # the parameters a `--config` file may set
               ) -> int:
    "Parse, run, and turn failures into one clear line and an exit code (see the table above)."
    args = parser.parse_args(argv)
    try:
        params = read_params(args.config, names) if args.config else {}
        params.update({k: v for k, v in vars(args).items() if k != 'config' and v is not None})
        run(params)
    except (ConfigError, CheckpointError) as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr); return 2
    except (NonFiniteLossError, OSError) as e:  # OSError: a full disk, an unreadable file in strict mode...
        print(f'{parser.prog}: stopped: {e}', file=sys.stderr); return 1
    except Preempted as e:
        print(f'{parser.prog}: {e}', file=sys.stderr); return EXIT_PREEMPTED
    except KeyboardInterrupt as e:
        print(f'{parser.prog}: interrupted' + (f' {e}' if str(e) else ''), file=sys.stderr); return 130
    return 0


# %%
def exit_code(error):  # run_command's exit code when the run raises `error`
    def fail(params): raise error
    with contextlib.redirect_stderr(io.StringIO()): return run_command([], cli_parser(), fail)
test_eq([exit_code(e) for e in (ConfigError('lr', 0, 'positive'), CheckpointError('x.pt'), NonFiniteLossError('step 3'),
                                OSError('disk full'), Preempted('saved'), KeyboardInterrupt())], [2, 2, 1, 1, EXIT_PREEMPTED, 130])
got = []
test_eq(run_command(['--lr', '2', '--seed', '1'], cli_parser(), got.append), 0)
test_eq(got, [{'lr': 2.0, 'seed': 1}])


# %%
#| exports
def main(argv:list[str]|None=None) -> int:
    "The command line: parse, train, and turn bad input into one clear line and an exit code."
    return run_command(argv, cli_parser(), lambda params: train(TrainConfig(**params)))

if __name__ == '__main__' and '__file__' in globals(): sys.exit(main())  # a script or `-m`, not a notebook

# %%
print(help_text[:1200])


# %% [markdown]
# Bad input through `main`: exit code 2 and a line that names the parameter (a YAML file's unknown key names the file).

# %%
def run_main(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err): code = main(list(argv))
    return code, err.getvalue()
for argv, word in [(['--arch', 'resnet51'], 'arch'), (['--lr', '0'], 'lr'), (['--threshold', '11'], 'threshold'),
                   (['--data', '/no/such/dir'], 'data'), (['--image_size', '32', '--arch', 'resnetrs_tiny'], 'image_size'),
                   (['--batch_size', '0'], 'batch_size'), (['--recipe', 'nope'], 'recipe')]:
    code, err = run_main(*argv)
    test_eq(code, 2); assert f'invalid {word}=' in err and 'Traceback' not in err, err
yml = tmp/'params.yaml'; yml.write_text('arch: resnetrs_tiny\nlearning_rate: 0.1\n')
code, err = run_main('--config', str(yml)); test_eq(code, 2); assert 'learning_rate' in err and 'params.yaml' in err, err
print(err)
yml.write_text('arch: resnetrs_tiny\nimage_size: 64\nbatch_size: 4\nepochs: 1\nsynthetic_length: 8\nsynthetic_size: 64\nnum_workers: 0\nprogress: false\n')
code, err = run_main('--config', str(yml), '--output_dir', str(tmp/'cli'), '--epochs', '2')
test_eq(code, 0); test_eq(json.loads((tmp/'cli'/'config.json').read_text())['epochs'], 2)
test_eq(len((tmp/'cli'/'metrics.csv').read_text().splitlines()), 1 + 4)

# %% [markdown]
# ## Summary
#
# - `TrainConfig` holds every parameter under the glossary's names; `resolve_config` fills the named recipe's values,
#   derives the global batch and the linearly scaled lr, and rejects a bad value before any work with a
#   `ConfigError` naming the parameter (exit code 2 on the command line).
# - `train(config)` runs config -> Accelerate -> data -> model -> LARS and schedules -> loop -> checkpoints. Only the
#   online half (`OnlineNet`) is wrapped by DDP; SyncBN is used across GPUs only; `grad_accum` micro-batches equal
#   one large batch (the target moves once per step); the losses of all processes are gathered every step.
# - Checkpoints (`checkpoints/step-*.pt`) hold the whole model (the momentum schedule's position included), the
#   optimiser, the config, the metrics and the RNG states; they are written atomically, load with
#   `weights_only=True`, and a run started again continues exactly, also in the middle of an epoch and after SIGKILL
#   (tests/test_train.py). A folder holding a different run (config, checkpoint or images) is refused unless
#   `overwrite=True`.
# - The run folder is locked while its run lives (`RunGuard`, `RunLock`); every check runs before anything is written;
#   pruning never deletes the checkpoint just written; an unreadable newest checkpoint is set aside for the newest
#   that loads; SIGTERM saves a checkpoint at the current step and exits with code 143 (tests/test_run_folder.py).
# - A non-finite loss stops every process at the same step with `NonFiniteLossError`, naming the step and the last
#   good checkpoint, before the optimiser touches the weights.
# - `main` is the command line: `pixpro-train`, `python -m pixpro_rs.train`, `accelerate launch -m pixpro_rs.train`
#   and `accelerate launch pixpro_rs/train.py`, with `--config params.yaml`. The papermill notebook `train.ipynb`
#   has the same parameters.
# - Not tested here, because they need GPUs: SyncBN across GPUs, fp16 loss scaling, and multi-node runs. They are
#   Accelerate's and PyTorch's code paths behind the same switches.

# %% [markdown]
# ## Exercises
#
# 1. Run the tiny configuration with `grad_accum=2` and half the `batch_size`: which metrics change, and which stay
#    equal to the run with the full batch? (Hint: BN's statistics are per micro-batch.)
# 2. Start `pixpro-train` in a folder, send it SIGTERM from another terminal (`kill PID`) in the middle of an epoch,
#    and compare the checkpoint it leaves with `max_steps` set to the same step. Then run the command again.
# 3. Truncate the newest checkpoint of a finished run (`truncate -s 4096 FILE`) and start the run again. What does
#    `resume='auto'` do, what does the folder look like afterwards, and why is the bad file kept?
# 4. `momentum_horizon` rounds down the reference's way. For a 1,000-image folder, 2 processes and a batch of 64 per
#    process, how many steps does an epoch have, what is $K$ for 10 epochs, and what is the momentum at the last step?
