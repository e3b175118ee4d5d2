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
# The reference implementation's known answers (spec section 2), for a 7x7 map and $T = 0.7$. Two identical crops
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
# a direct per-pixel loop over the spec's formula
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
