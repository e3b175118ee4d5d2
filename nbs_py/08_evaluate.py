# %% [markdown]
# # Evaluation and transfer: probes and exports
#
# > Linear and dense probes on frozen features (top-1, mIoU, pixel accuracy), Pascal VOC-style segmentation folders, and exports of the pretrained online encoder for timm, torchvision and detectron2.

# %%
#| default_exp evaluate

# %%
#| export
from __future__ import annotations

import copy
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn, Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pixpro_rs.augment import IMAGENET_MEAN, IMAGENET_STD
from pixpro_rs.core import ConfigError, atomic_write, check_choice, check_positive
from pixpro_rs.data import BadImageError, SyntheticScenes, find_images, load_image
from pixpro_rs.pixpro import PixPro
from pixpro_rs.resnet_rs import MODEL_NAMES, RS_CONFIGS, CheckpointError, create_model, load_pretrained

# %%
#| hide
import tempfile
import time

import matplotlib.pyplot as plt
import timm
import torchvision
from fastcore.test import test_close, test_eq, test_fail, test_ne
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from nbdev.showdoc import show_doc
from safetensors.torch import save_file

from pixpro_rs.data import ClassFolders

# %%
#| hide
_t0 = time.time()
_threads = torch.get_num_threads()  # restored at the end
torch.set_num_threads(1)  # nbdev_test runs notebooks side by side on 2 cores: small ops with 2 spinning threads each crawl


# %% [markdown]
# PixPro is judged by what its features do for *someone else's* task: the paper (Xie et al., arXiv 2011.10043)
# fine-tunes detectors and segmenters: Faster R-CNN R50-C4 on Pascal VOC, Mask R-CNN R50-FPN and R50-C4 on COCO, and
# semantic segmentation on Cityscapes (the reference's README at commit e390d6b lists the detection results with
# their detectron2 configs; the segmentation code was never released, which users of the reference keep asking for:
# zdaxie/PixPro issues #2 and #23). Those runs take GPU-days. Two questions come before them: *how do I check my
# checkpoint quickly?* and *how do I get the weights into my detection library?* This chapter answers both:
#
# | unit | what it does |
# |---|---|
# | `load_backbone` | the **online** encoder of a PixPro checkpoint (or a backbone file) as a stand-alone network |
# | `extract_features` | frozen features: pooled C5, the C5 map, or C4 with C5 upsampled beside it |
# | `confusion_matrix`, `iou_per_class`, `miou`, `pixel_accuracy` | segmentation scores, with an ignore index |
# | `linear_probe` | a linear classifier on pooled C5 (top-1), on `ClassFolders` or `SyntheticScenes` |
# | `SegmentationFolders` | images + PNG label maps in Pascal VOC's layout |
# | `dense_probe` | a 1x1 convolution on frozen C5 (optionally C4), upsampled, per-pixel cross-entropy (mIoU) |
# | `export_backbone` | the encoder for timm (ResNet-RS and ResNet-50), torchvision and detectron2 (ResNet-50) |
#
# A probe trains only a linear layer on top of a frozen network, so it measures what the features already contain.
# It is not the paper's transfer protocol (fine-tuning everything), and a probe's ranking of methods need not match a
# fine-tuning ranking; it is the cheap check one can run after every pretraining run, on a CPU.

# %% [markdown]
# ## The online encoder of a checkpoint
#
# A PixPro training checkpoint (written by the training chapter) is a `torch.save` dict with
# `'model'`, the state dict of a `PixPro` module, and `'config'`, the resolved run configuration (with at least `arch`
# and `image_size`). The state dict holds two encoders: `encoder.*`, the **online** network trained by gradients, and
# `target.encoder.*`, its momentum copy. Transfer uses the online encoder, as the reference does: its converter
# keeps only the keys under `module.encoder.` (`transfer/detection/convert_pretrain_to_d2.py`, lines 16-17).
# `load_backbone` also takes a plain backbone state dict (`.pth`/`.safetensors`, e.g. a timm checkpoint), a `PixPro`
# module or a backbone module, and always returns a copy in eval mode with gradients off: a probe can never change
# the caller's model.
#
# The architecture comes from the file whenever the file says it. A `.safetensors` file has no room for a config, but
# its header has a small str-to-str metadata dict, and every safetensors file this package writes puts `arch` there:
# training's `encoder.safetensors`, fine-tuning's `model.safetensors`, `export_backbone`'s exports. So
# `load_backbone('runs/x/encoder.safetensors')` needs no `arch`, and a given `arch` that disagrees with the saved one
# is refused with both names, before any weights are read. Only a file that says nothing (a plain `.pth` state
# dict, a timm checkpoint) needs `arch` from the caller.

# %%
#| exports
def _peek(path:Path) -> tuple[list[str], dict|None, str|None]:
    "Tensor names (inside 'state_dict'/'model' if present), the 'config' dict and the saved arch of a checkpoint, read lazily."
    try:
        if path.suffix == '.safetensors':  # no config, but training and the exports write the arch in the metadata
            from safetensors import safe_open
            with safe_open(str(path), 'pt') as f: return list(f.keys()), None, (f.metadata() or {}).get('arch')
        try: obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)  # no copy of the weights
        except RuntimeError: obj = torch.load(path, map_location='cpu', weights_only=True)  # old (non-zip) format
    except Exception as e: raise CheckpointError(f'{path}: cannot read checkpoint ({type(e).__name__}: {e})') from e
    config = obj.get('config') if isinstance(obj, dict) and isinstance(obj.get('config'), dict) else None
    for key in ('state_dict', 'model', 'model_state_dict'):  # the order of resnet_rs.load_pretrained
        if isinstance(obj, dict) and isinstance(obj.get(key), dict): obj = obj[key]; break
    return (list(obj) if isinstance(obj, dict) else []), config, (config or {}).get('arch')


# %%
tmp_peek = Path(tempfile.mkdtemp())
torch.save({'model': {'conv1.weight': torch.zeros(1)}, 'config': {'arch': 'resnetrs_tiny', 'image_size': 64}}, tmp_peek/'ckpt.pth')
test_eq(_peek(tmp_peek/'ckpt.pth'), (['conv1.weight'], {'arch': 'resnetrs_tiny', 'image_size': 64}, 'resnetrs_tiny'))
torch.save({'w': torch.zeros(1)}, tmp_peek/'plain.pth')  # a plain state dict: no config, no arch
test_eq(_peek(tmp_peek/'plain.pth'), (['w'], None, None))
(tmp_peek/'junk.pth').write_bytes(b'not a checkpoint')
test_fail(lambda: _peek(tmp_peek/'junk.pth'), contains='junk.pth: cannot read checkpoint')


# %%
#| exports
def load_backbone(checkpoint_or_model:str|Path|nn.Module,  # PixPro checkpoint, backbone .pth/.safetensors, PixPro or backbone
                  arch:str|None=None,  # backbone name; needed when the file does not say, checked when it does
                 ) -> nn.Module:
    "The ONLINE encoder as a backbone without classifier: a copy, in eval mode, without gradients."
    config = None
    if isinstance(checkpoint_or_model, nn.Module):
        m = checkpoint_or_model
        backbone = copy.deepcopy(m.encoder if hasattr(m, 'encoder') and hasattr(m, 'target') else m)
    else:
        path = Path(checkpoint_or_model)
        if not path.is_file(): raise FileNotFoundError(f'checkpoint {path} does not exist')
        keys, config, saved = _peek(path)
        if arch and saved and arch != saved: raise ConfigError('arch', arch, f'{saved!r}, the arch saved in {path}')
        arch = arch or saved
        if arch is None:
            raise ConfigError('arch', None, f'one of {", ".join(MODEL_NAMES)}: {path} has no config (or arch metadata) to read it from')
        wrap = 'module.' if keys and all(k.startswith('module.') for k in keys) else ''  # saved from a DDP wrapper
        prefix = f'{wrap}encoder.' if any(k.startswith(f'{wrap}target.') for k in keys) else None  # online, not target
        backbone = load_pretrained(create_model(arch, num_classes=0), path, prefix=prefix)
    if arch and getattr(backbone, 'arch', arch) != arch:
        raise ConfigError('arch', arch, f'{backbone.arch!r}, the arch of the given model')
    backbone.pretrain_config = config  # the run's config (image_size ...) when the checkpoint has one
    return backbone.eval().requires_grad_(False)


# %% [markdown]
# The test writes a checkpoint in the training chapter's format from a `PixPro` on `resnetrs_tiny`, moves the target
# away from the online encoder (so that picking the wrong one would show), and reads it back. A plain backbone state
# dict needs `arch`; a wrong `arch` is refused with the saved one in the message. Then the encoder file exactly as
# training writes it (`save_file(..., metadata={'arch': ...})`) loads without `arch`.
# The checkpoint maker is this test's fixture, not part of the evaluation API (it is not exported).

# %%
def tiny_pixpro_checkpoint(path:str|Path,  # where to write it
                           seed:int=0,
                          ) -> nn.Module:  # the PixPro model saved
    "A random `PixPro` on `resnetrs_tiny` saved in the training chapter's format, online encoder moved off the target."
    torch.manual_seed(seed)
    model = PixPro(create_model('resnetrs_tiny', num_classes=0))
    with torch.no_grad():
        for p in model.encoder.parameters(): p.add_(0.1 * torch.randn_like(p))  # online != target
    torch.save({'model': model.state_dict(), 'config': {'arch': 'resnetrs_tiny', 'image_size': 64}}, path)
    return model


# %%
tmp = Path(tempfile.mkdtemp())
pixpro = tiny_pixpro_checkpoint(tmp/'ckpt.pth')
bb = load_backbone(tmp/'ckpt.pth')
test_eq((bb.arch, bb.training, bb.pretrain_config['image_size']), ('resnetrs_tiny', False, 64))
assert not any(p.requires_grad for p in bb.parameters())
for k, v in bb.state_dict().items(): test_eq(v, pixpro.encoder.state_dict()[k])  # the online encoder ...
assert not torch.equal(bb.state_dict()['conv1.0.weight'], pixpro.target['encoder'].state_dict()['conv1.0.weight'])  # ... not the target
test_fail(lambda: load_backbone(tmp/'ckpt.pth', arch='resnetrs50'), contains="'resnetrs_tiny', the arch saved in")

torch.save(pixpro.encoder.state_dict(), tmp/'plain.pth')  # a plain backbone state dict: no config
test_fail(lambda: load_backbone(tmp/'plain.pth'), contains='has no config')
test_eq(load_backbone(tmp/'plain.pth', 'resnetrs_tiny').conv1[0].weight, pixpro.encoder.conv1[0].weight.detach())
save_file({k: v.contiguous() for k, v in pixpro.encoder.state_dict().items()}, str(tmp/'plain.safetensors'))
test_eq(load_backbone(tmp/'plain.safetensors', 'resnetrs_tiny').conv1[0].weight, pixpro.encoder.conv1[0].weight.detach())
test_fail(lambda: load_backbone(tmp/'plain.safetensors'), contains='has no config (or arch metadata)')  # no metadata
save_file({k: v.contiguous() for k, v in pixpro.encoder.state_dict().items()}, str(tmp/'encoder.safetensors'),
          metadata={'arch': 'resnetrs_tiny'})  # as train() writes it
bb = load_backbone(tmp/'encoder.safetensors')  # no arch: the metadata says
test_eq((bb.arch, bb.pretrain_config), ('resnetrs_tiny', None))
for k, v in bb.state_dict().items(): test_eq(v, pixpro.encoder.state_dict()[k])
test_fail(lambda: load_backbone(tmp/'encoder.safetensors', arch='resnetrs50'),
          contains="invalid arch='resnetrs50': expected 'resnetrs_tiny', the arch saved in")
test_fail(lambda: load_backbone(tmp/'missing.pth'), contains='missing.pth does not exist')

pixpro.train()
bb = load_backbone(pixpro)  # a module: the online encoder, copied
assert bb is not pixpro.encoder and pixpro.encoder.training and not bb.training
test_eq(bb.conv1[0].weight, pixpro.encoder.conv1[0].weight.detach())


# %% [markdown]
# ## Frozen features
#
# Images come in as uint8 tensors (as every dataset of the data chapter yields them). `resize_crop` brings one image or
# label map to the probe's square size the way an evaluation transform does: shorter side to `size`, then a centre
# crop; bilinear with antialiasing for images, nearest for label maps (interpolating class indices would invent
# classes). `normalize_images` applies the ImageNet mean and standard deviation that pretraining used (the augmentation
# chapter's `IMAGENET_MEAN`/`IMAGENET_STD`).

# %%
#| exports
def resize_crop(x:Tensor,  # image [3, H, W] uint8, or label map [H, W]
                size:int,  # side of the square output
               ) -> Tensor:  # [3, size, size] or [size, size], same dtype
    "Shorter side to `size`, then centre crop: bilinear (antialiased) for images, nearest for label maps."
    if tuple(x.shape[-2:]) == (size, size): return x
    if x.ndim == 2: return TF.center_crop(TF.resize(x[None], size, InterpolationMode.NEAREST_EXACT), [size, size])[0]
    return TF.center_crop(TF.resize(x, size, InterpolationMode.BILINEAR, antialias=True), [size, size])


# %%
lab = torch.tensor([[0, 0, 1, 1, 2, 2]] * 4)  # [4, 6]
test_eq(resize_crop(lab, 2), torch.tensor([[0, 1], [0, 1]]))  # nearest: still class indices; centre crop of 2x3
img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
test_eq((resize_crop(img, 20).shape, resize_crop(img, 20).dtype), ((3, 20, 20), torch.uint8))
assert resize_crop(img, 30) is not img and resize_crop(resize_crop(img, 30), 30).shape == (3, 30, 30)


# %%
#| exports
def normalize_images(images:Tensor) -> Tensor:  # [N, 3, H, W] uint8 -> float
    "Scale to [0, 1] and normalise with ImageNet's mean and std, as in pretraining."
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


# %%
test_close(normalize_images(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))[0, :, 0, 0],
           (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD), eps=1e-6)

# %% [markdown]
# `extract_features` runs the backbone in **eval mode** under `no_grad`: batch norm uses its running statistics and
# never updates them, and the backbone's own mode is restored afterwards. Three kinds of feature:
#
# | `features` | shape | used by |
# |---|---|---|
# | `'pooled'` | [N, C5] | the linear (classification) probe |
# | `'c5'` | [N, C5, H/32, W/32] | the dense probe |
# | `'c4c5'` | [N, C4 + C5, H/16, W/16]: C4, with C5 upsampled bilinearly beside it | the dense probe, twice the resolution |
# | `'c3c4c5'` | [N, C3 + C4 + C5, H/8, W/8]: a hypercolumn (Hariharan et al., arXiv 1411.5752), C4 and C5 upsampled to C3 | the dense probe on small objects, four times the resolution |
#
# > **Ours.** The reference's linear evaluation freezes the backbone's *weights* but runs it in training mode, so every
# > batch norm keeps updating its running mean and variance on the probe's data: the "frozen" backbone drifts, and the
# > features at test time are not those the probe was trained on. We run the backbone in eval mode throughout; the
# > test below shows both behaviours.

# %%
#| exports
FEATURES = ('pooled', 'c5', 'c4c5', 'c3c4c5')

@torch.no_grad()
def extract_features(backbone:nn.Module,  # frozen: run in eval mode, its own mode restored afterwards
                     images:Tensor,  # [N, 3, H, W] uint8
                     features:str='c5',  # one of FEATURES (see the table)
                     batch_size:int=64,  # images per forward pass
                    ) -> Tensor:  # float32, on the CPU
    "Features of a frozen backbone: eval mode (BN statistics used, never updated), no gradients."
    check_choice('features', features, FEATURES)
    device, was, out = next(backbone.parameters()).device, backbone.training, []
    backbone.eval()
    try:
        for i in range(0, len(images), batch_size):
            x = normalize_images(images[i:i + batch_size].to(device))  # [B, 3, H, W]
            if features in ('c4c5', 'c3c4c5'):
                maps = backbone.forward_pyramid(x)[1 if features == 'c3c4c5' else 2:]  # [C3,] C4, C5 at 8, 16, 32
                size = maps[0].shape[-2:]  # the finest map's
                f = torch.cat([maps[0]] + [F.interpolate(m, size=size, mode='bilinear', align_corners=False) for m in maps[1:]], 1)
            else:
                f = backbone.forward_features(x)  # [B, C5, H/32, W/32]
                if features == 'pooled': f = f.mean((2, 3))  # [B, C5]
            out.append(f.float().cpu())
    finally: backbone.train(was)
    return torch.cat(out)


# %%
def bn_buffers(m): return {k: v.clone() for k, v in m.state_dict().items() if 'running' in k or 'num_batches' in k}

torch.manual_seed(0)
net = create_model('resnetrs_tiny', num_classes=0).train()  # a caller's backbone left in training mode
images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
before = bn_buffers(net)
for kind, shape in [('pooled', (5, 512)), ('c5', (5, 512, 2, 2)), ('c4c5', (5, 256 + 512, 4, 4)),
                    ('c3c4c5', (5, 128 + 256 + 512, 8, 8))]:
    test_eq(extract_features(net, images, kind, batch_size=2).shape, shape)
assert net.training  # mode restored
for k, v in bn_buffers(net).items(): test_eq(v, before[k])  # no BN statistic moved
with torch.no_grad(): ref = net.eval().forward_features(normalize_images(images))
test_close(extract_features(net.train(), images), ref, eps=1e-5)  # the same as an eval-mode forward
with torch.no_grad(): c3 = net.eval().forward_pyramid(normalize_images(images))[1]
test_close(extract_features(net.train(), images, 'c3c4c5')[:, :128], c3, eps=1e-5)  # the hypercolumn starts with C3 itself
with torch.no_grad(): net.train()(normalize_images(images))  # what the reference's linear eval does every batch:
assert not torch.equal(net.bn1.running_mean, before['bn1.running_mean'])  # weights frozen, statistics drift


# %% [markdown]
# ## Segmentation scores
#
# All scores come from one **confusion matrix** $M$ accumulated over the whole evaluation set, $M_{tp}$ = pixels of
# true class $t$ predicted as $p$, skipping every pixel whose label is the ignore index (255, Pascal VOC's object
# borders). With $\mathrm{TP}_k = M_{kk}$, $\mathrm{FP}_k = \sum_t M_{tk} - M_{kk}$ and
# $\mathrm{FN}_k = \sum_p M_{kp} - M_{kk}$:
#
# $$\mathrm{IoU}_k = \frac{\mathrm{TP}_k}{\mathrm{TP}_k + \mathrm{FP}_k + \mathrm{FN}_k}, \qquad
#   \mathrm{mIoU} = \frac{1}{|P|} \sum_{k \in P} \mathrm{IoU}_k, \qquad
#   \text{pixel accuracy} = \frac{\sum_k M_{kk}}{\sum_{t,p} M_{tp}},$$
#
# where $P$ is the set of classes **present in the ground truth or in the predictions** (the union is not empty).
#
# > **Ours (the convention, stated).** A class absent from both the labels and the predictions has IoU 0/0: it is
# > *excluded* from the mean (reported as `nan`), neither counted as 1 (which would reward a model for not
# > predicting a class that is not there) nor as 0 (which would punish it). A class that is predicted but absent
# > from the labels has IoU 0 and counts: false positives are errors. This is the convention of mmsegmentation (a mean
# > that skips `nan`). Scores are computed from the matrix of the *whole* set, as the VOC and Cityscapes benchmarks
# > do, never as a mean of per-image mIoUs.

# %%
#| exports
def confusion_matrix(pred:Tensor,  # predicted class per pixel (or per image), any shape
                     target:Tensor,  # true class, same shape; `ignore_index` marks pixels to skip
                     num_classes:int,  # K: classes 0..K-1
                     ignore_index:int=255,  # label value left out of every count
                    ) -> Tensor:  # [K, K] int64: rows true class, columns predicted class
    "Counts of (true class, predicted class) over the pixels whose label is not `ignore_index`."
    if pred.shape != target.shape: raise ConfigError('pred', tuple(pred.shape), f'the shape of target, {tuple(target.shape)}')
    keep = target != ignore_index
    p, t = pred[keep].long(), target[keep].long()  # [n]
    for name, v in (('pred', p), ('target', t)):
        if v.numel() and (v.min() < 0 or v.max() >= num_classes):
            raise ConfigError(name, f'values {int(v.min())}..{int(v.max())}', f'classes 0..{num_classes - 1} (or {ignore_index} in target)')
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes).cpu()


# %% [markdown]
# Hand-made masks with known answers: 16 pixels, 4 of them ignored (the predictions there, class 3, must not
# count), class 4 absent from both (excluded). By hand: class 0 has TP 3 and union 6 (IoU 1/2), class 1 TP 3 of 5
# (3/5), class 2 TP 3 of 4 (3/4); mIoU = (0.5 + 0.6 + 0.75)/3, pixel accuracy 9/12.

# %%
target = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 255, 255],
                       [2, 2, 255, 255]])
pred = torch.tensor([[0, 0, 1, 0],
                     [0, 1, 1, 1],
                     [2, 0, 3, 3],
                     [2, 2, 2, 2]])
conf = confusion_matrix(pred, target, 5)
test_eq(int(conf.sum()), 12)
test_eq(confusion_matrix(target.clamp(max=2), target, 3).diag().sum(), 12)  # a perfect prediction
test_fail(lambda: confusion_matrix(pred[:2], target, 5), contains='shape of target')


# %%
#| exports
def iou_per_class(conf:Tensor) -> Tensor:  # [K] float64, nan where a class is in neither labels nor predictions
    "TP / (TP + FP + FN) per class from a confusion matrix (rows true, columns predicted)."
    conf = conf.double()
    tp, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


# %%
iou = iou_per_class(conf)
test_close(iou[:3], torch.tensor([0.5, 0.6, 0.75], dtype=torch.float64), eps=1e-12)
assert iou[3].isnan() and iou[4].isnan()  # 3: predicted only where the label is ignored; 4: nowhere


# %%
#| exports
def miou(conf:Tensor) -> float:
    "Mean IoU over the classes present in the labels or the predictions (nan if there is none)."
    iou = iou_per_class(conf)
    return float(iou.nanmean()) if (~iou.isnan()).any() else math.nan


# %%
test_close(miou(conf), (0.5 + 0.6 + 0.75) / 3, eps=1e-12)
assert math.isnan(miou(torch.zeros(3, 3, dtype=torch.long)))


# %%
#| exports
def pixel_accuracy(conf:Tensor) -> float:
    "Correctly classified pixels / counted pixels (nan if none was counted)."
    return float(conf.diag().sum() / conf.sum()) if conf.sum() > 0 else math.nan


# %%
test_close(pixel_accuracy(conf), 0.75, eps=1e-12)
assert math.isnan(pixel_accuracy(torch.zeros(3, 3)))

# %% [markdown]
# Then one correct pixel of class 1 is predicted as class 3, which is in no label: class 3 now counts with IoU 0
# and class 1 rises to 3/4.

# %%
pred[1, 1] = 3  # a pixel of class 0 (truth) predicted as 3, a class in no label
conf = confusion_matrix(pred, target, 5)
test_close(iou_per_class(conf)[:4], torch.tensor([0.5, 0.75, 0.75, 0.], dtype=torch.float64), eps=1e-12)
test_close(miou(conf), 0.5, eps=1e-12)
test_fail(lambda: confusion_matrix(pred, target, 3), contains='classes 0..2')  # prediction 3 with K = 3


# %% [markdown]
# ## The linear probe
#
# A probe trains only a linear map on frozen features, here with plain SGD (momentum 0.9) and a cosine learning rate
# on minibatches drawn with a seeded generator, so a rerun gives the same numbers. The features are computed **once**
# (one pass of the backbone over the data), which makes hundreds of probe steps cost seconds on a CPU.
#
# > **Ours.** (1) Before the linear layer, every feature channel is standardised with the training set's mean and
# > standard deviation, i.e. a batch norm without affine parameters, frozen at the training-set statistics (MAE's
# > linear probe puts a batch norm without affine parameters in the same place). A per-channel affine map followed by a linear layer is still a linear classifier, so the
# > probe measures the same thing; it only makes one learning rate work for features of any scale (a random network's
# > C5 and a trained one's differ by orders of magnitude). (2) The classifier starts at zero: deterministic, and the
# > problem is convex anyway. (3) No augmentation: the paper-style linear evaluation (random crops for 100 ImageNet
# > epochs) is a different, much longer protocol; ours is a quick, repeatable measurement of the features.

# %%
#| exports
class ProbeHead(nn.Module):
    "A linear classifier on standardised features: (x - mean) / std per channel, then Linear [N, C] or 1x1 conv [N, C, h, w]."
    def __init__(self, channels:int, num_classes:int, dense:bool=False):
        super().__init__()
        self.dense = dense
        self.register_buffer('mean', torch.zeros(channels))
        self.register_buffer('std', torch.ones(channels))
        self.fc = nn.Conv2d(channels, num_classes, 1) if dense else nn.Linear(channels, num_classes)
        nn.init.zeros_(self.fc.weight); nn.init.zeros_(self.fc.bias)

    @torch.no_grad()
    def standardize_from(self, feats:Tensor) -> ProbeHead:  # [N, C] or [N, C, h, w] training features
        "Set mean and std per channel from the training features (std as BN: sqrt(var + 1e-5))."
        dims = (0, 2, 3) if self.dense else (0,)
        self.mean.copy_(feats.mean(dims)); self.std.copy_((feats.var(dims, unbiased=False) + 1e-5).sqrt())
        return self

    def forward(self, x:Tensor) -> Tensor:  # [N, C(, h, w)] -> [N, K(, h, w)]
        shape = (1, -1, 1, 1) if self.dense else (1, -1)
        return self.fc((x - self.mean.view(shape)) / self.std.view(shape))


# %%
ph = ProbeHead(3, 2).standardize_from(torch.tensor([[0., 2., 4.], [2., 4., 8.]]))
test_close(ph.mean, torch.tensor([1., 3., 6.])); test_close(ph.std, torch.tensor([1., 1., 2.]), eps=1e-4)
test_eq(ph(torch.randn(5, 3)).detach(), torch.zeros(5, 2))  # the classifier starts at zero
fd = torch.randn(2, 4, 5, 5) * 10 + 3
phd = ProbeHead(4, 3, dense=True).standardize_from(fd)
test_close(((fd - phd.mean.view(1, -1, 1, 1)) / phd.std.view(1, -1, 1, 1)).mean((0, 2, 3)), torch.zeros(4), eps=1e-5)
test_eq(phd(fd).shape, (2, 3, 5, 5))


# %%
#| exports
def fit_probe(head:ProbeHead,  # trained in place (its `fc` only)
              feats:Tensor,  # [N, C] or [N, C, h, w] training features
              targets:Tensor,  # [N] classes, or [N, H, W] label maps (uint8 or int64)
              steps:int=300,  # optimiser steps
              lr:float=0.1,  # peak learning rate, cosine-decayed to 0
              batch_size:int=256,  # samples per step, drawn with replacement
              seed:int=0,  # the minibatch draws
              ignore_index:int=255,  # label-map value left out of the loss
             ) -> list[float]:  # the loss of every step
    "SGD (momentum 0.9, cosine lr) on precomputed features; dense logits are upsampled bilinearly to the label maps' size."
    check_positive('steps', steps); check_positive('lr', lr); check_positive('batch_size', batch_size)
    opt = torch.optim.SGD(head.fc.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g, losses = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        idx = torch.randint(0, len(feats), (min(batch_size, len(feats)),), generator=g)
        logits, y = head(feats[idx]), targets[idx].long()  # [B, K] or [B, K, h, w]; [B] or [B, H, W]
        if logits.ndim == 4: logits = F.interpolate(logits, size=y.shape[-2:], mode='bilinear', align_corners=False)
        if not (y != ignore_index).any(): continue  # nothing to learn from in this draw
        loss = F.cross_entropy(logits, y, ignore_index=ignore_index)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        losses.append(loss.item())
    return losses


# %%
torch.manual_seed(0)
fx = torch.randn(64, 2); fy = (fx[:, 0] > 0).long()  # separable by the first feature
fl = fit_probe(ProbeHead(2, 2).standardize_from(fx), fx, fy, steps=50, batch_size=32)
test_eq(len(fl), 50); test_close(fl[0], math.log(2), eps=1e-5); assert np.mean(fl[-5:]) < 0.5 * fl[0]
test_eq(fit_probe(ProbeHead(2, 2).standardize_from(fx), fx, fy, steps=50, batch_size=32), fl)  # seeded: the same losses
test_eq(fit_probe(ProbeHead(2, 2, dense=True), torch.randn(4, 2, 2, 2), torch.full((4, 8, 8), 255), steps=3), [])  # all ignored
test_fail(lambda: fit_probe(ProbeHead(2, 2), fx, fy, steps=0), contains='steps')


# %% [markdown]
# The probes take any dataset of uint8 images: `(image, label)` pairs (`ClassFolders`, `SyntheticScenes`) for the
# linear probe, `(image, label map)` pairs (`SegmentationFolders` below, or `SyntheticScenes`, whose `scene(i)` gives
# the label map) for the dense one. `_probe_data` reads a dataset in chunks and keeps only the features and the
# targets, never all the images. Memory is that of the features: N x C x h x w floats (for `resnetrs50` at 224 px,
# 400 KB per image for `'c5'`, 2.4 MB for `'c4c5'`), which suits VOC-sized sets, not ImageNet. For evaluation, build
# `ClassFolders(root, strict=True)`: by default it replaces an unreadable image by the next one, which is right
# for pretraining and wrong for a score.

# %%
#| exports
def _num_classes(ds:Dataset) -> int|None:
    "K of a dataset: `num_classes` or `len(classes)` when it says."
    if isinstance(getattr(ds, 'num_classes', None), int): return ds.num_classes
    return len(ds.classes) if hasattr(ds, 'classes') else None


# %%
test_eq(_num_classes(SyntheticScenes(2, 32, num_classes=4)), 4)
test_eq(_num_classes(type('Named', (), {'classes': ['a', 'b', 'c']})()), 3)
test_eq(_num_classes([]), None)


# %%
#| exports
def _probe_data(backbone:nn.Module, ds:Dataset, image_size:int, features:str, dense:bool,
                batch_size:int=64) -> tuple[Tensor, Tensor]:
    "Features of every image of `ds` at `image_size`, and its labels [N] (int64) or label maps [N, S, S] (uint8)."
    feats, targets, chunk = [], [], []
    def flush():
        feats.append(extract_features(backbone, torch.stack([x for x, _ in chunk]), features, batch_size))
        targets.extend(y for _, y in chunk); chunk.clear()
    for i in range(len(ds)):
        if dense: x, y = ds.scene(i)[:2] if isinstance(ds, SyntheticScenes) else ds[i]
        else: x, y = ds[i]
        chunk.append((resize_crop(x, image_size), resize_crop(y, image_size) if dense else int(y)))
        if len(chunk) == batch_size: flush()
    if chunk: flush()
    if not dense: return torch.cat(feats), torch.tensor(targets)
    y = torch.stack(targets)
    if y.min() < 0 or y.max() > 255: raise ConfigError('labels', f'values {int(y.min())}..{int(y.max())}', '0..254 and 255 (ignore)')
    return torch.cat(feats), y.to(torch.uint8)


# %%
pd_scenes = SyntheticScenes(3, 48, num_classes=4, seed=0)
pf, py = _probe_data(net, pd_scenes, 32, 'pooled', dense=False, batch_size=2)  # two chunks
test_eq((pf.shape, py.tolist()), ((3, 512), [int(pd_scenes[i][1]) for i in range(3)]))
pf, py = _probe_data(net, pd_scenes, 32, 'c5', dense=True, batch_size=2)
test_eq((pf.shape, py.shape, py.dtype), ((3, 512, 1, 1), (3, 32, 32), torch.uint8))
test_eq(py[0].long(), resize_crop(pd_scenes.scene(0)[1], 32).long())


# %%
#| exports
@dataclass
class LinearProbeResult:
    "What `linear_probe` returns."
    losses: list  # training loss of every step
    top1: float  # validation top-1 accuracy
    chance: float  # top-1 of always answering the training set's most frequent class
    head: ProbeHead  # the trained classifier, on pooled C5


# %%
#| exports
def linear_probe(backbone:nn.Module,  # frozen (see `extract_features`); e.g. from `load_backbone`
                 train:Dataset,  # (uint8 image [3, H, W], class) pairs: ClassFolders, SyntheticScenes ...
                 val:Dataset,  # the same, for the reported accuracy
                 num_classes:int|None=None,  # K; None: the dataset's `num_classes` or `len(classes)`
                 image_size:int=64,  # images are resized (shorter side) and centre-cropped to this
                 steps:int=300, lr:float=0.1, batch_size:int=256, seed:int=0,  # see `fit_probe`
                ) -> LinearProbeResult:
    "Top-1 of a linear classifier on pooled C5 of a frozen backbone (features computed once)."
    K = num_classes or _num_classes(train)
    if not K: raise ConfigError('num_classes', num_classes, 'the number of classes (the dataset does not say)')
    ftr, ytr = _probe_data(backbone, train, image_size, 'pooled', dense=False)  # [N, C], [N]
    fva, yva = _probe_data(backbone, val, image_size, 'pooled', dense=False)
    head = ProbeHead(ftr.shape[1], K).standardize_from(ftr)
    losses = fit_probe(head, ftr, ytr, steps, lr, batch_size, seed)
    with torch.no_grad(): top1 = float((head(fva).argmax(1) == yva).float().mean())
    chance = float((yva == torch.bincount(ytr, minlength=K).argmax()).float().mean())
    return LinearProbeResult(losses, top1, chance, head.eval())


# %% [markdown]
# **The probe learns and leaves the backbone alone.** `SyntheticScenes`' image label is the class of the object that
# covers most pixels (4 classes here). We probe a randomly initialised `resnetrs_tiny`, handed over in training mode:
# the loss must start at $\ln 4$ (the classifier starts at zero) and fall, and not one number of the backbone
# (weights or BN statistics) may move.

# %%
torch.manual_seed(0)
backbone = create_model('resnetrs_tiny', num_classes=0).train()
state = {k: v.clone() for k, v in backbone.state_dict().items()}
t = time.time()
lin = linear_probe(backbone, SyntheticScenes(300, 64, num_classes=4, seed=1), SyntheticScenes(100, 64, num_classes=4, seed=2))
print(f'scenes, random init: top-1 {lin.top1:.3f} (majority class {lin.chance:.3f}), loss {lin.losses[0]:.3f} -> '
      f'{np.mean(lin.losses[-20:]):.3f}, {time.time() - t:.1f} s')
test_close(lin.losses[0], math.log(4), eps=1e-5)
assert np.mean(lin.losses[-20:]) < 0.8 * lin.losses[0]
assert backbone.training
for k, v in backbone.state_dict().items(): test_eq(v, state[k])  # weights and BN running statistics untouched


# %% [markdown]
# The training loss falls, but the validation top-1 stays at the majority-class level: the probe memorises 300
# scenes, and nothing in the features generalises. That is a measurement, not a failure of the probe. Pooled C5 of
# a random network averages colour and texture energy over the whole image (and with ResNet-RS's zero-initialised
# last BN of every block, the residual branches are still switched off), not *which* object dominates it. This
# number is the baseline pretraining has to move, from zero.
#
# To check that the probe *does* read a signal when the features carry one, a second data set whose classes are
# global looks that random convolutions see: the same scenes as photographs, in grayscale, or blurred, written as an
# ImageNet-style `ClassFolders` tree. Here the probe must beat chance (1/3) by far, and give the same numbers when
# run again with the same seed.

# %%
def write_looks(root, scenes):
    "ClassFolders of scenes in three looks: root/{photo,gray,blurred}/NNNN.png."
    looks = {'photo': lambda x: x, 'gray': lambda x: TF.rgb_to_grayscale(x, 3), 'blurred': lambda x: TF.gaussian_blur(x, [9, 9], [3., 3.])}
    for name in looks: (root/name).mkdir(parents=True, exist_ok=True)
    for i in range(len(scenes)):
        img = scenes[i][0]
        for name, f in looks.items(): Image.fromarray(f(img).permute(1, 2, 0).numpy()).save(root/name/f'{i:04d}.png')
    return ClassFolders(root)

looks_train, looks_val = write_looks(tmp/'looks_train', SyntheticScenes(60, 64, seed=3)), write_looks(tmp/'looks_val', SyntheticScenes(20, 64, seed=4))
test_eq((looks_train.classes, len(looks_train), len(looks_val)), (['blurred', 'gray', 'photo'], 180, 60))
lk = linear_probe(backbone, looks_train, looks_val, steps=100)
print(f'looks, random init: top-1 {lk.top1:.3f} (majority class {lk.chance:.3f}), loss {lk.losses[0]:.3f} -> {np.mean(lk.losses[-20:]):.3f}')
test_close(lk.chance, 1 / 3, eps=1e-6)
assert lk.top1 > lk.chance + 0.3, (lk.top1, lk.chance)
assert np.mean(lk.losses[-20:]) < 0.5 * lk.losses[0]
again = linear_probe(backbone, looks_train, looks_val, steps=100)
test_eq((again.top1, again.losses), (lk.top1, lk.losses))  # the same seed, the same numbers
for k, v in backbone.state_dict().items(): test_eq(v, state[k])

# %% [markdown]
# ## Segmentation folders (Pascal VOC layout)
#
# A user's segmentation data most often looks like Pascal VOC 2012:
#
# ```
# root/JPEGImages/2007_000032.jpg           images (VOC has 17,125; 2,913 of them have a mask)
# root/SegmentationClass/2007_000032.png    palette PNG: pixel value = class index, 255 = ignore (object borders)
# root/ImageSets/Segmentation/train.txt     one id per line (1,464 in train, 1,449 in val)
# ```
#
# A palette PNG stores an index per pixel and a colour table for display; the indices are the classes, so a mask is
# read *without* converting it to RGB (the colours would have to be mapped back). Without a split list, every mask
# with an image of the same name is used.
#
# > **Ours.** Pretraining skips an unreadable image and goes on; an evaluation must not: a skipped pair changes the
# > score. A missing folder, a split listing a missing file, a mask that is not an index PNG, a mask whose size
# > differs from its image's, or a label outside the classes raise an error naming the file.

# %%
#| exports
VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
               'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')

class MaskError(BadImageError):
    "An image/label-map pair that cannot be used (unreadable or non-index mask, size mismatch, unknown label); names the files."


# %%
test_eq((len(VOC_CLASSES), VOC_CLASSES[0], VOC_CLASSES[15]), (21, 'background', 'person'))
assert isinstance(MaskError('x'), BadImageError)


# %%
#| exports
def load_mask(path:str|Path) -> Tensor:  # [H, W] int64
    "Class indices of a palette ('P', as Pascal VOC) or 8-bit grayscale ('L') PNG; the palette's colours are not used."
    path = Path(path)
    try:
        with Image.open(path) as m:
            m.load()
            if m.mode not in ('P', 'L'):
                raise MaskError(f"{path}: mode {m.mode!r}; expected a palette ('P') or grayscale ('L') image of class "
                                'indices (convert a colour-coded mask to indices first)')
            return torch.from_numpy(np.array(m, dtype=np.int64))
    except MaskError: raise
    except (OSError, ValueError, SyntaxError, EOFError) as e: raise MaskError(f'{path}: {type(e).__name__}: {e}') from e


# %%
tmp_mask = Path(tempfile.mkdtemp())
idx_map = np.array([[0, 1, 2], [255, 4, 0]], np.uint8)
pm = Image.frombytes('P', (3, 2), idx_map.tobytes()); pm.putpalette([0, 0, 0, 255, 0, 0] * 128); pm.save(tmp_mask/'p.png')
Image.fromarray(idx_map).save(tmp_mask/'l.png')  # 8-bit grayscale
for f in ('p.png', 'l.png'): test_eq(load_mask(tmp_mask/f), torch.from_numpy(idx_map.astype(np.int64)))  # indices, not colours
Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_mask/'rgb.png')
test_fail(lambda: load_mask(tmp_mask/'rgb.png'), contains="rgb.png: mode 'RGB'")
(tmp_mask/'junk.png').write_bytes(b'not a png')
test_fail(lambda: load_mask(tmp_mask/'junk.png'), contains='junk.png: UnidentifiedImageError')


# %%
#| exports
class SegmentationFolders(Dataset):
    "Images and PNG label maps in Pascal VOC's layout; yields (uint8 image [3, H, W], int64 label map [H, W])."
    def __init__(self, root:str|Path,  # the folder holding `image_dir`, `mask_dir` (and `split_dir`)
                 split:str|None=None,  # e.g. 'train', 'val': the ids of `split_dir/<split>.txt`; None: every mask with an image
                 classes:tuple=VOC_CLASSES,  # class names; labels must be < len(classes) or `ignore_index`
                 ignore_index:int=255,  # label of pixels to ignore
                 image_dir:str='JPEGImages', mask_dir:str='SegmentationClass', split_dir:str='ImageSets/Segmentation',
                ):
        self.root, self.split, self.classes, self.ignore_index = Path(root), split, tuple(classes), ignore_index
        self.num_classes = len(self.classes)
        for d in (self.root, self.root/image_dir, self.root/mask_dir):
            if not d.is_dir(): raise ConfigError('data', str(root), f'a segmentation folder with {image_dir}/ and {mask_dir}/; {d} does not exist')
        images = {p.stem: p for p in find_images(self.root/image_dir)}
        masks = {p.stem: p for p in sorted((self.root/mask_dir).glob('*.png'))}
        if split is None: ids = [i for i in masks if i in images]
        else: ids = self._read_split(self.root/split_dir, split, images, masks)
        if not ids: raise ConfigError('data', str(root), f'image/mask pairs; none found ({len(images)} images in {image_dir}/, '
                                      f'{len(masks)} PNG masks in {mask_dir}/, no name in common)')
        self.ids, self.images, self.masks = ids, [images[i] for i in ids], [masks[i] for i in ids]

    def _read_split(self, folder:Path, split:str, images:dict, masks:dict) -> list[str]:
        f = folder/f'{split}.txt'
        if not f.is_file():
            have = ', '.join(sorted(p.stem for p in folder.glob('*.txt'))) or 'none'
            raise ConfigError('split', split, f'a list {f}; it does not exist (lists there: {have})')
        ids = [l.strip() for l in f.read_text().splitlines() if l.strip()]
        for i in ids:
            if i not in images: raise ConfigError('split', split, f'ids with an image: {f} lists {i!r}, not in {self.root}/JPEGImages')
            if i not in masks: raise ConfigError('split', split, f'ids with a mask: {f} lists {i!r}, no {i}.png in {self.root}/SegmentationClass')
        return ids

    def __len__(self): return len(self.ids)
    def __repr__(self): return f'SegmentationFolders({str(self.root)!r}, split={self.split!r}, {len(self)} pairs, {self.num_classes} classes)'


# %%
test_fail(lambda: SegmentationFolders(tmp/'nowhere'), contains='nowhere does not exist')


# %%
#| exports
def _getitem(self:SegmentationFolders, i:int) -> tuple[Tensor, Tensor]:  # [3, H, W] uint8, [H, W] int64
    img, mask = load_image(self.images[i]), load_mask(self.masks[i])
    if tuple(img.shape[1:]) != tuple(mask.shape):
        raise MaskError(f'{self.masks[i]}: mask {mask.shape[0]}x{mask.shape[1]} (HxW) does not match image '
                        f'{self.images[i]} {img.shape[1]}x{img.shape[2]}')
    bad = mask[(mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))]
    if bad.numel(): raise MaskError(f'{self.masks[i]}: label {int(bad[0])} is not a class (0..{self.num_classes - 1}) '
                                    f'nor ignore_index={self.ignore_index}')
    return img, mask

SegmentationFolders.__getitem__ = _getitem


# %% [markdown]
# The tests build a tiny VOC folder from `SyntheticScenes` (JPEG images, palette PNG masks with a 255 border like
# VOC's, split lists), then break it in every way the class promises to report.

# %%
def voc_palette():
    "VOC's colour map (bit-interleaved), as a flat list for PIL."
    pal = []
    for k in range(256):
        r = g = b = 0; c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j); g |= ((c >> 1) & 1) << (7 - j); b |= ((c >> 2) & 1) << (7 - j); c >>= 3
        pal += [r, g, b]
    return pal

def write_voc(root, scenes, splits):
    "A VOC-layout folder from SyntheticScenes: JPEG images, palette masks with a 2-pixel 255 border, split lists."
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'): (root/d).mkdir(parents=True, exist_ok=True)
    for i in range(len(scenes)):
        img, lab, _ = scenes.scene(i)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root/'JPEGImages'/f'{i:06d}.jpg', quality=95)
        m = lab.clone(); m[:2], m[-2:], m[:, :2], m[:, -2:] = 255, 255, 255, 255
        p = Image.frombytes('P', (m.shape[1], m.shape[0]), m.numpy().astype(np.uint8).tobytes())  # index image
        p.putpalette(voc_palette()); p.save(root/'SegmentationClass'/f'{i:06d}.png')
    for name, ids in splits.items(): (root/'ImageSets/Segmentation'/f'{name}.txt').write_text(''.join(f'{i:06d}\n' for i in ids))
    return root

voc = write_voc(tmp/'voc', SyntheticScenes(6, (48, 64), num_classes=4, seed=3), {'train': range(4), 'val': [4, 5]})
(voc/'JPEGImages'/'no_mask.jpg').write_bytes((voc/'JPEGImages'/'000000.jpg').read_bytes())  # VOC: most images have no mask
ds = SegmentationFolders(voc, classes=VOC_CLASSES[:5])
print(str(ds).replace(str(tmp), '<tmp>'), str(SegmentationFolders(voc, 'val')).replace(str(tmp), '<tmp>'), sep='\n')
test_eq((len(ds), len(SegmentationFolders(voc, 'train')), SegmentationFolders(voc, 'val').ids), (6, 4, ['000004', '000005']))
img, mask = ds[2]
test_eq((img.shape, img.dtype, mask.shape, mask.dtype), ((3, 48, 64), torch.uint8, (48, 64), torch.int64))
_, lab, _ = SyntheticScenes(6, (48, 64), num_classes=4, seed=3).scene(2)
test_eq(mask[2:-2, 2:-2], lab[2:-2, 2:-2]); test_eq(set(mask[0].tolist()), {255})  # indices, not palette colours

# %%
bad = write_voc(tmp/'bad', SyntheticScenes(3, 32, num_classes=4, seed=4), {'train': [0, 1, 2], 'extra': [0, 7]})
test_fail(lambda: SegmentationFolders(bad, 'test'), contains='test.txt; it does not exist (lists there: extra, train)')
test_fail(lambda: SegmentationFolders(bad, 'extra'), contains="lists '000007', not in")
(bad/'SegmentationClass'/'000000.png').rename(bad/'SegmentationClass'/'other.png')
test_fail(lambda: SegmentationFolders(bad, 'train'), contains="no 000000.png in")
Image.fromarray(np.zeros((32, 30), np.uint8)).save(bad/'SegmentationClass'/'000001.png')  # wrong size
Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad/'SegmentationClass'/'000002.png')  # a colour mask
Image.fromarray(np.full((32, 32), 9, np.uint8)).save(bad/'SegmentationClass'/'other.png')  # label 9 of 5 classes
ds = SegmentationFolders(bad, classes=VOC_CLASSES[:5])
test_eq(ds.ids, ['000001', '000002'])  # 'other' has no image
test_fail(lambda: ds[0], contains='000001.png: mask 32x30 (HxW) does not match image')
test_fail(lambda: ds[1], contains="000002.png: mode 'RGB'")
(bad/'JPEGImages'/'other.jpg').write_bytes((bad/'JPEGImages'/'000000.jpg').read_bytes())
test_fail(lambda: SegmentationFolders(bad, classes=VOC_CLASSES[:5])[2], contains='other.png: label 9 is not a class (0..4)')
for p in (bad/'SegmentationClass').glob('*.png'): p.unlink()
test_fail(lambda: SegmentationFolders(bad), contains='image/mask pairs; none found (4 images')


# %% [markdown]
# ## The dense probe
#
# The dense probe asks whether the *per-pixel* features already separate the classes, which is what PixPro's
# pixel-level pretext task is meant to improve. A 1x1 convolution maps each feature vector of the frozen map (C5 at
# stride 32, or `'c4c5'` at stride 16) to class scores, the scores are upsampled bilinearly to the label map's size,
# and a per-pixel cross-entropy (ignoring 255) trains it. Because both the 1x1 convolution and bilinear
# upsampling are linear, this is a linear classifier of the upsampled features: the probe adds no capacity of its own.
# It reports mIoU and pixel accuracy on the validation set, with the scores of predicting the training set's most
# frequent class everywhere (in scenes, the background) as the chance level.
#
# > **Ours.** Images and label maps are resized (shorter side) and centre-cropped to `image_size` and scored there,
# > not at each image's original resolution as the VOC benchmark does; the probe is a comparison between
# > backbones on equal terms, not a benchmark number.

# %%
#| exports
@dataclass
class DenseProbeResult:
    "What `dense_probe` returns."
    losses: list  # training loss of every step
    miou: float  # validation mIoU (classes in the labels or the predictions, see `miou`)
    pixel_acc: float  # validation pixel accuracy
    iou: Tensor  # [K] IoU per class, nan where absent
    confusion: Tensor  # [K, K] validation confusion matrix (rows true class)
    chance_miou: float  # mIoU of predicting the training set's most frequent class everywhere
    chance_pixel_acc: float  # its pixel accuracy
    head: ProbeHead  # the trained 1x1 convolution (with its standardisation)
    features: str  # 'c5', 'c4c5' or 'c3c4c5'
    image_size: int  # side of the images and label maps the probe saw


# %%
#| exports
def dense_probe(backbone:nn.Module,  # frozen (see `extract_features`); e.g. from `load_backbone`
                train:Dataset,  # SegmentationFolders, SyntheticScenes (its label maps), or (image, label map) pairs
                val:Dataset,  # the same, for the reported scores
                num_classes:int|None=None,  # K including background; None: SegmentationFolders' classes, scenes' K + 1
                image_size:int=96,  # images and label maps are resized (shorter side) and centre-cropped to this
                features:str='c5',  # 'c5', 'c4c5' (C4 with C5 upsampled beside it) or 'c3c4c5' (the hypercolumn at stride 8)
                steps:int=300, lr:float=0.1, batch_size:int=16, seed:int=0,  # see `fit_probe`
                ignore_index:int=255,  # label of pixels to ignore
               ) -> DenseProbeResult:
    "mIoU and pixel accuracy of a 1x1 convolution on a frozen feature map, upsampled bilinearly, per-pixel cross-entropy."
    check_choice('features', features, FEATURES[1:])
    K = num_classes or (train.num_classes + 1 if isinstance(train, SyntheticScenes) else _num_classes(train))
    if not K: raise ConfigError('num_classes', num_classes, 'the number of classes with background (the dataset does not say)')
    ftr, ytr = _probe_data(backbone, train, image_size, features, dense=True)  # [N, C, h, w], [N, S, S] uint8
    fva, yva = _probe_data(backbone, val, image_size, features, dense=True)
    head = ProbeHead(ftr.shape[1], K, dense=True).standardize_from(ftr)
    losses = fit_probe(head, ftr, ytr, steps, lr, batch_size, seed, ignore_index)
    conf = torch.zeros(K, K, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(fva), 64):
            logits = F.interpolate(head(fva[i:i + 64]), size=yva.shape[-2:], mode='bilinear', align_corners=False)
            conf += confusion_matrix(logits.argmax(1), yva[i:i + 64].long(), K, ignore_index)
    counts = torch.bincount(ytr[ytr != ignore_index].long(), minlength=K)
    chance = confusion_matrix(torch.full_like(yva, int(counts.argmax())).long(), yva.long(), K, ignore_index)
    return DenseProbeResult(losses, miou(conf), pixel_accuracy(conf), iou_per_class(conf), conf, miou(chance),
                            pixel_accuracy(chance), head.eval(), features, image_size)


# %% [markdown]
# **The dense probe learns and beats chance.** On 96-pixel scenes with 4 object classes (5 with the background) and
# `'c4c5'` features (a 6x6 map), the randomly initialised backbone of the linear probe must give a falling loss and a
# mIoU clearly above the majority answer's; the backbone must again come out untouched.

# %%
dense_train, dense_val = SyntheticScenes(300, 96, num_classes=4, seed=1), SyntheticScenes(100, 96, num_classes=4, seed=2)
t = time.time()
dp = dense_probe(backbone, dense_train, dense_val, features='c4c5', steps=300)
print(f'dense probe: mIoU {dp.miou:.3f} (majority class {dp.chance_miou:.3f}), pixel accuracy {dp.pixel_acc:.3f} '
      f'(majority class {dp.chance_pixel_acc:.3f}), loss {dp.losses[0]:.3f} -> {np.mean(dp.losses[-20:]):.3f}, '
      f'{time.time() - t:.1f} s')
print('IoU per class:', ', '.join(f'{x:.2f}' for x in dp.iou.tolist()))
test_close(dp.losses[0], math.log(5), eps=1e-5)
assert np.mean(dp.losses[-20:]) < 0.7 * dp.losses[0]
assert dp.miou > dp.chance_miou + 0.05, (dp.miou, dp.chance_miou)
test_eq(int(dp.confusion.sum()), 100 * 96 * 96)
for k, v in backbone.state_dict().items(): test_eq(v, state[k])


# %%
#| exports
@torch.no_grad()
def dense_predict(backbone:nn.Module,  # the probed backbone
                  probe:DenseProbeResult,  # what `dense_probe` returned
                  images:Tensor,  # [N, 3, S, S] uint8, S = probe.image_size (see `resize_crop`)
                 ) -> Tensor:  # [N, S, S] int64 predicted classes
    "The dense probe's per-pixel predictions for a batch of images."
    f = extract_features(backbone, images, probe.features)  # [N, C, h, w]
    return F.interpolate(probe.head(f), size=images.shape[-2:], mode='bilinear', align_corners=False).argmax(1)


# %%
vi, vl = zip(*[dense_val.scene(i)[:2] for i in range(len(dense_val))])
pv = dense_predict(backbone, dp, torch.stack(vi))
test_eq((pv.shape, pv.dtype), ((100, 96, 96), torch.int64))
test_close(confusion_matrix(pv, torch.stack(vl), 5).float(), dp.confusion.float(), eps=5)  # the probe's own scores (to a few pixels: batching)

# %% [markdown]
# Figure 1 shows what such a probe sees: scenes of the validation set, their label maps, and the probe's
# prediction from the frozen features of the random network. At stride 16 the prediction is blobby, and it
# mostly finds *where* objects are rather than *which* class they belong to: that is what pretraining must add.

# %%
imgs, labs = zip(*[dense_val.scene(i)[:2] for i in range(4)])
preds = dense_predict(backbone, dp, torch.stack(imgs))
cmap = ListedColormap(['#303030', '#e41a1c', '#377eb8', '#4daf4a', '#ff7f00'])
fig, axes = plt.subplots(3, 4, figsize=(8, 6.2))
for j in range(4):
    axes[0, j].imshow(imgs[j].permute(1, 2, 0).numpy()); axes[1, j].imshow(labs[j], cmap=cmap, vmin=0, vmax=4, interpolation='nearest')
    axes[2, j].imshow(preds[j], cmap=cmap, vmin=0, vmax=4, interpolation='nearest')
for ax, name in zip(axes[:, 0], ('image', 'label map', 'dense probe')): ax.set_ylabel(name)
names = ['background', *dense_val.classes]
fig.legend([Patch(color=cmap(k)) for k in range(5)], names, loc='lower center', ncol=5, fontsize=8, frameon=False)
for ax in axes.flat: ax.set_xticks([]); ax.set_yticks([])
fig.suptitle(f'Figure 1: dense probe (1x1 conv on C4 + C5) of a random-init resnetrs_tiny: mIoU {dp.miou:.2f}, chance {dp.chance_miou:.2f}')
plt.tight_layout(rect=(0, 0.04, 1, 1)); plt.show()

# %% [markdown]
# The same probe reads a VOC-layout folder. Here we write 60 scenes as JPEGs with palette PNG masks (and VOC's
# 255 borders) and probe through `SegmentationFolders` with its train/val lists (45/15 images): the ignored borders
# are left out of the loss and of the scores. With so few images the scores are noisy; the point is the data path.

# %%
voc2 = write_voc(tmp/'voc2', SyntheticScenes(60, 96, num_classes=4, seed=5), {'train': range(45), 'val': range(45, 60)})
vtrain = SegmentationFolders(voc2, 'train', classes=('background', *SyntheticScenes(1, num_classes=4).classes))
dv = dense_probe(backbone, vtrain, SegmentationFolders(voc2, 'val', classes=vtrain.classes), features='c4c5', steps=200)
print(f'VOC-layout folder: mIoU {dv.miou:.3f} (majority class {dv.chance_miou:.3f}), pixel accuracy {dv.pixel_acc:.3f} '
      f'(majority class {dv.chance_pixel_acc:.3f})')
test_eq(int(dv.confusion.sum()), 15 * 92 * 92)  # every pixel but the 2-pixel borders
assert dv.losses[-1] < dv.losses[0] and dv.iou.shape == (5,)

# %% [markdown]
# ## Exports
#
# The online encoder leaves this library in three formats. All are written atomically (`atomic_write`: a crash
# leaves the old file or none, never half of one) and all contain the **backbone only**.
#
# > **Ours.** No classifier in any export. PixPro never trains one, so a `fc` in the file would be random numbers
# > dressed as weights. The consequences: the file loads *strictly* into `timm.create_model(arch, num_classes=0)`
# > and into torchvision's `resnet50()` once its `fc` is replaced by `nn.Identity()`; a model with a new K-class head
# > loads it with `strict=False`, and the only missing keys are `fc.weight` and `fc.bias` (tested).
# > It is also what lets timm's `features_only=True` model (what mmdetection's timm wrapper builds) load the file
# > through `checkpoint_path`: a checkpoint with a classifier fails there.
#
# | `fmt` | archs | file | loads into |
# |---|---|---|---|
# | `'timm'` | `resnetrs50` ... `resnetrs420`, `resnet50` | `.pth` or `.safetensors`, timm's names | `timm.create_model(arch, num_classes=0)`, strict |
# | `'torchvision'` | `resnet50` | `.pth` or `.safetensors` | `torchvision.models.resnet50()` with `fc = nn.Identity()`, strict |
# | `'detectron2'` | `resnet50` | `.pkl`: `{'model': {name: numpy array}, '__author__', 'matching_heuristics': True}` | detectron2's `R-50` via `MODEL.WEIGHTS` |
#
# Our ResNet-RS modules already carry timm's state-dict names (the ResNet-RS chapter checks this against timm), and
# our `resnet50` *is* torchvision's class, whose names timm's `resnet50` shares; so the timm and torchvision exports are
# the state dict itself. `resnetrs_tiny` is our own CPU model: timm cannot build it (timm's deep stem ends at twice
# the stem width), so it has no timm export.

# %%
#| exports
EXPORT_FORMATS = ('timm', 'torchvision', 'detectron2')
TIMM_ARCHS = tuple(a for a, c in RS_CONFIGS.items() if c.paper) + ('resnet50',)  # archs timm builds by name

def to_detectron2(sd:dict) -> dict:
    "The reference's renaming of a torchvision ResNet-50 state dict for detectron2 (`convert_pretrain_to_d2.py` l. 19-27)."
    out = {}
    for k, v in sd.items():
        if 'layer' not in k: k = 'stem.' + k  # conv1, bn1
        for t in (1, 2, 3, 4): k = k.replace(f'layer{t}', f'res{t + 1}')
        for t in (1, 2, 3): k = k.replace(f'bn{t}', f'conv{t}.norm')
        out[k.replace('downsample.0', 'shortcut').replace('downsample.1', 'shortcut.norm')] = v
    return out


# %% [markdown]
# The reference's mapping (zdaxie/PixPro at commit e390d6b, `transfer/detection/convert_pretrain_to_d2.py`, lines
# 19-27: drop the prefix, `stem.` for keys outside the stages, `layer{t}` -> `res{t+1}`, `bn{t}` -> `conv{t}.norm`,
# `downsample.0/1` -> `shortcut`/`shortcut.norm`), on the keys that matter (the stem, a block with a shortcut, a last
# block):

# %%
sd50 = create_model('resnet50', num_classes=0).state_dict()
d2 = to_detectron2(sd50)
for ours, theirs in [('conv1.weight', 'stem.conv1.weight'), ('bn1.running_var', 'stem.conv1.norm.running_var'),
                     ('layer1.0.conv1.weight', 'res2.0.conv1.weight'), ('layer1.0.bn2.bias', 'res2.0.conv2.norm.bias'),
                     ('layer2.0.downsample.0.weight', 'res3.0.shortcut.weight'),
                     ('layer3.0.downsample.1.running_mean', 'res4.0.shortcut.norm.running_mean'),
                     ('layer4.2.bn3.weight', 'res5.2.conv3.norm.weight')]:
    assert d2[theirs] is sd50[ours], (ours, theirs)
test_eq(len(d2), len(sd50)); assert not any(k.startswith(('layer', 'bn', 'fc')) or 'downsample' in k for k in d2)
assert 'resnetrs50' in TIMM_ARCHS and 'resnet50' in TIMM_ARCHS and 'resnetrs_tiny' not in TIMM_ARCHS  # timm builds these by name


# %%
#| exports
def from_detectron2(sd:dict) -> dict:
    "The inverse of `to_detectron2`: detectron2's ResNet-50 names back to torchvision's."
    out = {}
    for k, v in sd.items():
        k = k.replace('shortcut.norm', 'downsample.1').replace('shortcut', 'downsample.0')
        for t in (1, 2, 3): k = k.replace(f'conv{t}.norm', f'bn{t}')
        for t in (1, 2, 3, 4): k = k.replace(f'res{t + 1}', f'layer{t}')
        out[k[len('stem.'):] if k.startswith('stem.') else k] = v
    return out


# %% [markdown]
# The inverse, on every key of ResNet-50:

# %%
test_eq(list(from_detectron2(d2)), list(sd50))

# %%
#| exports
_NO_D2_RS = ("'timm' for ResNet-RS. detectron2's ResNet cannot hold ResNet-RS weights: its stem is one 7x7 conv and a "
             'max-pool (ResNet-RS: three 3x3 convs and a strided 3x3 conv), its blocks have no squeeze-and-excitation, '
             "and its shortcut is a strided 1x1 conv (ResNet-D: a 2x2 average pool, then a 1x1 conv). detectron2 needs "
             "a ResNet-RS backbone registered in its BACKBONE_REGISTRY to use these weights; otherwise export with fmt='timm' "
             "and use mmdetection's TIMMBackbone or torchvision's detection models")

def _check_export(fmt:str, arch:str|None, suffix:str):
    "Refuse an (fmt, arch, file suffix) combination the target library cannot load, saying what to do instead."
    if arch is None: raise ConfigError('arch', None, f'one of {", ".join(MODEL_NAMES)}: the model does not say')
    if fmt == 'timm' and arch not in TIMM_ARCHS:
        raise ConfigError('arch', arch, f"one timm builds by name for fmt='timm' ({', '.join(TIMM_ARCHS)})")
    if fmt == 'detectron2' and arch != 'resnet50': raise ConfigError('fmt', fmt, _NO_D2_RS)
    if fmt == 'torchvision' and arch != 'resnet50':
        raise ConfigError('fmt', fmt, f"'timm' for {arch}: torchvision has no ResNet-RS, its export is for arch 'resnet50'")
    check_choice('path suffix', suffix, ['.pkl'] if fmt == 'detectron2' else ['.pth', '.pt', '.bin', '.safetensors'])


# %%
_check_export('timm', 'resnetrs50', '.safetensors'); _check_export('detectron2', 'resnet50', '.pkl')  # accepted
test_fail(lambda: _check_export('timm', None, '.pth'), contains='the model does not say')
test_fail(lambda: _check_export('detectron2', 'resnet50', '.pth'), contains='path suffix')
test_fail(lambda: _check_export('detectron2', 'resnetrs50', '.pkl'), contains='BACKBONE_REGISTRY')
test_fail(lambda: _check_export('torchvision', 'resnetrs50', '.pth'), contains='torchvision has no ResNet-RS')


# %%
#| exports
def export_backbone(checkpoint:str|Path|nn.Module,  # anything `load_backbone` takes (a PixPro checkpoint ...)
                    fmt:str,  # 'timm', 'torchvision' or 'detectron2'
                    path:str|Path,  # output: .pth/.pt/.bin/.safetensors (timm, torchvision) or .pkl (detectron2)
                    arch:str|None=None,  # backbone name, when the checkpoint does not say (no config, no arch metadata)
                   ) -> Path:
    "Write the online encoder (no classifier) for timm, torchvision or detectron2, atomically; returns the path."
    check_choice('fmt', fmt, EXPORT_FORMATS)
    path = Path(path)
    backbone = load_backbone(checkpoint, arch)
    _check_export(fmt, getattr(backbone, 'arch', arch), path.suffix)
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in backbone.state_dict().items() if not k.startswith('fc.')}
    if fmt == 'detectron2':
        obj = {'model': {k: v.numpy() for k, v in to_detectron2(sd).items()}, '__author__': 'pixpro_rs', 'matching_heuristics': True}
        return atomic_write(path, lambda tmp: tmp.write_bytes(pickle.dumps(obj)))
    if path.suffix == '.safetensors':
        from safetensors.torch import save_file
        return atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata={'arch': backbone.arch, 'format': fmt}))
    return atomic_write(path, lambda tmp: torch.save(sd, tmp))


# %% [markdown]
# **Round trips.** Each export is loaded by its target library and must give the same features as our model on
# the same input, in eval mode, to 1e-5. A fresh network would make that test weak (every residual branch starts at
# zero, and BN statistics at 0 and 1), so the backbones first get random BN parameters and statistics.

# %%
def randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.25); m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1); m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()

torch.manual_seed(0)
x = torch.randn(2, 3, 64, 64)
rs50 = randomise_bn(create_model('resnetrs50', num_classes=0))
with torch.no_grad(): want = rs50.forward_features(x)
assert want.abs().max() > 0.1
for name in ('rs50.pth', 'rs50.safetensors'):
    path = export_backbone(rs50, 'timm', tmp/name)
    ref = timm.create_model('resnetrs50', num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad(): test_close(ref.forward_features(x), want, eps=1e-5)
sd = torch.load(tmp/'rs50.pth', weights_only=True)
ref = timm.create_model('resnetrs50', num_classes=0); ref.load_state_dict(sd, strict=True)  # strict, as promised
missing = timm.create_model('resnetrs50', num_classes=10).load_state_dict(sd, strict=False)
test_eq((sorted(missing.missing_keys), missing.unexpected_keys), (['fc.bias', 'fc.weight'], []))
test_fail(lambda: export_backbone(rs50, 'detectron2', tmp/'rs50.pkl'), contains='registered in its BACKBONE_REGISTRY')
test_fail(lambda: export_backbone(rs50, 'torchvision', tmp/'rs50_tv.pth'), contains='torchvision has no ResNet-RS')
test_fail(lambda: export_backbone(tmp/'ckpt.pth', 'timm', tmp/'tiny.pth'), contains="one timm builds by name")
test_fail(lambda: export_backbone(rs50, 'timm', tmp/'rs50.pkl'), contains='path suffix')
again = export_backbone(tmp/'rs50.safetensors', 'timm', tmp/'rs50_again.pth')  # an export's metadata names its arch
with torch.no_grad(): test_close(load_backbone(again, 'resnetrs50').forward_features(x), want, eps=1e-6)
test_fail(lambda: export_backbone(tmp/'rs50.safetensors', 'timm', tmp/'r50.pth', arch='resnet50'),
          contains="invalid arch='resnet50': expected 'resnetrs50', the arch saved in")
assert not (tmp/'r50.pth').exists()
assert not (tmp/'rs50.pkl').exists() and not (tmp/'tiny.pth').exists()

# %%
r50 = randomise_bn(create_model('resnet50', num_classes=0))
with torch.no_grad(): want, want_pooled = r50.forward_features(x), r50(x)
tv = torchvision.models.resnet50(); tv.fc = nn.Identity()
tv.load_state_dict(torch.load(export_backbone(r50, 'torchvision', tmp/'r50_tv.pth'), weights_only=True), strict=True)
tv.eval()
with torch.no_grad():
    test_close(nn.Sequential(*list(tv.children())[:-2])(x), want, eps=1e-5)  # C5
    test_close(tv(x), want_pooled, eps=1e-5)  # pooled
with open(export_backbone(r50, 'detectron2', tmp/'r50.pkl'), 'rb') as f: obj = pickle.load(f)
test_eq((obj['__author__'], obj['matching_heuristics']), ('pixpro_rs', True))
assert all(isinstance(v, np.ndarray) for v in obj['model'].values()) and 'res5.2.conv3.norm.weight' in obj['model']
back = create_model('resnet50', num_classes=0)
back.load_state_dict({k: torch.from_numpy(v) for k, v in from_detectron2(obj['model']).items()}, strict=True)
with torch.no_grad(): test_close(back.eval().forward_features(x), want, eps=1e-5)

# %% [markdown]
# ### Using the exports
#
# **timm** (classification fine-tuning with a new head): the file is the `pretrained` weights, the head is new.
#
# ```python
# model = timm.create_model('resnetrs50', pretrained=True, num_classes=K,   # any K except 1000; 0: no head
#                           pretrained_cfg_overlay=dict(file='rs50_pixpro.safetensors'))
# ```
#
# **mmdetection** (3.x) uses timm models through mmpretrain's `TIMMBackbone`, which calls
# `timm.create_model(model_name, features_only=..., pretrained=..., checkpoint_path=..., **kwargs)`. With
# `features_only=True`, `out_indices=(1, 2, 3, 4)` selects C2..C5 (strides 4 to 32, 256 to 2048 channels; index 0 is
# the stride-2 stem). For Faster R-CNN + FPN:
#
# ```python
# _base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
# custom_imports = dict(imports=['mmpretrain.models'], allow_failed_imports=False)
# model = dict(
#     data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
#     backbone=dict(_delete_=True, type='mmpretrain.TIMMBackbone', model_name='resnetrs50',
#                   features_only=True, pretrained=False, checkpoint_path='rs50_pixpro.pth',
#                   out_indices=(1, 2, 3, 4)),
#     neck=dict(in_channels=[256, 512, 1024, 2048]))
# ```
#
# The mean and standard deviation are ImageNet's on the 0-255 scale, in RGB order, as in pretraining. mmpretrain
# warns that `features_only` with `checkpoint_path` fails in timm: that holds for checkpoints with a classifier,
# not for ours (the pytest suite builds exactly this timm model from an export and compares its C2..C5 with ours).
# A timm backbone has plain batch norm, trained like every other layer: mmdetection's own ResNet configs instead
# freeze the stem (`frozen_stages=1`) and keep BN in eval mode (`norm_eval=True`), so compare like with like; for
# multi-GPU detection, synchronise BN as the reference's detectron2 configs do (SyncBN).
#
# **detectron2** (ResNet-50 only), the reference's settings: `Pascal_VOC_R_50_C4_24k_PixPro.yaml` (zdaxie/PixPro at
# commit e390d6b, `transfer/detection/configs/`) sets the pixel mean and std, `STRIDE_IN_1X1: False` and RGB input; the
# synchronised batch norm comes from the detectron2 configs of MoCo that the reference builds on (its README
# acknowledges facebookresearch/moco; `detection/configs/Base-RCNN-C4-BN.yaml` there sets `NORM: "naiveSyncBN"`):
#
# ```yaml
# MODEL:
#   WEIGHTS: "r50_pixpro.pkl"
#   PIXEL_MEAN: [123.675, 116.28, 103.53]
#   PIXEL_STD: [58.395, 57.12, 57.375]
#   RESNETS: {DEPTH: 50, STRIDE_IN_1X1: False, NORM: "SyncBN"}
# INPUT: {FORMAT: "RGB"}
# ```
#
# `STRIDE_IN_1X1: False` puts the stride on the 3x3 convolution as torchvision does (detectron2's default follows the
# original Caffe2 ResNet, stride on the first 1x1), and RGB with these statistics is what the encoder was trained on.
# **Why not ResNet-RS in detectron2?** Its `ResNet` builds the classic architecture only: a 7x7 stem with max-pool,
# blocks without squeeze-and-excitation, strided 1x1 shortcuts. ResNet-RS weights have no place there; no renaming can
# fix missing modules. One would register a backbone (`@BACKBONE_REGISTRY.register()`) that builds ResNet-RS (for
# instance around `pixpro_rs.resnet_rs.ResNetRS.forward_pyramid`) and returns its C2..C5 as a `ShapeSpec` dict. The
# timm route above, or torchvision's detection models, need no such code.

# %% [markdown]
# ## Summary
#
# - `load_backbone(checkpoint_or_model, arch=None)` returns the **online** encoder of a PixPro checkpoint (not the
#   momentum target), of a backbone file, or of a module: a copy, eval mode, no gradients, `pretrain_config` attached.
#   The arch comes from the checkpoint's config or a safetensors file's metadata (`encoder.safetensors`, exports);
#   a given `arch` that disagrees is refused.
# - `extract_features` runs a frozen backbone in eval mode: BN statistics are used, never updated (the reference's
#   linear evaluation lets them drift), giving pooled C5, the C5 map, or C4 with C5 upsampled.
# - `confusion_matrix`, `iou_per_class`, `miou`, `pixel_accuracy`: scores over the whole set, pixels labelled 255
#   ignored, a class absent from both labels and predictions excluded from the mean (not 0, not 1).
# - `linear_probe` (pooled C5 -> linear) and `dense_probe` (1x1 conv on C5 or C4+C5 -> bilinear upsampling ->
#   per-pixel cross-entropy) train on features computed once, standardised per channel, with seeded SGD; each reports
#   the majority-class chance level beside its score. On scenes, a random `resnetrs_tiny` gives a dense probe above
#   chance (mIoU 0.25 against 0.15: it finds where objects are) and a linear probe at chance (top-1 0.29 against
#   0.33): the baselines pretraining must improve on. On a task its features do carry (three global looks), the
#   linear probe reaches 0.90 against 0.33.
# - `SegmentationFolders` reads Pascal VOC's layout (palette PNG masks as class indices, 255 ignored, split lists)
#   and names the file of every problem instead of skipping it.
# - `export_backbone(checkpoint, fmt, path)`: `'timm'` (ResNet-RS and ResNet-50, strict into
#   `timm.create_model(arch, num_classes=0)`, usable from mmdetection), `'torchvision'` and `'detectron2'`
#   (ResNet-50; the reference's key mapping, with its inverse `from_detectron2`). No classifier in any export. Every
#   format round-trips to the same features.
#
# ## Exercises
#
# 1. Pretrain `resnetrs_tiny` on the synthetic scenes for a few hundred steps with the training chapter's
#    `train(TrainConfig(arch='resnetrs_tiny', ...))`, then run `dense_probe` and `linear_probe` on its checkpoint
#    exactly as above. By how much does each score move from the random network's, and which of the two moves first?
# 2. Probe C5 alone (`features='c5'`) against C4 + C5 on the same scenes. What does the finer C4 map add to the mIoU,
#    and why does it matter more for small objects?
# 3. Let BN statistics drift, as the reference's linear evaluation does: compute the features with the backbone in
#    `train()` mode and compare the probe's score and its spread over three seeds with the frozen version.
# 4. Export a checkpoint with `export_backbone(..., 'detectron2', ...)`, load the pickle back, and check with
#    `from_detectron2` that every tensor matches the encoder's state dict. Which keys would a detectron2 R50-C4 model
#    still initialise at random?

# %%
#| hide
torch.set_num_threads(_threads)
print(f'notebook ran in {time.time() - _t0:.0f} s')
