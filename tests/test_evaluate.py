"Exports of pixpro_rs.evaluate against the real target libraries, checkpoint loading, and SegmentationFolders' errors."
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from pixpro_rs.core import ConfigError
from pixpro_rs.evaluate import (MaskError, SegmentationFolders, export_backbone, from_detectron2, load_backbone,
                                to_detectron2)
from pixpro_rs.pixpro import PixPro
from pixpro_rs.resnet_rs import create_model

from helpers import randomise_bn

timm = pytest.importorskip('timm')
torchvision = pytest.importorskip('torchvision')


def _pixpro_checkpoint(path, arch, seed=0, **kw):
    "A training checkpoint in the training chapter's format; the online encoder differs from the target."
    torch.manual_seed(seed)
    model = PixPro(create_model(arch, num_classes=0), **kw)
    randomise_bn(model.encoder, seed)
    torch.save({'model': model.state_dict(), 'config': {'arch': arch, 'image_size': 64}}, path)
    return model.encoder.eval()


@pytest.fixture(scope='module')
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- checkpoints

def test_load_backbone_takes_the_online_encoder(tmp_path):
    online = _pixpro_checkpoint(tmp_path / 'ckpt.pth', 'resnetrs_tiny')
    bb = load_backbone(tmp_path / 'ckpt.pth')
    assert bb.arch == 'resnetrs_tiny' and not bb.training and bb.pretrain_config == {'arch': 'resnetrs_tiny', 'image_size': 64}
    assert not any(p.requires_grad for p in bb.parameters())
    ref = online.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in bb.state_dict().items()) and len(ref) == len(bb.state_dict())
    # saved from a DDP-wrapped model: every key under 'module.'
    sd = torch.load(tmp_path / 'ckpt.pth', weights_only=True)
    torch.save({'model': {f'module.{k}': v for k, v in sd['model'].items()}, 'config': sd['config']}, tmp_path / 'ddp.pth')
    bb2 = load_backbone(tmp_path / 'ddp.pth')
    assert all(torch.equal(v, ref[k]) for k, v in bb2.state_dict().items())
    with pytest.raises(ConfigError, match="'resnetrs_tiny', the arch saved in"):
        load_backbone(tmp_path / 'ckpt.pth', arch='resnet50')


def test_load_backbone_reads_what_train_writes(tmp_path):
    "A real checkpoint of the training engine (2 steps on scenes): the online encoder, with the run's config."
    train = pytest.importorskip('pixpro_rs.train')
    train.train(arch='resnetrs_tiny', image_size=64, batch_size=4, synthetic_length=16, synthetic_size=64,
                num_workers=0, max_steps=2, progress=False, output_dir=str(tmp_path / 'run'))
    ckpt = train.list_checkpoints(tmp_path / 'run')[-1]
    bb = load_backbone(ckpt)
    assert bb.arch == 'resnetrs_tiny' and bb.pretrain_config['image_size'] == 64
    model = torch.load(ckpt, weights_only=True)['model']
    online = {k[len('encoder.'):]: v for k, v in model.items() if k.startswith('encoder.')}
    target = {k[len('target.encoder.'):]: v for k, v in model.items() if k.startswith('target.encoder.')}
    assert set(online) == set(bb.state_dict()) == set(target)
    assert all(torch.equal(v, online[k]) for k, v in bb.state_dict().items())
    assert any(not torch.equal(v, target[k]) for k, v in bb.state_dict().items())  # 2 steps: target != online
    enc = load_backbone(tmp_path / 'run' / 'encoder.safetensors')  # the run's encoder file: no arch needed
    assert enc.arch == 'resnetrs_tiny' and all(torch.equal(v, online[k]) for k, v in enc.state_dict().items())
    with pytest.raises(ConfigError, match="'resnetrs_tiny', the arch saved in"):
        load_backbone(tmp_path / 'run' / 'encoder.safetensors', arch='resnetrs50')


def test_load_backbone_names_the_file_on_mismatch(tmp_path):
    torch.save(create_model('resnetrs_tiny', num_classes=0).state_dict(), tmp_path / 'tiny.pth')
    with pytest.raises(ConfigError, match='has no config'):
        load_backbone(tmp_path / 'tiny.pth')
    with pytest.raises(ValueError, match='tiny.pth does not match resnet50'):
        load_backbone(tmp_path / 'tiny.pth', arch='resnet50')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='junk.pth: cannot read checkpoint'):
        load_backbone(tmp_path / 'junk.pth', arch='resnetrs_tiny')



def test_load_backbone_reads_the_arch_from_safetensors_metadata(tmp_path, x):
    "encoder.safetensors as train() writes it: loaded and exported without arch; a conflicting arch is refused."
    from safetensors import safe_open
    from safetensors.torch import save_file
    torch.manual_seed(0)
    enc = randomise_bn(create_model('resnet50', num_classes=0)).eval()
    sd = {k: v.detach().contiguous() for k, v in enc.state_dict().items()}
    save_file(sd, str(tmp_path / 'encoder.safetensors'), metadata={'arch': 'resnet50'})  # the end of train()
    bb = load_backbone(tmp_path / 'encoder.safetensors')
    assert bb.arch == 'resnet50' and bb.pretrain_config is None and not bb.training
    assert all(torch.equal(v, sd[k]) for k, v in bb.state_dict().items()) and len(bb.state_dict()) == len(sd)
    with pytest.raises(ConfigError, match=r"invalid arch='resnetrs50': expected 'resnet50', the arch saved in .*encoder\.safetensors"):
        load_backbone(tmp_path / 'encoder.safetensors', arch='resnetrs50')
    assert load_backbone(tmp_path / 'encoder.safetensors', arch='resnet50').arch == 'resnet50'  # agreeing: fine
    out = export_backbone(tmp_path / 'encoder.safetensors', 'torchvision', tmp_path / 'tv.safetensors')  # no arch
    with safe_open(str(out), 'pt') as f:
        assert f.metadata() == {'arch': 'resnet50', 'format': 'torchvision'}
    with torch.no_grad():
        assert torch.allclose(load_backbone(out).forward_features(x), enc.forward_features(x), atol=1e-6)  # chains
    with pytest.raises(ConfigError, match="'resnet50', the arch saved in"):
        export_backbone(tmp_path / 'encoder.safetensors', 'timm', tmp_path / 'rs.pth', arch='resnetrs50')
    assert not (tmp_path / 'rs.pth').exists()
    save_file(sd, str(tmp_path / 'bare.safetensors'))  # no metadata: the caller must say
    with pytest.raises(ConfigError, match='has no config'):
        load_backbone(tmp_path / 'bare.safetensors')


# ---------------------------------------------------------------- exports

def test_timm_export_of_a_pixpro_checkpoint_round_trips(tmp_path, x):
    "ResNet-RS-50 from a PixPro checkpoint -> timm: strict load, the same C5; the mmdetection path (features_only)."
    online = _pixpro_checkpoint(tmp_path / 'ckpt.pth', 'resnetrs50', hidden_dim=64, proj_dim=16)
    with torch.no_grad():
        want, pyramid = online.forward_features(x), online.forward_pyramid(x)
    assert want.abs().max() > 0.1
    path = export_backbone(tmp_path / 'ckpt.pth', 'timm', tmp_path / 'rs50.pth')
    sd = torch.load(path, weights_only=True)
    assert not any(k.startswith('fc.') for k in sd)
    ref = timm.create_model('resnetrs50', num_classes=0)
    ref.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.allclose(ref.eval().forward_features(x), want, atol=1e-5)
    # what mmpretrain's TIMMBackbone builds: features_only + checkpoint_path, out_indices (1, 2, 3, 4) = C2..C5
    feat = timm.create_model('resnetrs50', features_only=True, out_indices=(1, 2, 3, 4), checkpoint_path=str(path)).eval()
    with torch.no_grad():
        for a, b in zip(feat(x), pyramid, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    # a new classifier: only fc is missing; timm's pretrained-file route fills the rest
    missing = timm.create_model('resnetrs50', num_classes=7).load_state_dict(sd, strict=False)
    assert sorted(missing.missing_keys) == ['fc.bias', 'fc.weight'] and missing.unexpected_keys == []
    path = export_backbone(tmp_path / 'ckpt.pth', 'timm', tmp_path / 'rs50.safetensors')
    ft = timm.create_model('resnetrs50', pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert torch.allclose(ft.forward_features(x), want, atol=1e-5)


@pytest.fixture(scope='module')
def r50(tmp_path_factory):
    "A PixPro checkpoint on torchvision's ResNet-50, and its online encoder."
    path = tmp_path_factory.mktemp('r50') / 'ckpt.pth'
    return path, _pixpro_checkpoint(path, 'resnet50', seed=3, hidden_dim=64, proj_dim=16)


def test_torchvision_and_timm_exports_of_resnet50(r50, tmp_path, x):
    ckpt, online = r50
    with torch.no_grad():
        want, pooled = online.forward_features(x), online(x)
    tv = torchvision.models.resnet50()
    tv.fc = nn.Identity()
    tv.load_state_dict(torch.load(export_backbone(ckpt, 'torchvision', tmp_path / 'tv.pth'), weights_only=True), strict=True)
    tv.eval()
    with torch.no_grad():
        assert torch.allclose(nn.Sequential(*list(tv.children())[:-2])(x), want, atol=1e-5)
        assert torch.allclose(tv(x), pooled, atol=1e-5)
    ref = timm.create_model('resnet50', num_classes=0)  # timm's ResNet-50 shares torchvision's names
    ref.load_state_dict(torch.load(export_backbone(ckpt, 'timm', tmp_path / 'timm.pth'), weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.allclose(ref.eval().forward_features(x), want, atol=1e-5)


def test_detectron2_export_round_trips_through_the_inverse_mapping(r50, tmp_path, x):
    ckpt, online = r50
    with open(export_backbone(ckpt, 'detectron2', tmp_path / 'r50.pkl'), 'rb') as f:
        obj = pickle.load(f)
    assert set(obj) == {'model', '__author__', 'matching_heuristics'} and obj['matching_heuristics'] is True
    d2 = obj['model']
    assert all(isinstance(v, np.ndarray) for v in d2.values())
    # detectron2's names for a ResNet-50 (stem + res2..res5, conv{1,2,3}.norm, shortcut(.norm))
    stages = {k.split('.')[0] for k in d2}
    assert stages == {'stem', 'res2', 'res3', 'res4', 'res5'}
    assert {'stem.conv1.weight', 'stem.conv1.norm.running_mean', 'res2.0.shortcut.weight', 'res2.0.shortcut.norm.bias',
            'res4.5.conv2.norm.weight', 'res5.2.conv3.weight'} <= set(d2)
    assert not any('.bn' in k or 'downsample' in k or k.startswith('layer') for k in d2)
    back = create_model('resnet50', num_classes=0)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in from_detectron2(d2).items()}, strict=True)
    with torch.no_grad():
        assert torch.allclose(back.eval().forward_features(x), online.forward_features(x), atol=1e-5)
    sd = online.state_dict()
    assert list(from_detectron2(to_detectron2(sd))) == list(sd)


def test_exports_refuse_what_the_target_cannot_load(tmp_path):
    rs = create_model('resnetrs50', num_classes=0)
    with pytest.raises(ConfigError, match=r'(?s)three 3x3 convs.*squeeze-and-excitation.*BACKBONE_REGISTRY.*'
                                          r"fmt='timm'"):
        export_backbone(rs, 'detectron2', tmp_path / 'rs.pkl')
    with pytest.raises(ConfigError, match='torchvision has no ResNet-RS'):
        export_backbone(rs, 'torchvision', tmp_path / 'rs.pth')
    with pytest.raises(ConfigError, match='one timm builds by name'):
        export_backbone(create_model('resnetrs_tiny', num_classes=0), 'timm', tmp_path / 'tiny.pth')
    with pytest.raises(ConfigError, match='fmt'):
        export_backbone(rs, 'onnx', tmp_path / 'rs.onnx')
    with pytest.raises(ConfigError, match='path suffix'):
        export_backbone(create_model('resnet50', num_classes=0), 'detectron2', tmp_path / 'r50.pth')
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


# ---------------------------------------------------------------- segmentation folders

def _mask(a, path):
    "A palette PNG of class indices (VOC's format), with a colour table that is not the identity."
    im = Image.frombytes('P', (a.shape[1], a.shape[0]), a.astype(np.uint8).tobytes())
    im.putpalette([(7 * i) % 256 for i in range(768)])
    im.save(path)


@pytest.fixture
def voc(tmp_path):
    "root/JPEGImages (4 images), SegmentationClass (3 masks), ImageSets/Segmentation/{train,val}.txt."
    root = tmp_path / 'VOC2012'
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(['a', 'b', 'c', 'unlabelled']):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / 'JPEGImages' / f'{name}.jpg')
        if name != 'unlabelled':
            m = np.full((20, 30), i, np.uint8)
            m[0] = 255  # an ignored row, as VOC's object borders
            _mask(m, root / 'SegmentationClass' / f'{name}.png')
    (root / 'ImageSets/Segmentation/train.txt').write_text('a\nb\n')
    (root / 'ImageSets/Segmentation/val.txt').write_text('c\n')
    return root


def test_segmentation_folders_reads_voc_layout(voc):
    ds = SegmentationFolders(voc)
    assert ds.ids == ['a', 'b', 'c'] and ds.num_classes == 21  # the image without a mask is not used
    assert SegmentationFolders(voc, 'train').ids == ['a', 'b'] and SegmentationFolders(voc, 'val').ids == ['c']
    img, mask = ds[2]
    assert img.shape == (3, 20, 30) and img.dtype == torch.uint8
    assert mask.shape == (20, 30) and mask.dtype == torch.int64
    assert set(mask[0].tolist()) == {255} and set(mask[1:].flatten().tolist()) == {2}  # indices, not colours


def test_segmentation_folders_errors_name_the_file(voc, tmp_path):
    with pytest.raises(ConfigError, match='nowhere does not exist'):
        SegmentationFolders(tmp_path / 'nowhere')
    with pytest.raises(ConfigError, match='SegmentationObject does not exist'):
        SegmentationFolders(voc, mask_dir='SegmentationObject')
    with pytest.raises(ConfigError, match=r'test.txt; it does not exist \(lists there: train, val\)'):
        SegmentationFolders(voc, 'test')
    (voc / 'ImageSets/Segmentation/bad.txt').write_text('a\nzz\n')
    with pytest.raises(ConfigError, match="lists 'zz', not in"):
        SegmentationFolders(voc, 'bad')
    (voc / 'ImageSets/Segmentation/bad.txt').write_text('unlabelled\n')
    with pytest.raises(ConfigError, match='no unlabelled.png in'):
        SegmentationFolders(voc, 'bad')
    # a mask whose size differs from its image's
    _mask(np.zeros((20, 31), np.uint8), voc / 'SegmentationClass' / 'b.png')
    with pytest.raises(MaskError, match=r'b.png: mask 20x31 \(HxW\) does not match image .*b.jpg 20x30'):
        SegmentationFolders(voc)[1]
    # a colour-coded mask
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(voc / 'SegmentationClass' / 'b.png')
    with pytest.raises(MaskError, match="b.png: mode 'RGB'"):
        SegmentationFolders(voc)[1]
    # a label outside the classes
    _mask(np.full((20, 30), 30, np.uint8), voc / 'SegmentationClass' / 'b.png')
    with pytest.raises(MaskError, match=r'b.png: label 30 is not a class \(0..20\)'):
        SegmentationFolders(voc)[1]
    # an unreadable mask
    (voc / 'SegmentationClass' / 'b.png').write_bytes(b'\x89PNG garbage')
    with pytest.raises(MaskError, match='b.png'):
        SegmentationFolders(voc)[1]
    assert isinstance(MaskError('x'), OSError)  # a BadImageError
    # no pairs at all
    for p in (voc / 'SegmentationClass').glob('*.png'):
        p.rename(p.with_name('x' + p.name))
    with pytest.raises(ConfigError, match=r'image/mask pairs; none found \(4 images'):
        SegmentationFolders(voc)
