# %% [markdown]
# # ResNet-RS
#
# > The ResNet-RS family (RS-50 ... RS-420) as one generic class and a table of configurations, exact to the released checkpoints, plus torchvision's ResNet-50.

# %%
#| default_exp resnet_rs

# %%
#| export
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from pixpro_rs.core import ConfigError, check_choice, check_range

# %%
#| hide
import tempfile
import time

import matplotlib.pyplot as plt
from fastcore.test import test_close, test_eq, test_fail
from IPython.display import Markdown, display
from matplotlib.patches import FancyBboxPatch
from nbdev.showdoc import show_doc
from safetensors.torch import save_file

# %%
#| hide
_t0 = time.time()


# %% [markdown]
# Bello et al., *Revisiting ResNets: Improved Training and Scaling Strategies* (NeurIPS 2021, arXiv 2103.07579), make
# one uncomfortable point: most of the progress credited to new architectures since ResNet came from better *training
# methods* and better *scaling*. Their ResNet-RS models are ordinary bottleneck ResNets with two well-known tweaks
# (ResNet-D and squeeze-and-excitation), trained with a modern recipe (cosine schedule, label smoothing, RandAugment,
# dropout, stochastic depth, weight EMA, lower weight decay) and scaled mostly in *depth*. In their additive study on
# ResNet-200, the training methods give about three quarters of the gain (79.0 -> 82.2 top-1), the two architecture
# tweaks the last quarter (-> 83.4).
#
# For this book, ResNet-RS is the backbone we pretrain with PixPro. This chapter builds it so that:
#
# - the architecture is exactly that of the released TF1 checkpoints (and of timm's `resnetrs*`, which loads them):
#   same parameters, same state-dict key names, so any converted checkpoint loads with `strict=True`;
# - one class (`ResNetRS`) plus one table (`RS_CONFIGS`) gives the whole family, `create_model(arch)` builds a member;
# - dense methods get the C5 map without pooling (`forward_features`) and the pyramid C2..C5 (`forward_pyramid`);
# - torchvision's ResNet-50, the PixPro paper's backbone, has the same interface, so our PixPro numbers compare with
#   the paper's.

# %% [markdown]
# ## What ResNet-RS changes in a ResNet
#
# Two changes to the 2015 ResNet-50, both visible in the released checkpoints:
#
# 1. **ResNet-D** (He et al., *Bag of Tricks*, 2019). The 7x7 stem convolution becomes three 3x3 convolutions
#    (3 -> 32 -> 32 -> 64 channels, the first with stride 2), and the max-pool after the stem is replaced by a
#    **strided 3x3 convolution** (64 -> 64). (The paper's text says the max-pool is *removed*; every released config and
#    checkpoint has this strided convolution instead, and so do we.) In the first block of a stage with stride 2, the
#    projection shortcut no longer is a 1x1 convolution *with stride 2*, which reads only one pixel in four: it is a
#    2x2 average pool with stride 2 followed by a 1x1 convolution, so every input pixel contributes.
# 2. **Squeeze-and-excitation** (Hu et al., 2018) in every bottleneck, after the last BN: the block's output
#    $x \in \mathbb{R}^{C \times H \times W}$ is reweighted channel by channel, by gates computed from its mean over
#    the pixels (equation below).
#
# $$\mathrm{SE}(x) = x \odot \sigma\big(W_2\,\mathrm{ReLU}(W_1 \bar x + b_1) + b_2\big), \qquad
# \bar x = \tfrac{1}{HW}\textstyle\sum_{h,w} x_{:,h,w},$$
#
# with $W_1 \in \mathbb{R}^{C/4 \times C}$, $W_2 \in \mathbb{R}^{C \times C/4}$ (SE's reduction ratio 0.25, with
# biases).
#
# The rest is the classic bottleneck: conv1x1 ($f$) -> conv3x3 (stride $s$, $f$) -> conv1x1 ($4f$), each followed by BN,
# ReLU after the first two; the last BN's $\gamma$ starts at **zero**, so every residual block starts as the identity;
# stochastic depth drops the residual branch of a whole sample; widths $f$ = 64, 128, 256, 512 per stage, strides
# 1, 2, 2, 2. The head is global average pooling -> dropout -> linear. Figure 1 draws the two changes.

# %%
#| echo: false
def _box(ax, x, y, text, color, w=2.6, h=0.55):
    ax.add_patch(FancyBboxPatch((x - w/2, y - h/2), w, h, boxstyle='round,pad=0.04', fc=color, ec='0.3', lw=0.8))
    ax.text(x, y, text, ha='center', va='center', fontsize=8)

def _arrow(ax, x0, y0, x1, y1):
    ax.annotate('', xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle='->', color='0.3', lw=0.9))

fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 5.2), gridspec_kw=dict(width_ratios=[1, 1.5, 1]))
for a in (a1, a2, a3): a.set_xlim(-2, 2); a.set_ylim(-0.6, 8.6); a.axis('off')
a2.set_xlim(-2.6, 3.4)
# (a) stem
stem = ['image 3 x H x W', 'conv3x3 s2, 3->32, BN, ReLU', 'conv3x3, 32->32, BN, ReLU', 'conv3x3, 32->64, BN, ReLU',
        'conv3x3 s2, 64->64, BN, ReLU\n(replaces the max-pool)', '64 x H/4 x W/4']
cols = ['w', '#cfe2f3', '#cfe2f3', '#cfe2f3', '#f9cb9c', 'w']
for i, (t, c) in enumerate(zip(stem, cols)):
    y = 8 - i * 1.5
    _box(a1, 0, y, t, c, w=3.4, h=0.8 if '\n' in t else 0.55)
    if i: _arrow(a1, 0, y + 1.5 - 0.33, 0, y + 0.45 if '\n' in t else y + 0.3)
a1.set_title('(a) ResNet-D deep stem', fontsize=10)
# (b) first bottleneck of a stride-2 stage
main = ['x: 4f_in x H x W', 'conv1x1 -> f, BN, ReLU', 'conv3x3 s2 -> f, BN, ReLU', 'conv1x1 -> 4f, BN (gamma = 0)',
        'SE (ratio 0.25)', 'stochastic depth', '+', 'ReLU -> 4f x H/2 x W/2']
mc = ['w', '#cfe2f3', '#cfe2f3', '#cfe2f3', '#b6d7a8', '#ead1dc', 'w', 'w']
for i, (t, c) in enumerate(zip(main, mc)):
    y = 8.2 - i * 1.17
    _box(a2, -0.4, y, t, c, w=0.5 if t == '+' else 3.0, h=0.5)
    if i: _arrow(a2, -0.4, y + 1.17 - 0.27, -0.4, y + 0.27)
for j, t in enumerate(['avgpool 2x2 s2', 'conv1x1 -> 4f', 'BN']):
    _box(a2, 2.3, 6.0 - j * 1.2, t, '#f9cb9c', w=1.9, h=0.5)
    if j: _arrow(a2, 2.3, 6.0 - (j - 1) * 1.2 - 0.27, 2.3, 6.0 - j * 1.2 + 0.27)
_arrow(a2, 1.1, 8.2, 2.3, 6.27); _arrow(a2, 2.3, 3.33, -0.15, 1.2 + 0.1)
a2.set_title('(b) first bottleneck of a stage: avg-pool shortcut', fontsize=10)
# (c) SE
se = ['4f x H x W', 'global mean -> 4f x 1 x 1', 'conv1x1 4f -> f (bias), ReLU', 'conv1x1 f -> 4f (bias)',
      'sigmoid -> gates', 'x * gates']
for i, t in enumerate(se):
    y = 8 - i * 1.5
    _box(a3, 0, y, t, '#b6d7a8' if 0 < i < 5 else 'w', w=3.4)
    if i: _arrow(a3, 0, y + 1.5 - 0.3, 0, y + 0.3)
a3.set_title('(c) squeeze-and-excitation', fontsize=10)
fig.text(0.5, 0.01, 'Figure 1: the two ResNet-D changes (orange) and SE (green) in ResNet-RS; blue: the classic layers.',
         ha='center', fontsize=9)
plt.tight_layout(rect=(0, 0.04, 1, 1)); plt.show()


# %% [markdown]
# ## Building blocks
#
# ### Squeeze-and-excitation
#
# The two fully connected layers of SE are 1x1 convolutions with bias, named `fc1` and `fc2`, as in timm (the names are
# part of the checkpoint format).

# %%
#| exports
class SqueezeExcite(nn.Module):
    "Squeeze-and-excitation: per-channel gates from the global mean through a small MLP (1x1 convs with bias)."
    def __init__(self,
                 channels:int,  # C, channels of the block output
                 rd_channels:int,  # hidden width (C/4 in ResNet-RS)
                ):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)

    def forward(self, x):  # [N, C, H, W]
        s = x.mean((2, 3), keepdim=True)  # [N, C, 1, 1]
        s = self.fc2(F.relu(self.fc1(s)))  # [N, C, 1, 1]
        return x * s.sigmoid()  # [N, C, H, W]


# %% [markdown]
# SE only rescales channels, so a gate can never change the sign of a value or mix channels: with the biases of `fc2`
# set very high, every gate is 1 and SE is the identity; with them very low, it switches the block output off.

# %%
se = SqueezeExcite(8, 2)
x = torch.randn(2, 8, 5, 5)
test_eq(se(x).shape, x.shape)
with torch.no_grad():
    se.fc2.bias.fill_(50.); test_close(se(x), x, eps=1e-6)
    se.fc2.bias.fill_(-50.); test_close(se(x), torch.zeros_like(x), eps=1e-6)
test_eq(sum(p.numel() for p in se.parameters()), 8*2 + 2 + 2*8 + 8)


# %% [markdown]
# ### Stochastic depth
#
# Stochastic depth (Huang et al., 2016) drops the residual branch $F$ of a block for a random subset of the samples
# in a training batch: $y = x + \frac{m}{1-p} F(x)$ with $m \sim \mathrm{Bernoulli}(1-p)$ per sample. Dividing by the
# keep probability $1-p$ keeps the expected output unchanged, so nothing needs rescaling at evaluation, where the block
# always runs in full. TF's ResNet-RS code and timm's `DropPath` compute the same `x / keep * mask`.

# %%
#| exports
class DropPath(nn.Module):
    "Stochastic depth: in training, zero a sample's residual branch with probability `p`, scale the others by 1/(1-p)."
    def __init__(self, p:float=0.):  # drop probability of this block
        super().__init__()
        self.p = check_range('drop_path', p, 0, 1, high_open=True)

    def forward(self, x):  # [N, ...]
        if not self.training or self.p == 0.: return x
        keep = 1. - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # [N, 1, 1, 1]
        return x / keep * mask

    def extra_repr(self): return f'p={self.p:g}'


# %%
dp, x = DropPath(0.5), torch.ones(4000, 3, 2, 2)
test_eq(dp.eval()(x), x)  # evaluation: identity
y = dp.train()(x)
per_sample = y.flatten(1)
assert ((per_sample == 0).all(1) | (per_sample == 2.).all(1)).all(), "a whole sample is dropped or scaled by 1/keep"
test_close(y.mean().item(), 1.0, eps=0.05)  # the expectation is kept
test_fail(lambda: DropPath(1.0), contains='invalid drop_path=1.0')


# %% [markdown]
# ### The bottleneck block
#
# One class for every block of every model. The first block of a stage gets a shortcut projection (`downsample`, the
# name timm and torchvision use): `[AvgPool 2x2 s2 | Identity, conv1x1, BN]` at indices 0, 1, 2, so the checkpoint keys
# are `downsample.1.weight` (conv) and `downsample.2.*` (BN) whether or not the stage strides.

# %%
#| exports
def conv_bn(cin:int, cout:int, k:int=3, stride:int=1) -> list:
    "A bias-free conv with 'same' padding k//2 and its BatchNorm (eps 1e-5), as two modules."
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


# %%
conv, bn = conv_bn(4, 6, 3, 2)
test_eq((conv.kernel_size, conv.stride, conv.padding, conv.bias), ((3, 3), (2, 2), (1, 1), None))
test_eq((type(bn), bn.num_features, bn.eps), (nn.BatchNorm2d, 6, 1e-5))
test_eq(conv(torch.randn(1, 4, 7, 7)).shape, (1, 6, 4, 4))  # 'same' padding: ceil(7 / 2)
test_eq(conv_bn(4, 6, 1)[0].padding, (0, 0))


# %%
#| exports
class Bottleneck(nn.Module):
    "ResNet-D bottleneck with SE: 1x1 -> 3x3 (stride) -> 1x1 (x4) -> SE -> stochastic depth -> + shortcut -> ReLU."
    expansion = 4
    def __init__(self,
                 cin:int,  # input channels
                 width:int,  # f, the bottleneck width; the output has 4f channels
                 stride:int=1,  # stride of the 3x3 conv and of the shortcut's average pool
                 drop_path:float=0.,  # stochastic depth rate of this block
                 se_ratio:float=0.25,  # SE hidden width / output width (0: no SE)
                ):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = conv_bn(cin, width, 1)
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = conv_bn(width, cout, 1)
        self.se = SqueezeExcite(cout, int(cout * se_ratio)) if se_ratio > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.downsample = None
        if stride != 1 or cin != cout:  # ResNet-D: average 2x2 then project, so no input pixel is skipped
            pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
            self.downsample = nn.Sequential(pool, *conv_bn(cin, cout, 1))

    def forward(self, x):  # [N, cin, H, W]
        shortcut = x if self.downsample is None else self.downsample(x)  # [N, 4f, H/s, W/s]
        x = F.relu(self.bn1(self.conv1(x)))  # [N, f, H, W]
        x = F.relu(self.bn2(self.conv2(x)))  # [N, f, H/s, W/s]
        x = self.se(self.bn3(self.conv3(x)))  # [N, 4f, H/s, W/s]
        return F.relu(self.drop_path(x) + shortcut)


# %% [markdown]
# `ceil_mode=True` matters for odd sizes: a 7x7 map pools to 4x4, exactly like the 3x3 stride-2 convolution of the main
# path, so the two branches can be added. With the last BN's $\gamma = 0$ the residual branch contributes nothing, so a
# fresh block is `ReLU(shortcut(x))`: for a block without projection and a non-negative input, the identity.

# %%
blk = Bottleneck(16, 8, stride=2).eval()
x = torch.randn(2, 16, 7, 7)
test_eq(blk(x).shape, (2, 32, 4, 4))  # odd size: ceil mode on both branches
test_eq(sorted(k for k in blk.state_dict() if 'downsample' in k)[:3],
        ['downsample.1.weight', 'downsample.2.bias', 'downsample.2.num_batches_tracked'])
nn.init.zeros_(blk.bn3.weight); nn.init.zeros_(blk.bn3.bias)
test_close(blk(x), F.relu(blk.downsample(x)), eps=1e-6)
idb = Bottleneck(32, 8).eval(); nn.init.zeros_(idb.bn3.weight); nn.init.zeros_(idb.bn3.bias)
xp = torch.rand(2, 32, 5, 5)
test_close(idb(xp), xp, eps=1e-6)  # zero gamma: the block starts as the identity
assert idb.downsample is None


# %% [markdown]
# ### Stochastic-depth rates: TF's rule and timm's
#
# The two reference implementations schedule the drop rate differently. TF's ResNet-RS code (the paper's) gives every
# block of stage $i$ (1-based, of $S = 4$) the same rate $r\,(i+1)/(S+1)$, so with $r = 0.1$: 0.04, 0.06, 0.08, 0.10.
# timm ramps the rate linearly over all $B$ blocks of the network, $r\,b/(B-1)$ for block $b = 0 \dots B-1$, from 0 in
# the first block to $r$ in the last. Same final rate, different totals: for RS-200 (66 blocks) TF's rule drops more
# early blocks, because its stage 2 (24 blocks) runs at 0.06 where timm's rule is still below 0.04.

# %%
#| exports
def drop_path_rates(layers,  # blocks per stage
                    rate:float,  # r, the rate of the last stage / block
                    rule:str='tf',  # 'tf': r*(i+1)/(S+1) for stage i=1..S (paper); 'timm': linear over blocks
                   ) -> list[float]:
    "Stochastic-depth rate of every block, in network order."
    check_choice('drop_path_rule', rule, ['tf', 'timm'])
    rate = check_range('drop_path_rate', rate, 0, 1, high_open=True)
    if rule == 'tf': return [rate * (i + 2) / (len(layers) + 1) for i, n in enumerate(layers) for _ in range(n)]
    total = sum(layers)
    return [rate * b / max(total - 1, 1) for b in range(total)]


# %%
tf_rates, timm_rates = drop_path_rates((3, 24, 36, 3), 0.1, 'tf'), drop_path_rates((3, 24, 36, 3), 0.1, 'timm')
test_eq(len(tf_rates), 66)
test_close(tf_rates, [0.04]*3 + [0.06]*24 + [0.08]*36 + [0.10]*3, eps=1e-12)
test_close(timm_rates, [0.1 * b / 65 for b in range(66)], eps=1e-12)
test_eq((timm_rates[0], timm_rates[-1]), (0.0, 0.1))
test_close(sum(tf_rates), 4.74, eps=1e-9); test_close(sum(timm_rates), 3.3, eps=1e-9)  # expected blocks dropped
test_fail(lambda: drop_path_rates((3, 4), 0.1, 'linear'), contains="drop_path_rule='linear'")


# %% [markdown]
# ## The family as data
#
# Every member differs only in the number of blocks per stage and in its recipe. The table keeps the paper's defaults
# next to the architecture: the train = eval image size, dropout, stochastic depth rate and RandAugment magnitude of the
# recipe behind the paper's top-1 (where the paper trains a model at several sizes, the largest, best one; the others
# are in `RS_PAPER_RESULTS` below). Recipes in later chapters read these numbers instead of copying them.
#
# > **Ours.** `resnetrs_tiny` is **not from the paper**: the same stem and block design with one block per stage and a
# > quarter of the widths (16, 32, 64, 128; C5 has 512 channels), about 1.2 M parameters, most of them in the 1000-class
# > head. It exists so the tests and demos of every chapter run in seconds on a CPU. Never report its numbers as ResNet-RS.

# %%
#| exports
@dataclass(frozen=True)
class RSConfig:
    "One member of the family: its architecture and the paper's recipe defaults (train = eval size)."
    layers:tuple  # bottleneck blocks per stage
    image_size:int  # train = eval image size of the paper's recipe for this model
    drop_rate:float  # dropout before the classifier
    drop_path_rate:float  # stochastic depth rate r
    randaug_magnitude:int  # RandAugment magnitude (TF scale, 2 ops)
    top1:float|None  # paper's ImageNet top-1 at image_size (TF1 checkpoints); None: not from the paper
    widths:tuple=(64, 128, 256, 512)  # bottleneck widths f per stage (outputs 4f)
    stem_width:int=32  # channels of the first two stem convs; the stem outputs widths[0]
    paper:bool=True  # False for our own CPU variant

RS_CONFIGS: dict[str, RSConfig] = {
    'resnetrs50':  RSConfig((3, 4, 6, 3), 160, 0.25, 0.0, 10, 78.8),
    'resnetrs101': RSConfig((3, 4, 23, 3), 192, 0.25, 0.0, 15, 81.2),
    'resnetrs152': RSConfig((3, 8, 36, 3), 256, 0.25, 0.0, 15, 83.0),
    'resnetrs200': RSConfig((3, 24, 36, 3), 256, 0.25, 0.1, 15, 83.4),
    'resnetrs270': RSConfig((4, 29, 53, 4), 256, 0.25, 0.1, 15, 83.8),
    'resnetrs350': RSConfig((4, 36, 72, 4), 320, 0.4, 0.1, 15, 84.2),
    'resnetrs420': RSConfig((4, 44, 87, 4), 320, 0.4, 0.1, 15, 84.4),
    # ours, NOT from the paper: 1 block per stage, 1/4 of the widths, for CPU tests and demos
    'resnetrs_tiny': RSConfig((1, 1, 1, 1), 64, 0.0, 0.0, 10, None, (16, 32, 64, 128), 16, paper=False),
}

# %%
test_eq([n for n, c in RS_CONFIGS.items() if not c.paper], ['resnetrs_tiny'])
test_eq(sum(RS_CONFIGS['resnetrs200'].layers), 66)

# %% [markdown]
# Every ImageNet result of the paper for these models (TF1 checkpoints, train = eval size): `(arch, image_size, top1)`.

# %%
#| exports
RS_PAPER_RESULTS: list[tuple[str, int, float]] = [
    ('resnetrs50', 160, 78.8), ('resnetrs101', 160, 80.3), ('resnetrs101', 192, 81.2),
    ('resnetrs152', 192, 82.0), ('resnetrs152', 224, 82.2), ('resnetrs152', 256, 83.0),
    ('resnetrs200', 256, 83.4), ('resnetrs270', 256, 83.8), ('resnetrs350', 256, 84.0),
    ('resnetrs350', 320, 84.2), ('resnetrs420', 320, 84.4),
]

# %%
for name, c in RS_CONFIGS.items():
    test_eq(len(c.layers), 4); test_eq(len(c.widths), 4)
    if c.paper: assert (name, c.image_size, c.top1) in RS_PAPER_RESULTS, name


# %% [markdown]
# ## One class for the whole family
#
# The stem and the four stages, with timm's module names: the stem is `conv1` (a `Sequential` whose convolutions sit at
# 0, 3, 6 and BNs at 1, 4), `bn1`, and `maxpool`, which in ResNet-RS holds the strided convolution and its BN (the name
# stayed for checkpoint compatibility, and we keep it for the same reason). Stages are `layer1` ... `layer4`, the
# classifier `fc`.

# %%
#| exports
class ResNetRS(nn.Module):
    "ResNet-RS: ResNet-D deep stem (strided conv, no max-pool), SE bottlenecks, avg-pool shortcuts; timm's key names."
    def __init__(self,
                 layers=(3, 4, 6, 3),  # bottleneck blocks per stage
                 widths=(64, 128, 256, 512),  # bottleneck widths f per stage
                 stem_width:int=32,  # channels of the first two stem convs
                 num_classes:int=1000,  # classifier size; 0: no classifier, `forward` returns pooled features
                 in_chans:int=3,  # input channels
                 drop_rate:float=0.25,  # dropout before the classifier
                 drop_path_rate:float=0.,  # stochastic depth rate r
                 drop_path_rule:str='tf',  # 'tf' (the paper's, per stage) or 'timm' (per block, linear)
                 se_ratio:float=0.25,  # SE hidden width / block output width
                 zero_init_last:bool=True,  # start the last BN of every block at gamma = 0
                 bn_momentum:float=0.1,  # PyTorch BN momentum (TF's recipe: 1.0, i.e. TF's 0, with a weight EMA)
                ):
        super().__init__()
        self.drop_rate = check_range('drop_rate', drop_rate, 0, 1, high_open=True)
        check_range('bn_momentum', bn_momentum, 0, 1, low_open=True)
        if len(layers) != 4 or len(widths) != 4: raise ConfigError('layers/widths', (layers, widths), 'four stages each')
        c0 = widths[0]
        self.conv1 = nn.Sequential(*conv_bn(in_chans, stem_width, 3, 2), nn.ReLU(inplace=True),
                                   *conv_bn(stem_width, stem_width, 3), nn.ReLU(inplace=True),
                                   nn.Conv2d(stem_width, c0, 3, 1, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(c0)
        self.maxpool = nn.Sequential(*conv_bn(c0, c0, 3, 2), nn.ReLU(inplace=True))  # the strided conv
        rates, cin, b = drop_path_rates(layers, drop_path_rate, drop_path_rule), c0, 0
        for s, (n, f) in enumerate(zip(layers, widths)):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(cin, f, 2 if (i == 0 and s > 0) else 1, rates[b], se_ratio))
                cin, b = f * Bottleneck.expansion, b + 1
            self.add_module(f'layer{s + 1}', nn.Sequential(*blocks))
        self.pyramid_channels = tuple(f * Bottleneck.expansion for f in widths)  # channels of C2..C5
        self.num_features, self.num_classes = cin, num_classes  # C5 channels (2048 in the paper's models)
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d): m.momentum = bn_momentum
        self.init_weights(zero_init_last)

    def init_weights(self, zero_init_last:bool=True):
        "timm's init: Kaiming normal (fan_out, ReLU) for convs, BN gamma 1 beta 0, last BN of each block gamma 0."
        for m in self.modules():
            if isinstance(m, nn.Conv2d): nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d): nn.init.ones_(m.weight); nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, Bottleneck): nn.init.zeros_(m.bn3.weight)

    def stem(self, x):  # [N, 3, H, W] -> [N, widths[0], H/4, W/4]
        return self.maxpool(F.relu(self.bn1(self.conv1(x))))

    def forward_pyramid(self, x) -> list:
        "The maps [C2, C3, C4, C5] at strides 4, 8, 16, 32 (for FPN heads)."
        x, out = self.stem(x), []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out  # [N, 256, H/4, W/4], [N, 512, H/8, W/8], [N, 1024, H/16, W/16], [N, 2048, H/32, W/32]

    def forward_features(self, x):
        "C5, the last map without pooling: [N, num_features, H/32, W/32]."
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def forward_head(self, x, pre_logits:bool=False):
        "Global average pool -> dropout -> fc. [N, C, h, w] -> [N, num_classes] (or [N, C] with `pre_logits`)."
        x = x.mean((2, 3))  # [N, C]
        if self.drop_rate > 0: x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x): return self.forward_head(self.forward_features(x))


# %% [markdown]
# The methods the rest of the book uses:

# %%
show_doc(ResNetRS.forward_features)

# %%
show_doc(ResNetRS.forward_pyramid)

# %%
m = ResNetRS((1, 1, 1, 1), (8, 16, 32, 64), stem_width=8, num_classes=10).eval()
x = torch.randn(2, 3, 64, 64)
test_eq([tuple(c.shape) for c in m.forward_pyramid(x)], [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)])
test_eq(m.forward_features(x).shape, (2, 256, 2, 2)); test_eq(m(x).shape, (2, 10))
test_eq((m.num_features, m.pyramid_channels), (256, (32, 64, 128, 256)))
assert all((b.bn3.weight == 0).all() for b in m.modules() if isinstance(b, Bottleneck)), "bn3 gamma starts at 0"
test_eq(ResNetRS((1, 1, 1, 1), (8, 16, 32, 64), 8, num_classes=0).eval()(x).shape, (2, 256))  # pooled features
test_fail(lambda: ResNetRS(drop_rate=1.5), contains='invalid drop_rate=1.5')


# %% [markdown]
# ### torchvision's ResNet-50 with the same interface
#
# The PixPro paper pretrains torchvision's ResNet-50. To compare with its numbers we offer exactly that network (same
# modules, key names and initialisation, because it *is* torchvision's class) with the two feature methods added.

# %%
#| exports
class TorchvisionResNet(torchvision.models.ResNet):
    "torchvision's bottleneck ResNet (PixPro paper's backbone), unchanged, plus `forward_features`/`forward_pyramid`."
    def __init__(self,
                 layers=(3, 4, 6, 3),  # blocks per stage (ResNet-50)
                 num_classes:int=1000,  # classifier size; 0: no classifier
                 **kwargs,  # passed to torchvision.models.ResNet (e.g. zero_init_residual)
                ):
        super().__init__(torchvision.models.resnet.Bottleneck, list(layers), num_classes=max(num_classes, 1), **kwargs)
        self.num_classes, self.num_features = num_classes, self.fc.in_features
        self.pyramid_channels = (256, 512, 1024, 2048)
        if num_classes == 0: self.fc = nn.Identity()

    def stem(self, x): return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [N, 64, H/4, W/4]
    forward_pyramid = ResNetRS.forward_pyramid
    forward_features = ResNetRS.forward_features


# %%
tv, ours = torchvision.models.resnet50(weights=None), TorchvisionResNet()
test_eq({k: v.shape for k, v in ours.state_dict().items()}, {k: v.shape for k, v in tv.state_dict().items()})
ours.load_state_dict(tv.state_dict()); ours.eval(); tv.eval()
x = torch.randn(1, 3, 64, 64)
with torch.no_grad(): test_close(ours(x), tv(x), eps=1e-5); test_eq(ours.forward_features(x).shape, (1, 2048, 2, 2))

# %% [markdown]
# ## `create_model`
#
# One factory for every backbone of the book, with the glossary's names (`arch`, `num_classes`). Keyword overrides
# replace the table's defaults, e.g. `create_model('resnetrs200', drop_path_rule='timm')` or `drop_rate=0.0`.

# %%
#| exports
MODEL_NAMES: tuple[str, ...] = (*RS_CONFIGS, 'resnet50')

def create_model(arch:str,  # one of MODEL_NAMES
                 num_classes:int=1000,  # classifier size; 0: backbone only (`forward` gives pooled features)
                 **overrides,  # constructor arguments replacing the table's defaults (drop_rate, drop_path_rule, ...)
                ) -> nn.Module:
    "A randomly initialised `arch` with the paper's defaults from `RS_CONFIGS` (or torchvision's ResNet-50)."
    check_choice('arch', arch, MODEL_NAMES)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError('num_classes', num_classes, 'an integer >= 0')
    if arch == 'resnet50': model = TorchvisionResNet((3, 4, 6, 3), num_classes, **overrides)
    else:
        allowed = [k for k in inspect.signature(ResNetRS).parameters if k != 'num_classes']
        for k in overrides: check_choice('override', k, allowed)
        c = RS_CONFIGS[arch]
        kw = dict(layers=c.layers, widths=c.widths, stem_width=c.stem_width, drop_rate=c.drop_rate,
                  drop_path_rate=c.drop_path_rate)
        model = ResNetRS(num_classes=num_classes, **{**kw, **overrides})
    model.arch = arch
    return model


# %% [markdown]
# A wrong name is answered with the list of right ones; `num_classes=0` gives a backbone for PixPro, whose projector
# reads `num_features` to size itself.

# %%
test_fail(lambda: create_model('resnetrs51'), contains="invalid arch='resnetrs51': expected one of 'resnetrs50'")
test_fail(lambda: create_model('resnetrs51'), contains="'resnet50'")
test_fail(lambda: create_model('resnetrs50', num_classes=-1), contains='invalid num_classes=-1')
test_fail(lambda: create_model('resnetrs50', drop_path_rule='linear'), contains='drop_path_rule')
test_fail(lambda: create_model('resnetrs50', dropout=0.1), contains="invalid override='dropout': expected one of 'layers'")
for arch in ('resnetrs_tiny', 'resnet50'):
    bb = create_model(arch, num_classes=0).eval()
    assert not any(k.startswith('fc.') for k in bb.state_dict()), arch
    test_eq(bb.forward_features(torch.randn(1, 3, 64, 64)).shape, (1, bb.num_features, 2, 2))
test_eq(create_model('resnetrs_tiny', num_classes=0).num_features, 512)
test_eq([round(m.p, 4) for m in create_model('resnetrs_tiny', drop_path_rate=0.1).modules() if isinstance(m, DropPath)],
        [0.04, 0.06, 0.08, 0.1])
test_eq(create_model('resnetrs_tiny').arch, 'resnetrs_tiny')
test_eq({b.momentum for b in create_model('resnetrs_tiny', bn_momentum=1.0).modules() if isinstance(b, nn.BatchNorm2d)}, {1.0})


# %% [markdown]
# ## Stage by stage
#
# The shape table of *Dive into Deep Learning*'s `layer_summary`, for one image. The stem divides the side by 4 and
# each of stages 2-4 by 2 more, so C5 has side $H/32$: **224 -> 7x7** (the grid of the PixPro paper), **160 -> 5x5**
# (RS-50's training size). Shapes do not depend on depth, so RS-50 stands for the family. We trace on PyTorch's `meta`
# device: shapes without memory or arithmetic, instant even for RS-420.

# %%
#| exports
def on_meta(model:nn.Module) -> nn.Module:
    "`model` itself if it lives on the `meta` device, else a copy there (the caller's weights are never touched)."
    return model if all(p.is_meta for p in model.parameters()) else copy.deepcopy(model).to('meta')


# %%
m = create_model('resnetrs_tiny')
mm = on_meta(m)
assert mm is not m and all(p.is_meta for p in mm.parameters())
assert not any(p.is_meta for p in m.parameters())  # the caller's weights are untouched
assert on_meta(mm) is mm  # already on meta: no copy


# %%
#| exports
def stage_shapes(model:nn.Module,  # a model from `create_model`
                 image_size:int,  # side of the square input
                ) -> list[tuple[str, tuple, int, int]]:
    "Rows (part, output shape [C, H, W], output stride, parameters) for the stem, the four stages and the head."
    x, rows = torch.empty(1, 3, image_size, image_size, device='meta'), []
    model = on_meta(model)
    parts = [('stem', model.stem, [model.conv1, model.bn1, model.maxpool])] + \
            [(f'layer{i}', getattr(model, f'layer{i}'), [getattr(model, f'layer{i}')]) for i in range(1, 5)]
    for name, fn, mods in parts:
        x = fn(x)
        rows.append((name, tuple(x.shape[1:]), image_size // x.shape[-1], sum(p.numel() for m in mods for p in m.parameters())))
    head = model.fc
    rows.append(('pool + fc', (model.num_classes or model.num_features,), 0, sum(p.numel() for p in head.parameters())))
    return rows


# %%
#| echo: false
def _stage_table(arch, sizes):
    m = create_model(arch)
    tabs = {s: stage_shapes(m, s) for s in sizes}
    hdr = '| part | ' + ' | '.join(f'output at {s} px | stride' for s in sizes) + ' | parameters |\n'
    hdr += '|---|' + '---|---|' * len(sizes) + '---:|\n'
    for i, row in enumerate(tabs[sizes[0]]):
        cells = [f"{' x '.join(map(str, tabs[s][i][1]))} | {tabs[s][i][2] or '-'}" for s in sizes]
        hdr += f'| {row[0]} | ' + ' | '.join(cells) + f' | {row[3]:,} |\n'
    return hdr

display(Markdown('**Table 1.** ResNet-RS-50, stage by stage (shapes are [C, H, W] for one image).\n\n' +
                 _stage_table('resnetrs50', (224, 160))))

# %%
r224, r160 = stage_shapes(create_model('resnetrs50'), 224), stage_shapes(create_model('resnetrs50'), 160)
test_eq([r[1] for r in r224[:5]], [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)])
test_eq(r160[4][1], (2048, 5, 5)); test_eq(r160[4][2], 32)
test_eq(sum(r[3] for r in r224), 35_691_912)
test_eq(stage_shapes(create_model('resnetrs420'), 320)[4][1], (2048, 10, 10))


# %% [markdown]
# ## The family, counted
#
# Parameters are counted from the modules; multiply-accumulates (MACs) with `torch.utils.flop_counter.FlopCounterMode`
# during one forward pass of one image on the `meta` device. The counter counts the convolutions and the final linear
# layer (2 FLOPs per MAC), not BN, ReLU, SE's sigmoid or pooling, which are cheap elementwise work; this is also the
# convention of the paper's table, which quotes FLOPs as 2 x MACs (RS-50: 4.6 B FLOPs at 160 px).

# %%
#| exports
def count_params(model:nn.Module) -> int:
    "Number of parameters (trainable or not); buffers such as BN running statistics are not counted."
    return sum(p.numel() for p in model.parameters())


# %%
test_eq(count_params(nn.Linear(3, 2)), 3*2 + 2)
test_eq(count_params(nn.BatchNorm2d(4)), 8)  # gamma and beta; the running statistics are buffers


# %%
#| exports
def count_macs(model:nn.Module,  # any model; it is moved to the `meta` device (no memory, no arithmetic)
               image_size:int,  # side of the square input
              ) -> int:
    "Multiply-accumulates of one forward pass of one image (convolutions and linear layers)."
    model = on_meta(model).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device='meta'))
    return counter.get_total_flops() // 2


# %%
conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
test_eq(count_macs(conv, 8), 8*8 * 4 * 3*3*3)  # output pixels x output channels x (input channels x taps); BN, ReLU: 0
assert not conv[0].weight.is_meta  # counted on a copy


# %% [markdown]
# The test compares our counts with reference values anyone can recompute: the parameters and state-dict sizes of
# timm's `resnetrs*` models (the key names and shapes of the released checkpoints) and their multiply-accumulates at
# the training size (FLOPs / 2), measured by us with timm 1.0.31 (`timm.create_model(arch)` on the `meta` device,
# counted with `torch.utils.flop_counter.FlopCounterMode` as `count_macs` does): every parameter count and
# state-dict size exactly, the MACs to three decimals. Models are built directly on the `meta` device, which takes
# under a second even for RS-420 (192 M parameters).

# %%
#| exports
def build_meta(arch:str, **kwargs) -> nn.Module:
    "`create_model` on the `meta` device: shapes and counts without allocating the weights."
    with torch.device('meta'): return create_model(arch, **kwargs)


# %%
TIMM_REF = {  # arch: (parameters at 1000 classes, {train size: GMACs}, state-dict entries), measured on timm 1.0.31's models
    'resnetrs50':  (35_691_912, {160: 2.279}, 402),
    'resnetrs101': (63_618_696, {160: 4.182, 192: 6.012}, 776),
    'resnetrs152': (86_621_576, {192: 8.747, 224: 11.895, 256: 15.528}, 1150),
    'resnetrs200': (93_209_992, {256: 20.093}, 1502),
    'resnetrs270': (129_861_448, {256: 26.950}, 2030),
    'resnetrs350': (163_956_168, {256: 34.377, 320: 53.684}, 2602),
    'resnetrs420': (191_891_656, {320: 63.942}, 3108),
}
fam = {}
for arch in TIMM_REF:
    m = build_meta(arch)
    fam[arch] = (sum(RS_CONFIGS[arch].layers), count_params(m), len(m.state_dict()))
for arch, (npar, gmacs, nkeys) in TIMM_REF.items(): test_eq(fam[arch][1], npar); test_eq(fam[arch][2], nkeys)
se_params = sum(p.numel() for n, p in build_meta('resnetrs50').named_parameters() if '.se.' in n)
test_close(se_params / 1e6, 10.08, eps=5e-3)  # SE holds 28% of RS-50's parameters
test_eq(count_params(build_meta('resnet50')), 25_557_032)

# %% [markdown]
# Counting the MACs of eleven (model, size) pairs takes about 20 s on a shared 2-core CPU (the counter intercepts
# every operator of RS-420's 139 blocks), so the cell is flagged `#| slow`; the test at its end compares every figure to
# timm's, to three decimals.

# %%
#| slow
t = time.time()
macs = {(arch, s): count_macs(build_meta(arch), s) / 1e9 for arch in TIMM_REF for s in TIMM_REF[arch][1]}
for arch, (npar, gmacs, nkeys) in TIMM_REF.items():
    for s, g in gmacs.items(): test_close(macs[arch, s], g, eps=5e-4)
rows = ['| model | blocks | params (ours) | params (timm) | state-dict entries | size | top-1 (paper) | GMACs (ours) | GMACs (timm) |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
for arch, s, top1 in RS_PAPER_RESULTS:
    nb, npar, nkeys = fam[arch]
    rows.append(f'| {arch} | {nb} | {npar:,} | {TIMM_REF[arch][0]:,} | {nkeys} | {s} | {top1} | {macs[arch, s]:.3f} | {TIMM_REF[arch][1][s]:.3f} |')
display(Markdown('**Table 2.** The ResNet-RS family at 1000 classes; GMACs for one image at the training size; top-1 from tensorflow/tpu `models/official/resnet/resnet_rs/README.md`.\n\n'
                 + '\n'.join(rows)))
print(f'counted in {time.time() - t:.1f} s')

# %% [markdown]
# Two things stand out. First, SE is not free in parameters: 10.08 M of RS-50's 35.7 M (28 %), against 25.6 M for the
# whole torchvision ResNet-50, yet it adds almost no MACs (its convolutions act on 1x1 maps). Second, parameters and
# FLOPs grow very differently along the family: RS-420 has 5.4x the parameters of RS-50 but needs 28x its MACs, because
# it is both deeper and trained at twice the side (4x the pixels).

# %%
#| slow
#| echo: false
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
npar = {a: fam[a][1] / 1e6 for a in fam}
for ax, xlab, val in ((axes[0], 'parameters (M)', lambda a, s: npar[a]),
                      (axes[1], 'GFLOPs at the training size (2 x MACs)', lambda a, s: 2 * macs[a, s])):
    for arch in TIMM_REF:
        pts = [(val(a, s), t1, s) for a, s, t1 in RS_PAPER_RESULTS if a == arch]
        xs, ys, ss = zip(*pts)
        ax.plot(xs, ys, 'o-', ms=5, label=arch.replace('resnetrs', 'RS-'))
        for xv, yv, sv in pts: ax.annotate(str(sv), (xv, yv), textcoords='offset points', xytext=(4, -10), fontsize=7)
    ax.set_xlabel(xlab); ax.grid(alpha=0.3)
axes[0].set_ylabel('ImageNet top-1 (%), paper'); axes[1].set_xscale('log')
axes[1].legend(fontsize=8, loc='lower right')
fig.suptitle('Figure 2: paper top-1 against our parameter and FLOP counts; labels: train = eval image size', fontsize=10)
plt.tight_layout(); plt.show()


# %% [markdown]
# ## Scaling lessons
#
# Figure 2 is the paper's argument in miniature. Along one model, resolution buys accuracy at a steep FLOP price:
# RS-152 from 192 to 256 px gains 1.0 point for 6.8 more GMACs (8.7 -> 15.5). At a fixed 256 px, depth buys it too:
# RS-152 -> RS-200 -> RS-270 gain 0.4 and 0.4 points for 4.6 and 6.9 more GMACs. The paper's conclusions, from training
# many scales for the full schedule:
#
# - **Scale depth when you can overfit.** With long schedules (350 epochs) the deeper models keep improving; scaling
#   *width* only wins in short schedules (about 10 epochs), where overfitting is not yet a concern.
# - **Scale resolution slowly.** EfficientNet's compound rule raises image size quickly with model size; ResNet-RS
#   raises it more slowly (160 px for RS-50 to 320 px for RS-420), because past a point extra pixels cost more than
#   extra depth for the same accuracy.
# - **FLOPs do not predict accuracy, nor speed across architectures.** The paper reads the Pareto front from models
#   trained for the full schedule rather than extrapolating from small runs. ResNet-RS models are 1.7-2.7x faster than
#   EfficientNets of similar accuracy on TPU-v3 (2.1-3.3x on V100) despite *more* FLOPs: dense convolutions on small
#   activation maps use accelerators better than depthwise convolutions on large ones.
#
# For PixPro this matters twice. Dense pretext tasks want a usable C5 grid, so the image size fixes the *number* of
# pixel pairs (5x5 at 160 px, 7x7 at 224 px): a recipe must state its size. And a PixPro step costs roughly 2.7 supervised
# steps (two views forward and backward through the online network, two forwards through the target), so the throughput
# table below tells what a pretraining run will cost.

# %% [markdown]
# ## Loading checkpoints
#
# Our key names and shapes equal timm's, so a checkpoint saved from timm's `resnetrs*` (including the TF1 checkpoints
# timm converted) loads into our model with `strict=True`. `load_pretrained` reads a **local** file only (the book never
# downloads): `.pth`/`.pt`/`.bin` through `torch.load(..., weights_only=True)`, which refuses to unpickle arbitrary code,
# or `.safetensors`. It unwraps the usual containers (`{'state_dict': ...}`, `{'model': ...}`), strips prefixes that
# *every* key carries (`module.` from DDP, `encoder.`), or keeps only the keys under an explicit `prefix` (e.g.
# `'module.encoder.'` in a PixPro checkpoint that also holds the momentum encoder and the heads).
#
# > **Ours.** `load_state_dict(strict=True)` reports a mismatch as a wall of key names without saying which file was
# > read. We check first and raise one error that names the file and the model, counts the missing keys, unexpected keys
# > and shape conflicts, and lists the first few of each. Two deliberate tolerances: a backbone built with
# > `num_classes=0` ignores the file's `fc.*`; missing `num_batches_tracked` counters (some converted checkpoints drop
# > them) are left at their current value, since with the default BN momentum they change nothing.

# %%
#| exports
class CheckpointError(ValueError):
    "A checkpoint file that cannot be read or does not match the model; the message names the file."


# %%
assert issubclass(CheckpointError, ValueError)  # callers that catch ValueError keep working


# %%
#| exports
def _read_state_dict(path:Path) -> dict:
    "Load a tensor dict from `.safetensors` or a torch file (weights only), unwrapping common containers."
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        sd = load_file(str(path), device='cpu')
    else: sd = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model', 'model_state_dict'):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict): sd = sd[key]; break
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f'{path}: no state dict of tensors found')
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    torch.save({'model': {'w': torch.ones(2), 'step': 3}, 'epoch': 3}, d/'m.pt')  # a container, a non-tensor entry
    sd = _read_state_dict(d/'m.pt'); test_eq(list(sd), ['w']); test_eq(sd['w'], torch.ones(2))
    save_file({'a.w': torch.zeros(3)}, str(d/'s.safetensors'))
    test_eq(list(_read_state_dict(d/'s.safetensors')), ['a.w'])
    torch.save({'epoch': 3}, d/'e.pt')
    test_fail(lambda: _read_state_dict(d/'e.pt'), contains='no state dict of tensors found')


# %%
#| exports
def strip_prefixes(sd:dict,  # state dict
                   prefixes=('module.', 'encoder.'),  # stripped (repeatedly) while every key starts with one
                   prefix:str|None=None,  # if given: keep only the keys starting with it, stripped
                  ) -> dict:
    "Remove wrapper prefixes from state-dict keys."
    if prefix: sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    changed = True
    while changed and sd:
        changed = False
        for p in prefixes:
            if all(k.startswith(p) for k in sd): sd, changed = {k[len(p):]: v for k, v in sd.items()}, True
    return sd


# %%
test_eq(list(strip_prefixes({'module.encoder.fc.weight': 1, 'module.encoder.bn1.bias': 2})), ['fc.weight', 'bn1.bias'])
test_eq(list(strip_prefixes({'module.fc.weight': 1, 'projector.w': 2})), ['module.fc.weight', 'projector.w'])
test_eq(strip_prefixes({'module.encoder.a': 1, 'module.encoder_k.a': 2, 'module.projector.b': 3}, prefix='module.encoder.'),
        {'a': 1})


# %%
#| exports
def load_pretrained(model:nn.Module,  # a model from `create_model`
                    path:str|Path,  # local .pth / .pt / .bin / .safetensors file
                    prefix:str|None=None,  # keep only keys under this prefix (e.g. 'module.encoder.'), stripped
                    n_show:int=5,  # how many keys of each kind the error lists
                   ) -> nn.Module:
    "Load a local checkpoint into `model` strictly, or raise `CheckpointError` naming the file and every mismatch."
    path = Path(path)
    check_choice('checkpoint suffix', path.suffix, ['.pth', '.pt', '.bin', '.safetensors'])
    if not path.is_file(): raise FileNotFoundError(f'checkpoint {path} does not exist')
    try: sd = strip_prefixes(_read_state_dict(path), prefix=prefix)
    except CheckpointError: raise
    except Exception as e: raise CheckpointError(f'{path}: cannot read checkpoint ({type(e).__name__}: {e})') from e
    own = model.state_dict()
    if not any(k.startswith('fc.') for k in own): sd = {k: v for k, v in sd.items() if not k.startswith('fc.')}
    missing = [k for k in own if k not in sd and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in sd if k not in own]
    shapes = [f'{k}: file {list(v.shape)} vs model {list(own[k].shape)}' for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        arch = getattr(model, 'arch', type(model).__name__)
        msg = [f'{path} does not match {arch}: {len(missing)} missing keys, {len(unexpected)} unexpected keys, '
               f'{len(shapes)} shape conflicts']
        for what, keys in (('missing', missing), ('unexpected', unexpected), ('shape conflicts', shapes)):
            if keys: msg.append(f'  {what} (first {min(n_show, len(keys))}): ' + ', '.join(keys[:n_show]))
        raise CheckpointError('\n'.join(msg))
    sd = {**{k: own[k] for k in own if k not in sd}, **sd}  # keep our num_batches_tracked where the file has none
    model.load_state_dict(sd, strict=True)
    return model


# %% [markdown]
# The round trip through both formats with the wrappers of a DDP training script, then three bad files: a checkpoint of
# another model, a file that is not a checkpoint, and a wrong suffix.

# %%
src, dst = create_model('resnetrs_tiny').eval(), create_model('resnetrs_tiny').eval()
with torch.no_grad():
    for p in src.parameters(): p.normal_()
x = torch.randn(1, 3, 64, 64)
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    torch.save({'state_dict': {f'module.{k}': v for k, v in src.state_dict().items()}, 'epoch': 3}, d/'a.pth')
    save_file({f'encoder.{k}': v.contiguous() for k, v in src.state_dict().items()}, str(d/'a.safetensors'))
    for f in ('a.pth', 'a.safetensors'):
        load_pretrained(dst, d/f)
        with torch.no_grad(): test_eq(dst(x), src(x))
    load_pretrained(create_model('resnetrs_tiny', num_classes=0), d/'a.pth')  # backbone: the head is ignored
    torch.save(create_model('resnetrs50', num_classes=10).state_dict(), d/'rs50.pth')
    test_fail(lambda: load_pretrained(dst, d/'rs50.pth'), contains=f'{d/"rs50.pth"} does not match resnetrs_tiny')
    test_fail(lambda: load_pretrained(dst, d/'rs50.pth'), contains='shape conflicts (first 5): conv1.0.weight: file [32, 3, 3, 3]')
    test_fail(lambda: load_pretrained(dst, d/'rs50.pth'), contains='unexpected keys')
    (d/'junk.pth').write_bytes(b'not a checkpoint')
    test_fail(lambda: load_pretrained(dst, d/'junk.pth'), contains=f'{d/"junk.pth"}: cannot read checkpoint')
    test_fail(lambda: load_pretrained(dst, d/'a.ckpt'), contains="invalid checkpoint suffix='.ckpt'")
    test_fail(lambda: load_pretrained(dst, d/'none.pth'), contains='none.pth does not exist')

# %% [markdown]
# Checkpoint compatibility with timm itself (timm's `resnetrs50` and `resnetrs101` with random weights, loaded into ours
# with `strict=True`, logits equal in evaluation mode) is tested in `tests/test_resnet_rs.py`, since timm is only a
# development dependency of the package.

# %% [markdown]
# ## Memory format and mixed precision
#
# Training runs in `bfloat16` under `torch.autocast`, with tensors in `channels_last` (NHWC), the layout tensor cores
# prefer. Nothing in the model depends on the layout or the dtype, but it is cheap to check on a tiny input: same
# result in NHWC, finite bf16 logits close to the float32 ones, and gradients that flow.

# %%
m = create_model('resnetrs_tiny', num_classes=10).eval()
with torch.no_grad():
    for b in m.modules():
        if isinstance(b, Bottleneck): b.bn3.weight.fill_(1.)  # let the residual branches contribute
x = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    ref = m(x)
    m_cl = m.to(memory_format=torch.channels_last)
    out_cl = m_cl(x.to(memory_format=torch.channels_last))
    test_close(out_cl, ref, eps=1e-4)
    assert m_cl.forward_features(x.to(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16): out_bf = m_cl(x.to(memory_format=torch.channels_last))
test_eq(out_bf.dtype, torch.bfloat16)
assert torch.isfinite(out_bf).all() and (out_bf.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
m.train()
with torch.autocast('cpu', dtype=torch.bfloat16): loss = m(x.to(memory_format=torch.channels_last)).float().logsumexp(1).mean()
loss.backward()
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())

# %% [markdown]
# ## TF or timm: what we chose
#
# The released checkpoints come from TF1 (`tensorflow/tpu`, `models/official/resnet/resnet_rs`, one YAML config per
# model and size); timm reimplemented the architecture and converted them. The *network* is the same (both pad the
# strided 3x3 convolutions symmetrically by 1, as PyTorch's `padding=1` does); around it, the two codes differ:
#
# | | TF1 (the paper's code) | timm | ours |
# |---|---|---|---|
# | stochastic depth | one rate per stage, $r\,(i+1)/5$ for stage $i$ = 1..4 | linear over blocks, $r\,b/(B-1)$ | TF's rule by default; `drop_path_rule='timm'` |
# | per-model defaults (dropout, SD rate, size, RandAugment) | in each config | none (the training script's arguments) | `RS_CONFIGS` |
# | BN running statistics | configs set `bn_momentum: 0`: the "moving" statistics are those of the last batch; the weight EMA (decay 0.9999), which also averages them, does the averaging | momentum 0.1 (PyTorch's convention; TF's decay 0.9); `ModelEmaV2/V3` average parameters *and* buffers | momentum 0.1 by default; `bn_momentum=1.0` is TF's setting, to be used only with an EMA over buffers |
# | weight EMA | 0.9999 with warm-up $\min(0.9999, \frac{1+t}{10+t})$; the EMA model is evaluated | optional, fixed decay | a training-recipe matter, not the model's |
# | key names | TF variable scopes | `conv1.0`, `maxpool.0`, `layerN.i.se.fc1` ... | timm's, so timm / TF-converted files load |
#
# > **Ours.** Stochastic depth follows the paper's per-stage rule by default, because the paper's numbers were obtained
# > with it and because that is what each config's `drop_connect_rate` means. The rules are not interchangeable: for
# > RS-200 the TF rule drops 4.74 of 66 residual branches per sample on average, timm's 3.30 (tested above), so a
# > timm-style run with the same $r$ is a *less regularised* model. For batch norm we keep PyTorch's momentum 0.1: with
# > TF's setting (momentum 0, `bn_momentum=1.0` here) the raw model's running statistics are those of a single batch,
# > fine when only the EMA model is ever evaluated, wrong everywhere else (a PixPro online encoder, a quick evaluation of
# > the raw weights, a test). With 0.1 and an EMA over parameters and buffers, the statistics are averaged twice, which
# > costs nothing.

# %% [markdown]
# ## Throughput on a GPU
#
# Measured once with `tools/bench_resnet_rs.py` (supervised training step: forward, backward and an SGD step under
# bf16 autocast, batch and image size in the table; inference under `inference_mode`). timm's published anchors
# (RTX 3090, PyTorch 1.12, AMP) are listed for orientation; they were measured on another GPU with another PyTorch,
# so only the ratios (NHWC vs NCHW, model vs model) compare.
#
# **Table 3.** Images per second, measured on one **NVIDIA H200** (a lent machine), 2026-11-26, torch 2.11.0+cu130,
# CUDA 13.0, cuDNN 9.19, bf16 autocast, `cudnn.benchmark`, random data, 5 warm-up then 20 timed steps, one run each;
# command `PYTHONPATH=. python tools/bench_resnet_rs.py --steps 20 --warmup 5`. The right-hand column is timm's
# published benchmark (RTX 3090, PyTorch 1.12, AMP; inference on an RTX 4090), quoted, not measured by us.
#
# | mode | model | image size | batch | NCHW img/s | channels_last img/s | peak GiB (NHWC) | timm anchor NCHW / NHWC |
# |---|---|---:|---:|---:|---:|---:|---|
# | train | resnetrs50 | 160 | 256 | 3014 | 5067 | 7.7 | 1317 / 1686 |
# | train | resnetrs101 | 192 | 256 | 1610 | 2484 | 16.0 | 565 / 714 |
# | train | resnetrs152 | 256 | 128 | 775 | 988 | 19.8 | 238 / 282 |
# | train | resnetrs420 | 320 | 64 | 165 | 187 | 42.1 | 48 (layout not stated) |
# | infer | resnetrs50 | 224 | 256 | 8373 | 10824 | 2.0 | 3434 (RTX 4090) |
#
# What the table says: channels_last pays most where activations are small and convolutions cheap (x1.68 for RS-50
# training at 160 px, x1.13 for RS-420 at 320 px); keep it on. The ordering and the ratios between models follow timm's
# anchors; the H200 runs these 2.3-3.5x faster than the RTX 3090. From RS-50 at 160 px to RS-420 at 320 px the images
# per second fall 27x while the MACs per image grow 28x: the GPU sustains about the same forward work (11.5 vs 12.0
# TMAC/s in NHWC), so *within* this family of dense convolutions FLOPs do predict training cost; the paper's warning
# is about comparing *across* families (depthwise convolutions, large activations). With a PixPro step costing about 2.7 supervised steps, RS-50 at 160 px would pretrain at
# roughly 5067 / 2.7, about 1900 images/s on this GPU: an estimate from the table, not a measurement.

# %% [markdown]
# ## Summary
#
# - `create_model(arch, num_classes=1000, **overrides)` builds `resnetrs50` ... `resnetrs420` from one class
#   (`ResNetRS`) and one table (`RS_CONFIGS`, with the paper's per-model dropout, stochastic depth, image size and
#   RandAugment magnitude), torchvision's `resnet50` (the PixPro paper's backbone), and `resnetrs_tiny`, our CPU variant
#   (not from the paper). Unknown names are answered with the list of valid ones.
# - `num_classes=0` gives a backbone; `forward_features` returns C5 unpooled (`num_features` channels, 7x7 at 224 px,
#   5x5 at 160 px), `forward_pyramid` returns [C2, C3, C4, C5].
# - Parameter counts, state-dict sizes and GMACs equal the released checkpoints' exactly; key names equal timm's, and
#   `load_pretrained` loads local `.pth`/`.safetensors` files strictly with an error that names the file and the
#   mismatches.
# - Stochastic depth follows the paper's per-stage rule by default; timm's per-block rule is one argument away, and
#   on RS-200 the TF rule drops 44 % more residual branches on average.
# - Depth, not width, is what to scale for long schedules; resolution slowly; FLOPs predict neither accuracy nor speed.

# %%
#| hide
print(f'notebook ran in {time.time() - _t0:.0f} s')

# %% [markdown]
# ## Exercises
#
# 1. Measure the C5 size of `create_model('resnetrs50', num_classes=0)` at 160, 192 and 224 pixels with
#    `stage_shapes`. Which sizes give PixPro a 5x5, 6x6 and 7x7 map?
# 2. Save timm's `resnetrs50` state dict (built without weights), load it with `load_pretrained`, then rename one key
#    and read the error.
# 3. Compare the mean number of dropped residual branches of RS-200 in training mode under `drop_path_rule='tf'` and
#    `'timm'`.
# 4. Build RS-50 with `se_ratio=0` and recount with `count_params` and `count_macs`: how much of the gap to ResNet-50
#    is squeeze-and-excitation?
