# %% [markdown]
# # The PixPro model
#
# > The pixel propagation module, the projector, the momentum encoder and the full PixPro model with its optional instance branch.

# %%
#| default_exp pixpro

# %%
#| export
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn, Tensor

from pixpro_rs.core import ConfigError, check_choice, check_positive, check_range
from pixpro_rs.positives import _check_coords, positive_mask, pixpro_loss, pixcontrast_loss  # re-exported here

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close, test_ne
from nbdev.showdoc import show_doc
import warnings
warnings.filterwarnings('ignore', message='Converting a tensor with requires_grad')  # float(loss) in the tests

# %%
import matplotlib.pyplot as plt
from pixpro_rs.data import SyntheticScenes


# %% [markdown]
# The previous chapter decided *which* pixels of two views should agree and *how* agreement is scored. This chapter
# builds the networks that produce the features being compared, as the PixPro paper describes them (Xie et al.,
# arXiv 2011.10043) and as its reference code builds them (zdaxie/PixPro at commit e390d6b,
# `contrast/models/PixPro.py`: the projector `MLP2d`, lines 24-41; the pixel propagation module `featprop`, lines
# 178-202; the momentum update `_momentum_update_key_encoder`, lines 160-176; `forward`, lines 207-265):
#
# | branch | view goes through | output |
# |---|---|---|
# | online | encoder (backbone C5) -> projector -> **pixel propagation module** -> L2 norm | $y$, [N, 256, H, W] |
# | target | momentum encoder -> momentum projector -> L2 norm (no gradient) | $x'$, [N, 256, H, W] |
# | instance (optional) | online: instance projector -> predictor -> average pool; target: its momentum copy -> pool | [N, 256] |
#
# The loss compares the online output of view 1 with the target output of view 2 and vice versa. The target is
# not trained by gradients: it is an exponential moving average (EMA) of the online encoder and projector.
# `positive_mask`, `pixpro_loss` and `pixcontrast_loss` are re-exported here, so `pixpro_rs.pixpro` is the one
# module to import.

# %% [markdown]
# ## The projector
#
# A per-pixel MLP: two 1x1 convolutions with batch norm and ReLU between them, no normalisation on the output, the
# default PyTorch initialisation. It maps the backbone's 2048 channels to 256 through a hidden width of 4096. The
# same block, 256 -> 4096 -> 256, is the instance branch's predictor.

# %%
#| exports
class Projector(nn.Sequential):
    "Per-pixel MLP: conv1x1(in -> hidden, bias) -> BN -> ReLU -> conv1x1(hidden -> out, bias)."
    def __init__(self,
                 in_dim:int=2048,  # input channels (the backbone's C5 channels)
                 hidden_dim:int=4096,  # hidden width
                 out_dim:int=256,  # output channels
                ):
        super().__init__(nn.Conv2d(in_dim, hidden_dim, 1), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden_dim, out_dim, 1))


# %%
p = Projector(32, 64, 16)
test_eq([type(l).__name__ for l in p], ['Conv2d', 'BatchNorm2d', 'ReLU', 'Conv2d'])
assert p[0].bias is not None and p[3].bias is not None
test_eq(p(torch.randn(2, 32, 7, 7)).shape, (2, 16, 7, 7))
test_eq(p(torch.randn(2, 32, 5, 3)).shape, (2, 16, 5, 3))  # any map size
test_eq(sum(x.numel() for x in Projector().parameters()), 2048*4096 + 4096 + 2*4096 + 4096*256 + 256)


# %% [markdown]
# ## The pixel propagation module (PPM)
#
# PixPro does not ask a pixel's own feature to match its partner in the other view. It first *propagates*: each
# pixel's prediction is a weighted sum of transformed features of all pixels of the same view, weighted by how
# similar they are to it. For the projector output $x_i$ (pixel $i$, one image),
#
# $$y_i = \sum_{j} s(x_i, x_j)\, g(x_j), \qquad
#   s(x_i, x_j) = \max\big(\cos(x_i, x_j),\ 0\big)^{\gamma},$$
#
# with $\gamma = 2$ (sharper) and $g$ a transform: one 1x1 convolution with bias in the released setting (the paper
# also studies 0 layers, the identity, and 2 layers, conv-BN-ReLU-conv; one layer is best). Three details of the
# reference that the equation hides, all kept and tested:
#
# 1. $g(x_j)$ is **L2-normalised** along the channels before the sum;
# 2. the sum includes $j = i$ (the **self term**, $s_{ii} = 1$);
# 3. the weights are **not normalised** (no softmax, no division by $\sum_j s_{ij}$); the caller L2-normalises $y_i$.
#
# The effect is a smoothing that respects content: pixels of the same object reinforce each other, and the
# prediction of a pixel is informed by its surroundings, which the paper credits for spatial smoothness.

# %%
#| exports
class PPM(nn.Module):
    "Pixel propagation module: y_i = sum_j max(cos(x_i, x_j), 0)^gamma * normalize(g(x_j))."
    def __init__(self,
                 dim:int=256,  # channels of the input (the projector's output)
                 gamma:float=2.0,  # sharpness exponent of the similarity
                 n_layers:int=1,  # layers of the transform g: 0 identity, 1 conv1x1 (paper), 2 conv-BN-ReLU-conv
                ):
        super().__init__()
        self.gamma = check_positive('gamma', gamma)
        check_choice('n_layers', n_layers, (0, 1, 2))
        self.transform = (nn.Identity() if n_layers == 0 else nn.Conv2d(dim, dim, 1) if n_layers == 1
                          else Projector(dim, dim, dim))

    def similarity(self, x:Tensor) -> Tensor:  # [N, HW, HW]
        "s[i, j] = max(cos(x_i, x_j), 0) ** gamma for the pixels of each image of x [N, C, H, W]."
        xn = F.normalize(x, dim=1).flatten(2)  # [N, C, HW]
        s = torch.bmm(xn.transpose(1, 2), xn).clamp(min=0)  # [N, HW, HW]
        if self.gamma < 1: s = s + 1e-6  # as the reference: keeps the gradient of s**gamma finite at 0
        return s ** self.gamma

    def forward(self, x:Tensor) -> Tensor:  # [N, C, H, W], not normalised
        N, C, H, W = x.shape
        v = F.normalize(self.transform(x), dim=1).flatten(2)  # [N, C, HW]
        y = torch.bmm(v, self.similarity(x).transpose(1, 2))  # [N, C, HW]: y_i = sum_j s_ij v_j
        return y.view(N, C, H, W)


# %% [markdown]
# The test writes the equation as a loop over pixels, in float64, and compares for $\gamma \in \{1, 2\}$ and every
# transform depth. It also checks the structure the chapter promises for `transform`.

# %%
torch.manual_seed(0)
x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
for n_layers in (0, 1, 2):
    for gamma in (1., 2.):
        ppm = PPM(8, gamma, n_layers).double()
        y = ppm(x)
        gx = F.normalize(ppm.transform(x), dim=1)
        for n in range(2):
            for i in range(12):
                xi = x[n, :, i // 4, i % 4]
                ref = sum(max(float(F.cosine_similarity(xi, x[n, :, j // 4, j % 4], dim=0)), 0.) ** gamma
                          * gx[n, :, j // 4, j % 4] for j in range(12))
                test_close(y[n, :, i // 4, i % 4], ref, eps=1e-10)
test_eq(type(PPM(8, n_layers=0).transform), nn.Identity)
t = PPM(8).transform
assert type(t) is nn.Conv2d and (t.in_channels, t.out_channels, t.kernel_size, t.bias is not None) == (8, 8, (1, 1), True)
test_eq([type(l).__name__ for l in PPM(8, n_layers=2).transform], ['Conv2d', 'BatchNorm2d', 'ReLU', 'Conv2d'])
test_close(torch.diagonal(PPM(8).similarity(x), dim1=1, dim2=2), torch.ones(2, 12, dtype=torch.float64), eps=1e-12)  # self term
test_fail(lambda: PPM(8, gamma=0), contains='gamma'); test_fail(lambda: PPM(8, n_layers=3), contains='n_layers')


# %% [markdown]
# **What the similarity looks like.** Figure 1 takes image 0 of `SyntheticScenes` (the embedded dataset of the data
# chapter: textured objects of several classes on a textured background), runs it through a small *randomly
# initialised* conv stack (stride 8, so a 112-pixel image gives a 14x14 map) and a projector, and shows
# $s(x_i, \cdot)$ for a pixel inside an object (marked), for $\gamma = 1, 2, 4$. Even untrained features separate
# colours and textures; the exponent decides how far the propagation reaches: raising $\gamma$ shrinks every weight
# below 1, so with $\gamma = 4$ only pixels much like the chosen one still count. The paper's ablation prefers
# $\gamma = 2$; the reference's command-line *default* is 1 (`--pixpro-p` in `contrast/option.py`), a trap: the
# released scripts pass 2 (`tools/pixpro_base_r50_100ep.sh`, line 34). The cell also prints
# the mean weight that pixels of the same object and of the rest of the image receive.

# %%
def scene(S:int=112) -> tuple[Tensor, Tensor]:
    "Image 0 of `SyntheticScenes` at S x S: [3, S, S] floats in [0, 1] and its [S, S] per-pixel label map."
    img, labels, _ = SyntheticScenes(length=1, image_size=S, seed=0).scene(0)
    return img.float() / 255, labels

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1),
                    nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, 2, 1))
img, labels = scene()
with torch.no_grad(): x = Projector(64, 256, 64)(net(img[None]))  # [1, 64, 14, 14]
lab = labels[4::8, 4::8]  # [14, 14] label at each feature pixel's centre
obj = torch.bincount(lab[lab > 0].flatten()).argmax()  # the object class covering most feature pixels
r, c = [int(v) for v in (lab == obj).nonzero()[len((lab == obj).nonzero()) // 2]]
i = r*14 + c
fig, axs = plt.subplots(1, 4, figsize=(12, 3.2), dpi=80)
axs[0].imshow(img.permute(1, 2, 0)); axs[0].plot(c*8 + 3.5, r*8 + 3.5, 'w+', ms=12, mew=2); axs[0].set_title('SyntheticScenes #0')
for ax, g in zip(axs[1:], (1, 2, 4)):
    s = PPM(64, g).similarity(x)[0, i].view(14, 14)
    im = ax.imshow(s, vmin=0, vmax=1); ax.plot(c, r, 'w+', ms=12, mew=2); ax.set_title(f'$s(x_i, \\cdot)$, gamma {g}')
    same = (lab == obj).flatten()
    print(f'gamma {g}: mean weight on the same object {s.flatten()[same].mean():.2f}, elsewhere {s.flatten()[~same].mean():.2f}')
fig.colorbar(im, ax=axs[1:], shrink=.8); fig.suptitle('Figure 1: PPM similarity of one pixel of a SyntheticScenes image (untrained features)');

# %% [markdown]
# Since $0 \le \cos \le 1$ after the clamp, raising $\gamma$ can only lower a weight, and the self weight stays 1:

# %%
s1, s2, s4 = (PPM(64, g).similarity(x) for g in (1, 2, 4))
assert (s4 <= s2 + 1e-6).all() and (s2 <= s1 + 1e-6).all() and (s1 >= 0).all()
test_close(torch.diagonal(s4, dim1=1, dim2=2), torch.ones(1, 196), eps=1e-5)

# %% [markdown]
# **Through the book's backbone.** The same scene at 448 pixels through an untrained `resnetrs_tiny` (the CPU-sized
# ResNet-RS of the backbone chapter; C5 is 14x14) and a projector tells a different story: random *deep* features
# are nearly collinear, so every pixel of the image is at least ~0.8 similar to the chosen pixel, for any $\gamma$.
# At initialisation the PPM averages over the whole view; it becomes selective only as training spreads the
# features apart, and $\gamma$ then sharpens that selection. (Measured here with random weights: we ship no
# pretrained PixPro weights to show the trained map.)

# %%
from pixpro_rs.resnet_rs import create_model

# %%
torch.manual_seed(0)
rs = create_model('resnetrs_tiny', num_classes=0).eval()
with torch.no_grad():
    f = rs.forward_features(scene(448)[0][None])  # [1, 512, 14, 14]
    x = Projector(rs.num_features, 256, 64).eval()(f)  # [1, 64, 14, 14]
lows = {g: float(PPM(64, g).similarity(x)[0, i].min()) for g in (1, 2, 4)}
print(f'C5 {tuple(f.shape)}; smallest similarity to pixel ({r}, {c}): ' + ', '.join(f'gamma {g}: {v:.2f}' for g, v in lows.items()))
assert lows[4] < lows[2] < lows[1] and lows[4] > .8


# %% [markdown]
# ## The momentum schedule
#
# The target network follows the online one as an exponential moving average,
# $\theta_t \leftarrow m\,\theta_t + (1 - m)\,\theta_o$, with a momentum that rises from $m_0 = 0.99$ to 1 over the
# run along a half cosine:
#
# $$m(k) = 1 - (1 - m_0)\,\frac{\cos(\pi k / K) + 1}{2},$$
#
# $k$ the global training step (counted from 0) and $K$ the total number of steps. Early on the target moves 1 %
# of the way towards the online network per step; at the end it freezes.
#
# > **Ours.** Past $K$ the formula would *decrease* again (the cosine rises after $\pi$); `momentum_at` holds
# > $m = 1$ for $k \ge K$, so a run extended beyond its plan does not un-freeze its target.

# %%
#| exports
def momentum_at(step:int,  # global training step k, counted from 0
                total_steps:int,  # K, the total number of training steps of the run
                base:float=0.99,  # m_0, the momentum at step 0
               ) -> float:
    "EMA momentum of the target network at `step`: cosine from `base` at 0 to 1 at `total_steps` (and after)."
    check_positive('total_steps', total_steps); check_range('step', step, 0); check_range('momentum', base, 0, 1)
    return 1. - (1. - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1.) / 2.


# %%
test_eq(momentum_at(0, 100), 0.99)
test_close(momentum_at(50, 100), 0.995, eps=1e-12)
test_eq(momentum_at(100, 100), 1.); test_eq(momentum_at(150, 100), 1.)
ms = [momentum_at(k, 1000) for k in range(1001)]
assert all(a <= b for a, b in zip(ms, ms[1:]))
test_eq(momentum_at(0, 10, base=0.), 0.)
test_fail(lambda: momentum_at(0, 0), contains='total_steps'); test_fail(lambda: momentum_at(-1, 10), contains='step')

# %%
K = 100 * 1251  # 100 epochs of ImageNet at a global batch of 1024
fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
ax.plot([k / 1251 for k in range(0, K + 1, 500)], [momentum_at(k, K) for k in range(0, K + 1, 500)])
ax.set(xlabel='epoch', ylabel='momentum m', title='Figure 2: the EMA momentum over a 100-epoch run'); ax.grid(alpha=.3);


# %% [markdown]
# ### The horizon $K$
#
# How long is "the run" for the momentum? The reference does not count optimiser steps: it divides the number of
# images by the images per step, `self.K = int(args.num_instances * 1. / get_world_size() / args.batch_size *
# args.epochs)` (`contrast/models/PixPro.py` line 133 at commit e390d6b), a fraction of a step per epoch more than
# its data loader gives. Its loader drops the last incomplete batch (`drop_last=True` in `contrast/data/__init__.py`),
# so an epoch of ImageNet on 8 GPUs x 128 is $\lfloor \lceil 1{,}281{,}167 / 8 \rceil / 128 \rfloor = 1251$ steps, and
# the learning-rate schedule (`get_scheduler(optimizer, len(train_loader), args)`, `T_max = (epochs -
# warmup_epoch) * n_iter_per_epoch` in `contrast/lr_scheduler.py`) counts exactly these whole epochs of steps:
#
# | ImageNet, 8 x 128 | momentum horizon $K$ (reference) | steps run = lr schedule's length | momentum at the last step |
# |---|---|---|---|
# | 100 epochs | 125,113 | 1251 x 100 = 125,100 | $1 - 3.1 \times 10^{-10}$ |
# | 400 epochs | 500,455 | 1251 x 400 = 500,400 | $1 - 3.1 \times 10^{-10}$ |
#
# So in the reference the momentum never quite reaches 1: the run stops 13 (55) steps short of $K$. The difference
# is tiny, but a faithful reproduction should have it, so `momentum_horizon` computes the reference's expression in
# the same floating-point order (which matters: `int(1000 * 1. / 6 / 10 * 30)` is 499, not 500), and the training
# engine passes it to `PixPro` as `total_steps`. `batch_size` there is the images per process per optimiser step,
# `batch_size x grad_accum` with gradient accumulation. The lr schedule keeps counting whole epochs of steps, as
# the reference's scheduler does; `momentum_at` holds $m = 1$ for steps beyond $K$ if a run ever has more.

# %%
#| exports
def momentum_horizon(num_images:int,  # images in the training set (the reference's num_instances)
                     world_size:int,  # processes (GPUs)
                     batch_size:int,  # images per process per optimiser step (batch_size x grad_accum)
                     epochs:int,  # epochs of the run
                    ) -> int:  # K, the `total_steps` of the momentum schedule
    "The reference's momentum horizon K = int(num_images / world_size / batch_size x epochs), in its floating-point order."
    for name, v in (('num_images', num_images), ('world_size', world_size), ('batch_size', batch_size), ('epochs', epochs)):
        check_positive(name, v)
    return int(num_images * 1. / world_size / batch_size * epochs)


# %%
test_eq(momentum_horizon(1281167, 8, 128, 100), 125113)
test_eq(momentum_horizon(1281167, 8, 128, 400), 500455)
steps_per_epoch = -(-1281167 // 8) // 128  # DistributedSampler pads to ceil(n / world), the loader drops the last batch
test_eq(steps_per_epoch, 1251); test_eq(steps_per_epoch * 100, 125100)
test_eq(momentum_horizon(1000, 6, 10, 30), 499)  # the float order, not the exact 1000 * 30 // 60 = 500
test_eq(momentum_horizon(1281167, 4, 2 * 128, 100), momentum_horizon(1281167, 8, 128, 100))  # 4 GPUs x 2 accumulated
for e, K in ((100, 125113), (400, 500455)):
    last = momentum_at(steps_per_epoch * e - 1, K)
    print(f'{e} epochs: K = {K:,}, {steps_per_epoch * e:,} steps, momentum at the last step 1 - {1 - last:.1e}')
    assert 0 < 1 - last < 1e-9
test_fail(lambda: momentum_horizon(1281167, 0, 128, 100), contains='world_size')


# %% [markdown]
# The update itself touches the **parameters** (weights and biases, including BN's affine ones) and nothing else:
# the target's BN running statistics are its own, accumulated from the batches it sees in train mode.

# %%
#| exports
@torch.no_grad()
def ema_update_(target:nn.Module,  # the momentum copy, updated in place
                online:nn.Module,  # the network it follows (same architecture)
                m:float,  # momentum: target <- m * target + (1 - m) * online
               ):
    "In-place EMA of the parameters of `target` towards `online`; buffers (BN statistics) are left alone."
    pt, po = list(target.parameters()), [p.detach() for p in online.parameters()]
    if len(pt) != len(po): raise ConfigError('online', f'{len(po)} parameters', f'the same architecture as the target ({len(pt)})')
    torch._foreach_mul_(pt, m)  # one kernel launch per group of tensors, not two per parameter
    torch._foreach_add_(pt, po, alpha=1. - m)


# %% [markdown]
# The update is two `torch._foreach_*` calls over all parameters: the arithmetic of the textbook loop
# `for pt, po: pt.mul_(m).add_(po, alpha=1-m)` (bit for bit, the test below checks it), without its ~320 Python
# iterations and ~640 kernel launches per step for a ResNet-50, which on a GPU cost more than the arithmetic.

# %%
torch.manual_seed(0)
a, b = Projector(4, 8, 4), Projector(4, 8, 4)
a0 = [p.detach().clone() for p in a.parameters()]; rm = a[1].running_mean.clone(); b[1].running_mean.fill_(3.)
ema_update_(a, b, .9)
for p, p0, q in zip(a.parameters(), a0, b.parameters()): test_close(p.detach(), .9*p0 + .1*q.detach(), eps=1e-6)
test_eq(a[1].running_mean, rm)  # buffers untouched
loop = [p0.mul(.9).add_(q.detach(), alpha=.1) for p0, q in zip(a0, b.parameters())]  # the per-parameter loop
for p, l in zip(a.parameters(), loop): assert torch.equal(p.detach(), l)  # bit for bit
ema_update_(a, b, 0.)
for p, q in zip(a.parameters(), b.parameters()): test_eq(p.detach(), q.detach())
test_fail(lambda: ema_update_(a, nn.Linear(2, 2), .9), contains='online')  # refused before any change


# %% [markdown]
# ## The backbone
#
# PixPro works on any encoder that returns a C5 feature map [N, C, H, W] (no pooling). The model accepts any
# `nn.Module`: if it has a `forward_features` method (the ResNet-RS models of this book, timm models) that is used,
# otherwise its `forward` must return the map (e.g. torchvision's ResNet-50 without `avgpool` and `fc`). The channel
# count comes from the backbone's `num_features` attribute when it has one, else from a dry run on a small input.

# %%
#| exports
def backbone_features(backbone:nn.Module, x:Tensor) -> Tensor:  # [N, C, H, W]
    "The C5 map of `backbone`: `forward_features(x)` when it exists, else `backbone(x)`; must be 4-D."
    f = backbone.forward_features(x) if hasattr(backbone, 'forward_features') else backbone(x)
    if f.ndim != 4: raise ConfigError('backbone', type(backbone).__name__, f'a C5 map [N, C, H, W], got shape {tuple(f.shape)}')
    return f


# %%
class _WithFeatures(nn.Module):
    def forward_features(self, x): return x[:, :2]
    def forward(self, x): raise AssertionError('forward_features must be preferred')
test_eq(backbone_features(_WithFeatures(), torch.zeros(1, 3, 4, 4)).shape, (1, 2, 4, 4))
test_eq(backbone_features(nn.Conv2d(3, 4, 3, 2, 1), torch.zeros(1, 3, 8, 8)).shape, (1, 4, 4, 4))  # else forward
test_fail(lambda: backbone_features(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), torch.zeros(1, 3, 8, 8)), contains='backbone')


# %%
#| exports
def feature_channels(backbone:nn.Module, image_size:int=64) -> int:
    "C of the backbone's feature map: its `num_features`, else measured by a dry run in eval mode."
    if isinstance(getattr(backbone, 'num_features', None), int): return backbone.num_features
    was = backbone.training
    p = next(backbone.parameters(), None)
    try:
        backbone.eval()
        with torch.no_grad():
            return backbone_features(backbone, torch.zeros(1, 3, image_size, image_size, device=None if p is None else p.device)).shape[1]
    finally: backbone.train(was)


# %%
def tiny_backbone(c:int=32):
    "A 3-layer conv stack with stride 8 (56 px -> 7x7, 40 px -> 5x5): a CPU stand-in for a ResNet in the tests."
    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, c, 3, 2, 1),
                         nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, 2, 1))

bb = tiny_backbone()
test_eq(feature_channels(bb), 32); assert bb.training
bb.num_features = 7; test_eq(feature_channels(bb), 7)


# %% [markdown]
# ## The model
#
# `PixPro` holds the online networks (`encoder`, `projector`, `ppm`, and for the instance branch
# `instance_projector` and `predictor`) and their momentum copies in `target` (a `ModuleDict` with the same names;
# no predictor, no PPM: those exist only online). One training step, in the reference's order:
#
# 1. each view goes through the online networks **in its own forward call** (so batch norm computes statistics per
#    view, as in the reference);
# 2. **the EMA update**: the target moves towards the online weights with $m = $ `momentum_at(step, total_steps)`,
#    then `step` is incremented. It happens inside `forward` when the model is in training mode (override with
#    `update_target=True/False`), after the online forward and before the target forward, so with $m = 0$ the
#    target of this step *is* the online network;
# 3. each view goes through the target networks (no gradient, batch norm in train mode when the model is);
# 4. the losses, both directions: online view 1 against target view 2, online view 2 against target view 1.
#
# `method='pixpro'` uses the PPM and `pixpro_loss`; `method='pixcontrast'` skips the PPM and uses
# `pixcontrast_loss` (with `tau`); `method='instance'` trains only the instance branch, a BYOL-style baseline.
# With `instance_weight` $\alpha > 0$ the pixel methods add $\alpha\,\mathcal{L}_{inst}$.
#
# `total_steps` ($K$) must be known before the first training step: pass it to the constructor, or call
# `set_total_steps(K)` once the data loader's length is known (the reference's $K$ is `momentum_horizon(...)`,
# a few steps more than epochs x optimiser steps per epoch). With
# gradient accumulation, call the forward of the extra micro-batches with `update_target=False`, so that the EMA
# moves once per optimiser step.
#
# > **Ours.** `step` and `total_steps` are registered **buffers**, so they are part of `state_dict()` and every
# > checkpoint. The reference keeps $k$ in a plain attribute, set at construction from `--start-epoch`
# > (`contrast/models/PixPro.py`, line 134); on resume that is still 1 when the model is built, because `main` in
# > `main_pretrain.py` builds the model before `load_checkpoint` sets `args.start_epoch`, so a resumed run's momentum
# > restarts at 0.99 instead of following the planned schedule. Here loading a checkpoint restores the schedule
# > exactly (tested below). The reference also hard-codes a 7x7 average pool in the instance branch, which breaks for any other
# > image size; we pool adaptively.
# >
# > **Ours.** `instance_loss` is the reference's `regression_loss` method (`contrast/models/PixPro.py` lines
# > 204-205 at commit e390d6b: `-2. * torch.einsum('nc, nc->n', [x, y]).mean()`), which computes in whatever dtype
# > its inputs have. Ours computes like the pixel losses of the previous chapter: autocast off, never below float32
# > (bf16/fp16 features give a float32 loss), and in float64 for float64 inputs (an earlier version of ours cast
# > everything to float32, so a float64 check against a hand computation could not be exact).

# %%
#| exports
class PixProOutput(NamedTuple):
    "What `PixPro.forward` returns: the loss to backpropagate and its parts (for logging)."
    loss: Tensor  # the total: pixel + instance_weight * instance (instance only for method='instance')
    pixel: Tensor  # pixel loss, both directions (pixpro or pixcontrast); 0 for method='instance'
    instance: Tensor  # instance loss, both directions; 0 when the branch is off
    momentum: float  # the EMA momentum used by this call's target update (nan when there was none)


# %%
o = PixProOutput(torch.tensor(-1.), torch.tensor(-1.5), torch.tensor(.5), .99)
test_eq(o._fields, ('loss', 'pixel', 'instance', 'momentum'))
loss_, pixel_, instance_, m_ = o; test_eq((float(loss_), float(instance_), m_), (-1., .5, .99))  # unpacks in that order


# %%
#| exports
def instance_loss(p:Tensor,  # [N, D] online predictions, L2-normalised
                  z:Tensor,  # [N, D] target projections, L2-normalised
                 ) -> Tensor:  # scalar in [-2, 2]
    "One direction of the instance (BYOL-style) loss: -2 x the mean cosine, in the inputs' precision and at least float32."
    dt = torch.promote_types(torch.promote_types(p.dtype, z.dtype), torch.float32)  # bf16 -> float32, float64 stays
    with torch.autocast(p.device.type, enabled=False):
        return -2 * (p.to(dt) * z.to(dt)).sum(1).mean()  # [N, D] -> [N] -> scalar


# %% [markdown]
# The test checks the known answers (identical vectors give -2, opposite ones +2), a float64 hand computation to
# 1e-12 with a float64 result, and float32 for bf16 inputs, with and without autocast.

# %%
g = torch.Generator().manual_seed(0)
p64, z64 = (F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1) for _ in range(2))  # [5, 8] each
hand = -2 * sum(sum(a * b for a, b in zip(pr, zr)) for pr, zr in zip(p64.tolist(), z64.tolist())) / 5  # Python floats
l64 = instance_loss(p64, z64)
test_eq(l64.dtype, torch.float64); assert abs(float(l64) - hand) < 1e-12, (float(l64), hand)
test_close(float(instance_loss(p64, p64)), -2., eps=1e-12); test_close(float(instance_loss(p64, -p64)), 2., eps=1e-12)
test_eq(instance_loss(p64.float(), z64.float()).dtype, torch.float32)
pb, zb = p64.bfloat16(), z64.bfloat16()
test_eq(instance_loss(pb, zb).dtype, torch.float32)
with torch.autocast('cpu', dtype=torch.bfloat16): lb = instance_loss(pb, zb)
test_eq(lb.dtype, torch.float32); test_close(float(lb), hand, eps=0.05)

# %%
#| exports
METHODS = ('pixpro', 'pixcontrast', 'instance')

class PixPro(nn.Module):
    "PixPro: online encoder + projector + PPM against an EMA target, optional instance branch."
    def __init__(self,
                 backbone:nn.Module,  # encoder returning a C5 map (via `forward_features` if it has one)
                 method:str='pixpro',  # 'pixpro', 'pixcontrast' or 'instance'
                 feature_dim:int|None=None,  # C of the backbone's map (None: `num_features` or a dry run)
                 hidden_dim:int=4096,  # hidden width of projectors and predictor
                 proj_dim:int=256,  # output channels of the projectors
                 threshold:float=0.7,  # T of `positive_mask`
                 gamma:float=2.0,  # PPM sharpness
                 ppm_layers:int=1,  # layers of the PPM transform g
                 instance_weight:float=0.0,  # alpha: weight of the instance branch (0: no branch)
                 tau:float=0.3,  # PixContrast temperature
                 momentum:float=0.99,  # base EMA momentum m_0
                 total_steps:int|None=None,  # K, total training steps (or call `set_total_steps` later)
                ):
        super().__init__()
        self.method = check_choice('method', method, METHODS)
        self.threshold, self.tau = check_positive('threshold', threshold), check_positive('tau', tau)
        self.instance_weight = check_range('instance_weight', instance_weight, 0)
        self.base_momentum = check_range('momentum', momentum, 0, 1)
        C = feature_dim or feature_channels(backbone)
        self.encoder = backbone
        nets = {'encoder': backbone}
        if method != 'instance': self.projector = nets['projector'] = Projector(C, hidden_dim, proj_dim)
        self.ppm = PPM(proj_dim, gamma, ppm_layers) if method == 'pixpro' else None
        self.with_instance = method == 'instance' or instance_weight > 0
        if self.with_instance:
            self.instance_projector = nets['instance_projector'] = Projector(C, hidden_dim, proj_dim)
            self.predictor = Projector(proj_dim, hidden_dim, proj_dim)
        self.target = nn.ModuleDict({k: copy.deepcopy(v) for k, v in nets.items()})  # same names as online
        self.target.requires_grad_(False)
        self.register_buffer('step', torch.zeros((), dtype=torch.long))  # k, saved in checkpoints
        self.register_buffer('total_steps', torch.zeros((), dtype=torch.long))  # K, saved in checkpoints
        if total_steps is not None: self.set_total_steps(total_steps)

    def set_total_steps(self, total_steps:int):
        "Set K, the number of training steps of the whole run (the momentum reaches 1 there)."
        self.total_steps.fill_(int(check_positive('total_steps', total_steps)))

    @torch.no_grad()
    def momentum_update(self) -> float:
        "Move the target towards the online networks with m = momentum_at(step, total_steps); step += 1. Returns m."
        K = int(self.total_steps)
        if K <= 0: raise ConfigError('total_steps', K, 'the number of training steps (> 0): PixPro(..., total_steps=K) or set_total_steps(K)')
        m = momentum_at(int(self.step), K, self.base_momentum)
        for name, target in self.target.items(): ema_update_(target, getattr(self, name), m)
        self.step += 1
        return m


# %%
pp = PixPro(tiny_backbone(), hidden_dim=64, proj_dim=16)
test_eq(set(pp.target), {'encoder', 'projector'}); assert not any(p.requires_grad for p in pp.target.parameters())
test_eq((int(pp.step), int(pp.total_steps)), (0, 0))
test_fail(lambda: pp.momentum_update(), contains='total_steps')  # K unknown: refused
pp.set_total_steps(10); test_eq(pp.momentum_update(), 0.99); test_eq(int(pp.step), 1)
test_fail(lambda: PixPro(tiny_backbone(), tau=0.), contains='tau')


# %% [markdown]
# The two branches of one view, each in its own call. The online branch returns the L2-normalised pixel output
# $y$ [N, 256, H, W] (through the PPM for PixPro, straight from the projector for PixContrast) and the instance
# prediction [N, 256]; the target branch the same from the momentum networks. Average pooling is adaptive, so any
# map size works.

# %%
#| exports
def _online(self:PixPro, x:Tensor) -> tuple[Tensor|None, Tensor|None]:
    "Online outputs of one view: (pixel [N, D, H, W] or None, instance [N, D] or None), L2-normalised."
    f = backbone_features(self.encoder, x)  # [N, C, H, W]
    pix = inst = None
    if self.method != 'instance':
        pix = self.projector(f)  # [N, D, H, W]
        if self.ppm is not None: pix = self.ppm(pix)
        pix = F.normalize(pix, dim=1)
    if self.with_instance:
        inst = F.normalize(F.adaptive_avg_pool2d(self.predictor(self.instance_projector(f)), 1).flatten(1), dim=1)  # [N, D]
    return pix, inst


# %%
torch.manual_seed(0)
pp, xv = PixPro(tiny_backbone(), hidden_dim=64, proj_dim=16, instance_weight=1.), torch.randn(2, 3, 56, 56)
pix, inst = _online(pp, xv)
test_eq((pix.shape, inst.shape), ((2, 16, 7, 7), (2, 16)))
test_close(pix.norm(dim=1), torch.ones(2, 7, 7), eps=1e-5); test_close(inst.norm(dim=1), torch.ones(2), eps=1e-5)
assert pix.requires_grad and inst.requires_grad
test_eq(_online(PixPro(tiny_backbone(), 'instance', hidden_dim=64, proj_dim=16), xv)[0], None)  # no pixel branch


# %%
#| exports
@torch.no_grad()
def _target(self:PixPro, x:Tensor) -> tuple[Tensor|None, Tensor|None]:
    "Target outputs of one view, no gradient: (pixel [N, D, H, W] or None, instance [N, D] or None)."
    f = backbone_features(self.target['encoder'], x)
    pix = F.normalize(self.target['projector'](f), dim=1) if self.method != 'instance' else None
    inst = None
    if self.with_instance:
        inst = F.normalize(F.adaptive_avg_pool2d(self.target['instance_projector'](f), 1).flatten(1), dim=1)
    return pix, inst

PixPro._online, PixPro._target = _online, _target

# %%
pix_t, inst_t = pp._target(xv)
test_eq((pix_t.shape, inst_t.shape), ((2, 16, 7, 7), (2, 16))); assert not pix_t.requires_grad and not inst_t.requires_grad
test_close(pix_t, F.normalize(pp.projector(pp.encoder(xv)), dim=1).detach(), eps=1e-5)  # a fresh target is the online copy, no PPM
test_close(inst_t.norm(dim=1), torch.ones(2), eps=1e-5)


# %% [markdown]
# The forward checks its inputs first: a wrong coordinate shape would otherwise surface as a broadcasting error deep
# inside the mask, or worse, broadcast silently.

# %%
#| exports
def _forward(self:PixPro,
             view1:Tensor,  # [N, 3, S, S] first augmented views
             view2:Tensor,  # [N, 3, S, S] second augmented views
             coord1:Tensor,  # [N, 4] crop of view1 in its image, (x_ul, y_ul, x_lr, y_lr)
             coord2:Tensor,  # [N, 4] crop of view2
             update_target:bool|None=None,  # EMA update in this call (None: when training)
             online:nn.Module|None=None,  # computes the online outputs of both views (None: this model; see `OnlineNet`)
            ) -> PixProOutput:
    "One PixPro step: online forward, EMA update, target forward, symmetric losses."
    for name, v in (('view1', view1), ('view2', view2)):
        if not isinstance(v, Tensor) or v.ndim != 4: raise ConfigError(name, getattr(v, 'shape', v), 'a batch [N, 3, H, W]')
    if view2.shape[0] != view1.shape[0]: raise ConfigError('view2', view2.shape, f'N = {view1.shape[0]} as view1')
    for name, c in (('coord1', coord1), ('coord2', coord2)):
        if not isinstance(c, Tensor) or c.shape != (view1.shape[0], 4):
            raise ConfigError(name, getattr(c, 'shape', c), f'a tensor of shape [N, 4] with N = {view1.shape[0]}')
    (p1, i1), (p2, i2) = online(view1, view2) if online is not None else (self._online(view1), self._online(view2))
    m = self.momentum_update() if (self.training if update_target is None else update_target) else float('nan')
    t1, j1 = self._target(view1)
    t2, j2 = self._target(view2)
    zero = torch.zeros((), device=view1.device)
    pixel = instance = zero
    if self.method == 'pixpro':
        pixel = pixpro_loss(p1, t2, coord1, coord2, self.threshold) + pixpro_loss(p2, t1, coord2, coord1, self.threshold)
    elif self.method == 'pixcontrast':
        pixel = (pixcontrast_loss(p1, t2, coord1, coord2, self.threshold, self.tau)
                 + pixcontrast_loss(p2, t1, coord2, coord1, self.threshold, self.tau))
    if self.with_instance: instance = instance_loss(i1, j2) + instance_loss(i2, j1)
    loss = instance if self.method == 'instance' else pixel + self.instance_weight * instance
    return PixProOutput(loss, pixel, instance, m)

PixPro.forward = _forward


# %% [markdown]
# A tiny model (the 3-layer stand-in backbone, hidden width 64, 16 output channels) and a batch of two image pairs
# at 56 pixels (7x7 maps): one nested pair and one flipped twin. The shape table shows what each network produces.

# %%
def tiny_pixpro(**kw):
    torch.manual_seed(0)
    return PixPro(tiny_backbone(), hidden_dim=64, proj_dim=16, total_steps=10, **kw)

def batch(n=2, size=56):
    g = torch.Generator().manual_seed(1)
    c1 = torch.tensor([[.1, .2, .9, .8], [0, 0, 1, 1]]).repeat(n // 2, 1)
    c2 = torch.tensor([[.3, .3, .6, .7], [1, 0, 0, 1]]).repeat(n // 2, 1)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g), c1, c2

model = tiny_pixpro()
v1, v2, c1, c2 = batch()
with torch.no_grad():
    f = backbone_features(model.encoder, v1)
    for name, t in [('view', v1), ('encoder (C5)', f), ('projector', model.projector(f)),
                    ('PPM', model.ppm(model.projector(f))), ('target projector', model.target['projector'](f))]:
        print(f'{name:18s} {tuple(t.shape)}')
out = model(v1, v2, c1, c2)
print(out)
assert isinstance(out, PixProOutput) and torch.isfinite(out.loss) and -4 <= float(out.loss) <= 4
test_eq(float(out.loss), float(out.pixel)); test_eq(float(out.instance), 0.); test_eq(out.momentum, 0.99)
test_eq(int(model.step), 1)
assert model.target['encoder'][1].training  # target BN in train mode while training

# %% [markdown]
# **Gradients** reach every online parameter (encoder, projector, PPM) and no target parameter; the target's
# parameters do not even require a gradient, so an optimiser built from `requires_grad` parameters never sees them.

# %%
model.zero_grad()
model(v1, v2, c1, c2).loss.backward()
online = [n for n, p in model.named_parameters() if not n.startswith('target.')]
assert any(n.startswith('ppm.') for n in online) and any(n.startswith('projector.') for n in online)
for n, p in model.named_parameters():
    if n.startswith('target.'): assert p.grad is None and not p.requires_grad, n
    else: assert p.grad is not None and p.grad.abs().sum() > 0, n

# %% [markdown]
# **The EMA.** With base momentum 0 the first step's $m$ is 0, so right after the forward the target equals the
# online networks. With $m_0 = 0.99$, $K = 10$, at step 3 each target parameter moves to exactly
# $m\,\theta_t + (1-m)\,\theta_o$ with $m$ = `momentum_at(3, 10)`, and the BN statistics of the target are not
# copied from the online network. Without training mode (or with `update_target=False`) nothing moves.

# %%
model = tiny_pixpro(momentum=0.)
with torch.no_grad():  # make online and target differ first
    for p in model.encoder.parameters(): p.add_(torch.randn_like(p))
out = model(v1, v2, c1, c2)
test_eq(out.momentum, 0.)
for name, t in model.target.items():
    for pt, po in zip(t.parameters(), getattr(model, name).parameters()): test_eq(pt.detach(), po.detach())

model = tiny_pixpro()
model.step.fill_(3)
with torch.no_grad():
    for p in model.encoder.parameters(): p.add_(torch.randn_like(p))
before = {n: p.clone() for n, p in model.target.named_parameters()}
onl = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith('target.')}
out = model(v1, v2, c1, c2)
m = momentum_at(3, 10); test_eq(out.momentum, m); test_eq(int(model.step), 4)
for n, p in model.target.named_parameters(): test_close(p.detach(), m * before[n] + (1 - m) * onl[n], eps=1e-6)
test_ne(model.target['encoder'][1].running_mean, model.encoder[1].running_mean)

model.eval(); s = int(model.step); out = model(v1, v2, c1, c2)
test_eq(int(model.step), s); assert math.isnan(out.momentum)
model.train(); model(v1, v2, c1, c2, update_target=False); test_eq(int(model.step), s)

# %% [markdown]
# **Checkpoints keep the schedule.** `step` and `total_steps` are in the `state_dict`; a fresh model that loads it
# continues with the next momentum of the schedule, not with 0.99 again. A model without `total_steps` refuses to
# train instead of silently using a wrong schedule.

# %%
model = tiny_pixpro()
for _ in range(4): model(v1, v2, c1, c2)
sd = model.state_dict()
assert 'step' in sd and 'total_steps' in sd
fresh = PixPro(tiny_backbone(), hidden_dim=64, proj_dim=16)
fresh.load_state_dict(sd)
test_eq((int(fresh.step), int(fresh.total_steps)), (4, 10))
test_eq(fresh(v1, v2, c1, c2).momentum, momentum_at(4, 10))
test_fail(lambda: PixPro(tiny_backbone(), hidden_dim=64, proj_dim=16)(v1, v2, c1, c2), contains='total_steps')

# %% [markdown]
# **The instance branch** works at any map size (the reference's fixed 7x7 pool would fail at 5x5), alone
# (`method='instance'`) or added to the pixel loss. The total is `pixel + alpha * instance`.

# %%
for size in (40, 56):  # 5x5 and 7x7 maps
    v1s, v2s, c1s, c2s = batch(size=size)
    m_ = tiny_pixpro(instance_weight=0.5)
    o = m_(v1s, v2s, c1s, c2s)
    test_close(float(o.loss), float(o.pixel + 0.5 * o.instance), eps=1e-6); assert -4 <= float(o.instance) <= 4 and float(o.instance) != 0
    o = tiny_pixpro(method='instance')(v1s, v2s, c1s, c2s)
    test_eq(float(o.loss), float(o.instance)); test_eq(float(o.pixel), 0.)
mi = tiny_pixpro(method='instance')
assert not hasattr(mi, 'projector') and mi.ppm is None and set(mi.target) == {'encoder', 'instance_projector'}
test_eq(set(tiny_pixpro(instance_weight=1.).target), {'encoder', 'projector', 'instance_projector'})

# %% [markdown]
# **PixContrast** has no PPM; its loss is non-negative. **Mixed precision**: under bf16 autocast the networks run in
# bf16, the mask and the losses in float32, and the loss is finite.

# %%
mc = tiny_pixpro(method='pixcontrast')
assert mc.ppm is None
o = mc(v1, v2, c1, c2); assert float(o.loss) > 0 and torch.isfinite(o.loss)
for kw in ({}, {'instance_weight': 1.}, {'method': 'pixcontrast'}):
    with torch.autocast('cpu', dtype=torch.bfloat16):
        o = tiny_pixpro(**kw)(v1, v2, c1, c2)
    test_eq(o.loss.dtype, torch.float32); assert torch.isfinite(o.loss), kw

# %% [markdown]
# **Bad input** is refused with the argument's name:

# %%
model = tiny_pixpro()
test_fail(lambda: model(v1, v2, c1[:, :3], c2), contains='coord1')
test_fail(lambda: model(v1, v2, c1, torch.cat([c2, c2])), contains='coord2')
test_fail(lambda: model(v1, v2[:1], c1, c2), contains='view2')
test_fail(lambda: model(v1[0], v2, c1, c2), contains='view1')
test_fail(lambda: tiny_pixpro(threshold=0.), contains='threshold')
test_fail(lambda: tiny_pixpro(method='byol'), contains='method')
test_fail(lambda: tiny_pixpro(instance_weight=-1.), contains='instance_weight')
test_fail(lambda: tiny_pixpro(gamma=-1.), contains='gamma')
try: model(v1, v2, c1[:, :3], c2)
except ValueError: pass


# %% [markdown]
# ## Data parallelism
#
# Only the online networks learn, so only they belong inside `DistributedDataParallel`: the
# target is updated by the EMA, identically on every process because the online weights are. `OnlineNet` is a view
# of a `PixPro` model that holds the *same* online modules (no copy) and computes both views' online outputs; the
# training loop wraps it in DDP and passes it as `online=`, so the gradients of the online parameters are averaged
# across processes while the target and the step counter stay outside DDP.
#
# > **Ours.** The reference wraps the whole model, target included, in apex's DDP; that broadcasts and checks
# > buffers of a network that no gradient reaches.

# %%
#| exports
class OnlineNet(nn.Module):
    "The online half of a `PixPro` model, sharing its modules: what DDP wraps. `forward(v1, v2)` -> both views' outputs."
    def __init__(self, model:PixPro):
        super().__init__()
        self.model = [model]  # a plain list: the target must not become a child of this module
        for name in ('encoder', 'projector', 'ppm', 'instance_projector', 'predictor'):
            if getattr(model, name, None) is not None: setattr(self, name, getattr(model, name))
    def forward(self, view1:Tensor, view2:Tensor):
        return self.model[0]._online(view1), self.model[0]._online(view2)


# %%
model = tiny_pixpro(instance_weight=1.)
net = OnlineNet(model)
test_eq({id(p) for p in net.parameters()}, {id(p) for n, p in model.named_parameters() if not n.startswith('target.')})
assert not any(n.startswith('target') for n, _ in net.named_parameters()) and 'step' not in dict(net.named_buffers())
a = model(v1, v2, c1, c2, update_target=False).loss
b = model(v1, v2, c1, c2, update_target=False, online=net).loss
test_eq(float(a), float(b))

# %% [markdown]
# ## Summary
#
# - `Projector` is the per-pixel MLP (C -> 4096 -> 256, BN and ReLU in between); the instance predictor is the same
#   block on 256 channels.
# - `PPM(dim, gamma, n_layers)` propagates features within a view: $y_i = \sum_j \max(\cos(x_i, x_j), 0)^\gamma\,
#   \mathrm{normalize}(g(x_j))$, self term included, weights not normalised; `transform` is $g$.
# - `momentum_at(step, total_steps, base)` is the cosine EMA schedule from 0.99 to 1 (held at 1 past the end);
#   `momentum_horizon(num_images, world_size, batch_size, epochs)` is the reference's $K$ (125,113 for ImageNet on
#   8 x 128 over 100 epochs, 13 more than the 125,100 steps run); `ema_update_` moves parameters only.
# - `instance_loss` computes in the inputs' precision, at least float32, with autocast off, like the pixel losses.
# - `PixPro(backbone, method=...)` runs each view through the online networks, updates the target once per training
#   forward (after the online pass, before the target pass), and returns `PixProOutput(loss, pixel, instance,
#   momentum)`. Its `step` and `total_steps` are buffers, so checkpoints resume the schedule exactly, which the
#   reference does not do; the instance branch pools adaptively, so any image size works.
# - `OnlineNet(model)` is the online half of a model, sharing its modules: the training loop wraps it in DDP and
#   passes it as `model(..., online=...)`, so the target stays outside DDP.
#
# ## Exercises
#
# 1. Replace the PPM's unnormalised weights by a softmax over $j$ of $\cos(x_i, x_j)/0.1$ and compare Figure 1's maps
#    and the printed same-object and rest-of-image weights with those of $\gamma = 2$. What does the normalisation
#    take away?
# 2. Train `tiny_pixpro()` for a few dozen steps on `SyntheticScenes` with `ppm_layers` 0, 1 and 2 and record the
#    loss. Why is the loss not a fair way to compare the three (see the previous chapter on what the loss measures)?
# 3. Resume a run in the middle: save `model.state_dict()` after 5 steps of a 10-step schedule, load it into a fresh
#    `PixPro` and check that its next training step uses `momentum_at(5, 10)`. Then set `model.step` to 0 after
#    loading, which is what the reference's resume amounts to, and print how far the momentum is off.
# 4. Compute `momentum_horizon` for your own data set and GPUs, and how many steps short of $K$ the run stops.
