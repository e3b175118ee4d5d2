# %% [markdown]
# # Positive pixel pairs and the PixPro losses
#
# > Which pixels of two crops show the same place, and the two pixel-level losses built on them: PixPro's cosine regression and PixContrast.

# %%
#| default_exp positives

# %%
#| export
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pixpro_rs.core import ConfigError, check_positive

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
from nbdev.showdoc import show_doc


# %% [markdown]
# PixPro learns from *pixel* correspondences. Two augmented views of one image are cut from two crops of it; the
# backbone turns each view into a small feature map (7x7 for a 224-pixel view of a ResNet's C5). Every feature pixel
# looks at a patch of the original image, so a pixel of view 1 and a pixel of view 2 can be said to show "the same
# place" when the centres of their patches are close. Those are the **positive pairs**; the loss pulls their
# features together. This chapter builds the pairs, then the two losses that use them. The networks (projector,
# pixel propagation module, momentum encoder) are the next chapter.

# %% [markdown]
# ## Where a feature pixel looks
#
# A view remembers where it came from as four numbers, `[x_ul, y_ul, x_lr, y_lr]`: the crop's upper-left and
# lower-right corners in the original image, each axis normalised to [0, 1] separately (see the augmentation
# chapter). A horizontal flip swaps the two x entries, so `x_ul > x_lr` for a flipped view. Split the crop into an
# $H \times W$ grid of **bins**, one per feature pixel:
#
# $$w_b = \frac{x_{lr} - x_{ul}}{W}, \qquad h_b = \frac{y_{lr} - y_{ul}}{H}, \qquad
#   c(b, a) = \big(x_{ul} + (a + \tfrac12)\,w_b,\; y_{ul} + (b + \tfrac12)\,h_b\big)$$
#
# for the pixel in row $b$, column $a$. With a flipped view $w_b < 0$, and column 0 sits at the crop's *right*
# edge, exactly where the flipped image puts it. No special case is needed.
#
# Two pixels $i$ (of view $q$) and $j$ (of view $k$) are positive when their centres are closer than $T$ **bin
# diagonals**, measured with the larger of the two views' diagonals:
#
# $$d_{ij} = \frac{\lVert c_q(i) - c_k(j) \rVert_2}{\max\big(\sqrt{w_{b,q}^2 + h_{b,q}^2},\ \sqrt{w_{b,k}^2 + h_{b,k}^2}\big)},
#   \qquad \text{positive}_{ij} = d_{ij} < T, \quad T = 0.7.$$

# %%
#| exports
def _check_coords(coord_q:Tensor, coord_k:Tensor, n:int|None=None):
    "Raise `ConfigError` unless both coordinate tensors are [N, 4] with the same N (and N == `n` when given)."
    for name, c in (('coord_q', coord_q), ('coord_k', coord_k)):
        if not isinstance(c, Tensor) or c.ndim != 2 or c.shape[1] != 4:
            raise ConfigError(name, getattr(c, 'shape', c), 'a tensor of shape [N, 4] (x_ul, y_ul, x_lr, y_lr)')
    if coord_k.shape[0] != coord_q.shape[0]:
        raise ConfigError('coord_k', coord_k.shape, f'the same N as coord_q ({coord_q.shape[0]})')
    if n is not None and coord_q.shape[0] != n:
        raise ConfigError('coord_q', coord_q.shape, f'N = {n}, the batch size of the features')


# %%
c = torch.rand(3, 4)
_check_coords(c, c, 3)  # valid: no error
test_fail(lambda: _check_coords(c, torch.rand(3, 5)), contains='invalid coord_k=')
test_fail(lambda: _check_coords(c[:2], c), contains='the same N as coord_q (2)')
test_fail(lambda: _check_coords(c, c, 4), contains='N = 4, the batch size of the features')


# %%
#| exports
def _bin_centres(coord:Tensor, H:int, W:int):
    "Centres [N, H*W] (x and y, row-major) and bin diagonals [N, 1] of an H x W grid over each crop."
    bw = (coord[:, 2] - coord[:, 0]) / W  # [N], negative for a flipped view
    bh = (coord[:, 3] - coord[:, 1]) / H  # [N]
    a = torch.arange(W, dtype=coord.dtype, device=coord.device) + 0.5  # [W] column centres in bins
    b = torch.arange(H, dtype=coord.dtype, device=coord.device) + 0.5  # [H] row centres in bins
    cx = coord[:, 0, None, None] + a[None, None, :] * bw[:, None, None]  # [N, 1, W]
    cy = coord[:, 1, None, None] + b[None, :, None] * bh[:, None, None]  # [N, H, 1]
    cx, cy = cx.expand(-1, H, W).reshape(-1, H * W), cy.expand(-1, H, W).reshape(-1, H * W)  # [N, H*W]
    return cx, cy, torch.sqrt(bw**2 + bh**2)[:, None]


# %%
cx, cy, diag = _bin_centres(torch.tensor([[0., 0, 1, 1], [1., 0, 0, 1]]), 2, 2)
test_close(cx, torch.tensor([[.25, .75, .25, .75], [.75, .25, .75, .25]]))  # flipped: column 0 at the right
test_close(cy, torch.tensor([[.25, .25, .75, .75]] * 2))
test_close(diag, torch.full((2, 1), .5 ** .5))


# %% [markdown]
# The exported function computes all $HW \times HW$ distances of a batch at once. It returns the distances (useful
# for figures and for PixContrast's negatives) and the boolean mask.

# %%
#| exports
def positive_mask(coord_q:Tensor,  # [N, 4] crop of the query view, (x_ul, y_ul, x_lr, y_lr) in [0, 1]
                  coord_k:Tensor,  # [N, 4] crop of the key view
                  size:tuple[int, int]=(7, 7),  # (H, W) of the feature map
                  threshold:float=0.7,  # T: positive when closer than T of the larger bin diagonal
                 ) -> tuple[Tensor, Tensor]:  # dist [N, HW, HW] float, mask [N, HW, HW] bool; row-major pixels
    "Distances between all pixel centres of two views in bin diagonals, and the positive pairs `dist < threshold`."
    _check_coords(coord_q, coord_k)
    check_positive('threshold', threshold)
    if len(size) != 2 or any(isinstance(s, bool) or int(s) != s or s < 1 for s in size):
        raise ConfigError('size', size, '(H, W), two positive integers')
    H, W = int(size[0]), int(size[1])
    dtype = torch.promote_types(coord_q.dtype, torch.float32)  # float32, or float64 if given float64
    qx, qy, qd = _bin_centres(coord_q.to(dtype), H, W)  # [N, HW], [N, HW], [N, 1]
    kx, ky, kd = _bin_centres(coord_k.to(dtype), H, W)
    dist = torch.sqrt((qx[:, :, None] - kx[:, None, :])**2 + (qy[:, :, None] - ky[:, None, :])**2)  # [N, HW, HW]
    dist = dist / torch.maximum(qd, kd)[:, :, None]  # the LARGER of the two bin diagonals
    return dist, dist < threshold  # strict <


# %% [markdown]
# Known answers for a 7x7 map and $T = 0.7$, the same as the reference's mask code gives (the lines of its
# `regression_loss` that build `pos_mask`, zdaxie/PixPro at commit e390d6b, `contrast/models/PixPro.py`, lines
# 55-82, run by us on these four pairs of crops as in the script of Table 1 below). Two identical crops
# match only pixel to pixel: the nearest other centre is one bin away, $1/\sqrt2 \approx 0.707$ diagonals, just
# above 0.7. A horizontally flipped twin matches column $a$ with column $6 - a$. A small crop nested in a larger
# one gives 177 pairs over 28 query pixels; disjoint crops give none.

# %%
def _n(cq, ck, **kw):
    "Number of positive pairs and of query pixels with at least one positive, for a single pair of crops."
    _, m = positive_mask(torch.tensor([cq]), torch.tensor([ck]), **kw)
    return int(m.sum()), int(m.any(-1).sum())

_, m = positive_mask(torch.tensor([[0., 0, 1, 1]]), torch.tensor([[0., 0, 1, 1]]))
test_eq(m.shape, (1, 49, 49)); test_eq(m.dtype, torch.bool)
test_eq(m[0], torch.eye(49, dtype=torch.bool))                       # identical -> exactly the diagonal
_, m = positive_mask(torch.tensor([[0., 0, 1, 1]]), torch.tensor([[1., 0, 0, 1]]))
test_eq(int(m.sum()), 49)
for b in range(7):
    for a in range(7): assert m[0, b*7 + a, b*7 + 6 - a], (b, a)     # flipped twin -> column a matches 6 - a
test_eq(_n([.1, .2, .9, .8], [.3, .3, .6, .7]), (177, 28))            # nested crops
test_eq(_n([0, 0, .4, .4], [.6, .6, 1, 1]), (0, 0))                   # disjoint

# %% [markdown]
# The details matter, and each is tested: the threshold is strict (`<`), and the distance is divided by the
# *larger* bin diagonal. With identical crops the neighbours sit at exactly $1/\sqrt2$ diagonals, so a threshold of
# 0.7071 already picks the 4 direct neighbours of every pixel, and with the smaller diagonal the nested case
# would count many fewer pairs. Batches are independent, float64 coordinates stay float64, and the mask of a pair
# swapped (k, q) is the transpose.

# %%
test_eq(_n([0, 0, 1, 1], [0, 0, 1, 1], threshold=0.7072), (49 + 2*(2*7*6), 49))  # + all 4-neighbours
test_eq(_n([.1, .2, .9, .8], [.3, .3, .6, .7], threshold=1e-9), (0, 0))
cq = torch.tensor([[.1, .2, .9, .8], [0, 0, 1, 1]], dtype=torch.float64)
ck = torch.tensor([[.3, .3, .6, .7], [1, 0, 0, 1]], dtype=torch.float64)
d, m = positive_mask(cq, ck)
test_eq(d.dtype, torch.float64)
test_eq(m.sum((1, 2)).tolist(), [177, 49])
d2, m2 = positive_mask(ck, cq)
test_eq(m2, m.transpose(1, 2)); test_close(d2, d.transpose(1, 2))
# a direct per-pixel loop over the formula above
q, k = cq[0], ck[0]
bq, bk = ((q[2]-q[0])/7, (q[3]-q[1])/7), ((k[2]-k[0])/7, (k[3]-k[1])/7)
D = max((bq[0]**2 + bq[1]**2)**.5, (bk[0]**2 + bk[1]**2)**.5)
for i in range(49):
    for j in range(0, 49, 5):
        ci = (q[0] + (i % 7 + .5)*bq[0], q[1] + (i // 7 + .5)*bq[1])
        cj = (k[0] + (j % 7 + .5)*bk[0], k[1] + (j // 7 + .5)*bk[1])
        test_close(float(d[0, i, j]), float(((ci[0]-cj[0])**2 + (ci[1]-cj[1])**2)**.5 / D), eps=1e-12)

# %% [markdown]
# Non-square maps follow the same rule (the crop is split into `size = (H, W)` bins). Distances are measured in
# bin diagonals, so the bins' shape matters: a 0.9 x 0.5 crop split 5 x 9 has square bins and matches itself pixel
# to pixel, while the unit square split 5 x 9 has flat bins (1/9 wide, 1/5 tall) whose left and right neighbours
# are only 0.49 diagonals away. Wrong input is refused by a message that names the argument:

# %%
sq, flat = torch.tensor([[0., 0, .9, .5]]), torch.tensor([[0., 0, 1, 1]])
test_eq(positive_mask(sq, sq, size=(5, 9))[1][0], torch.eye(45, dtype=torch.bool))
test_eq(int(positive_mask(flat, flat, size=(5, 9))[1].sum()), 45 + 2*5*8)
c = torch.rand(3, 4)
test_fail(lambda: positive_mask(torch.rand(3, 5), c), contains='coord_q')
test_fail(lambda: positive_mask(c, torch.rand(3)), contains='coord_k')
test_fail(lambda: positive_mask(c, torch.rand(2, 4)), contains='coord_k')
test_fail(lambda: positive_mask(c, c, threshold=0), contains='threshold=0')
test_fail(lambda: positive_mask(c, c, threshold=-0.5), contains='threshold')
test_fail(lambda: positive_mask(c, c, size=(7,)), contains='size')
try: positive_mask(c, c, threshold=0)
except ValueError: pass
else: raise AssertionError('a bad threshold must raise ValueError')

# %% [markdown]
# ## A picture of the pairs
#
# Figure 1 draws two crops of one image: a query crop (blue) and a horizontally flipped key crop (orange), each with
# its 7x7 bins, and a grey line for every positive pair. Only the overlap of the crops has pairs, and because the
# key crop is larger (bigger bins) each query pixel can match several key pixels: the relation is many-to-many.
# Figure 2 shows the 49x49 masks of the three known cases as images (row: query pixel, column: key pixel).

# %%
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle


# %%
def _draw_crop(ax, c, colour, H=7, W=7):
    "Draw crop `c` (x_ul, y_ul, x_lr, y_lr) with its bin grid and centres; return the centres."
    x0, y0, x1, y1 = c.tolist()
    ax.add_patch(Rectangle((min(x0, x1), y0), abs(x1 - x0), y1 - y0, fill=False, ec=colour, lw=2))
    for t in range(1, W): ax.plot([x0 + t*(x1-x0)/W]*2, [y0, y1], c=colour, lw=.4, alpha=.6)
    for t in range(1, H): ax.plot([x0, x1], [y0 + t*(y1-y0)/H]*2, c=colour, lw=.4, alpha=.6)
    cx, cy, _ = _bin_centres(c[None], H, W)
    ax.scatter(cx[0], cy[0], s=6, c=colour, zorder=3)
    return cx[0], cy[0]

cq, ck = torch.tensor([.05, .08, .62, .70]), torch.tensor([.92, .25, .30, .95])  # key is flipped: x_ul > x_lr
_, m = positive_mask(cq[None], ck[None])
fig, ax = plt.subplots(figsize=(5.2, 5.2), dpi=80)
qx, qy = _draw_crop(ax, cq, 'tab:blue'); kx, ky = _draw_crop(ax, ck, 'tab:orange')
for i, j in m[0].nonzero().tolist(): ax.plot([qx[i], kx[j]], [qy[i], ky[j]], c='.3', lw=.6)
ax.set(xlim=(0, 1), ylim=(1, 0), aspect='equal', xlabel='x (normalised)', ylabel='y (normalised)',
       title=f'Figure 1: {int(m.sum())} positive pairs over {int(m.any(-1).sum())} query pixels')
ax.text(.06, .06, 'query (blue)', color='tab:blue'); ax.text(.62, .97, 'key, flipped (orange)', color='tab:orange');

# %%
cases = {'identical': ([0., 0, 1, 1], [0., 0, 1, 1]), 'flipped twin': ([0., 0, 1, 1], [1., 0, 0, 1]),
         'nested': ([.1, .2, .9, .8], [.3, .3, .6, .7])}
fig, axs = plt.subplots(1, 3, figsize=(10, 3.6), dpi=80)
for ax, (name, (a, b)) in zip(axs, cases.items()):
    _, m = positive_mask(torch.tensor([a]), torch.tensor([b]))
    ax.imshow(m[0], cmap='Greys', interpolation='nearest')
    ax.set(title=f'{name}: {int(m.sum())} pairs', xlabel='key pixel j', ylabel='query pixel i')
fig.suptitle('Figure 2: the 49x49 positive masks of the known cases'); fig.tight_layout()


# %% [markdown]
# **Why the threshold is relative to the bin diagonal.** A crop covers anything from 8 % to 100 % of the image, so a
# fixed distance in image units would mean "the same pixel" for a large crop and "three pixels away" for a small
# one. Measured in bins, $T$ asks the same question at every scale: *is the other centre within 0.7 of a feature
# pixel's extent?* Using the larger of the two diagonals lets a coarse view's pixel match the several fine pixels of
# the other view that fall inside it (Figure 1). And 0.7 is just below $1/\sqrt2 \approx 0.7071$, the distance to
# the nearest neighbour when the two grids coincide: for identical crops 0.7 means **only the exact match**, a
# diagonal in Figure 2. A threshold of 0.71 would add the four direct neighbours of every pixel (tested above), so
# the number is not arbitrary and a round "0.7 or so" is not good enough. The reference's `regression_loss` has
# `pos_ratio=0.5` as its default argument (`contrast/models/PixPro.py`, line 44); its command line
# (`--pixpro-pos-ratio`, `contrast/option.py`) and its released scripts (`tools/pixpro_base_r50_100ep.sh`, line 36)
# pass 0.7, and so does this book.
#
# > **Ours.** The mask is computed in float32 (or float64 when the coordinates are float64) even when the model runs
# > under bf16/fp16 autocast. bf16 keeps 8 bits of mantissa: 0.7 becomes 0.6992 and 0.7071 becomes 0.7070, two
# > units of the last place apart, and the rounding of the centres and the division moves pairs across the
# > threshold. The cell below computes the same masks in bf16 for 500 random pairs of crops: a few percent of the
# > pairs change, and almost every image pair has at least one changed entry.

# %%
def _mask_in(dtype, cq, ck, H=7, W=7, T=0.7):
    "The mask computed entirely in `dtype` (what autocast would do), for the demonstration only."
    qx, qy, qd = _bin_centres(cq.to(dtype), H, W); kx, ky, kd = _bin_centres(ck.to(dtype), H, W)
    d = torch.sqrt((qx[:, :, None] - kx[:, None, :])**2 + (qy[:, :, None] - ky[:, None, :])**2)
    return d / torch.maximum(qd, kd)[:, :, None] < T

g = torch.Generator().manual_seed(0)
xy, wh = torch.rand(500, 2, generator=g) * .5, torch.rand(500, 2, generator=g) * .5 + .2
cq = torch.cat([xy, xy + wh], 1)
xy2 = xy + torch.rand(500, 2, generator=g) * .2 - .1
ck = torch.cat([xy2, xy2 + wh * (.7 + .6 * torch.rand(500, 2, generator=g))], 1)
m32, m16 = _mask_in(torch.float32, cq, ck), _mask_in(torch.bfloat16, cq, ck)
test_eq(m32, positive_mask(cq, ck)[1])
changed = (m32 != m16)
print(f'bf16 changes {float(changed.sum() / m32.sum()):.1%} of the positive pairs; '
      f'{float(changed.flatten(1).any(1).float().mean()):.0%} of the image pairs have a changed entry')
assert changed.any()

# %% [markdown]
# ## Positive pairs of two real views
#
# The augmentation chapter draws the views; each view's `ViewParams` knows its coordinates. Figure 3 takes two real
# views of a photograph from `PixProAugment`, one of them flipped, draws the 7x7 feature-bin centres of both and a
# line for every positive pair. The lines cross because one view is mirrored: its column 0 shows the right edge of its
# crop (for the flipped twin above, column $a$ meets column $6-a$ exactly).

# %%
import dataclasses
from matplotlib import cbook
from matplotlib.patches import ConnectionPatch
from PIL import Image
import numpy as np
from pixpro_rs.augment import IMAGENET_MEAN, IMAGENET_STD, PixProAugment, apply_view

# %%
photo = Image.open(cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)).convert('RGB')  # 512x600
x_photo = torch.from_numpy(np.array(photo)).permute(2, 0, 1).contiguous()  # [3, 600, 512] uint8
aug = PixProAugment()
def show(v): return (v * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).clamp(0, 1).permute(1, 2, 0)
def bin_centres(size=224, n=7): return (torch.arange(n) + 0.5) * size / n  # in view pixels

g = torch.Generator().manual_seed(26)
while True:  # a pair with a flip in one view and a few dozen positives, to make the picture readable
    p1, p2 = aug.draw(*x_photo.shape[1:], g)
    _, m = positive_mask(p1.coord[None], p2.coord[None])
    if p1.flip != p2.flip and 15 <= m.sum() <= 80: break
fig, axs = plt.subplots(1, 3, figsize=(13, 4.6), gridspec_kw=dict(width_ratios=[512 / 600, 1, 1]))
axs[0].imshow(photo)
for p, col in ((p1, 'tab:orange'), (p2, 'tab:cyan')):
    axs[0].add_patch(Rectangle((p.left, p.top), p.width, p.height, fill=False, color=col, lw=2))
c = bin_centres(); yy, xx = torch.meshgrid(c, c, indexing='ij')
for ax, p, col, name in ((axs[1], p1, 'tab:orange', 'view 1'), (axs[2], p2, 'tab:cyan', 'view 2')):
    ax.imshow(show(apply_view(x_photo, p))); ax.scatter(xx.flatten(), yy.flatten(), s=8, c=col)
    ax.set_title(f"{name}{' (flipped)' if p.flip else ''}", fontsize=9)
for i, j in m[0].nonzero().tolist():
    con = ConnectionPatch(xyA=(xx.flatten()[i], yy.flatten()[i]), coordsA=axs[1].transData,
                          xyB=(xx.flatten()[j], yy.flatten()[j]), coordsB=axs[2].transData, color='w', lw=0.5, alpha=0.7)
    fig.add_artist(con)
for ax in axs: ax.set_axis_off()
axs[0].set_title('the two crops in the original', fontsize=9)
fig.suptitle(f'Figure 3: {int(m.sum())} positive pairs of two real views (7x7 bins, T = 0.7); coordinates '
             f'{p1.coord.numpy().round(2)} and {p2.coord.numpy().round(2)}', fontsize=10)
plt.tight_layout(); plt.show()

# %% [markdown]
# A real crop and its mirror twin (the same crop, flipped) show the same places column for column, mirrored: every
# feature pixel's mirror image sits at distance 0, whatever the crop's shape in the unit square.

# %%
p = aug.draw(*x_photo.shape[1:], torch.Generator().manual_seed(0))[0]
dist, _ = positive_mask(p.coord[None], dataclasses.replace(p, flip=not p.flip).coord[None])
mirror = torch.tensor([b * 7 + 6 - a for b in range(7) for a in range(7)])
test_close(dist[0, torch.arange(49), mirror], torch.zeros(49), eps=1e-5)


# %% [markdown]
# ## How many pairs in practice
#
# Coordinates alone decide the positives, so their distribution under the augmentation costs no pixels: `draw` gives
# the `ViewParams` of a pair and `positive_mask` counts. Most pairs of views share a good part of the image, but not
# all. Table 1 holds the reference's figures for crops of a 500x375 image, produced by the reference's own code: the
# crops and flips of its `RandomResizedCropCoord` and `RandomHorizontalFlipCoord` (`contrast/data/transform_coord.py`)
# and the mask of its `regression_loss` (`contrast/models/PixPro.py`, lines 44-82).
#
# | crops of a 500x375 image, 7x7 map, T = 0.7 | pairs without a positive | positive pairs per pair: mean | median | query pixels with a positive (of 49) |
# |---|---|---|---|---|
# | reference code, 40,000 pairs (seed 0) | 2.5 % | 115.1 | 128 | 34.2 |
# | reference code, 4000 pairs (seeds 0, 1, 2, 3) | 2.1, 2.8, 2.4, 2.6 % | 116.3, 114.7, 114.8, 113.7 | 128, 128, 128, 127 | 34.8, 34.1, 34.3, 34.1 |
#
# *Table 1: positive pixel pairs under the reference's crop-and-flip distribution. Measured by us, in a clone of
# zdaxie/PixPro at commit e390d6b, with the script below (`n, seed = 40000, 0` for the first row, 4000 and 0-3 for
# the second; 80 s and 8 s on one CPU core).*
#
# ```python
# import importlib.util, random, torch
# from PIL import Image
# sp = importlib.util.spec_from_file_location('tc', 'contrast/data/transform_coord.py')
# tc = importlib.util.module_from_spec(sp); sp.loader.exec_module(tc)
# lines = open('contrast/models/PixPro.py').read().splitlines()
# exec('\n'.join(lines[43:82] + ['    return pos_mask']))  # regression_loss, lines 44-82, returning its mask
# n, seed = 40000, 0
# random.seed(seed); img = Image.new('RGB', (500, 375))
# crop, flip = tc.RandomResizedCropCoord(224), tc.RandomHorizontalFlipCoord()
# c = torch.stack([flip(*crop(img))[1] for _ in range(2 * n)])  # [2n, 4]: view 1 of every pair, then view 2
# m = regression_loss(*[torch.zeros(n, 1, 7, 7)] * 2, c[:n], c[n:], 0.7)  # [n, 49, 49]
# k = m.sum((1, 2))
# print(f'{(k == 0).float().mean():.1%} none, mean {k.mean():.1f}, median {k.median():.0f}, '
#       f'{m.amax(2).sum(1).mean():.1f} of 49 query pixels')
# ```
#
# The cell below draws 4000 pairs with this book's `PixProAugment().draw`, the sampler training uses, and compares.
# Figure 4 is the histogram.

# %%
def positives_stats(aug, img_h=375, img_w=500, n=4000, seed=0):
    "Positive pairs per pair of views and query pixels with a positive, for `n` pairs drawn by `aug`."
    g = torch.Generator().manual_seed(seed)
    ps = [aug.draw(img_h, img_w, g) for _ in range(n)]
    c1, c2 = torch.stack([a.coord for a, _ in ps]), torch.stack([b.coord for _, b in ps])  # [n, 4]
    _, m = positive_mask(c1, c2)  # [n, 49, 49]
    return m.sum((1, 2)).float(), m.any(2).sum(1).float()  # [n], [n]

pairs, queries = positives_stats(PixProAugment())
none = float((pairs == 0).float().mean())
print(f'ours, 4000 pairs:   {none:.1%} without a positive, mean {float(pairs.mean()):.1f}, '
      f'median {float(pairs.median()):.0f}, {float(queries.mean()):.1f} of 49 query pixels with a positive')
print(f'reference, 40,000:  2.5% without a positive, mean 115.1, median 128, 34.2 of 49 query pixels with a positive')
assert .01 < none < .04 and abs(float(pairs.mean()) - 115.1) < 4 and abs(float(pairs.median()) - 128) < 5
assert abs(float(queries.mean()) - 34.2) < 1
fig, ax = plt.subplots(figsize=(7, 3.2), dpi=80)
ax.hist(pairs.numpy(), bins=60, color='tab:blue')
ax.axvline(float(pairs.mean()), color='k', ls='--', label=f'mean {float(pairs.mean()):.0f} (reference 115)')
ax.axvline(float(pairs.median()), color='tab:red', ls=':', label=f'median {float(pairs.median()):.0f} (reference 128)')
ax.set(xlabel='positive pixel pairs per pair of views (of 2401)', ylabel='pairs of views',
       title=f'Figure 4: positives of 4000 pairs of views of a 500x375 image; {none:.1%} have none (reference 2.5 %)')
ax.legend(); plt.tight_layout(); plt.show()


# %% [markdown]
# > **Ours.** The figures agree with the reference's within Monte-Carlo noise: for 4000 pairs the standard error is
# > about 0.25 % on the share without positives and about 0.7 pairs on the mean, and four seeds of the reference
# > itself spread over 2.1-2.8 % and 113.7-116.3 (Table 1). That checks the crop sampler, the flip convention and the
# > coordinate convention of the augmentation chapter together with the mask of this one: getting any one of them
# > wrong (pixel-space instead of normalised coordinates, crop edges instead of pixel centres, a flip that does not
# > swap the x entries) moves these figures visibly.

# %% [markdown]
# ## The PixPro loss
#
# PixPro pulls each query pixel's prediction $y_i$ (online branch, after the pixel propagation module, L2-normalised)
# towards the momentum features $x'_j$ (target branch, L2-normalised) of every positive key pixel. For one direction
# and a batch of $N$ image pairs,
#
# $$\mathcal{L}_{q \to k} = -\frac{2}{N} \sum_{n=1}^{N}
#   \frac{\sum_{i,j} \cos(y_i, x'_j)\, [d_{ij} < T]}{\sum_{i,j} [d_{ij} < T] + 10^{-6}},$$
#
# the mean cosine over the image's positive pairs, averaged over the images, times $-2$. The full loss is
# symmetric: $\mathcal{L} = \mathcal{L}_{1 \to 2} + \mathcal{L}_{2 \to 1}$ (the model chapter does that).
# An image pair without any positive pair (disjoint crops, about 2.5 % of pairs under the reference augmentation,
# Table 1) contributes 0 to the sum **and still counts in $N$**; the $10^{-6}$ keeps its 0/0 at 0. Both are the
# reference's behaviour (`regression_loss`, `contrast/models/PixPro.py`, lines 87-89), and both are kept.

# %%
#| exports
def _check_features(q:Tensor, k:Tensor, coord_q:Tensor, coord_k:Tensor):
    "Raise `ConfigError` unless q and k are [N, C, H, W] of one shape and the coordinates are [N, 4]."
    for name, t in (('q', q), ('k', k)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            raise ConfigError(name, getattr(t, 'shape', t), 'a tensor of shape [N, C, H, W]')
    if k.shape != q.shape: raise ConfigError('k', k.shape, f'the shape of q, {tuple(q.shape)}')
    _check_coords(coord_q, coord_k, q.shape[0])


# %%
fm, cc = torch.zeros(2, 8, 7, 7), torch.rand(2, 4)
_check_features(fm, fm, cc, cc)  # valid: no error
test_fail(lambda: _check_features(fm[0], fm[0], cc, cc), contains='invalid q=')
test_fail(lambda: _check_features(fm, fm[:, :4], cc, cc), contains='the shape of q, (2, 8, 7, 7)')
test_fail(lambda: _check_features(fm, fm, cc[:1], cc[:1]), contains='N = 2, the batch size of the features')


# %%
#| exports
def _float(*ts:Tensor):
    "Cast to float32 (float64 stays float64)."
    dt = torch.promote_types(ts[0].dtype, torch.float32)
    return [t.to(dt) for t in ts]


# %%
test_eq([t.dtype for t in _float(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float16))], [torch.float32] * 2)
test_eq([t.dtype for t in _float(torch.zeros(2, dtype=torch.float64), torch.zeros(2))], [torch.float64] * 2)  # the first decides


# %%
#| exports
def pixpro_loss(q:Tensor,  # [N, C, H, W] online predictions y, L2-normalised along C
                k:Tensor,  # [N, C, H, W] target features x', L2-normalised along C
                coord_q:Tensor,  # [N, 4] crop of the view q comes from
                coord_k:Tensor,  # [N, 4] crop of the view k comes from
                threshold:float=0.7,  # T of `positive_mask`
               ) -> Tensor:  # scalar in [-2, 2]; -2 is perfect agreement
    "One direction of the PixPro loss: -2 x the mean over images of the mean cosine over positive pairs."
    _check_features(q, k, coord_q, coord_k)
    N, C, H, W = q.shape
    with torch.autocast(q.device.type, enabled=False):  # mask and loss in float32 even under bf16 autocast
        q, k = _float(q, k)
        _, pos = positive_mask(coord_q.to(q.dtype), coord_k.to(q.dtype), (H, W), threshold)  # [N, HW, HW]
        cos = torch.bmm(q.flatten(2).transpose(1, 2), k.flatten(2))  # [N, HW, C] @ [N, C, HW] -> [N, HW, HW]
        pos = pos.to(cos.dtype)
        per_image = (cos * pos).sum((1, 2)) / (pos.sum((1, 2)) + 1e-6)  # [N]
        return -2 * per_image.mean()


# %% [markdown]
# The test compares the function, in float64, with the formula written out as loops over images and pixel pairs,
# on a batch that mixes a nested pair, a flipped pair and a disjoint pair.

# %%
def _unit(*shape, dtype=torch.float64): return F.normalize(torch.randn(*shape, dtype=dtype), dim=1)

torch.manual_seed(0)
cq = torch.tensor([[.1, .2, .9, .8], [0, 0, 1, 1], [0, 0, .4, .4]], dtype=torch.float64)
ck = torch.tensor([[.3, .3, .6, .7], [1, 0, 0, 1], [.6, .6, 1, 1]], dtype=torch.float64)
q, k = _unit(3, 16, 7, 7), _unit(3, 16, 7, 7)
_, m = positive_mask(cq, ck)
total = 0.
for n in range(3):
    s, c = 0., 0
    for i in range(49):
        for j in range(49):
            if m[n, i, j]: s += float(q[n, :, i // 7, i % 7] @ k[n, :, j // 7, j % 7]); c += 1
    total += s / (c + 1e-6)
loss = pixpro_loss(q, k, cq, ck)
test_eq(loss.dtype, torch.float64)
test_close(float(loss), -2 * total / 3, eps=1e-12)

# %% [markdown]
# The known answers of the loss: disjoint crops give exactly 0; identical crops with identical features give
# $-2$ per direction (so $-4$ in total), opposite features $+2$; random high-dimensional features give about 0.
# Wrong shapes are refused by name.

# %%
c0, c1 = torch.tensor([[0., 0, .4, .4]]), torch.tensor([[.6, .6, 1, 1]])
x = _unit(1, 32, 7, 7, dtype=torch.float32)
test_eq(float(pixpro_loss(x, x, c0, c1)), 0.)
full = torch.tensor([[0., 0, 1, 1]])
test_close(float(pixpro_loss(x, x, full, full)), -2., eps=1e-6)
test_close(float(pixpro_loss(x, -x, full, full)), 2., eps=1e-6)
assert abs(float(pixpro_loss(_unit(8, 4096, 7, 7), _unit(8, 4096, 7, 7), full.expand(8, 4), full.expand(8, 4)))) < .02
# an image without positives still counts in the mean: (pair with loss -2) + (disjoint pair) -> -1
test_close(float(pixpro_loss(torch.cat([x, x]), torch.cat([x, x]), torch.cat([full, c0]), torch.cat([full, c1]))), -1., eps=1e-6)
test_fail(lambda: pixpro_loss(x[0], x[0], full, full), contains='invalid q=')
test_fail(lambda: pixpro_loss(x, x[:, :16], full, full), contains='invalid k=')
test_fail(lambda: pixpro_loss(x, x, full.expand(2, 4), full.expand(2, 4)), contains='coord_q')
test_fail(lambda: pixpro_loss(x, x, full, full, threshold=0.), contains='threshold')

# %% [markdown]
# **Why the loss is negative, and what to expect.** The loss is $-2\times$ a mean cosine, so one direction lives in
# $[-2, 2]$ and the symmetric total in $[-4, 4]$; $-4$ means every positive pair agrees perfectly. Negative values are
# the normal, good case: a question users of the reference asked more than once. (BYOL writes the same thing as
# $2 - 2\cos$, which is $\ge 0$; PixPro drops the constant.) A user of the reference who trained its 100-epoch
# recipe on their own data set reports about $+0.1$ at the first iteration, about $-3$ within the first epoch and
# about $-2.2$ at epoch 100 (zdaxie/PixPro issue #6, "Loss Curve"; issue #9 is the question about negative values):
# the curve falls fast, then *rises* slowly. That rise is not divergence: the target network (momentum encoder)
# keeps improving, and agreeing with a better target is harder. The loss value is not a measure of representation
# quality; transfer results are. (These numbers are a user's report, not our measurements.)
#
# Under autocast the loss is computed in float32 whatever the dtype of the features:

# %%
with torch.autocast('cpu', dtype=torch.bfloat16):
    l = pixpro_loss(x.bfloat16(), x.bfloat16(), full, full)
test_eq(l.dtype, torch.float32)
test_close(float(l), -2., eps=1e-2)


# %% [markdown]
# ## PixContrast
#
# The first pretext task of the PixPro paper (Xie et al., arXiv 2011.10043) is contrastive: for pixel $i$ of view 1,
# the positive key pixels $P_i$ of view 2 (the same $d_{ij} < T$) should be more similar than the negatives $N_i$ (all
# others, $d_{ij} \ge T$), with a temperature $\tau = 0.3$:
#
# $$\mathcal{L}_i = -\log \frac{\sum_{j \in P_i} e^{\cos(x_i, x'_j)/\tau}}{\sum_{k \in P_i \cup N_i} e^{\cos(x_i, x'_k)/\tau}}.$$
#
# The reference code does not include PixContrast, so the averaging is ours, chosen to mirror the PixPro loss: the
# mean over the query pixels that have a positive, then the mean over images, where an image pair without any
# positive contributes 0 and still counts. Like `pixpro_loss` the function is one direction; the model sums
# $1 \to 2$ and $2 \to 1$. The negatives are only the other pixels of the *same* image pair, as in the paper's
# description (no memory bank).

# %%
#| exports
def pixcontrast_loss(q:Tensor,  # [N, C, H, W] online features x, L2-normalised along C
                     k:Tensor,  # [N, C, H, W] target features x', L2-normalised along C
                     coord_q:Tensor,  # [N, 4] crop of the view q comes from
                     coord_k:Tensor,  # [N, 4] crop of the view k comes from
                     threshold:float=0.7,  # T: positives closer than T bin diagonals, the rest are negatives
                     tau:float=0.3,  # temperature of the softmax
                    ) -> Tensor:  # scalar >= 0
    "One direction of PixContrast: InfoNCE with all positive pixels in the numerator, averaged as in `pixpro_loss`."
    _check_features(q, k, coord_q, coord_k)
    check_positive('tau', tau)
    N, C, H, W = q.shape
    with torch.autocast(q.device.type, enabled=False):
        q, k = _float(q, k)
        _, pos = positive_mask(coord_q.to(q.dtype), coord_k.to(q.dtype), (H, W), threshold)  # [N, HW, HW]
        logits = torch.bmm(q.flatten(2).transpose(1, 2), k.flatten(2)) / tau  # [N, HW, HW]
        has_pos = pos.any(-1)  # [N, HW]
        # rows without a positive use all logits, so their term is exactly 0 (and its gradient finite)
        num = torch.where(has_pos[..., None], logits.masked_fill(~pos, float('-inf')), logits)
        per_pixel = (logits.logsumexp(-1) - num.logsumexp(-1)) * has_pos  # [N, HW]
        per_image = per_pixel.sum(-1) / has_pos.sum(-1).clamp(min=1)  # [N]
        return per_image.mean()


# %% [markdown]
# Tests: with identical crops every pixel has exactly one positive (the diagonal), so PixContrast is the ordinary
# cross-entropy of each row against its own index; the float64 value equals the formula written as loops; disjoint
# crops give exactly 0 with finite gradients.

# %%
torch.manual_seed(1)
q, k = _unit(1, 16, 7, 7), _unit(1, 16, 7, 7)
logits = (q.flatten(2)[0].T @ k.flatten(2)[0]) / .3
test_close(float(pixcontrast_loss(q, k, full, full)), float(F.cross_entropy(logits, torch.arange(49))), eps=1e-10)
q, k = _unit(3, 16, 7, 7), _unit(3, 16, 7, 7)
_, m = positive_mask(cq, ck)
total = 0.
for n in range(3):
    terms = []
    for i in range(49):
        if not m[n, i].any(): continue
        e = [torch.exp(q[n, :, i // 7, i % 7] @ k[n, :, j // 7, j % 7] / .3) for j in range(49)]
        terms.append(-torch.log(sum(e[j] for j in range(49) if m[n, i, j]) / sum(e)))
    total += float(sum(terms) / len(terms)) if terms else 0.
test_close(float(pixcontrast_loss(q, k, cq, ck)), total / 3, eps=1e-10)
qq = _unit(1, 16, 7, 7).requires_grad_()
l = pixcontrast_loss(qq, k[:1], c0.double(), c1.double())
l.backward()
test_eq(float(l.detach()), 0.); assert torch.isfinite(qq.grad).all()
test_fail(lambda: pixcontrast_loss(q, k, cq, ck, tau=0), contains='tau')

# %% [markdown]
# ## Summary
#
# - `positive_mask(coord_q, coord_k, size, threshold)` matches pixel centres of two crops, in units of the larger bin
#   diagonal, with a strict `< 0.7`: identical crops give exactly the 49 diagonal pairs, a flipped twin column
#   $a \leftrightarrow 6-a$, the nested case 177 pairs over 28 query pixels, disjoint crops none.
# - `pixpro_loss` is $-2\times$ the mean cosine over positive pairs, averaged over images (images without positives
#   count as 0); one direction is in $[-2, 2]$, the symmetric total in $[-4, 4]$, and negative is good.
# - `pixcontrast_loss` is the contrastive alternative with $\tau = 0.3$.
# - Masks and losses are computed in float32 (float64 if given) even under autocast.
# - Under the augmentation of the previous chapters, about 2.5 % of pairs of views have no positive pair and a pair has
#   about 115 on average (Table 1): the same as the reference's code gives, which checks crops, flips, coordinates and
#   mask together.
#
# ## Exercises
#
# 1. Draw the 4000 pairs with `PixProAugment(scale=(0.2, 1.0))` (the `--crop` default of the reference's
#    `contrast/option.py`, not the 0.08 of its released script) and recompute the statistics of Table 1 and Figure 4.
#    What happens to the share of pairs without positives, and why?
# 2. Compute the positives of the same pairs in pixel space instead of the stretched unit square: multiply the x
#    entries of the coordinates by 499 and the y entries by 374 before `positive_mask`. How many pairs change, and
#    which pairs of views change most?
# 3. Plot the mean number of positive pairs against the threshold $T$ from 0.3 to 1.0 for the same pairs. Where does the
#    curve jump for identical crops, and where for the real pairs?
# 4. At 160 px a ResNet's C5 map is 5x5: count with `positive_mask(..., size=(5, 5))`. Does the share of pairs without
#    positives change? How does the mean number of pairs compare with $(25/49)^2$ of the 7x7 figure?
