"""The training engine across processes: the command line, papermill, two gloo processes under `accelerate launch`,
and a run killed with SIGKILL that resumes to the same weights as an uninterrupted one."""
import json
import sys

import pytest
import torch

from pixpro_rs.recipes import LARS, lars_param_groups, lr_at
from pixpro_rs.train import PARAMETERS, build_dataset, build_model, load_checkpoint, list_checkpoints
from pixpro_rs.data import make_loader

from helpers import ACCELERATE, ROOT, kill_after, rows, run

TINY = ['--arch', 'resnetrs_tiny', '--image_size', '64', '--batch_size', '4', '--synthetic_length', '32',
        '--synthetic_size', '64', '--num_workers', '0', '--progress', 'false']


def losses(run_dir):
    return [r['loss'] for r in rows(run_dir)]


def test_help_everywhere():
    "`python -m`, the console script and the file as a script give the same help, with every parameter."
    for cmd in ([sys.executable, '-m', 'pixpro_rs.train', '--help'], ['pixpro-train', '--help'],
                [sys.executable, 'pixpro_rs/train.py', '--help']):
        r = run(cmd)
        assert r.returncode == 0, r.stderr
        for name in PARAMETERS: assert f'--{name}' in r.stdout, (cmd, name)


@pytest.mark.parametrize('argv, name', [
    (['--arch', 'resnet51'], 'arch'), (['--lr', '-1'], 'lr'), (['--threshold', '0'], 'threshold'),
    (['--data', '/no/such/folder'], 'data'), (['--image_size', '32'], 'image_size'), (['--method', 'byol'], 'method'),
    (['--batch_size', '0'], 'batch_size'), (['--recipe', 'pixpro_r50_1000ep'], 'recipe')])
def test_bad_config_exit_2(tmp_path, argv, name):
    "A bad configuration fails before any work: exit code 2, one line naming the parameter, nothing written."
    r = run([sys.executable, '-m', 'pixpro_rs.train', *TINY, *argv, '--output_dir', str(tmp_path/'run')])
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f'invalid {name}=' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'run').exists()


def test_bad_yaml_and_flag_types(tmp_path):
    (tmp_path/'p.yaml').write_text('arch: [unclosed\n')
    r = run([sys.executable, '-m', 'pixpro_rs.train', '--config', str(tmp_path/'p.yaml')])
    assert r.returncode == 2 and 'p.yaml' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = run([sys.executable, '-m', 'pixpro_rs.train', '--lr', 'fast'])
    assert r.returncode == 2 and '--lr' in r.stderr and 'Traceback' not in r.stderr, r.stderr


def test_different_run_refused(tmp_path):
    out = str(tmp_path/'run')
    assert run([sys.executable, '-m', 'pixpro_rs.train', *TINY, '--max_steps', '1', '--output_dir', out]).returncode == 0
    r = run([sys.executable, '-m', 'pixpro_rs.train', *TINY, '--max_steps', '1', '--lr', '2', '--output_dir', out])
    assert r.returncode == 2 and 'holds a different run' in r.stderr and 'lr: 16.0 -> 2.0' in r.stderr, r.stderr
    assert [p.name for p in list_checkpoints(out)] == ['step-00000001.pt']  # untouched


def test_papermill_train_notebook(tmp_path):
    "The README's main job with tiny parameters; it runs outside nbs/ and writes nothing there."
    out_nb = tmp_path/'out.ipynb'
    p = ['-p', 'arch', 'resnetrs_tiny', '-p', 'image_size', '64', '-p', 'batch_size', '4', '-p', 'epochs', '2',
         '-p', 'synthetic_length', '16', '-p', 'synthetic_size', '64', '-p', 'num_workers', '0',
         '-p', 'output_dir', str(tmp_path/'run'), '-p', 'progress', 'False']
    r = run(['papermill', str(ROOT/'nbs'/'train.ipynb'), str(out_nb), *p, '--cwd', str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    nb = json.loads(out_nb.read_text())
    text = ''.join(''.join(o.get('text', '')) for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', []))
    assert '8 steps in' in text and 'images/s' in text, text[-2000:]
    assert sum('image/png' in o.get('data', {}) for c in nb['cells'] for o in c.get('outputs', [])) >= 2
    assert len(losses(tmp_path/'run')) == 8 and (tmp_path/'run'/'encoder.safetensors').exists()


def test_sigkill_resume_same_weights(tmp_path):
    "A run killed with SIGKILL mid-epoch and started again ends with the weights and losses of an uninterrupted run."
    args = [sys.executable, '-m', 'pixpro_rs.train', *TINY, '--epochs', '4', '--save_every', '1']
    a, b = tmp_path/'a', tmp_path/'b'
    assert run(args + ['--output_dir', str(a)]).returncode == 0
    kill_after(args + ['--output_dir', str(b)], b, 11)  # step 11 of 32: epoch 1 of 4, mid-epoch
    ckpts = [int(p.stem.split('-')[1]) for p in list_checkpoints(b)]
    assert ckpts and max(ckpts) < 32, ckpts  # killed before the end, after the first epoch's checkpoint
    r = run(args + ['--output_dir', str(b)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(b) == losses(a) and len(losses(a)) == 32
    sa, sb = (load_checkpoint(list_checkpoints(d)[-1]) for d in (a, b))
    assert sa['step'] == sb['step'] == 32
    for k, v in sa['model'].items(): assert torch.equal(v, sb['model'][k]), k
    for (ka, va), (kb, vb) in zip(sa['optimizer']['state'].items(), sb['optimizer']['state'].items()):
        assert torch.equal(va['momentum_buffer'], vb['momentum_buffer'])


def test_accelerate_two_processes(tmp_path):
    """Two gloo processes: identical weights on both ranks; each rank's first loss equals a 1-process run on its
    shard; the weights after the step equal one LARS step with the two shards' gradients averaged."""
    r = run([*ACCELERATE, str(ROOT/'tests'/'mp_train.py'), str(tmp_path)])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    s0, s1 = (torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in (0, 1))
    assert s0['world_size'] == s1['world_size'] == 2
    for k in s0['params']: assert torch.equal(s0['params'][k], s1['params'][k]), k
    c = s0['config']
    dataset = build_dataset(c)
    total = len(make_loader(dataset, c['batch_size'], image_size=c['image_size'], world_size=2)) * c['epochs']
    grads, models = [], []
    for rank in (0, 1):
        loader = make_loader(dataset, c['batch_size'], image_size=c['image_size'], seed=c['seed'], rank=rank,
                             world_size=2, labels=False)
        v1, v2, c1, c2 = next(iter(loader))
        model = build_model(c, total)
        out = model(v1, v2, c1, c2)
        assert abs(out.loss.item() - s0['first_losses'][rank]) < 1e-5, (rank, out.loss.item(), s0['first_losses'])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        models.append(model)
    model = models[0]
    for n, p in model.named_parameters():
        if p.requires_grad: p.grad = (grads[0][n] + grads[1][n]) / 2
    opt = LARS(lars_param_groups(model, c['weight_decay']), lr=lr_at(0, base_lr=c['global_lr'], total_steps=total,
               warmup_steps=c['warmup_epochs'] * total // c['epochs'], start_factor=c['warmup_start_factor'],
               final_lr=c['final_lr']), momentum=c['optimizer_momentum'], trust_coefficient=c['trust_coefficient'])
    opt.step()
    ref = dict(model.named_parameters())
    for k, v in s0['params'].items():
        torch.testing.assert_close(v, ref[k].detach(), rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize('entry', [['-m', 'pixpro_rs.train'], ['pixpro_rs/train.py']])
def test_accelerate_launch_entry_points(tmp_path, entry):
    "`accelerate launch -m pixpro_rs.train` and `... pixpro_rs/train.py` on two CPU processes: both shards logged."
    r = run([*ACCELERATE, *entry, *TINY, '--max_steps', '3', '--output_dir', str(tmp_path/'run')])
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(l) for l in (tmp_path/'run'/'metrics.jsonl').read_text().splitlines()]
    assert len(rows) == 3 and all(len(m['loss_per_process']) == 2 for m in rows)
    cfg = json.loads((tmp_path/'run'/'config.json').read_text())
    assert (cfg['world_size'], cfg['global_batch']) == (2, 8)
    assert [p.name for p in list_checkpoints(tmp_path/'run')] == ['step-00000003.pt']


def test_notebook_parameters_are_the_config():
    "The papermill parameters cell has exactly TrainConfig's names, in order, with its defaults."
    import ast
    import dataclasses
    from pixpro_rs.train import TrainConfig
    nb = json.loads((ROOT/'nbs'/'train.ipynb').read_text())
    cells = [c for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(cells) == 1, 'one cell tagged parameters'
    tree = ast.parse(''.join(cells[0]['source']))
    params = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body}
    assert list(params) == list(PARAMETERS)
    assert params == dataclasses.asdict(TrainConfig())


def test_papermill_reads_every_parameter():
    "papermill's own parser understands every line of the parameters cell (a comment it cannot parse hides a parameter)."
    r = run(['papermill', '--help-notebook', str(ROOT/'nbs'/'train.ipynb')])
    assert r.returncode == 0 and 'Unable to parse' not in r.stdout + r.stderr, r.stdout + r.stderr
    for name in PARAMETERS: assert f'  {name}:' in r.stdout, name


def test_diverging_run_exits_1_with_the_step(tmp_path):
    "An absurd lr makes the weights overflow: the command stops at the first non-finite loss with exit code 1."
    r = run([sys.executable, '-m', 'pixpro_rs.train', *TINY, '--lr', '1e30', '--save_every', '1',
             '--output_dir', str(tmp_path/'run')])
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert 'non-finite loss in step' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert list_checkpoints(tmp_path/'run') == []  # it diverged before the first checkpoint; nothing half-written
