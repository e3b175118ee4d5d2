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
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm.std import tqdm

from pixpro_rs.core import GLOSSARY, ConfigError, atomic_write, check_choice, check_positive, check_range
from pixpro_rs.augment import PixProAugment
from pixpro_rs.data import ImageFiles, SyntheticScenes, make_loader
from pixpro_rs.gpu_augment import BatchAugment, ViewLoader, make_crop_loader
from pixpro_rs.pixpro import METHODS, OnlineNet, PixPro
from pixpro_rs.recipes import LARS, RECIPES, PixProRecipe, get_recipe, lars_param_groups, lr_at, scaled_lr, set_lr
from pixpro_rs.resnet_rs import MODEL_NAMES, CheckpointError, build_meta, create_model

# %%
#| hide
import contextlib
import io
import os
import subprocess
import tempfile
import warnings

import matplotlib.pyplot as plt
from fastcore.test import test_close, test_eq, test_fail
from nbdev.showdoc import show_doc
from pixpro_rs.pixpro import momentum_at
from pixpro_rs.recipes import steps_per_epoch
from pixpro_rs.resnet_rs import load_pretrained
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
#| export
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
    gpu_augment: bool = False  # workers crop and flip; colour, blur, solarize, normalise run batched on the device
    prefetch_factor: int = 2  # batches each DataLoader worker loads ahead

RECIPE_FIELDS = ('arch', 'epochs', 'batch_size', 'image_size', 'lr', 'weight_decay', 'momentum', 'threshold', 'gamma',
                 'ppm_layers', 'instance_weight', 'method')
PARAMETERS = tuple(f.name for f in dataclasses.fields(TrainConfig))

# %% [markdown]
# Every name is in the glossary, and the recipe supplies exactly the fields that are `None` by default:

# %%
test_eq([p for p in PARAMETERS if p not in GLOSSARY], [])
test_eq(tuple(f.name for f in dataclasses.fields(TrainConfig) if f.default is None and f.name != 'output_dir'), RECIPE_FIELDS)
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
#| export
_INTS = {'epochs': 1, 'batch_size': 1, 'image_size': 1, 'ppm_layers': 0, 'seed': 0, 'num_workers': 0,
         'max_steps': 0, 'save_every': 1, 'grad_accum': 1, 'synthetic_length': 1, 'synthetic_size': 32,
         'keep_checkpoints': 1, 'prefetch_factor': 1}  # integer parameters and their least value
BOOLS = ('overwrite', 'progress', 'channels_last', 'compile', 'gpu_augment')  # boolean parameters

def _int(name:str, value:Any, low:int) -> int:
    if isinstance(value, float) and value.is_integer(): value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(name, value, f'an integer >= {low}')
    return value

def _bool(name:str, value:Any) -> bool:
    if isinstance(value, str) and value.lower() in ('true', 'false', '1', '0', 'yes', 'no'):
        value = value.lower() in ('true', '1', 'yes')
    if not isinstance(value, bool): raise ConfigError(name, value, 'True or False')
    return value

def _merged(config, cls:type, names, overrides:dict) -> dict:
    "The defaults of the dataclass `cls`, then `config` (a `cls`, a dict or None), then `overrides`; unknown names refused."
    params = dataclasses.asdict(config) if isinstance(config, cls) else dict(config or {})
    params.update(overrides)
    for k in params: check_choice('parameter', k, names)
    return {**dataclasses.asdict(cls()), **params}

def c5_size(arch:str, image_size:int) -> int:
    "Side of the C5 map of `arch` for `image_size` views, from a forward pass on the meta device."
    with torch.device('meta'):
        return build_meta(arch, num_classes=0).eval().forward_features(torch.empty(1, 3, image_size, image_size)).shape[-1]

def default_output_dir(recipe:str, arch:str, seed:int) -> str:
    return f'runs/{recipe}-{arch}-seed{seed}'


# %%
#| export
def resolve_config(config:TrainConfig|dict|None=None,  # the parameters (None: all defaults)
                   world_size:int=1,  # processes of the run (for the global batch)
                   **overrides,  # parameters overriding `config`'s
                  ) -> dict:
    "Every parameter concrete and checked, plus the derived values (global batch, scaled lr...). Raises `ConfigError`."
    p = _merged(config, TrainConfig, PARAMETERS, overrides)
    pixpro = [k for k, v in RECIPES.items() if isinstance(v, PixProRecipe)]
    recipe = RECIPES[check_choice('recipe', p['recipe'], pixpro)]
    for k in RECIPE_FIELDS:
        if p[k] is None: p[k] = getattr(recipe, k)
    for k, low in _INTS.items(): p[k] = _int(k, p[k], low)
    check_choice('arch', p['arch'], MODEL_NAMES)
    check_choice('method', p['method'], METHODS)
    for k in ('lr', 'gamma'): check_positive(k, p[k])
    for k in ('weight_decay', 'instance_weight'): check_range(k, p[k], 0)
    check_range('momentum', p['momentum'], 0, 1)
    check_range('threshold', p['threshold'], 0, 10, low_open=True)
    check_choice('ppm_layers', p['ppm_layers'], [0, 1, 2])
    check_choice('mixed_precision', p['mixed_precision'], ['no', 'bf16', 'fp16'])
    if p['mixed_precision'] == 'fp16' and not torch.cuda.is_available():
        raise ConfigError('mixed_precision', 'fp16', "'no' or 'bf16' on a machine without a GPU")
    for k in BOOLS: p[k] = _bool(k, p[k])
    if not isinstance(p['data'], (str, Path)) or (p['data'] != 'synthetic' and not Path(p['data']).is_dir()):
        raise ConfigError('data', p['data'], "'synthetic' or an existing folder of images")
    p['data'] = str(p['data'])
    side = c5_size(p['arch'], p['image_size'])
    if side < 2: raise ConfigError('image_size', p['image_size'], f'a size giving a C5 map of at least 2x2 ({side}x{side} here): 64 or more')
    if not isinstance(p['resume'], (str, Path)) or (p['resume'] not in ('auto', 'never') and not Path(p['resume']).is_file()):
        raise ConfigError('resume', p['resume'], "'auto', 'never' or an existing checkpoint file")
    p['resume'] = str(p['resume'])
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
bad = [dict(arch='resnet51'), dict(recipe='pixpro_r50_200ep'), dict(recipe='resnetrs_supervised_350ep'),
       dict(method='byol'), dict(lr=0), dict(lr=-1.), dict(batch_size=0), dict(batch_size=2.5), dict(threshold=0),
       dict(threshold=10.5), dict(data='/no/such/folder'), dict(image_size=32), dict(mixed_precision='fp8'),
       dict(resume='/no/such.pt'), dict(epochs=0), dict(ppm_layers=3), dict(momentum=1.5), dict(gammma=2.)]
for kw in bad:
    name = next(iter(kw))
    try: resolve_config(**kw); raise AssertionError(f'accepted {kw}')
    except ConfigError as e:
        test_eq(e.name, 'parameter' if name == 'gammma' else name)
        print(e)

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
#| export
CHECKPOINT_FORMAT = 'pixpro_rs.train/1'

def rng_state() -> dict:
    "The states of Python's, NumPy's and torch's generators, as `weights_only`-loadable values."
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

def set_rng_state(state:dict):
    "Restore what `rng_state` saved."
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available(): torch.cuda.set_rng_state_all(state['cuda'])


# %%
#| export
def checkpoint_path(output_dir:str|Path, step:int) -> Path:
    return Path(output_dir)/'checkpoints'/f'step-{step:08d}.pt'

def list_checkpoints(output_dir:str|Path) -> list[Path]:
    "The run's checkpoints, oldest first."
    return sorted((Path(output_dir)/'checkpoints').glob('step-*.pt'))

def save_checkpoint(path:str|Path, state:dict) -> Path:
    "Write `state` atomically (temporary file + rename)."
    return atomic_write(path, lambda tmp: torch.save(state, tmp))

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

# %% [markdown]
# **Which run is in the folder?** The resolved config is written to `output_dir/config.json` when a run starts.
# Starting again into the same folder resumes when the config describes the same run (only parameters that do not
# change the result may differ: workers, checkpoint frequency, `max_steps`...) and refuses otherwise, naming the
# differences, unless `overwrite=True`. A run with a different number of processes is a different run (its global
# batch differs). A parameter the saved config lacks was added to the engine after that run was written, which
# therefore ran with the parameter's default: that is the value it is compared with.

# %%
#| export
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
# `prepare_output_dir` applies that rule (on every process, before anything is written) and returns the checkpoint
# to resume from, if any.

# %%
#| export
def prepare_output_dir(c:dict,  # resolved config
                       format:str=CHECKPOINT_FORMAT,  # format tag of the engine's checkpoints
                       defaults:dict|None=None,  # the config class's defaults (None: `TrainConfig`'s), see `run_differences`
                      ) -> Path|None:  # checkpoint to resume from (None: start fresh)
    "Decide between a fresh start, a resume and a refusal; raises `ConfigError` for a folder holding a different run."
    out, defaults = Path(c['output_dir']), dataclasses.asdict(TrainConfig()) if defaults is None else defaults
    if out.exists() and not out.is_dir(): raise ConfigError('output_dir', str(out), 'a folder (this is a file)')
    if c['resume'] not in ('auto', 'never'):
        old = load_checkpoint(c['resume'], format)['config']
        diff = run_differences(old, c, defaults)
        if diff: raise ConfigError('resume', c['resume'], 'a checkpoint of this same run; it differs in ' + '; '.join(diff))
        return Path(c['resume'])
    cfg_file, ckpts = out/'config.json', list_checkpoints(out)
    if c['overwrite'] or not (cfg_file.exists() or ckpts): return None
    if c['resume'] == 'never':
        raise ConfigError('output_dir', str(out), 'an empty folder (it holds a run and resume=never), or overwrite=True')
    old = json.loads(cfg_file.read_text()) if cfg_file.exists() else load_checkpoint(ckpts[-1], format)['config']
    diff = run_differences(old, c, defaults)
    if diff: raise ConfigError('output_dir', str(out), 'a new folder, the folder of this same run, or overwrite=True; '
                               'it holds a different run: ' + '; '.join(diff))
    return ckpts[-1] if ckpts else None


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
# **Resume** continues at the checkpoint's step, in the middle of an epoch if that is where it was saved: the
# sampler skips the batches already seen, which is exact because the order and every augmentation derive from
# `(seed, epoch, index)` alone (the data chapter). The metrics files are rewritten from the checkpoint's metrics, so
# the steps a killed run did after its last checkpoint do not appear twice.

# %%
#| export
class NonFiniteLossError(RuntimeError):
    "The loss became NaN or infinite; the message names the step and the last good checkpoint."

class TrainResult(NamedTuple):
    "What `train` returns."
    output_dir: Path  # the run's folder
    checkpoint: Path|None  # the final checkpoint
    metrics: list[dict]  # one row per optimiser step
    model: PixPro  # the trained model (online and target networks), on the training device
    config: dict  # the resolved config

METRIC_COLUMNS = ('step', 'epoch', 'loss', 'pixel', 'instance', 'lr', 'momentum', 'images_per_s', 'data_s', 'time_s')

def _write_metrics(out:Path, metrics:list[dict], columns:tuple=METRIC_COLUMNS):
    "metrics.jsonl and metrics.csv (of `columns`) from the full list, atomically."
    atomic_write(out/'metrics.jsonl', lambda t: Path(t).write_text(''.join(json.dumps(m) + '\n' for m in metrics)))
    def csv_(t):
        with open(t, 'w', newline='') as f:
            w = csv.DictWriter(f, columns, extrasaction='ignore'); w.writeheader(); w.writerows(metrics)
    atomic_write(out/'metrics.csv', csv_)

def build_dataset(c:dict):
    "The training images of a resolved config: `SyntheticScenes` or an `ImageFiles` folder."
    return SyntheticScenes(c['synthetic_length'], c['synthetic_size']) if c['data'] == 'synthetic' else ImageFiles(c['data'])

def build_model(c:dict, total_steps:int) -> PixPro:
    "The PixPro model of a resolved config, initialised from its seed (the same on every process)."
    torch.manual_seed(c['seed'])
    return PixPro(create_model(c['arch'], num_classes=0), method=c['method'], threshold=c['threshold'], gamma=c['gamma'],
                  ppm_layers=c['ppm_layers'], instance_weight=c['instance_weight'], momentum=c['momentum'],
                  total_steps=total_steps)

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

def to_memory_format(x:Tensor, channels_last:bool) -> Tensor:
    "A batch of views in the memory format of the model (`channels_last` or contiguous NCHW)."
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

def _make_accelerator(c:dict):
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=c['mixed_precision'],
                       log_with='tensorboard' if is_tensorboard_available() else None, project_dir=c['output_dir'])


# %% [markdown]
# `speed_up` holds the two switches that change how fast a step runs but not what it computes (beyond rounding):
# `channels_last` stores weights and views as NHWC, the layout GPU convolution kernels prefer, and `compile` hands
# each network to `torch.compile`. Compilation happens in place (`nn.Module.compile`, or the backbone's
# `forward_features`, the method PixPro calls), so parameter names, checkpoints and DDP stay as they were. The third
# switch, `gpu_augment`, is in `train` below: it swaps the loader for the GPU augmentation chapter's crop loader
# (a forward reference: that chapter comes later in the book). Their effects are measured in the performance
# chapter; the tests check that they leave the numbers alone.

# %%
cfg = resolve_config(arch='resnetrs_tiny', image_size=64, batch_size=4)
g = torch.Generator().manual_seed(0)
x1, x2 = torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)
k1, k2 = torch.tensor([[0., 0., .6, .6]] * 4), torch.tensor([[.2, .2, .9, .9]] * 4)
plain, fast = build_model(cfg, 10), speed_up(build_model(cfg, 10), channels_last=True)
test_eq(list(fast.state_dict()), list(plain.state_dict()))
assert fast.encoder.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
assert to_memory_format(x1, True).is_contiguous(memory_format=torch.channels_last)
test_close(fast(to_memory_format(x1, True), to_memory_format(x2, True), k1, k2).loss, plain(x1, x2, k1, k2).loss, eps=1e-4)

# %%
#| slow
compiled = speed_up(build_model(cfg, 10), compile=True)  # compiling takes a minute or two on a CPU
test_eq(list(compiled.state_dict()), list(plain.state_dict()))
test_close(compiled(x1, x2, k1, k2).loss, build_model(cfg, 10)(x1, x2, k1, k2).loss, eps=1e-4)


# %% [markdown]
# The function is long because a training run has many parts, but it reads top to bottom; helpers above hold the
# parts that have their own tests.

# %%
#| export
def train(config:TrainConfig|dict|None=None,  # the run's parameters (None: the defaults, the CPU demo)
          **overrides,  # parameters overriding `config`'s, e.g. `train(arch='resnetrs101')`
         ) -> TrainResult:
    "Pretrain with PixPro: config -> accelerator -> data -> model -> optimiser/schedules -> loop -> checkpoints."
    # 1. config: everything checked before any work
    c = resolve_config(config, **overrides)
    accelerator = _make_accelerator(c)
    c = resolve_config(config, world_size=accelerator.num_processes, **overrides)
    main, device, out = accelerator.is_main_process, accelerator.device, Path(c['output_dir'])
    resume_from = prepare_output_dir(c)
    accelerator.wait_for_everyone()  # every process has read the folder before the main process writes to it
    if main:
        if c['overwrite'] and resume_from is None:
            shutil.rmtree(out/'checkpoints', ignore_errors=True)
            for f in ('metrics.jsonl', 'metrics.csv', 'encoder.safetensors'): (out/f).unlink(missing_ok=True)
        atomic_write(out/'config.json', lambda t: Path(t).write_text(json.dumps(c, indent=1)))
    # 2./3. data: this process's shard; the order and augmentations derive from (seed, epoch, index)
    dataset = build_dataset(c)
    workers = c['num_workers']
    kw = dict(image_size=c['image_size'], num_workers=workers, seed=c['seed'], rank=accelerator.process_index,
              world_size=accelerator.num_processes, labels=False, pin_memory=device.type == 'cuda',
              persistent_workers=workers > 0, prefetch_factor=c['prefetch_factor'] if workers > 0 else None)
    if c['gpu_augment']:  # the same crops and decisions (same seeds), the pixel work batched on the device
        batch_augment = BatchAugment(PixProAugment(c['image_size'])).to(device)
        if c['compile']: batch_augment.compile()
        loader = ViewLoader(make_crop_loader(dataset, c['batch_size'], **kw), batch_augment, device)
    else: loader = make_loader(dataset, c['batch_size'], **kw)
    steps_per_epoch = len(loader) // c['grad_accum']
    if steps_per_epoch == 0:
        raise ConfigError('batch_size', c['batch_size'], f'small enough for one step: {len(dataset)} images for '
                          f'{c["global_batch"]} per step (batch_size x grad_accum x {accelerator.num_processes} processes)')
    total_steps = c['epochs'] * steps_per_epoch
    schedule = dict(base_lr=c['global_lr'], total_steps=total_steps, warmup_steps=c['warmup_epochs'] * steps_per_epoch,
                    start_factor=c['warmup_start_factor'], final_lr=c['final_lr'])
    # 4. model: the same initialisation on every process; SyncBN only across GPUs
    model = build_model(c, total_steps)
    if accelerator.num_processes > 1 and device.type == 'cuda': model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    speed_up(model.to(device), c['channels_last'], c['compile'])
    online = OnlineNet(model)  # what DDP wraps; the target stays outside
    # 5. optimiser and schedules
    optimizer = LARS(lars_param_groups(online, c['weight_decay']), lr=c['global_lr'], momentum=c['optimizer_momentum'],
                     trust_coefficient=c['trust_coefficient'])
    step, metrics = 0, []
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        model.load_state_dict(state['model']); optimizer.load_state_dict(state['optimizer'])
        step, metrics = state['step'], [m for m in state['metrics'] if m['step'] <= state['step']]
        set_rng_state(state['rng'])
        if state.get('scaler') and accelerator.scaler is not None: accelerator.scaler.load_state_dict(state['scaler'])
    online, optimizer = accelerator.prepare(online, optimizer)
    if main:
        _write_metrics(out, metrics)
        accelerator.init_trackers('tensorboard', config={k: v for k, v in c.items() if isinstance(v, (int, float, str, bool))})
        print(f"{c['arch']} {c['method']} on {c['data']}: {accelerator.num_processes} process(es) on {device.type}, "
              f"global batch {c['global_batch']} = {c['batch_size']} x {c['grad_accum']} x {accelerator.num_processes}, "
              f"lr {c['lr']:g} per 256 -> {c['global_lr']:g}, {total_steps} steps"
              + (f', resuming at step {step} from {resume_from}' if resume_from else ''), flush=True)

    def save(step:int) -> Path:
        path = checkpoint_path(out, step)
        if main:
            state = {'format': CHECKPOINT_FORMAT, 'step': step, 'config': c, 'model': model.state_dict(),
                     'optimizer': optimizer.state_dict(), 'metrics': metrics, 'rng': rng_state(),
                     'scaler': accelerator.scaler.state_dict() if accelerator.scaler is not None else {}}
            save_checkpoint(path, state)
            _write_metrics(out, metrics)
            for old in list_checkpoints(out)[:-c['keep_checkpoints']]: old.unlink()
        accelerator.wait_for_everyone()
        return path

    # 6. the loop
    last_ckpt, end = (Path(resume_from) if resume_from else None), min(total_steps, c['max_steps'] or total_steps)
    saved = step if resume_from else None  # the step of the newest checkpoint
    bar = tqdm(total=end, initial=step, disable=not (main and c['progress']), dynamic_ncols=True,
               mininterval=2 if sys.stderr.isatty() else 30)  # notebooks and log files: a line every 30 s
    t_start = time.perf_counter()
    while step < end:
        epoch, skip = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch, skip=skip * c['grad_accum'])
        n_micro = (steps_per_epoch - skip) * c['grad_accum']
        parts, micro = torch.zeros(3, device=device), 0
        t_step = t0 = time.perf_counter()  # the step's start; the last micro-batch's end
        data_s = 0.0
        for batch, _ in zip(loader, range(n_micro)):
            if micro == 0: set_lr(optimizer, lr := lr_at(step, **schedule))
            data_s += time.perf_counter() - t0
            v1, v2, c1, c2 = (t.to(device, non_blocking=True) for t in batch[:4])
            v1, v2 = to_memory_format(v1, c['channels_last']), to_memory_format(v2, c['channels_last'])
            last = micro == c['grad_accum'] - 1
            with accelerator.no_sync(online) if not last else nullcontext():
                with accelerator.autocast():
                    o = model(v1, v2, c1, c2, update_target=micro == 0, online=online)
                accelerator.backward(o.loss / c['grad_accum'])
            parts += torch.stack([o.loss, o.pixel, o.instance]).detach().float() / c['grad_accum']
            if micro == 0: m = o.momentum
            micro += 1
            if not last: t0 = time.perf_counter(); continue
            ranks = accelerator.gather(parts[None])  # [processes, 3]: every rank sees every rank's loss
            if not torch.isfinite(ranks).all():
                bad = ranks[:, 0].tolist()
                raise NonFiniteLossError(f'non-finite loss in step {step + 1} (epoch {epoch}), per process {bad}; the last '
                                         f'good checkpoint is {last_ckpt or "none (no checkpoint yet)"}. Lower lr, '
                                         f'check the data, or try mixed_precision="no".')
            optimizer.step(); optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t_step  # all the step's micro-batches
            loss, pixel, instance = ranks.mean(0).tolist()
            row = dict(step=step, epoch=step / steps_per_epoch, loss=loss, pixel=pixel, instance=instance, lr=lr,
                       momentum=m, images_per_s=c['global_batch'] / dt, data_s=data_s, time_s=time.perf_counter() - t_start,
                       loss_per_process=ranks[:, 0].tolist())
            metrics.append(row)
            if main:
                with open(out/'metrics.jsonl', 'a') as f: f.write(json.dumps(row) + '\n')
                accelerator.log({k: row[k] for k in METRIC_COLUMNS[2:-2]}, step=step)
                bar.set_postfix(loss=f'{loss:.3f}', lr=f'{lr:.3g}', m=f'{m:.4f}', img_s=f"{row['images_per_s']:.1f}", refresh=False)
                bar.update()
            parts.zero_(); micro, data_s = 0, 0.0
            t_step = t0 = time.perf_counter()
            if step >= end: break
        done_epoch = step % steps_per_epoch == 0
        if step == end or (done_epoch and (step // steps_per_epoch) % c['save_every'] == 0): last_ckpt, saved = save(step), step
    bar.close()
    # 7. the end: the final checkpoint (unless the run was already complete) and the online encoder for transfer
    if saved != step: last_ckpt = save(step)
    if main:
        from safetensors.torch import save_file
        enc = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
        atomic_write(out/'encoder.safetensors', lambda t: save_file(enc, str(t), metadata={'arch': c['arch']}))
    del online, optimizer, loader  # drop every reference to DDP/gloo objects before the process group ends
    accelerator.end_training()
    return TrainResult(out, last_ckpt, metrics, model, c)


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
# (the GPU augmentation chapter); with `channels_last` the model and views are NHWC. The crops and every random
# decision come from the same per-sample seeds, so a run with both switches sees the same views up to float
# rounding and its losses follow the plain run's. Being speed switches, they may change between a run and its resume.

# %%
fast = train(tiny, output_dir=str(tmp/'fast'), max_steps=4, gpu_augment=True, channels_last=True)
plain = train(tiny, output_dir=str(tmp/'plain'), max_steps=4)
test_close([m['loss'] for m in fast.metrics], [m['loss'] for m in plain.metrics], eps=1e-3)
assert 'gpu_augment' in RUN_ONLY and fast.config['gpu_augment'] and not plain.config['gpu_augment']
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
# ## The command line
#
# `python -m pixpro_rs.train`, the console script `pixpro-train`, `accelerate launch -m pixpro_rs.train` and
# `accelerate launch pixpro_rs/train.py` all run `main`. Its flags are the parameters' names (`--arch resnetrs101
# --batch_size 64`), their help is the glossary, and `--config params.yaml` reads a YAML file of the same names
# (flags given on the command line win). A bad configuration exits with code 2 and one line naming the parameter;
# a non-finite loss exits with code 1 and the message above; neither prints a traceback.

# %%
#| export
_TYPES = {f.name: (bool if f.name in BOOLS else int if f.name in _INTS else
                   float if f.name in ('lr', 'weight_decay', 'momentum', 'threshold', 'gamma', 'instance_weight') else str)
          for f in dataclasses.fields(TrainConfig)}

def _flag_bool(s:str) -> bool:
    try: return _bool('flag', s)
    except ConfigError: raise argparse.ArgumentTypeError(f'expected true or false, got {s!r}') from None

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

def cli_parser() -> argparse.ArgumentParser:
    "The command line's parser: one flag per `TrainConfig` field, with the glossary as help."
    return config_parser(TrainConfig, 'pixpro-train', 'PixPro pretraining (pixpro_rs). Parameters left out take the '
                         'recipe\'s values; see the training chapter of the docs.', _TYPES)

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

def run_command(argv:list[str]|None,
                parser:argparse.ArgumentParser,  # from `config_parser`
                run:Callable[[dict], Any],  # runs the job from the parameters
                names:tuple=PARAMETERS,  # the parameters a `--config` file may set
               ) -> int:
    "Parse, run, and turn bad input into one clear line and an exit code: 2 bad input, 1 non-finite loss, 130 Ctrl-C."
    args = parser.parse_args(argv)
    try:
        params = read_params(args.config, names) if args.config else {}
        params.update({k: v for k, v in vars(args).items() if k != 'config' and v is not None})
        run(params)
    except (ConfigError, CheckpointError) as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr); return 2
    except NonFiniteLossError as e:
        print(f'{parser.prog}: stopped: {e}', file=sys.stderr); return 1
    except KeyboardInterrupt:
        print(f'{parser.prog}: interrupted; the last checkpoint is intact', file=sys.stderr); return 130
    return 0

def main(argv:list[str]|None=None) -> int:
    "The command line: parse, train, and turn bad input into one clear line and an exit code."
    return run_command(argv, cli_parser(), lambda params: train(TrainConfig(**params)))

if __name__ == '__main__' and '__file__' in globals(): sys.exit(main())  # a script or `-m`, not a notebook

# %%
help_text = cli_parser().format_help()
for name in PARAMETERS: assert f'--{name}' in help_text, name
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
#   (tests/test_train.py). A folder holding a different run is refused unless `overwrite=True`.
# - A non-finite loss stops every process at the same step with `NonFiniteLossError`, naming the step and the last
#   good checkpoint, before the optimiser touches the weights.
# - `main` is the command line: `pixpro-train`, `python -m pixpro_rs.train`, `accelerate launch -m pixpro_rs.train`
#   and `accelerate launch pixpro_rs/train.py`, with `--config params.yaml`. The papermill notebook `train.ipynb`
#   has the same parameters.
# - Not tested here, because they need GPUs: SyncBN across GPUs, fp16 loss scaling, and multi-node runs. They are
#   Accelerate's and PyTorch's code paths behind the same switches.
