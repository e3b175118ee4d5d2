"""Detection transfer: scene boxes against the data chapter's instance maps, Pascal VOC folders through VOCDetection,
PixPro checkpoints in the detector, bad input, the CLI on VOC and COCO-format folders (Faster R-CNN, Mask R-CNN)."""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixpro_rs.core import ConfigError
from pixpro_rs.data import SyntheticScenes
from pixpro_rs.detection import (DET_PARAMETERS, VOC_CLASSES, SceneBoxes, VOCBoxes, build_detector, evaluate_detector, finetune_detector,
                                 main, voc_target, write_coco)
from pixpro_rs.train import train

ROOT = Path(__file__).resolve().parents[1]


def write_voc(root, images, year='2007', split='trainval'):
    "A VOC devkit folder: images = {stem: ((W, H), [(name, (xmin, ymin, xmax, ymax), difficult)])}."
    voc = Path(root) / 'VOCdevkit' / f'VOC{year}'
    for d in ('Annotations', 'JPEGImages', 'ImageSets/Main'):
        (voc / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, ((W, H), objects) in images.items():
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(voc / 'JPEGImages' / f'{stem}.jpg')
        objs = ''.join(f'<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>'
                       f'<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>' for n, b, d in objects)
        (voc / 'Annotations' / f'{stem}.xml').write_text(
            f'<annotation><filename>{stem}.jpg</filename><size><width>{W}</width><height>{H}</height>'
            f'<depth>3</depth></size>{objs}</annotation>')
    (voc / 'ImageSets' / 'Main' / f'{split}.txt').write_text(''.join(f'{s}\n' for s in images))
    return Path(root)


@pytest.fixture
def voc(tmp_path):
    return write_voc(tmp_path / 'data', {
        '000005': ((64, 48), [('chair', (10, 20, 30, 40), False), ('chair', (1, 1, 5, 5), True), ('person', (40, 2, 64, 48), False)]),
        '000007': ((50, 40), [('car', (3, 4, 20, 30), False)]),  # one object: VOCDetection still gives a list
        '000009': ((30, 30), []),  # no object at all
    })


# ---------------------------------------------------------------- boxes of SyntheticScenes

def test_scene_boxes_are_the_visible_extents_of_the_painted_objects():
    "SceneBoxes against a NumPy recomputation from scene(i, instances=True), at a size and settings the chapter does not use."
    scenes = SyntheticScenes(30, (96, 128), num_classes=6, seed=5, objects=(3, 8))
    ds, min_area = SceneBoxes(scenes, min_area=0.002), 0.002 * 96 * 128
    merged = 0
    for i in range(len(scenes)):
        image, labels, label, inst = scenes.scene(i, instances=True)
        assert all(torch.equal(a, b) for a, b in zip((image, labels), scenes.scene(i)[:2])) and label == scenes[i][1]
        got_image, target = ds[i]
        assert torch.equal(got_image, image)
        lab, ins = labels.numpy(), inst.numpy()
        want = []
        for j in np.unique(ins[ins > 0]):
            ys, xs = np.nonzero(ins == j)
            assert len(np.unique(lab[ys, xs])) == 1  # one class per object
            if len(ys) >= min_area:
                want.append(([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], int(lab[ys[0], xs[0]])))
        assert sorted(want) == sorted(zip(target['boxes'].int().tolist(), target['labels'].tolist())), i
        merged += len(want) > len(set(k for _, k in want))
    assert merged > 0  # some scenes hold two boxes of one class: the case connected components could merge


# ---------------------------------------------------------------- VOC layout

def test_voc_layout_conversion(voc):
    ds = VOCBoxes(voc, '2007', 'trainval')
    assert len(ds) == 3 and ds.num_classes == 20 and 'trainval' in repr(ds)
    image, t = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 48, 64)
    # 1-based inclusive VOC pixels -> continuous boxes: x0 = xmin - 1, x1 = xmax (same width)
    assert torch.equal(t['boxes'], torch.tensor([[9., 19., 30., 40.], [0., 0., 5., 5.], [39., 1., 64., 48.]]))
    assert t['labels'].tolist() == [VOC_CLASSES.index('chair') + 1] * 2 + [VOC_CLASSES.index('person') + 1]
    assert t['difficult'].tolist() == [False, True, False]
    image, t = ds[1]
    assert image.shape == (3, 40, 50) and t['labels'].tolist() == [VOC_CLASSES.index('car') + 1]
    assert t['boxes'].tolist() == [[2., 3., 20., 30.]]
    image, t = ds[2]
    assert t['boxes'].shape == (0, 4) and t['labels'].shape == (0,) and t['difficult'].shape == (0,)


def test_voc_2012_and_test_split(tmp_path):
    root = write_voc(tmp_path, {'2008_000001': ((20, 20), [('dog', (2, 2, 10, 10), False)])}, year='2012')
    assert VOCBoxes(root, '2012', 'trainval')[0][1]['labels'].tolist() == [VOC_CLASSES.index('dog') + 1]
    with pytest.raises(ConfigError, match="image_set='test'"):
        VOCBoxes(root, '2012', 'test')  # VOC2012 has no public test annotations


def test_voc_errors_name_the_file(voc, tmp_path):
    with pytest.raises(FileNotFoundError, match=r'nowhere/VOCdevkit/VOC2007 does not exist'):
        VOCBoxes(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match=r'ImageSets/Main/test.txt does not exist'):
        VOCBoxes(voc, '2007', 'test')
    with pytest.raises(ConfigError, match="year='2020'"):
        VOCBoxes(voc, '2020')
    ann = voc / 'VOCdevkit' / 'VOC2007' / 'Annotations'
    (ann / '000007.xml').write_text((ann / '000007.xml').read_text().replace('<name>car</name>', '<name>unicorn</name>'))
    with pytest.raises(ValueError, match=r"000007\.xml: object 'unicorn' is not one of the 20 classes"):
        VOCBoxes(voc)[1]
    (ann / '000007.xml').write_text((ann / '000007.xml').read_text().replace('unicorn', 'car').replace('<xmax>20</xmax>', '<xmax>1</xmax>'))
    with pytest.raises(ValueError, match=r"000007\.xml: object 'car' has an empty bndbox"):
        VOCBoxes(voc)[1]
    (ann / '000007.xml').write_text('<annotation><object>')
    with pytest.raises(ValueError, match=r'000007\.xml: not a valid annotation XML'):
        VOCBoxes(voc)[1]
    (voc / 'VOCdevkit' / 'VOC2007' / 'JPEGImages' / '000005.jpg').unlink()
    with pytest.raises(FileNotFoundError, match=r'JPEGImages/000005\.jpg does not exist'):
        VOCBoxes(voc)[0]
    with pytest.raises(ValueError, match=r"a\.xml: object 'car' has no valid bndbox"):
        voc_target({'annotation': {'object': [{'name': 'car', 'bndbox': {'xmin': '1'}}]}}, source='a.xml')


# ---------------------------------------------------------------- PixPro checkpoints in the detector

@pytest.fixture(scope='module')
def pixpro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('pixpro') / 'run'
    train(arch='resnetrs_tiny', image_size=64, batch_size=4, synthetic_length=16, synthetic_size=64, num_workers=0,
          max_steps=1, progress=False, output_dir=str(out))
    return out


def test_detector_from_a_training_checkpoint(pixpro_run):
    ckpt = sorted((pixpro_run / 'checkpoints').glob('step-*.pt'))[-1]
    online = {k[len('encoder.'):]: v for k, v in torch.load(ckpt, weights_only=False)['model'].items() if k.startswith('encoder.')}
    assert online
    for weights, arch in ((ckpt, None), (pixpro_run / 'encoder.safetensors', 'resnetrs_tiny')):
        det = build_detector(arch, num_classes=3, weights=weights, out_channels=32, representation_size=64, min_size=64, max_size=64)
        sd = det.backbone.body.state_dict()
        assert det.arch == 'resnetrs_tiny'
        for k, v in online.items():
            if k.startswith('fc.') or 'num_batches_tracked' in k:
                continue
            assert torch.equal(sd[k], v), k  # weights and BN statistics of the ONLINE encoder, frozen BN keeps the names
        frozen = [n for n, p in det.backbone.body.named_parameters() if not p.requires_grad]
        assert any(n.startswith('layer1.') for n in frozen) and not any(n.startswith('layer3.') for n in frozen)
    if 'config' in torch.load(ckpt, weights_only=False):
        with pytest.raises(ConfigError, match="the arch saved in"):
            build_detector('resnetrs50', num_classes=3, weights=ckpt)


def test_a_pretrained_detector_trains_and_scores(pixpro_run, voc):
    det = build_detector(num_classes=20, weights=pixpro_run / 'encoder.safetensors', arch='resnetrs_tiny', out_channels=32,
                         representation_size=64, min_size=64, max_size=64, box_batch_size_per_image=32)
    before = det.backbone.body.layer1[0].conv1.weight.clone()
    hist = finetune_detector(det, VOCBoxes(voc), steps=3, batch_size=2, warmup_steps=1)
    assert len(hist['loss']) == 3 and all(math.isfinite(v) for v in hist['loss'])
    assert torch.equal(det.backbone.body.layer1[0].conv1.weight, before)  # a frozen stage stays frozen
    res = evaluate_detector(det, VOCBoxes(voc))
    assert 0 <= res['AP50'] <= 1 and len(res['per_class']) == 20 and math.isnan(res['per_class'][VOC_CLASSES.index('dog')])


# ---------------------------------------------------------------- bad input

def test_bad_input_names_the_parameter(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pt does not exist'):
        build_detector('resnetrs_tiny', 3, weights=tmp_path / 'missing.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(Exception, match='junk.pt'):
        build_detector('resnetrs_tiny', 3, weights=tmp_path / 'junk.pt')
    with pytest.raises(ConfigError, match="norm='frozen'"):
        build_detector('resnetrs_tiny', 3, norm='frozen')
    with pytest.raises(ConfigError, match="norm='group'"):
        build_detector('resnetrs_tiny', 3, norm='group')
    with pytest.raises(ConfigError, match='trainable_layers=7'):
        build_detector('resnetrs_tiny', 3, trainable_layers=7)
    with pytest.raises(ConfigError, match='num_classes=0'):
        build_detector('resnetrs_tiny', 0)
    with pytest.raises(ConfigError, match='anchor_sizes'):
        build_detector('resnetrs_tiny', 3, anchor_sizes=(32, 64))
    with pytest.raises(ConfigError, match="arch='resnet18'"):
        build_detector('resnet18', 3)
    det = build_detector('resnetrs_tiny', 3, out_channels=16, representation_size=32)
    with pytest.raises(ConfigError, match='steps=0'):
        finetune_detector(det, [], steps=0)
    with pytest.raises(ConfigError, match='at least one image'):
        finetune_detector(det, [], steps=1)


# ---------------------------------------------------------------- the command line

TINY_FLAGS = ['--steps', '1', '--batch_size', '2', '--min_size', '64', '--test_size', '64', '--max_size', '64', '--device', 'cpu',
              '--num_workers', '0']


def cli(*argv):
    return subprocess.run([sys.executable, '-m', 'pixpro_rs.detection', *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_cli_runs_the_voc_protocol(voc, pixpro_run, tmp_path):
    write_voc(voc, {'000011': ((64, 48), [('person', (5, 5, 40, 40), False)])}, split='test')
    out = tmp_path / 'det'
    r = cli('--dataset', 'voc', '--data', voc, '--init', pixpro_run / 'encoder.safetensors', '--arch', 'resnetrs_tiny',
            '--train_sets', '2007-trainval', *TINY_FLAGS, '--output_dir', out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'voc 2007-test: AP' in r.stdout
    res = json.loads((out / 'results.json').read_text())
    assert res['arch'] == 'resnetrs_tiny' and 0 <= res['AP50'] <= 1 and (out / 'detector.pt').is_file()
    assert res['config']['steps'] == 1 and res['config']['masks'] is False and res['config']['recipe'] == 'voc_fpn_24k'
    assert json.loads((out / 'config.json').read_text()) == res['config']
    assert math.isnan(res['per_class']['dog']) and set(res['per_class']) == set(VOC_CLASSES)


@pytest.fixture
def coco(tmp_path):
    "A COCO-format folder exported from SyntheticScenes: train (4 images) and val (2 images of other scenes)."
    root = write_coco(tmp_path / 'coco', SceneBoxes(SyntheticScenes(4, 64, num_classes=3, seed=7), masks=True), 'train')
    return write_coco(root, SceneBoxes(SyntheticScenes(2, 64, num_classes=3, seed=8), masks=True), 'val')


def test_cli_runs_mask_rcnn_on_a_coco_folder(coco, pixpro_run, tmp_path):
    out = tmp_path / 'mask'
    r = cli('--dataset', 'coco', '--data', coco, '--init', pixpro_run / 'encoder.safetensors', '--arch', 'resnetrs_tiny',
            '--train_sets', 'train', '--test_set', 'val', *TINY_FLAGS, '--output_dir', out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'coco val: bbox AP' in r.stdout and 'segm AP' in r.stdout
    res = json.loads((out / 'results.json').read_text())
    for it in ('bbox', 'segm'):
        assert set(res[it]) == {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'} and 0 <= res[it]['AP'] <= res[it]['AP50'] <= 1
    assert res['config']['masks'] is True and res['config']['recipe'] == 'coco_fpn_1x' and res['arch'] == 'resnetrs_tiny'
    sd = torch.load(out / 'detector.pt', weights_only=True)
    assert any(k.startswith('roi_heads.mask_predictor.') for k in sd)  # a Mask R-CNN was trained and saved
    again = cli('--dataset', 'coco', '--data', coco, '--init', pixpro_run / 'encoder.safetensors', '--train_sets', 'train',
                '--test_set', 'val', *TINY_FLAGS, '--output_dir', out)
    assert again.returncode == 2 and 'invalid output_dir=' in again.stderr and 'results.json' in again.stderr


def test_cli_runs_the_c4_recipes(coco, pixpro_run, tmp_path):
    "The paper's C4 detectors from the command line: Mask R-CNN C4 on COCO, the checkpoint's C5 as the box head."
    out = tmp_path / 'c4'
    r = cli('--dataset', 'coco', '--recipe', 'coco_c4_1x', '--data', coco, '--init', pixpro_run / 'encoder.safetensors',
            '--train_sets', 'train', '--test_set', 'val', *TINY_FLAGS, '--output_dir', out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / 'results.json').read_text())
    assert res['config']['head'] == 'c4' and res['config']['steps'] == 1 and 0 <= res['segm']['AP'] <= 1
    sd = torch.load(out / 'detector.pt', weights_only=True)
    assert any(k.startswith('roi_heads.box_head.layer4.') for k in sd) and not any(k.startswith('backbone.fpn.') for k in sd)
    bad = cli('--dataset', 'voc', '--recipe', 'coco_c4_1x', '--data', coco, '--output_dir', tmp_path / 'x')
    assert bad.returncode == 2 and 'invalid' in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_cli_refuses_an_output_dir_that_is_a_file_before_training(coco, pixpro_run, tmp_path):
    (tmp_path / 'taken').write_text('not a folder')
    t = time.time()
    r = cli('--dataset', 'coco', '--data', coco, '--init', pixpro_run / 'encoder.safetensors', '--train_sets', 'train',
            '--test_set', 'val', '--steps', '100000', '--device', 'cpu', '--output_dir', tmp_path / 'taken')
    assert r.returncode == 2 and r.stdout == '', (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [f"pixpro-detect: error: invalid output_dir='{tmp_path / 'taken'}': "
                                             'expected a folder (this is a file)']
    assert time.time() - t < 60 and (tmp_path / 'taken').read_text() == 'not a folder'  # 100000 steps were never started


@pytest.mark.parametrize('argv, name', [
    (['--dataset', 'kitti'], 'dataset'),
    (['--dataset', 'coco', '--data', 'MISSING'], 'data'),
    (['--dataset', 'coco', '--data', 'COCO', '--train_sets', 'train', '--test_set', 'val', '--batch_size', '0'], 'batch_size'),
    (['--dataset', 'coco', '--data', 'COCO', '--train_sets', 'train', '--test_set', 'test'], 'data'),  # no such split
    (['--dataset', 'coco', '--data', 'COCO', '--train_sets', 'train', '--test_set', 'val', '--init', 'MISSING'], 'init'),
    (['--dataset', 'voc', '--data', 'COCO', '--train_sets', '2007'], 'train_sets'),
])
def test_cli_bad_input_is_one_line_naming_the_parameter(argv, name, coco, tmp_path, capsys):
    "The same `main` as `python -m pixpro_rs.detection`, in process (the subprocess path is tested above)."
    argv = [str(coco) if a == 'COCO' else str(tmp_path / 'missing') if a == 'MISSING' else a for a in argv]
    code = main(argv + ['--output_dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f'pixpro-detect: error: invalid {name}=') and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'out').exists()  # refused before anything was written


def test_help_everywhere():
    "`python -m`, the console script and the file as a script give the same help, with every parameter."
    for cmd in ([sys.executable, '-m', 'pixpro_rs.detection', '--help'], ['pixpro-detect', '--help'],
                [sys.executable, 'pixpro_rs/detection.py', '--help']):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        for name in DET_PARAMETERS: assert f'--{name}' in r.stdout, (cmd, name)
