# %% [markdown]
# # Two views with exact crop coordinates
#
# > PixPro's augmentation: two independently augmented views of one image, and the four numbers per view that say where each view came from.

# %%
#| default_exp augment

# %%
#| export
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor
try: import cv2  # OpenCV (opencv-python-headless): fused, vectorised kernels for the CPU path
except ImportError: cv2 = None
from torchvision.transforms.v2 import functional as F

from pixpro_rs.core import ConfigError, check_range

# %%
#| hide
import dataclasses
from fastcore.test import test_eq, test_close, test_fail, test_ne
from nbdev.showdoc import show_doc

# %%
import matplotlib.pyplot as plt
from matplotlib import cbook
import torchvision.transforms as T


# %% [markdown]
# PixPro learns by asking the features of *the same place in the world* to agree across two augmented views of an
# image. "The same place" is only defined if every view remembers where it was cut from. So the augmentation of this
# chapter returns, next to each view, its crop box in the coordinates of the original image; the PixPro chapter turns
# two boxes into the positive pixel pairs.
#
# Both views are drawn independently from the same decoded RGB image. The pipelines are those of BYOL, which PixPro
# took over unchanged: the reference builds them in `get_transform` for `aug_type == 'BYOL'` (zdaxie/PixPro at commit
# e390d6b, `contrast/data/transform.py`, lines 49-69), and its released script selects them with `--aug BYOL --crop
# 0.08` (`tools/pixpro_base_r50_100ep.sh`, lines 15-16; `--crop` is the lower end of the crop's area range):
#
# | step | view 1 | view 2 |
# |---|---|---|
# | RandomResizedCrop, scale (0.08, 1), ratio (3/4, 4/3), bilinear, 10 tries then centre crop | yes | yes |
# | horizontal flip | p 0.5 | p 0.5 |
# | ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) | p 0.8 | p 0.8 |
# | grayscale | p 0.2 | p 0.2 |
# | Gaussian blur, sigma ~ U(0.1, 2.0) | p 1.0 | p 0.1 |
# | solarize (threshold 128 on 0..255) | never | p 0.2 |
# | to float, normalise with the ImageNet mean and std | yes | yes |
#
# The chapter builds the coordinates first, then each operation, then `PixProAugment`, which draws all random
# numbers of a pair first (`draw`) and applies them second (`apply`). That split is what makes the rest testable:
# coordinates can be studied without touching pixels, and the same parameters can be replayed through a plain PIL
# pipeline to check that ours computes the same images.

# %% [markdown]
# ## Crop coordinates
#
# The reference describes a crop by its top-left pixel $(i, j)$ (row, column), its size $(h, w)$ and the image size
# $(H, W)$, and stores the *centres* of its corner pixels, each axis normalised on its own
# (`RandomResizedCropCoord.__call__`, `contrast/data/transform_coord.py`, lines 208-209):
#
# $$[x_{ul}, y_{ul}, x_{lr}, y_{lr}] = \left[\frac{j}{W-1}, \frac{i}{H-1}, \frac{j+w-1}{W-1}, \frac{i+h-1}{H-1}\right]$$
#
# So $0$ and $1$ are the centres of the first and last pixel of the image, not its outer edges, and a non-square
# image is stretched into the unit square. The positive-pair rule was tuned in this space (T = 0.7 of a bin
# diagonal), so we keep it exactly, stretch included.

# %%
#| exports
def crop_coord(top:int,  # i, row of the crop's top-left pixel
               left:int,  # j, column of the crop's top-left pixel
               height:int,  # h, rows in the crop
               width:int,  # w, columns in the crop
               img_h:int,  # H, rows in the original image
               img_w:int,  # W, columns in the original image
              ) -> Tensor:  # [4] float32: x_ul, y_ul, x_lr, y_lr
    "Normalised centres of a crop's corner pixels, `[x_ul, y_ul, x_lr, y_lr]`, as the PixPro reference stores them."
    if not (0 <= top and 0 <= left and 1 <= height and 1 <= width and top + height <= img_h and left + width <= img_w):
        raise ConfigError('crop', (top, left, height, width), f'a box inside the {img_h}x{img_w} image')
    sx, sy = max(img_w - 1, 1), max(img_h - 1, 1)  # a 1-pixel-wide image: all x are 0
    return torch.tensor([left/sx, top/sy, (left + width - 1)/sx, (top + height - 1)/sy], dtype=torch.float32)


# %% [markdown]
# Hand-computed crops on a 376x501 image (H-1 = 375, W-1 = 500): the whole image is the unit square; the top-left
# 100x250 block ends at pixel centre 249 of 500 and 99 of 375.

# %%
test_eq(crop_coord(0, 0, 376, 501, 376, 501), torch.tensor([0., 0., 1., 1.]))
test_close(crop_coord(0, 0, 100, 250, 376, 501), torch.tensor([0, 0, 249/500, 99/375]))
test_close(crop_coord(75, 100, 150, 301, 376, 501), torch.tensor([0.2, 0.2, 0.8, 224/375]))
test_fail(lambda: crop_coord(300, 0, 100, 10, 376, 501), contains='inside the 376x501 image')


# %% [markdown]
# A horizontal flip mirrors the view, so the view's left column now shows the crop's right column. The reference
# records this by swapping the two x entries (`RandomHorizontalFlipCoord`, `contrast/data/transform_coord.py`, lines
# 88-92), so that "upper-left" keeps meaning "the view's upper-left pixel":
# $x_{ul} > x_{lr}$ marks a flipped view, and the bin width computed from it is negative, which walks the feature
# columns right to left through the original image. y is untouched.

# %%
#| exports
def hflip_coord(coord:Tensor,  # [..., 4] x_ul, y_ul, x_lr, y_lr
               ) -> Tensor:  # [..., 4] the same box seen through a horizontal flip
    "Coordinates of a horizontally flipped view: the two x entries swap."
    return coord[..., [2, 1, 0, 3]]


# %%
c = crop_coord(75, 100, 150, 301, 376, 501)
test_close(hflip_coord(c), torch.tensor([0.8, 0.2, 0.2, 224/375]))
test_eq(hflip_coord(hflip_coord(c)), c)
test_eq(hflip_coord(torch.stack([c, c])).shape, (2, 4))


# %% [markdown]
# ## The random crop, from a generator
#
# `RandomResizedCrop` picks an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, tries ten times
# to fit such a box, and falls back to a centre crop. torchvision's transform draws from the *global* torch RNG. We
# need the draws from a generator we own (see "Randomness" below), so `sample_crop` is the same algorithm, line for
# line, with a `generator` argument. The test shows it is the same: with the default generator and the same seed it
# returns exactly torchvision's boxes.

# %%
#| exports
def sample_crop(img_h:int,  # H of the image
                img_w:int,  # W of the image
                scale:tuple[float, float]=(0.08, 1.0),  # range of the crop's area as a fraction of the image's
                ratio:tuple[float, float]=(3/4, 4/3),  # range of the crop's aspect ratio w/h (log-uniform)
                generator:torch.Generator|None=None,  # source of randomness (None: torch's global one)
               ) -> tuple[int, int, int, int]:  # top, left, height, width
    "torchvision's `RandomResizedCrop.get_params`, drawing from `generator`."
    area, log_ratio = img_h * img_w, torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= img_w and 0 < h <= img_h:
            i = torch.randint(0, img_h - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, img_w - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = img_w / img_h  # fallback: the largest centred box with an allowed aspect ratio
    if in_ratio < min(ratio): w, h = img_w, int(round(img_w / min(ratio)))
    elif in_ratio > max(ratio): w, h = int(round(img_h * max(ratio))), img_h
    else: w, h = img_w, img_h
    return (img_h - h) // 2, (img_w - w) // 2, h, w


# %%
img_probe = torch.zeros(3, 375, 500, dtype=torch.uint8)
torch.manual_seed(3); ref = [T.RandomResizedCrop.get_params(img_probe, [0.08, 1.0], [3/4, 4/3]) for _ in range(50)]
torch.manual_seed(3); ours = [sample_crop(375, 500) for _ in range(50)]
test_eq(ours, ref)
g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
test_eq([sample_crop(375, 500, generator=g1) for _ in range(5)], [sample_crop(375, 500, generator=g2) for _ in range(5)])
boxes = torch.tensor([sample_crop(375, 500, generator=g1) for _ in range(500)])
assert (boxes[:, 0] + boxes[:, 2] <= 375).all() and (boxes[:, 1] + boxes[:, 3] <= 500).all()
frac = boxes[:, 2] * boxes[:, 3] / (375 * 500)
assert frac.min() > 0.07 and frac.max() <= 1.0, (frac.min(), frac.max())
test_eq(sample_crop(10, 1000), (0, 493, 10, 13))  # too wide for any ratio: the centre fallback, 10 x round(10*4/3)

# %% [markdown]
# ## Colour operations on float tensors
#
# Brightness, contrast, saturation and grayscale are torchvision's blends on float images in [0, 1]
# (`clamp(f x + (1 - f) t, 0, 1)` with `t` black, the mean gray level or the gray image), written out with the
# same operations so that they can run in place; each clamps to [0, 1], as PIL's 8-bit versions do. Hue is the
# exception. torchvision's `adjust_hue` converts RGB to
# HSV and back with a dozen masked tensors (about 5 ms for one 224x224 view on one core, more than everything else of
# a view together). A hue shift keeps each pixel's maximum $V$ and minimum $m$, so the result can be written
# directly from the standard HSV-to-RGB formula: with chroma $C = V - m$ and hue $h \in [0, 6)$ after the shift,
#
# $$c_n = m + C\,\mathrm{clamp}(f_n(h), 0, 1), \qquad f_R = |h - 3| - 1,\quad f_G = 2 - |h - 2|,\quad f_B = 2 - |h - 4|.$$
#
# Only $h$ needs the wrap-around, on an [H, W] plane; the three channels then take an absolute value, a sign, an
# offset and a clamp each. Two details decide the speed on a CPU, where every operation is a pass over memory:
#
# - The hue before the shift depends on which channel is the largest (red: $(G - B)/C$, green: $2 + (B - R)/C$,
#   blue: $4 + (R - G)/C$). Written with comparisons and `torch.where` that is a branch per pixel; written with 0/1
#   masks from `sign` ($\mathrm{sign}(V - R)$ is 0 exactly where red is the largest) it is arithmetic. Exactly one
#   mask is 1 per pixel, so the masked sum equals the selected term to the bit.
# - The wrap-around as $h - 6\lfloor h/6 \rfloor$ (four cheap operations) instead of `remainder` (one slow one).
#
# Measured on real views in the benchmark chapter, the whole rotation takes about a third less time than with
# `where` and `remainder`, and it agrees with torchvision to float rounding.

# %%
#| exports
_HUE_RGB = ((3., 2., 4.), (1., -1., -1.), (-1., 2., 2.))  # f_n(h) = sign_n |h - off_n| + base_n for R, G, B

@functools.lru_cache(maxsize=None)
def _hue_tents(device:torch.device, dtype:torch.dtype) -> tuple[Tensor, ...]:  # off, sign, base [3, 1, 1]
    "`_HUE_RGB` as tensors, made once per device and dtype (no host-to-device copy per call on a GPU)."
    return tuple(torch.tensor(v, dtype=dtype).view(3, 1, 1).to(device) for v in _HUE_RGB)


# %%
h_ = torch.linspace(0, 6, 13)[:-1].view(1, 1, -1)  # R, G, B at h' = 0, 0.5, ..., 5.5: the hue circle's tents
off, sign, base = _hue_tents(torch.device('cpu'), torch.float32)
test_eq(((h_ - off).abs() * sign + base).clamp(0, 1)[:, 0, ::2], torch.tensor([[1., 1, 0, 0, 0, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]))
assert _hue_tents(torch.device('cpu'), torch.float32)[0] is off  # made once


# %%
#| exports
def adjust_hue(x:Tensor,  # [3, H, W] float RGB in [0, 1]
               hue:float,  # shift in turns, in [-0.5, 0.5]
              ) -> Tensor:  # [3, H, W]
    "Rotate the hue of `x` by `hue` turns; torchvision's `adjust_hue` on float tensors, in fewer operations."
    r, g, b = x.unbind(0)  # each [H, W]
    mx, mn = x.amax(0), x.amin(0)
    c = mx - mn  # chroma
    inv = c.clamp(min=1e-12).reciprocal_()  # where c == 0 every difference below is 0 too
    not_r = (mx - r).sign_()  # 0 where red is the largest channel, else 1
    is_b = (mx - g).sign_().mul_(not_r)  # 1 where neither red nor green is the largest
    is_g = not_r - is_b
    h = (g - b).mul_(inv).mul_(1 - not_r)  # red's sector, [-1, 1]
    h = h.addcmul_((b - r).mul_(inv).add_(2), is_g).addcmul_((r - g).mul_(inv).add_(4), is_b)  # in [-1, 5]
    h = h.add_(6 * hue)
    h = h.sub_(h.mul(1 / 6).floor_().mul_(6))  # the shifted hue, in [0, 6] (6 and 0 give the same colour)
    off, sign, base = _hue_tents(x.device, x.dtype)
    return (h - off).abs_().mul_(sign).add_(base).clamp_(0, 1).mul_(c).add_(mn)  # f_R, f_G, f_B, then m + C f


# %%
x = torch.rand(3, 32, 48)
for hshift in (-0.5, -0.1, 0.0, 0.03, 0.1, 0.5):
    test_close(adjust_hue(x, hshift), F.adjust_hue(x, hshift), eps=1e-5)
grey = torch.rand(1, 8, 8).expand(3, -1, -1)
test_eq(adjust_hue(grey, 0.3), grey)  # no chroma: nothing to rotate
prim = torch.eye(3).view(3, 3, 1, 1)  # pure red, green, blue: a third of a turn sends each to the next
test_close(torch.stack([adjust_hue(p, 1 / 3) for p in prim]), prim[[1, 2, 0]], eps=1e-6)
ties = torch.tensor([[1., 1, 0], [1, 0, 1], [0, 1, 1], [.5, .5, .5], [1, .25, 1]]).T[:, :, None]  # two channels share the max
test_close(adjust_hue(ties, 0.07), F.adjust_hue(ties, 0.07), eps=1e-6)


# %% [markdown]
# `ColorJitter` applies the four adjustments in a random order with factors drawn uniformly around 1 (hue around 0).
# `sample_jitter` is torchvision's `ColorJitter.get_params` with a generator (the order of draws kept, so the test
# can compare against torchvision with the same seed); `color_jitter` applies one draw.

# %%
#| exports
def sample_jitter(brightness:float=0.4,  # factor drawn in [max(0, 1-b), 1+b]
                  contrast:float=0.4,  # factor drawn in [max(0, 1-c), 1+c]
                  saturation:float=0.2,  # factor drawn in [max(0, 1-s), 1+s]
                  hue:float=0.1,  # shift drawn in [-hue, hue] turns
                  generator:torch.Generator|None=None,
                 ) -> tuple[tuple[int, ...], float, float, float, float]:  # order, b, c, s, h
    "Random order and factors of a colour jitter, drawn like torchvision's `ColorJitter.get_params`."
    order = tuple(torch.randperm(4, generator=generator).tolist())
    u = lambda lo, hi: float(torch.empty(1).uniform_(lo, hi, generator=generator))
    return (order, u(max(0, 1 - brightness), 1 + brightness), u(max(0, 1 - contrast), 1 + contrast),
            u(max(0, 1 - saturation), 1 + saturation), u(-hue, hue))


# %%
torch.manual_seed(5); fn_idx, *factors = T.ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.8, 1.2], [-0.1, 0.1])
torch.manual_seed(5); order, *drawn = sample_jitter()
test_eq(order, tuple(fn_idx.tolist())); test_close(drawn, factors, eps=1e-12)
g = torch.Generator().manual_seed(0)
for order, b, c, s, h in (sample_jitter(generator=g) for _ in range(200)):
    test_eq(sorted(order), [0, 1, 2, 3]); assert 0.6 <= b <= 1.4 and 0.6 <= c <= 1.4 and 0.8 <= s <= 1.2 and -0.1 <= h <= 0.1
test_eq(sample_jitter(0, 0, 0, 0, generator=g)[1:], (1., 1., 1., 0.))  # no jitter: identity factors


# %%
#| exports
def luma(x:Tensor,  # [3, H, W] float RGB
        ) -> Tensor:  # [H, W]
    "ITU-R 601 luma, torchvision's `rgb_to_grayscale` (same operations, same rounding)."
    r, g, b = x.unbind(0)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)


# %%
xg = torch.rand(3, 6, 7)
test_eq(luma(xg), F.rgb_to_grayscale(xg)[0])


# %%
#| exports
def color_jitter(x:Tensor,  # [3, H, W] float in [0, 1] (not changed)
                 order:tuple[int, ...],  # permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue
                 b:float, c:float, s:float, h:float,  # the factors, as drawn by `sample_jitter`
                ) -> Tensor:  # [3, H, W] float in [0, 1]
    "Apply one colour jitter draw: torchvision's blends, in place on a buffer of its own after the first operation."
    own = False  # whether x is a buffer of ours (then the blends work in place)
    for i in order:
        if i == 3: x = adjust_hue(x, h)
        else:
            f = (b, c, s)[i]
            target = None if i == 0 else luma(x).mean() if i == 1 else luma(x)  # black, mean gray, gray image
            x = x.mul_(f) if own else x.mul(f)
            if target is not None: x = x.add_(target, alpha=1 - f)
            x = x.clamp_(0, 1)
        own = True
    return x


# %%
torch.manual_seed(5); cj = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
ref = cj(x)
x0 = x.clone()
torch.manual_seed(5); ours = color_jitter(x, *sample_jitter())
test_close(ours, ref, eps=1e-5)
assert ours.min() >= 0 and ours.max() <= 1
test_eq(x, x0)  # the input is left alone
for i, op in enumerate((F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)):  # each blend is torchvision's, to the bit
    test_eq(color_jitter(x, (i,), 1.3, 1.3, 1.3, 0.0), op(x, 1.3))
    test_eq(color_jitter(x, (3, i), 0.7, 0.7, 0.7, 0.05), op(adjust_hue(x, 0.05), 0.7))  # and in place after the hue


# %% [markdown]
# ## Gaussian blur the way PIL does it
#
# The reference blurs with PIL's `ImageFilter.GaussianBlur(radius=sigma)` (its `GaussianBlur` class,
# `contrast/data/transform.py`, lines 8-14). PIL does not convolve with a Gaussian: it runs three passes of a box
# filter whose radius $r = l + a$ has a fractional part, chosen so that the three passes together have variance
# exactly $\sigma^2$ (Gwosdek et al. 2011):
#
# $$\sigma_1^2 = \sigma^2/3,\quad L = \sqrt{12\sigma_1^2 + 1},\quad l = \left\lfloor\tfrac{L-1}{2}\right\rfloor,\quad
# a = \frac{(2l+1)(l(l+1) - 3\sigma_1^2)}{6(\sigma_1^2 - (l+1)^2)}.$$
#
# One pass averages $2l+1$ pixels at weight 1 and the two next ones at weight $a$; edges repeat the border pixel.
# We build the same kernel (three boxes convolved: 7 taps for sigma < 1.41, 13 up to sigma = 2) and apply it one
# axis at a time as a weighted sum of shifted copies, after repeating the border pixels $R$ times (`torch.cat` of
# the edge, expanded; `F.pad(mode='replicate')` on the last axis is several times slower). The kernel is symmetric,
# so the taps go in pairs: $R + 1$ multiplies and $2R$ additions per axis. That beats a grouped convolution by
# far, and the banded matrix products we used before by 1.4-1.6x on real views (benchmark chapter). It is PIL's
# filter, not an approximation of it; what remains different is rounding (PIL rounds to 8 bits after each pass, we
# stay in float), measured below.

# %%
#| exports
def pil_blur_kernel(sigma:float,  # PIL's `radius`, the standard deviation of the blur
                   ) -> Tensor:  # [2R+1] float32, sums to 1
    "The 1-D kernel of PIL's `GaussianBlur(sigma)`: three passes of a box with a fractional radius."
    s2 = sigma * sigma / 3
    l = math.floor((math.sqrt(12 * s2 + 1) - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    box = np.ones(2 * l + 3); box[[0, -1]] = a; box /= box.sum()
    return torch.from_numpy(np.convolve(np.convolve(box, box), box)).float()


# %%
for s in (0.1, 0.5, 1.0, 1.7, 2.0):
    k = pil_blur_kernel(s); t = torch.arange(len(k)) - (len(k) - 1) / 2
    test_close(k.sum(), 1.0, eps=1e-6); test_close(k, k.flip(0), eps=1e-7)
    test_close((k * t**2).sum(), s * s, eps=1e-4)
test_eq(len(pil_blur_kernel(2.0)), 13)


# %%
#| exports
def _pad_edges(x:Tensor, R:int, dim:int) -> Tensor:
    "`x` with its first and last slices along `dim` repeated `R` more times (replicate padding)."
    shape = list(x.shape); shape[dim] = R
    return torch.cat([x.narrow(dim, 0, 1).expand(shape), x, x.narrow(dim, x.shape[dim] - 1, 1).expand(shape)], dim)


# %%
xe = torch.arange(6.).view(1, 2, 3)
test_eq(_pad_edges(xe, 2, -1), torch.tensor([[[0., 0, 0, 1, 2, 2, 2], [3, 3, 3, 4, 5, 5, 5]]]))
test_eq(_pad_edges(xe, 4, -2), torch.nn.functional.pad(xe[None], (0, 0, 4, 4), mode='replicate')[0])  # R > size too


# %%
#| exports
def gaussian_blur(x:Tensor,  # [C, H, W] float
                  sigma:float,  # standard deviation in pixels (PIL's radius)
                 ) -> Tensor:  # [C, H, W]
    "PIL's Gaussian blur (box-filter approximation, repeated edges) on a float tensor."
    if sigma <= 0: return x
    k = pil_blur_kernel(sigma).tolist(); R = (len(k) - 1) // 2
    for dim in (-1, -2):  # rows, then columns
        n, p = x.shape[dim], _pad_edges(x, R, dim)
        tap = lambda t: p.narrow(dim, t, n)  # the pixels t - R along dim
        x = tap(R) * k[R]
        for t in range(R): x = x.add_(tap(t) + tap(2 * R - t), alpha=k[t])  # symmetric: taps in pairs
    return x


# %% [markdown]
# The tests check what the construction promises (the kernel sums to 1, is symmetric and has variance $\sigma^2$),
# the filter against its definition written as a matrix (row $i$ holds the kernel at the clamped positions
# $i - R \dots i + R$), then the result against PIL itself on a real photograph, in levels of 0..255.

# %%
def blur_matrix(n, k):  # [n, n]: (M @ v)[i] = sum_t k[t] v[clamp(i + t - R)], the filter with repeated edges
    R = (len(k) - 1) // 2
    idx = (torch.arange(n)[:, None] + torch.arange(-R, R + 1)[None]).clamp_(0, n - 1)
    return torch.zeros(n, n).scatter_add_(1, idx, k.expand(n, -1).contiguous())
for (h, w), s in (((50, 70), 1.3), ((50, 70), 2.0), ((3, 5), 2.0)):  # the last narrower than the kernel
    xr, k = torch.rand(3, h, w), pil_blur_kernel(s)
    test_close(gaussian_blur(xr, s), blur_matrix(h, k) @ xr @ blur_matrix(w, k).T, eps=1e-5)
test_eq(gaussian_blur(xr, 0.0), xr)

photo = Image.open(cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)).convert('RGB')  # 512x600, in matplotlib
patch = photo.resize((224, 224), Image.BILINEAR, box=(100, 150, 400, 450))
xp = F.pil_to_tensor(patch).float() / 255
print('sigma  mean|ours-PIL|  max inside  max on border  mean|true Gaussian-PIL|   (levels of 255)')
for s in (0.1, 0.5, 1.0, 1.5, 2.0):
    pil = F.pil_to_tensor(patch.filter(ImageFilter.GaussianBlur(s))).float()
    ours = gaussian_blur(xp, s) * 255
    gauss = F.gaussian_blur(xp, [2 * math.ceil(3 * s) + 1] * 2, [s, s]) * 255
    d = (ours - pil).abs()
    inside = d[:, 8:-8, 8:-8]  # away from the border
    print(f'{s:5.1f}  {d.mean():15.2f}  {inside.max():10.1f}  {d.max():13.1f}  {(gauss - pil).abs().mean():24.2f}')
    assert d.mean() < 1.0 and inside.max() < 3
# the 1-D kernel is PIL's to the level: blur a single bright pixel in a row
row = Image.new('L', (31, 1), 0); row.putpixel((15, 0), 255)
for s in (0.5, 1.5, 2.0):
    k = pil_blur_kernel(s); R = (len(k) - 1) // 2
    pil_row = np.asarray(row.filter(ImageFilter.GaussianBlur(s)))[0].astype(np.float32)
    assert np.abs(pil_row[15 - R:16 + R] - (k * 255).numpy()).max() <= 1 and pil_row.sum() == pil_row[15 - R:16 + R].sum()


# %% [markdown]
# > **Ours.** The kernel is PIL's within one level (the impulse test), and on a real photo our blur is within one level
# > of 255 of PIL's on average and within three levels everywhere away from the border; the differences there come
# > from PIL rounding to 8 bits after each of its six passes. On the image's last row PIL differs by up to ~17 levels
# > for large sigma: its vertical pass treats the bottom edge slightly differently from the top one, while ours
# > repeats the edge pixel symmetrically. A true Gaussian with a 6-sigma kernel,
# > what `torchvision.transforms.v2.GaussianBlur` does, is about as far from PIL's filter; either choice is well
# > inside the noise of the colour jitter that runs before it. We keep PIL's kernel so that "sigma" means what it
# > means in the reference.

# %% [markdown]
# ## One view: parameters first, pixels second
#
# A `ViewParams` holds every random decision of one view. It also knows its coordinates, so anything that only needs
# coordinates (the histogram of positive pairs in the positive-pairs chapter, for example) never touches a pixel.

# %%
#| exports
@dataclass
class ViewParams:
    "Every random decision of one augmented view."
    top:int; left:int; height:int; width:int  # the crop, in pixels of the source image
    img_h:int; img_w:int  # size of the source image
    flip:bool = False  # horizontal flip
    jitter:tuple|None = None  # (order, b, c, s, h) from `sample_jitter`, or None
    gray:bool = False  # convert to grayscale
    sigma:float|None = None  # blur sigma, or None for no blur
    solarize:bool = False  # invert pixels >= the threshold

    @property
    def coord(self) -> Tensor:  # [4] x_ul, y_ul, x_lr, y_lr of the view (flip included)
        c = crop_coord(self.top, self.left, self.height, self.width, self.img_h, self.img_w)
        return hflip_coord(c) if self.flip else c


# %%
test_close(ViewParams(75, 100, 150, 301, 376, 501).coord, torch.tensor([0.2, 0.2, 0.8, 224/375]))
test_close(ViewParams(75, 100, 150, 301, 376, 501, flip=True).coord, torch.tensor([0.8, 0.2, 0.2, 224/375]))


# %% [markdown]
# `apply_view` turns parameters into pixels, in the order of the table. The crop and resize run on the uint8 image
# (torchvision's antialiased bilinear resize on uint8 is a vectorised kernel made to match PIL's); the image becomes
# float once, after the resize, so every later operation touches 224x224 pixels only. Four small pieces keep the
# passes over memory few:
#
# - `crop_resize` copies the crop to channels-last memory before the resize. The uint8 kernel works on
#   interleaved RGB; given a planar crop it would repack its result, and the cast to float that follows does the
#   conversion back to planar for free. Same pixels, to the bit.
# - A grayscale view keeps one channel (`grayscale`) through the blur and solarize: the three would be equal, so a
#   third of the work gives the same pixels. The normalisation, which differs per channel, makes the three.
# - `solarize` takes 0/1 masks from `sign` rather than `torch.where` (a branch per pixel on a CPU); torchvision's
#   `solarize` also checks the value range of the whole image first, which costs more than the operation.
# - `normalize_` subtracts and divides in place.

# %%
#| exports
def crop_resize(img:Tensor,  # [3, H, W] uint8
                top:int, left:int, height:int, width:int,  # the crop
                size:int,  # side of the output
               ) -> Tensor:  # [3, size, size] uint8 (channels-last memory)
    "torchvision's `resized_crop` (bilinear, antialiased), with the crop made channels-last first: the same pixels, faster."
    c = img[None, :, top:top + height, left:left + width].contiguous(memory_format=torch.channels_last)
    return F.resize(c, [size, size], antialias=True)[0]


# %%
xi = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
for img in (xi, xi.permute(1, 2, 0).contiguous().permute(2, 0, 1)):  # planar, and interleaved as decoders give
    for box in ((0, 0, 60, 80), (5, 7, 30, 41), (10, 10, 12, 12), (3, 4, 50, 60)):
        test_eq(crop_resize(img, *box, 24), F.resized_crop(img, *box, [24, 24], antialias=True))
test_eq(crop_resize(xi, 5, 7, 24, 24, 24), xi[:, 5:29, 7:31])  # no resize: the crop itself

# %%
#| exports
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def grayscale(v:Tensor,  # [3, H, W] float
             ) -> Tensor:  # [1, H, W]
    "torchvision's `rgb_to_grayscale(v)`: the luma as a one-channel image."
    return luma(v)[None]

def solarize(v:Tensor,  # float in [0, 1]
             threshold:float,  # on the same scale
            ) -> Tensor:
    "PIL's `ImageOps.solarize` on floats: `1 - v` where `v >= threshold`, with 0/1 masks (no branch per pixel)."
    m = (v - threshold).sign_().add_(1).clamp_(max=1)  # 1 where v >= threshold, else 0
    return (1 - v).mul_(m).add_((1 - m).mul_(v))  # exactly one term is not 0

@functools.lru_cache(maxsize=None)
def _mean_std(mean:tuple, std:tuple, device:torch.device) -> tuple[Tensor, Tensor]:  # [3, 1, 1] each, made once per device
    return tuple(torch.tensor(t, dtype=torch.float32).view(3, 1, 1).to(device) for t in (mean, std))

def normalize_(v:Tensor,  # [3, H, W] float, changed in place
               mean:tuple, std:tuple) -> Tensor:
    "torchvision's `normalize` (subtract, then divide), in place."
    m, s = _mean_std(tuple(mean), tuple(std), v.device)
    return v.sub_(m).div_(s)


# %%
vg = torch.rand(3, 5, 6)
test_eq(grayscale(vg), F.rgb_to_grayscale(vg))
vs_ = torch.cat([torch.rand(3, 5, 6), torch.full((3, 1, 6), 128 / 255)], 1)  # pixels at the threshold solarize too
test_eq(solarize(vs_, 128 / 255), torch.where(vs_ >= 128 / 255, 1 - vs_, vs_))
test_eq(normalize_(vg.clone(), IMAGENET_MEAN, IMAGENET_STD), F.normalize(vg, list(IMAGENET_MEAN), list(IMAGENET_STD)))

# %% [markdown]
# ## The fast path: OpenCV's kernels
#
# Every operation above is a handful of tensor operations, and each of them reads and writes the whole view: the hue
# rotation alone is about 35 passes over memory, the blur of sigma 2 about 26. On a CPU such a pass over a 224x224
# view costs 5-20 us whatever it computes, so the colour jitter and the blur were most of the time of a view after
# the decode. OpenCV has the same operations as single fused, vectorised loops (SSE to AVX-512, chosen at run time),
# on interleaved RGB: the layout the uint8 resize gives anyway. Each kernel below does what the tensor version above
# does, to float rounding, and the tests say so:
#
# - **Hue**: `cvtColor` to HSV (hue in degrees), one addition to the hue channel, `cvtColor` back: two passes. The
#   shift is added as a turn in [0, 1) (`h % 1`), so the hue lands in [0, 720 degrees); the conversion back reduces
#   it into one turn (the test covers shifts that wrap).
# - **Saturation** is linear in RGB: `s x + (1 - s) luma(x)` is the 3x3 matrix `s I + (1 - s) 1 w^T` applied to each
#   pixel (`cv2.transform`), with `w` torchvision's luma weights (0.2989, 0.587, 0.114; OpenCV's own `COLOR_RGB2GRAY`
#   uses 0.299 and is not used).
# - **Contrast** needs the mean luma, which is the luma of the channel means (`cv2.mean`); brightness is one multiply.
# - **Blur**: `sepFilter2D` with PIL's kernel for rows and columns and repeated edges (`BORDER_REPLICATE`), one pass
#   each.
# - **Layout**: the view stays interleaved `[H, W, 3]` until the normalisation, which writes the planar `[3, H, W]`
#   tensor the model takes in the same pass.
#
# `apply_view` uses these kernels when OpenCV is installed (it is a dependency of the package) and the view is on the
# CPU; `backend='torch'` keeps the tensor operations, which are also what the accelerator runs (the GPU-augmentation
# chapter). Before its first use, `opencv_agrees` runs both on a small image whose hue shifts wrap around and whose
# width is less than the blur kernel; if an OpenCV release ever behaved otherwise, the tensor path would be used, with
# a warning. DataLoader workers run OpenCV on one thread, as they run torch (`setNumThreads(0)`, set in each worker;
# the data chapter).

# %%
#| exports
_LUMA = np.array([0.2989, 0.587, 0.114])  # torchvision's rgb_to_grayscale weights (ITU-R 601)

def color_jitter_cv(x:np.ndarray,  # [H, W, 3] float32 RGB in [0, 1], interleaved (may be changed)
                    order:tuple[int, ...],  # permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue
                    b:float, c:float, s:float, h:float,  # the factors, as drawn by `sample_jitter`
                   ) -> np.ndarray:  # [H, W, 3] float32 in [0, 1]
    "`color_jitter` with OpenCV's kernels on an interleaved image: the same operations, to float rounding."
    for i in order:
        if i == 0: torch.from_numpy(x).mul_(b).clamp_(0, 1)
        elif i == 1:
            m = float(_LUMA @ np.array(cv2.mean(x)[:3]))  # mean luma = luma of the channel means
            torch.from_numpy(x).mul_(c).add_((1 - c) * m).clamp_(0, 1)
        elif i == 2:
            x = cv2.transform(x, s * np.eye(3) + (1 - s) * np.tile(_LUMA, (3, 1)))  # s x + (1 - s) luma(x)
            torch.from_numpy(x).clamp_(0, 1)
        else:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # hue in degrees, [0, 360)
            cv2.add(hsv, (h % 1.0 * 360, 0, 0, 0), dst=hsv)  # the shift as a turn in [0, 1): hue in [0, 720)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=x)
    return x

def gaussian_blur_cv(x:np.ndarray,  # [H, W] or [H, W, C] float32
                     sigma:float,  # standard deviation in pixels (PIL's radius)
                    ) -> np.ndarray:  # same shape
    "`gaussian_blur` with OpenCV's separable filter (PIL's kernel, repeated edges)."
    if sigma <= 0: return x
    k = pil_blur_kernel(sigma).numpy()
    return cv2.sepFilter2D(x, -1, k, k, borderType=cv2.BORDER_REPLICATE)

def grayscale_cv(x:np.ndarray,  # [H, W, 3] float32
                ) -> np.ndarray:  # [H, W]
    "`grayscale` on an interleaved image: the luma, one channel."
    return cv2.transform(x, _LUMA[None])

def normalize_planar(v:Tensor,  # [H, W, C] float, C = 1 (grayscale) or 3, interleaved
                     mean:tuple|None, std:tuple,  # mean=None: no normalisation
                    ) -> Tensor:  # [3, H, W] float32, planar
    "The normalisation that also makes the planar `[3, H, W]` tensor (one channel is repeated to three)."
    out = torch.empty(3, *v.shape[:2], dtype=v.dtype)
    src = v.permute(2, 0, 1).expand(3, -1, -1)
    if mean is None: return out.copy_(src)
    m, s = _mean_std(tuple(mean), tuple(std), v.device)
    return torch.sub(src, m, out=out).div_(s)


# %%
if cv2 is not None:
    xh = torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(1))
    xh[:, 0, :3] = torch.tensor([[.2, .7, .7], [.7, .2, .7], [.7, .7, .2]])  # two channels share the maximum
    xh[:, 1, :2] = torch.tensor([[0., 1.], [0., 1.], [0., 1.]])  # black and white: no chroma
    il = lambda t: t.permute(1, 2, 0).contiguous().numpy()  # planar tensor -> interleaved array
    for order in ((0,), (1,), (2,), (3,), (0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)):
        for hue in (0.0, 0.07, -0.07, 0.45, -0.45, 0.5, -0.5):  # the negative shifts wrap around
            ours = color_jitter_cv(il(xh), order, 1.3, 0.6, 1.25, hue)
            test_close(torch.from_numpy(ours).permute(2, 0, 1), color_jitter(xh, order, 1.3, 0.6, 1.25, hue), eps=2e-6)
    for sigma in (0.0, 0.1, 0.7, 2.0):
        test_close(torch.from_numpy(gaussian_blur_cv(il(xh), sigma)).permute(2, 0, 1), gaussian_blur(xh, sigma), eps=1e-6)
        test_close(torch.from_numpy(gaussian_blur_cv(il(xh[:, :5, :4]), sigma)).permute(2, 0, 1),
                   gaussian_blur(xh[:, :5, :4], sigma), eps=1e-6)  # narrower than the kernel (13 taps at sigma 2)
    test_close(torch.from_numpy(grayscale_cv(il(xh)))[None], grayscale(xh), eps=1e-6)
    test_eq(normalize_planar(torch.from_numpy(il(xh)), IMAGENET_MEAN, IMAGENET_STD),
            normalize_(xh.clone(), IMAGENET_MEAN, IMAGENET_STD))
    test_eq(normalize_planar(torch.from_numpy(il(xh[:1])), None, IMAGENET_STD), xh[:1].expand(3, -1, -1))


# %%
#| exports
@functools.lru_cache(maxsize=None)
def opencv_agrees() -> bool:
    "Whether this OpenCV's kernels give what the tensor operations give (checked once, on a small image)."
    if cv2 is None: return False
    x = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(0))
    il = x.permute(1, 2, 0).contiguous().numpy()
    pairs = [(color_jitter_cv(il.copy(), (0, 1, 2, 3), 1.2, 0.8, 1.1, h), color_jitter(x, (0, 1, 2, 3), 1.2, 0.8, 1.1, h))
             for h in (-0.45, 0.3)] + [(gaussian_blur_cv(il, 2.0), gaussian_blur(x, 2.0))]
    if all(torch.allclose(torch.from_numpy(a).permute(2, 0, 1), b, atol=1e-5) for a, b in pairs): return True
    warnings.warn(f'OpenCV {cv2.__version__} does not give the tensor operations\' results; the CPU views use the tensor '
                  'operations (slower)')
    return False


# %%
assert opencv_agrees() == (cv2 is not None)

# %%
#| exports
BACKENDS = ('opencv', 'torch')  # the kernels of the CPU path

def _check_backend(backend:str|None, on_cpu:bool=True):
    "Raise `ConfigError` naming `backend` unless it is None, 'torch', or 'opencv' with OpenCV installed and a CPU image."
    if backend is None: return
    if backend not in BACKENDS: raise ConfigError('backend', backend, f'one of {BACKENDS} or None')
    if backend == 'opencv' and cv2 is None:
        raise ConfigError('backend', backend, "'torch' or None: OpenCV is not installed (pip install opencv-python-headless)")
    if backend == 'opencv' and not on_cpu:
        raise ConfigError('backend', backend, "'torch' or None: OpenCV's kernels need an image on the CPU")

def apply_view(img:Tensor,  # [3, H, W] uint8 source image
               p:ViewParams,  # the view's random decisions
               size:int=224,  # side of the output view
               solarize_threshold:float=128,  # on the 0..255 scale
               mean:tuple=IMAGENET_MEAN, std:tuple=IMAGENET_STD,  # normalisation; mean=None returns [0, 1] floats
               backend:str|None=None,  # 'opencv', 'torch', or None: OpenCV's kernels on the CPU when they agree
              ) -> Tensor:  # [3, size, size] float32
    "One augmented view of `img` from its parameters."
    _check_backend(backend, img.device.type == 'cpu')
    if backend is None: backend = 'opencv' if img.device.type == 'cpu' and opencv_agrees() else 'torch'
    v = crop_resize(img, p.top, p.left, p.height, p.width, size)  # uint8 [3, S, S]
    if p.flip: v = v.flip(-1)
    if backend == 'opencv':
        x = v.permute(1, 2, 0).to(torch.float32).div_(255).contiguous().numpy()  # [S, S, 3], interleaved as resized
        if p.jitter is not None: x = color_jitter_cv(x, *p.jitter)
        if p.gray: x = grayscale_cv(x)  # [S, S]: one channel until the normalisation
        if p.sigma is not None: x = gaussian_blur_cv(x, p.sigma)
        v = torch.from_numpy(x).view(size, size, -1)
        if p.solarize: v = solarize(v, solarize_threshold / 255)
        return normalize_planar(v, mean, std)
    v = v.to(torch.float32, memory_format=torch.contiguous_format).div_(255)
    if p.jitter is not None: v = color_jitter(v, *p.jitter)
    if p.gray: v = grayscale(v)  # [1, S, S] until the normalisation: the three channels would be equal
    if p.sigma is not None: v = gaussian_blur(v, p.sigma)
    if p.solarize: v = solarize(v, solarize_threshold / 255)
    if mean is None: return v.expand(3, -1, -1)
    return normalize_(v, mean, std) if v.shape[0] == 3 else normalize_(v.expand(3, -1, -1).clone(), mean, std)


# %% [markdown]
# The best test of coordinates runs them through the pixels. In a 256x256 image whose red channel is the column and
# green channel the row, a view's top-left pixel *shows* where it came from: decoding its colour must give
# $(x_{ul}, y_{ul})$ of the coordinates, and the bottom-right pixel $(x_{lr}, y_{lr})$, flipped or not. (The
# resampling puts output pixel centres slightly inside the crop, by half an output pixel: the tolerance.)

# %%
ramp = torch.arange(256, dtype=torch.uint8)
coord_img = torch.stack([ramp.expand(256, 256), ramp[:, None].expand(256, 256), torch.zeros(256, 256, dtype=torch.uint8)])
for p in (ViewParams(10, 30, 120, 200, 256, 256), ViewParams(10, 30, 120, 200, 256, 256, flip=True),
          ViewParams(0, 0, 256, 256, 256, 256, flip=True), ViewParams(100, 5, 40, 30, 256, 256)):
    v = apply_view(coord_img, p, size=32, mean=None)
    tol = max(p.width, p.height) / 32 / 255 + 1.5 / 255
    test_close(torch.stack([v[0, 0, 0], v[1, 0, 0], v[0, -1, -1], v[1, -1, -1]]), p.coord, eps=tol)


# %% [markdown]
# ## The reference pipeline in PIL
#
# `apply_view_pil` applies the same parameters with the PIL operations of the reference (crop + bilinear resize,
# `ImageEnhance` through torchvision's PIL functional, `convert('L')`, `ImageFilter.GaussianBlur`,
# `ImageOps.solarize`). It is the yardstick for correctness here and for speed in the data chapter.

# %%
#| exports
def apply_view_pil(img:Image.Image,  # RGB source image
                   p:ViewParams, size:int=224, solarize_threshold:int=128,
                   mean:tuple=IMAGENET_MEAN, std:tuple=IMAGENET_STD,
                  ) -> Tensor:  # [3, size, size] float32
    "The reference's PIL pipeline, replaying the parameters `p` (for tests and benchmarks)."
    from torchvision.transforms import functional as TF
    v = img.resize((size, size), Image.BILINEAR, box=(p.left, p.top, p.left + p.width, p.top + p.height))
    if p.flip: v = v.transpose(Image.FLIP_LEFT_RIGHT)
    if p.jitter is not None:
        order, b, c, s, h = p.jitter
        for i in order: v = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][i](v, (b, c, s, h)[i])
    if p.gray: v = v.convert('L').convert('RGB')
    if p.sigma is not None: v = v.filter(ImageFilter.GaussianBlur(p.sigma))
    if p.solarize: v = ImageOps.solarize(v, solarize_threshold)
    return TF.normalize(TF.to_tensor(v), list(mean), list(std))


# %%
x_photo = F.pil_to_tensor(photo)
for p in (ViewParams(20, 30, 300, 280, *x_photo.shape[1:], flip=True, gray=True),
          ViewParams(20, 30, 300, 280, *x_photo.shape[1:], sigma=1.0, solarize=True)):
    ref = apply_view_pil(photo, p, size=64)
    test_eq((ref.shape, ref.dtype), ((3, 64, 64), torch.float32))
    assert ((ref - apply_view(x_photo, p, size=64)) * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255).abs().mean() < 1


# %% [markdown]
# ## `PixProAugment`
#
# The class holds the recipe; every parameter of the table is an argument, with the reference's BYOL values as
# defaults.
# Probabilities that differ between the views are pairs `(view 1, view 2)`.

# %%
#| exports
class PixProAugment:
    "Two independently augmented views of one image and their crop coordinates (PixPro / BYOL recipe)."
    def __init__(self,
                 image_size:int=224,  # side of each view (224 gives a 7x7 C5 map)
                 scale:tuple=(0.08, 1.0),  # RandomResizedCrop area range
                 ratio:tuple=(3/4, 4/3),  # RandomResizedCrop aspect-ratio range
                 flip_p:float=0.5,  # probability of a horizontal flip
                 brightness:float=0.4, contrast:float=0.4, saturation:float=0.2, hue:float=0.1,  # ColorJitter
                 jitter_p:float=0.8,  # probability of the colour jitter
                 gray_p:float=0.2,  # probability of grayscale
                 blur_sigma:tuple=(0.1, 2.0),  # blur sigma range (uniform)
                 blur_p:tuple=(1.0, 0.1),  # blur probability for (view 1, view 2)
                 solarize_p:tuple=(0.0, 0.2),  # solarize probability for (view 1, view 2)
                 solarize_threshold:float=128,  # on 0..255
                 mean:tuple|None=IMAGENET_MEAN,  # normalisation mean (None: return floats in [0, 1])
                 std:tuple=IMAGENET_STD,  # normalisation std
                 backend:str|None=None,  # kernels of `apply_view`: 'opencv', 'torch', None (OpenCV when it agrees)
                ):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError('image_size', image_size, 'a positive integer')
        if not (0 < scale[0] <= scale[1] <= 1): raise ConfigError('scale', scale, '(lo, hi) with 0 < lo <= hi <= 1')
        if not (0 < ratio[0] <= ratio[1]): raise ConfigError('ratio', ratio, '(lo, hi) with 0 < lo <= hi')
        for n in ('flip_p', 'jitter_p', 'gray_p'): check_range(n, locals()[n], 0, 1)
        for n in ('blur_p', 'solarize_p'):
            v = locals()[n]
            if len(v) != 2: raise ConfigError(n, v, '(p for view 1, p for view 2)')
            for x in v: check_range(n, x, 0, 1)
        if not (0 <= blur_sigma[0] <= blur_sigma[1]): raise ConfigError('blur_sigma', blur_sigma, '(lo, hi), 0 <= lo <= hi')
        for n in ('brightness', 'contrast', 'saturation'): check_range(n, locals()[n], 0)
        check_range('hue', hue, 0, 0.5)
        self.image_size, self.scale, self.ratio, self.flip_p = image_size, tuple(scale), tuple(ratio), flip_p
        self.jitter, self.jitter_p, self.gray_p = (brightness, contrast, saturation, hue), jitter_p, gray_p
        self.blur_sigma, self.blur_p, self.solarize_p = tuple(blur_sigma), tuple(blur_p), tuple(solarize_p)
        _check_backend(backend)
        self.solarize_threshold, self.mean, self.std, self.backend = solarize_threshold, mean, std, backend

    def __repr__(self):
        return (f'PixProAugment(image_size={self.image_size}, scale={self.scale}, blur_p={self.blur_p}, '
                f'solarize_p={self.solarize_p})')


# %%
test_fail(lambda: PixProAugment(blur_p=(1.0,)), contains='blur_p')
test_fail(lambda: PixProAugment(scale=(0.5, 0.2)), contains='scale')


# %% [markdown]
# `draw` makes every random decision of a pair, in a fixed order, from one generator: crop, flip, jitter, grayscale,
# blur, solarize for view 1, then the same for view 2. A coin is tossed for every step even when its probability is 0
# or 1, so changing one probability does not shift the random stream of everything after it.

# %%
#| exports
def _coin(p:float, g) -> bool: return bool(torch.rand(1, generator=g).item() < p)


# %%
g = torch.Generator().manual_seed(0)
test_eq({_coin(1.0, g) for _ in range(100)}, {True}); test_eq({_coin(0.0, g) for _ in range(100)}, {False})
test_close(sum(_coin(0.3, g) for _ in range(4000)) / 4000, 0.3, eps=0.03)
g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
_coin(0.0, g1); torch.rand(1, generator=g2)
test_eq(torch.rand(1, generator=g1), torch.rand(1, generator=g2))  # one draw per coin, whatever p


# %%
#| exports
def _draw_view(self:PixProAugment, img_h:int, img_w:int, view:int, g) -> ViewParams:
    top, left, h, w = sample_crop(img_h, img_w, self.scale, self.ratio, g)
    flip = _coin(self.flip_p, g)
    jitter = sample_jitter(*self.jitter, generator=g) if _coin(self.jitter_p, g) else None
    gray = _coin(self.gray_p, g)
    blur = _coin(self.blur_p[view], g)
    sigma = torch.empty(1).uniform_(*self.blur_sigma, generator=g).item()
    solarize = _coin(self.solarize_p[view], g)
    return ViewParams(top, left, h, w, img_h, img_w, flip, jitter, gray, sigma if blur else None, solarize)


# %%
fixed = PixProAugment(flip_p=1.0, jitter_p=0.0, gray_p=1.0, blur_p=(0.0, 1.0), solarize_p=(1.0, 0.0))
v0 = _draw_view(fixed, 375, 500, 0, torch.Generator().manual_seed(0))
test_eq((v0.img_h, v0.img_w, v0.flip, v0.jitter, v0.gray, v0.sigma, v0.solarize), (375, 500, True, None, True, None, True))
v1 = _draw_view(fixed, 375, 500, 1, torch.Generator().manual_seed(0))
assert 0.1 <= v1.sigma <= 2.0 and not v1.solarize
test_eq((v1.top, v1.left, v1.height, v1.width), (v0.top, v0.left, v0.height, v0.width))  # same seed: same crop


# %%
#| exports
def _draw(self:PixProAugment,
          img_h:int, img_w:int,  # size of the source image
          generator:torch.Generator|None=None,  # source of all randomness (None: torch's global generator)
         ) -> tuple[ViewParams, ViewParams]:
    "All random decisions of one pair of views."
    return _draw_view(self, img_h, img_w, 0, generator), _draw_view(self, img_h, img_w, 1, generator)

PixProAugment.draw = _draw

# %% [markdown]
# The statistics of many draws must match the table: view 1 is always blurred and never solarized, view 2 is blurred
# 10 % and solarized 20 % of the time.

# %%
aug = PixProAugment()
g = torch.Generator().manual_seed(0)
pairs = [aug.draw(375, 500, g) for _ in range(4000)]
rate = lambda f, v: sum(f(p[v]) for p in pairs) / len(pairs)
test_eq(rate(lambda p: p.sigma is not None, 0), 1.0); test_eq(rate(lambda p: p.solarize, 0), 0.0)
test_close(rate(lambda p: p.sigma is not None, 1), 0.1, eps=0.02); test_close(rate(lambda p: p.solarize, 1), 0.2, eps=0.02)
for v in (0, 1):
    test_close(rate(lambda p: p.flip, v), 0.5, eps=0.03); test_close(rate(lambda p: p.jitter is not None, v), 0.8, eps=0.03)
    test_close(rate(lambda p: p.gray, v), 0.2, eps=0.02)
sig = torch.tensor([p[0].sigma for p in pairs])
assert 0.1 <= sig.min() and sig.max() <= 2.0


# %% [markdown]
# Calling the augmentation draws and applies. It takes a PIL image (any mode, converted to RGB) or a uint8 tensor
# `[3, H, W]` (or `[1, H, W]` / `[H, W]` for grayscale).

# %%
#| exports
def to_rgb_tensor(img:Image.Image|Tensor) -> Tensor:  # [3, H, W] uint8
    "A PIL image or a uint8 tensor as a `[3, H, W]` uint8 RGB tensor."
    if isinstance(img, Image.Image):
        return F.pil_to_tensor(img if img.mode == 'RGB' else img.convert('RGB'))
    if not isinstance(img, Tensor) or img.dtype != torch.uint8 or img.ndim not in (2, 3):
        raise ConfigError('img', getattr(img, 'shape', type(img)), 'a PIL image or a uint8 tensor [3, H, W]')
    if img.ndim == 2: img = img[None]
    if img.shape[0] == 1: img = img.expand(3, -1, -1)
    if img.shape[0] != 3: raise ConfigError('img', tuple(img.shape), 'a uint8 tensor with 1 or 3 channels first')
    return img


# %%
test_eq(to_rgb_tensor(Image.new('L', (5, 4), 7)), torch.full((3, 4, 5), 7, dtype=torch.uint8))
g8 = torch.randint(0, 256, (4, 5), dtype=torch.uint8)
test_eq(to_rgb_tensor(g8), g8.expand(3, -1, -1)); test_eq(to_rgb_tensor(g8[None]), g8.expand(3, -1, -1))
test_fail(lambda: to_rgb_tensor(torch.zeros(3, 8, 8)), contains='uint8')
test_fail(lambda: to_rgb_tensor(torch.zeros(4, 8, 8, dtype=torch.uint8)), contains='1 or 3 channels')


# %%
#| exports
def _call(self:PixProAugment,
          img:Image.Image|Tensor,  # PIL image or uint8 [3, H, W] tensor
          generator:torch.Generator|None=None,  # source of all randomness (None: torch's global generator)
         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # view1, view2 [3, S, S] float; coord1, coord2 [4]
    "Two augmented views of `img` and their crop coordinates."
    x = to_rgb_tensor(img)
    p1, p2 = self.draw(x.shape[-2], x.shape[-1], generator)
    kw = dict(size=self.image_size, solarize_threshold=self.solarize_threshold, mean=self.mean, std=self.std,
              backend=getattr(self, 'backend', None))  # (objects pickled before the argument existed have none)
    return apply_view(x, p1, **kw), apply_view(x, p2, **kw), p1.coord, p2.coord

PixProAugment.__call__ = _call

# %%
aug = PixProAugment()
v1, v2, c1, c2 = aug(photo, torch.Generator().manual_seed(1))
test_eq((v1.shape, v2.shape, v1.dtype, c1.shape, c1.dtype), ((3, 224, 224), (3, 224, 224), torch.float32, (4,), torch.float32))
w1 = aug(F.pil_to_tensor(photo), torch.Generator().manual_seed(1))
for a, b in zip((v1, v2, c1, c2), w1): test_eq(a, b)  # PIL or tensor input, same result
w2 = aug(photo, torch.Generator().manual_seed(2))
assert not torch.equal(w2[0], v1) and not torch.equal(w2[2], c1)
tiny = Image.new('L', (9, 5), 128)  # grayscale, far smaller than the view
t1, t2, tc1, tc2 = PixProAugment(image_size=32)(tiny)
test_eq(t1.shape, (3, 32, 32)); assert torch.isfinite(t1).all() and (tc1 >= 0).all() and (tc1 <= 1).all()
test_fail(lambda: aug(torch.zeros(3, 8, 8)), contains='uint8')

# %% [markdown]
# Replayed through the PIL reference, the same parameters give the same views: across many random draws the mean
# difference is about one level of 255. The remaining differences come from PIL's 8-bit rounding after every
# operation and its quantised hue (256 steps around the circle), visible as a few levels on saturated pixels.

# %%
x_photo = F.pil_to_tensor(photo)
g = torch.Generator().manual_seed(11)
diffs = []
for _ in range(12):
    for p in aug.draw(*x_photo.shape[1:], g):
        d = (apply_view(x_photo, p) - apply_view_pil(photo, p)) * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
        diffs.append(d.abs().mean().item())
print(f'mean |ours - PIL| per view, levels of 255: mean {np.mean(diffs):.2f}, worst {np.max(diffs):.2f}')
assert np.mean(diffs) < 2 and np.max(diffs) < 4

# %% [markdown]
# The two backends give the same views to float rounding: across many draws the largest difference is a few units
# of $10^{-6}$, except at the rare pixels that lie within rounding of the solarize threshold, which one backend
# inverts and the other does not (a step of about one level either way, as any change of rounding would give).

# %%
if cv2 is not None:
    g, worst, flips = torch.Generator().manual_seed(12), 0.0, 0
    for _ in range(20):
        for p in aug.draw(*x_photo.shape[1:], g):
            a, b = apply_view(x_photo, p, mean=None), apply_view(x_photo, p, mean=None, backend='torch')
            near = ((a - 128 / 255).abs() < 1e-5) if p.solarize else torch.zeros_like(a, dtype=torch.bool)
            worst, flips = max(worst, (a - b)[~near].abs().max().item()), flips + int(((a - b).abs() > 1e-4).sum())
            test_eq(apply_view(x_photo, p), normalize_(apply_view(x_photo, p, mean=None).clone(), IMAGENET_MEAN, IMAGENET_STD))
    print(f'opencv vs torch over 40 views: largest difference {worst:.1e} (pixels that differ by more than 1e-4: {flips})')
    assert worst < 1e-5 and flips < 20
test_fail(lambda: apply_view(x_photo, p, backend='numpy'), contains="backend")
test_fail(lambda: apply_view(x_photo.to('meta'), p, backend='opencv'), contains="on the CPU")
test_fail(lambda: PixProAugment(backend='pil'), contains="backend")


# %% [markdown]
# ## What the two views look like
#
# Figure 1 shows four pairs from the photograph. View 1 (top) is always blurred; view 2 (bottom) is usually sharp and
# sometimes solarized. This asymmetry is BYOL's: if both views were always blurred, the network could rely on
# blur-invariant cues only; if neither, it would never learn blur invariance. Making one view hard and the other
# usually easy gives both a sharp target and an invariance to learn. Solarize (invert the bright half of the
# intensities) on view 2 only plays the same role for colour statistics.

# %%
def show(v): return (v * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).clamp(0, 1).permute(1, 2, 0)
def describe(p):
    return ', '.join(s for s, on in (('flip', p.flip), ('jitter', p.jitter is not None), ('gray', p.gray),
                                     (f'blur {p.sigma or 0:.1f}', p.sigma is not None), ('solarize', p.solarize)) if on)
fig, axs = plt.subplots(2, 4, figsize=(12, 6.4))
g = torch.Generator().manual_seed(4)
for col in range(4):
    p1, p2 = aug.draw(*x_photo.shape[1:], g)
    for row, p in enumerate((p1, p2)):
        axs[row, col].imshow(show(apply_view(x_photo, p))); axs[row, col].set_axis_off()
        axs[row, col].set_title(f'view {row + 1}: ' + (describe(p) or 'crop only'), fontsize=8)
fig.suptitle('Figure 1: four pairs of views (view 1 always blurred, view 2 sometimes solarized)'); plt.tight_layout(); plt.show()

# %% [markdown]
# ## A view and its mirror twin
#
# A flipped view must be the mirror image of the unflipped one, pixel for pixel, and its coordinates must walk the
# same crop right to left. The first is tested here through the pixels of the photograph; the second, and what the
# coordinates of real views mean for the positive pixel pairs (which pixels of two views show the same place, how
# many pairs a typical pair of views has, and a figure of two real views with their matched pixels), is the subject
# of the positive-pairs chapter, `04_positives`, which uses this chapter's `PixProAugment` and `ViewParams`.

# %%
H, W = x_photo.shape[1:]
p = ViewParams(0, 0, H, W, H, W, sigma=1.0)
twin = dataclasses.replace(p, flip=True)
test_close(apply_view(x_photo, p).flip(-1), apply_view(x_photo, twin), eps=1e-4)  # mirror images
test_close(twin.coord, torch.tensor([1., 0., 0., 1.]))  # the whole image, walked right to left
p = aug.draw(H, W, torch.Generator().manual_seed(0))[0]
t = dataclasses.replace(p, flip=not p.flip)
test_eq(t.coord, p.coord[[2, 1, 0, 3]])  # any crop: the twin swaps the x entries, and nothing else
test_close(apply_view(x_photo, p).flip(-1), apply_view(x_photo, t), eps=1e-4)  # jitter, blur, solarize commute with it

# %% [markdown]
# ## Randomness
#
# Every draw above goes through the `generator` argument; nothing reads NumPy's or Python's global RNG. The data
# chapter gives every *sample* its own generator, seeded from (seed, epoch, index), which makes a batch independent
# of how many workers produced it. The reference drew the blur sigma with `np.random.uniform` inside DataLoader
# workers (`contrast/data/transform.py`, line 12): the NumPy global state is copied into every forked worker, so the
# workers of one epoch repeat each other's sigmas (and, without persistent workers, every epoch repeats the last).
# Here the same seed gives the same pair and another seed another one, whatever process asks.

# %%
a = aug(x_photo, torch.Generator().manual_seed(123)); b = aug(x_photo, torch.Generator().manual_seed(123))
for u, v in zip(a, b): test_eq(u, v)
np.random.seed(0); state = np.random.get_state()[1].copy()
torch.manual_seed(0); expected = torch.rand(1)
torch.manual_seed(0); c = aug(x_photo, torch.Generator().manual_seed(123))
test_eq(np.random.get_state()[1], state)  # NumPy's global RNG untouched
test_eq(torch.rand(1), expected)  # and torch's global one too

# %% [markdown]
# ## Summary
#
# - `crop_coord` and `hflip_coord` write a view's box as the reference does: normalised corner-pixel centres, x and
#   y separately, a flip swaps the x entries. Tested on hand-computed boxes and through the pixels of a coordinate
#   image.
# - `PixProAugment(image_size=224, ...)` returns `(view1, view2, coord1, coord2)`; every parameter of the reference's
#   BYOL pipeline is an argument. `draw` makes all random decisions from one generator, `apply_view` turns them into
#   pixels.
# - The crop and colour jitter draws are torchvision's (same values for the same seed); hue and blur are
#   reimplemented for speed: hue exactly, blur with PIL's own three-box kernel (within about one level of 255 of
#   PIL); the whole pipeline stays within about one level of the reference PIL pipeline `apply_view_pil`.
# - On the CPU, `apply_view` runs OpenCV's fused kernels for the colour jitter, grayscale, blur and normalisation
#   (`color_jitter_cv`, `gaussian_blur_cv`, ...), which give the tensor operations' views to float rounding (checked
#   once per process by `opencv_agrees`); `backend='torch'` runs the tensor operations, the ones the accelerator
#   batches.
# - A flipped view is the mirror image of the unflipped one and its coordinates swap the x entries. What the
#   coordinates of two views mean for the positive pixel pairs, and how many pairs the augmentation produces, is the
#   next-but-one chapter, `04_positives`.
#
# ## Exercises
#
# 1. Replace `gaussian_blur` in `apply_view`'s tensor path (`backend='torch'`) by torchvision's `F.gaussian_blur` with a kernel of
#    $2\lceil 3\sigma\rceil+1$ taps, rerun the replay against `apply_view_pil` above and time one view before and
#    after (`%timeit`). Which costs more, the difference in pixels or the difference in time?
# 2. Make the recipe symmetric, `PixProAugment(blur_p=(0.5, 0.5), solarize_p=(0.1, 0.1))`, and check with the `rate`
#    statistics of the `draw` test that both views now have the same rates. Does the random stream of the crops
#    change? (Look at how `_draw_view` tosses its coins.)
# 3. Write `vflip_coord`, the coordinates of a vertically flipped view (the reference's `RandomVerticalFlipCoord`,
#    `contrast/data/transform_coord.py` line 99, swaps the two y entries), and test it through the pixels of the
#    `coord_img` ramp as the test of `apply_view` does.
# 4. Reproduce the reference's weakness: in a `DataLoader` with 2 workers and no `worker_init_fn`, draw a blur sigma
#    with `np.random.uniform(0.1, 2.0)` in the dataset's `__getitem__` and print what each worker draws. Then do the
#    same with a `torch.Generator` seeded from the sample index, as the data chapter does.
