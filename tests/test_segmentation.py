"""The segmentation engine across components: `python -m pixpro_rs.segmentation` on tiny Pascal VOC and Cityscapes
folders from a PixPro checkpoint, bad input (exit 2, one line naming the parameter, nothing written), and a run
stopped by SIGTERM mid-epoch that resumes to the losses and weights of an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixpro_rs.data import SyntheticScenes
from pixpro_rs.pixpro import PixPro
from pixpro_rs.resnet_rs import create_model
from pixpro_rs.segmentation import SEG_CHECKPOINT_FORMAT, SEG_PARAMETERS, build_segmenter
from pixpro_rs.train import EXIT_PREEMPTED, list_checkpoints, load_checkpoint

from helpers import ROOT, rows, run

SEG = [sys.executable, '-m', 'pixpro_rs.segmentation']
TINY = ['--image_size', '32', '--batch_size', '2', '--steps', '2', '--num_workers', '0', '--progress', 'false']


def write_voc(root, scenes, splits):
    "A VOC-layout folder from SyntheticScenes: JPEG images, index masks with a 255 border, split lists."
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'): (root/d).mkdir(parents=True, exist_ok=True)
    for i in range(len(scenes)):
        img, lab, _ = scenes.scene(i)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root/'JPEGImages'/f'{i:06d}.jpg', quality=95)
        m = lab.clone(); m[:2], m[-2:], m[:, :2], m[:, -2:] = 255, 255, 255, 255
        Image.fromarray(m.numpy().astype(np.uint8)).save(root/'SegmentationClass'/f'{i:06d}.png')
    for name, ids in splits.items(): (root/'ImageSets/Segmentation'/f'{name}.txt').write_text(''.join(f'{i:06d}\n' for i in ids))
    return root


def write_cityscapes(root, scenes, split):
    "A Cityscapes-layout folder: scene labels 0..4 written as label ids road, car, person, building, sky; border unlabeled."
    ids_of = torch.tensor([7, 26, 24, 11, 23])
    for i in range(len(scenes)):
        img, lab, _ = scenes.scene(i)
        city = ('aachen', 'bochum')[i % 2]
        for d in ('leftImg8bit', 'gtFine'): (root/d/split/city).mkdir(parents=True, exist_ok=True)
        ids = ids_of[lab]; ids[:2], ids[-2:], ids[:, :2], ids[:, -2:] = 0, 0, 0, 0
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root/'leftImg8bit'/split/city/f'{city}_000000_{i:06d}_leftImg8bit.png')
        Image.fromarray(ids.numpy().astype(np.uint8)).save(root/'gtFine'/split/city/f'{city}_000000_{i:06d}_gtFine_labelIds.png')
    return root


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A PixPro checkpoint (training format: online encoder and target), a VOC folder and a Cityscapes folder, 64 px."
    tmp = tmp_path_factory.mktemp('seg')
    torch.manual_seed(0)
    pix = PixPro(create_model('resnetrs_tiny', num_classes=0))
    with torch.no_grad():
        for p in pix.encoder.parameters(): p.add_(0.1 * torch.randn_like(p))  # online != target
    torch.save({'model': pix.state_dict(), 'config': {'arch': 'resnetrs_tiny', 'image_size': 64}}, tmp/'pixpro.pth')
    write_voc(tmp/'voc', SyntheticScenes(6, 64, num_classes=4, seed=3), {'train_aug': range(4), 'val': [4, 5]})
    write_cityscapes(tmp/'cityscapes', SyntheticScenes(4, 64, num_classes=4, seed=4), 'train')
    write_cityscapes(tmp/'cityscapes', SyntheticScenes(2, 64, num_classes=4, seed=5), 'val')
    return tmp, pix


@pytest.mark.parametrize('dataset, classes', [('voc', 21), ('cityscapes', 19)])
def test_cli_from_pixpro_checkpoint(tmp_path, data, dataset, classes):
    "The command line trains on each layout from the PixPro checkpoint's online encoder and writes its files."
    root, pix = data
    out = tmp_path/'run'
    r = run([*SEG, '--recipe', 'voc_aug_30k' if dataset == 'voc' else 'cityscapes_90k', '--data', str(root/dataset),
             '--arch', 'resnetrs_tiny', '--init', str(root/'pixpro.pth'), *TINY, '--output_dir', str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['dataset'], cfg['num_classes'], cfg['init'], cfg['data_files']) == (dataset, classes, str(root/'pixpro.pth'), 12)
    m = rows(out)
    assert len(m) == 2 and all(np.isfinite(x['loss']) for x in m) and 0 <= m[-1]['miou'] <= 1
    sd = load_file(out/'model.safetensors')
    model = build_segmenter('resnetrs_tiny', classes, seed=1)
    model.load_state_dict(sd)  # the segmenter's names; the head has `classes` outputs
    assert sd['head.6.weight'].shape[0] == classes
    state = load_checkpoint(list_checkpoints(out)[-1], SEG_CHECKPOINT_FORMAT)
    assert state['step'] == 2


@pytest.mark.parametrize('argv, name', [
    (['--dataset', 'ade20k'], 'dataset'),
    (['--recipe', 'cityscapes_90k', '--data', '/no/such/folder'], 'data'),
    (['--lr', '-0.1'], 'lr'),
    (['--output_dir', 'FILE'], 'output_dir')])
def test_bad_input_exit_2(tmp_path, argv, name):
    "Bad input fails before any work: exit code 2, one line on stderr naming the parameter, nothing written."
    (tmp_path/'a-file').write_text('')
    argv = [str(tmp_path/'a-file') if a == 'FILE' else a for a in argv]
    out = [] if name == 'output_dir' else ['--output_dir', str(tmp_path/'run')]
    r = run([*SEG, *TINY, *out, *argv])
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f'invalid {name}=' in lines[0] and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'run').exists() and (tmp_path/'a-file').read_text() == ''


def sigterm_after(args, run_dir, n_rows, timeout=300):
    "Start `args`, send SIGTERM once metrics.jsonl has `n_rows` rows, and return the exit code."
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, f = time.time() + timeout, run_dir/'metrics.jsonl'
    while time.time() < deadline and proc.poll() is None:
        if f.exists() and len(f.read_text().splitlines()) >= n_rows: break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    return proc.wait()


def test_sigterm_resume_same_weights(tmp_path):
    "SIGTERM mid-epoch saves the current step and exits 143; the same command resumes to the uninterrupted run, bit for bit."
    args = [*SEG, '--synthetic_length', '16', '--synthetic_size', '48', '--image_size', '32', '--batch_size', '4',
            '--steps', '24', '--num_workers', '0', '--progress', 'false']
    a, b = tmp_path/'a', tmp_path/'b'
    r = run(args + ['--output_dir', str(a)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert sigterm_after(args + ['--output_dir', str(b)], b, 6) == EXIT_PREEMPTED
    stopped = [int(p.stem.split('-')[1]) for p in list_checkpoints(b)]
    assert stopped and 6 <= stopped[-1] < 24, stopped  # saved at the step SIGTERM found (mid-epoch: 4 steps per epoch)
    r = run(args + ['--output_dir', str(b)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x['loss'] for x in rows(b)] == [x['loss'] for x in rows(a)] and len(rows(a)) == 24
    assert [x.get('miou') for x in rows(b)] == [x.get('miou') for x in rows(a)]
    sa, sb = (load_checkpoint(list_checkpoints(d)[-1], SEG_CHECKPOINT_FORMAT) for d in (a, b))
    assert sa['step'] == sb['step'] == 24
    for part in ('model', 'optimizer'):
        flat = lambda s: {k: v for k, v in s[part].items()} if part == 'model' else {
            (i, k): t for i, st in s[part]['state'].items() for k, t in st.items()}
        fa, fb = flat(sa), flat(sb)
        assert fa.keys() == fb.keys()
        for k, v in fa.items(): assert torch.equal(v, fb[k]), (part, k)


def test_help_everywhere():
    "`python -m`, the console script and the file as a script give the same help, with every parameter."
    for cmd in (SEG + ['--help'], ['pixpro-segment', '--help'], [sys.executable, 'pixpro_rs/segmentation.py', '--help']):
        r = run(cmd)
        assert r.returncode == 0, r.stderr
        for name in SEG_PARAMETERS: assert f'--{name}' in r.stdout, (cmd, name)
