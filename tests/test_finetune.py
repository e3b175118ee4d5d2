"""The fine-tuning engine across components: the command line (every entry point), papermill, a run killed with
SIGKILL that resumes to the weights of an uninterrupted one, and two gloo processes under `accelerate launch`
(also accumulating gradients)."""
import ast
import copy
import dataclasses
import json
import sys

import pytest
import torch
from torch import nn

from pixpro_rs.finetune import (FT_PARAMETERS, FinetuneConfig, build_classifier, build_datasets, load_finetune_checkpoint,
                                param_groups, train_loader, train_transform)
from pixpro_rs.resnet_rs import create_model, load_pretrained
from pixpro_rs.train import list_checkpoints

from helpers import ACCELERATE, ROOT, kill_after, rows, run

TINY = ['--data', 'synthetic', '--image_size', '32', '--batch_size', '8', '--synthetic_length', '48',
        '--synthetic_size', '48', '--num_workers', '0', '--progress', 'false']


def test_help_everywhere():
    "`python -m`, the console script and the file as a script give the same help, with every parameter."
    for cmd in ([sys.executable, '-m', 'pixpro_rs.finetune', '--help'], ['pixpro-finetune', '--help'],
                [sys.executable, 'pixpro_rs/finetune.py', '--help']):
        r = run(cmd)
        assert r.returncode == 0, r.stderr
        for name in FT_PARAMETERS: assert f'--{name}' in r.stdout, (cmd, name)


@pytest.mark.parametrize('argv, name', [
    (['--arch', 'resnet50'], 'arch'), (['--lr', '-1'], 'lr'), (['--init', '/no/such.safetensors'], 'init'),
    (['--data', '/no/such/folder'], 'data'), (['--image_size', '16'], 'image_size'),
    (['--ema_decay', '1'], 'ema_decay'), (['--randaugment_magnitude', '31'], 'randaugment_magnitude'),
    (['--recipe', 'pixpro_r50_100ep'], 'recipe'), (['--num_classes', '20'], 'num_classes')])
def test_bad_config_exit_2(tmp_path, argv, name):
    "A bad configuration fails before any work: exit code 2, one line naming the parameter, nothing written."
    r = run([sys.executable, '-m', 'pixpro_rs.finetune', *TINY, *argv, '--output_dir', str(tmp_path/'run')])
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f'invalid {name}=' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'run').exists()


def test_pixpro_checkpoint_to_finetune(tmp_path):
    "pretrain -> encoder.safetensors -> pixpro-finetune --init: the run starts from it; another arch is refused (exit 2)."
    pre = tmp_path/'pre'
    r = run(['pixpro-train', '--arch', 'resnetrs_tiny', '--image_size', '64', '--batch_size', '4', '--epochs', '1',
             '--synthetic_length', '8', '--synthetic_size', '64', '--num_workers', '0', '--progress', 'false',
             '--output_dir', str(pre)])
    assert r.returncode == 0, r.stderr[-2000:]
    enc = pre/'encoder.safetensors'
    r = run(['pixpro-finetune', *TINY, '--arch', 'resnetrs_tiny', '--init', str(enc), '--max_steps', '2',
             '--output_dir', str(tmp_path/'ft')])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path/'ft'/'config.json').read_text())
    assert cfg['init'] == str(enc) and cfg['arch'] == 'resnetrs_tiny'
    r = run(['pixpro-finetune', *TINY, '--arch', 'resnetrs50', '--init', str(enc), '--output_dir', str(tmp_path/'x')])
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr  # the encoder's file names its arch
    assert "invalid arch='resnetrs50'" in r.stderr and "'resnetrs_tiny', the arch saved in" in r.stderr, r.stderr
    assert not (tmp_path/'x').exists()  # refused before anything was written


def test_papermill_finetune_notebook(tmp_path):
    "The notebook with tiny parameters runs outside nbs/, writes its run where it is told, and shows its figure."
    out_nb = tmp_path/'out.ipynb'
    p = ['-p', 'data', 'synthetic', '-p', 'image_size', '32', '-p', 'batch_size', '8', '-p', 'epochs', '2',
         '-p', 'synthetic_length', '32', '-p', 'synthetic_size', '48', '-p', 'num_workers', '0',
         '-p', 'output_dir', str(tmp_path/'run'), '-p', 'progress', 'False']
    r = run(['papermill', str(ROOT/'nbs'/'finetune.ipynb'), str(out_nb), *p, '--cwd', str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    nb = json.loads(out_nb.read_text())
    text = ''.join(''.join(o.get('text', '')) for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', []))
    assert '8 steps in' in text and 'final top-1' in text and 'images/s' in text, text[-2000:]
    assert sum('image/png' in o.get('data', {}) for c in nb['cells'] for o in c.get('outputs', [])) >= 1
    m = rows(tmp_path/'run')
    assert len(m) == 8 and [x['step'] for x in m if 'top1_ema' in x] == [4, 8]
    load_pretrained(create_model('resnetrs_tiny', num_classes=4), tmp_path/'run'/'model.safetensors')


def test_notebook_parameters_are_the_config():
    "The papermill parameters cell has exactly FinetuneConfig's names, in order, with its defaults; papermill parses it."
    nb = json.loads((ROOT/'nbs'/'finetune.ipynb').read_text())
    cells = [c for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(cells) == 1, 'one cell tagged parameters'
    params = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(''.join(cells[0]['source'])).body}
    assert list(params) == list(FT_PARAMETERS) and params == dataclasses.asdict(FinetuneConfig())
    r = run(['papermill', '--help-notebook', str(ROOT/'nbs'/'finetune.ipynb')])
    assert r.returncode == 0 and 'Unable to parse' not in r.stdout + r.stderr, r.stdout + r.stderr
    for name in FT_PARAMETERS: assert f'  {name}:' in r.stdout, name


def test_notebook_passes_every_parameter():
    "The notebook's call passes every parameter by its name, in order: no papermill `-p NAME` is silently ignored."
    nb = json.loads((ROOT/'nbs'/'finetune.ipynb').read_text())
    src = next(''.join(c['source']) for c in nb['cells'] if 'finetune(FinetuneConfig(' in ''.join(c['source']))
    call = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call) and getattr(n.func, 'id', '') == 'FinetuneConfig')
    assert [(k.arg, getattr(k.value, 'id', None)) for k in call.keywords] == [(n, n) for n in FT_PARAMETERS]


def test_sigkill_resume_same_weights(tmp_path):
    "A run killed with SIGKILL mid-epoch and started again ends with the weights, EMA and losses of an uninterrupted one."
    args = [sys.executable, '-m', 'pixpro_rs.finetune', *TINY, '--epochs', '4', '--dropout', '0.2',
            '--stochastic_depth', '0.1']
    a, b = tmp_path/'a', tmp_path/'b'
    assert run(args + ['--output_dir', str(a)]).returncode == 0
    kill_after(args + ['--output_dir', str(b)], b, 9)  # step 9 of 24: epoch 1 of 4, mid-epoch
    ckpts = [int(p.stem.split('-')[1]) for p in list_checkpoints(b)]
    assert ckpts and max(ckpts) < 24, ckpts
    r = run(args + ['--output_dir', str(b)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x['loss'] for x in rows(b)] == [x['loss'] for x in rows(a)] and len(rows(a)) == 24
    sa, sb = (load_finetune_checkpoint(list_checkpoints(d)[-1]) for d in (a, b))
    assert sa['step'] == sb['step'] == 24
    for part in ('model', 'ema'):
        for k, v in sa[part].items(): assert torch.equal(v, sb[part][k]), (part, k)


def test_accelerate_two_processes(tmp_path):
    "Two gloo processes: the global batch and lr double, both ranks' losses are logged, evaluation covers the val set."
    r = run([*ACCELERATE, '-m', 'pixpro_rs.finetune', *TINY, '--epochs', '1', '--output_dir', str(tmp_path/'run')])
    assert r.returncode == 0, r.stderr[-4000:]
    cfg = json.loads((tmp_path/'run'/'config.json').read_text())
    assert (cfg['world_size'], cfg['global_batch']) == (2, 16) and cfg['global_lr'] == 16 / 256
    m = rows(tmp_path/'run')
    assert len(m) == 3 and 'top1_ema' in m[-1]  # 48 images / 16 per step
    assert 0 <= m[-1]['top1'] <= 1 and (m[-1]['top1'] * 12) == round(m[-1]['top1'] * 12)  # counts over all 12 val images


def test_accelerate_two_processes_grad_accum(tmp_path):
    """Two gloo processes x 2 micro-batches of 8: global batch 32 and its lr; the first step's weights are one Nesterov
    SGD step on the mean gradient of the four micro-batches (each rank's shard), rank 0's BN statistics its own."""
    r = run([*ACCELERATE, '-m', 'pixpro_rs.finetune', *TINY, '--grad_accum', '2', '--warmup_epochs', '0',
             '--max_steps', '1', '--output_dir', str(tmp_path/'run')])
    assert r.returncode == 0, r.stderr[-4000:]
    c = json.loads((tmp_path/'run'/'config.json').read_text())
    assert (c['world_size'], c['global_batch'], c['global_lr']) == (2, 32, 32 / 256)
    assert (c['dropout'], c['stochastic_depth']) == (0.0, 0.0)  # the demo recipe's: the forwards draw no random numbers
    state = load_finetune_checkpoint(list_checkpoints(tmp_path/'run')[-1])
    model = build_classifier(c['arch'], c['num_classes'], 'scratch', 0.0, 0.0, c['seed'])
    crit = nn.CrossEntropyLoss(label_smoothing=c['label_smoothing'])
    transform = train_transform(c['image_size'], c['randaugment_ops'], c['randaugment_magnitude'])
    grads, copies = [], []
    for rank in (0, 1):
        m = copy.deepcopy(model)
        loader = train_loader(build_datasets(c)[0], transform, c['batch_size'], seed=c['seed'], rank=rank, world_size=2)
        loader.set_epoch(0)
        for (x, y), _ in zip(loader, range(2)): (crit(m(x), y) / 2).backward()
        grads.append([p.grad for p in m.parameters()]); copies.append(m)
    ref = copies[0]  # rank 0: its own BN statistics
    for p, g0, g1 in zip(ref.parameters(), *grads): p.grad = (g0 + g1) / 2  # DDP's all-reduce: the mean over ranks
    torch.optim.SGD(param_groups(ref, c['weight_decay']), lr=c['global_lr'], momentum=0.9, nesterov=True).step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(state['model'][k].float(), v.float(), rtol=1e-5, atol=1e-6, msg=k)
