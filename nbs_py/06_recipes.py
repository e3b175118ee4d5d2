# %% [markdown]
# # Recipes
#
# > LARS exactly as the PixPro reference applies it (vectorised), the warm-up + cosine learning rate, the linear scaling rule, and the named recipes (PixPro pretraining and ResNet-RS supervised, one registry) of the papers and of our CPU demos, each value with its source.

# %%
#| default_exp recipes

# %%
#| export
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn, Tensor

from pixpro_rs.core import ConfigError, check_choice, check_positive, check_range
from pixpro_rs.pixpro import METHODS

# %%
#| hide
import io

import matplotlib.pyplot as plt
from fastcore.test import test_close, test_eq, test_fail
import warnings
from pixpro_rs.core import GLOSSARY
from pixpro_rs.pixpro import momentum_at
from nbdev.showdoc import show_doc


# %% [markdown]
# A pretraining method is only half of a result; the other half is the recipe: optimiser, learning-rate schedule,
# batch size, epochs. PixPro's numbers (VOC AP 58.8 after 100 epochs, 60.2 after 400) were obtained with LARS at a
# global batch of 1024, a learning rate of 4.0 and a 5-epoch warm-up; change one of these quietly and the comparison
# with the paper is gone. This chapter writes the recipe down as code and data:
#
# 1. `LARS`, the optimiser, with the reference's exact semantics and a test that the fast (vectorised) version equals
#    a plain per-parameter transcription of them;
# 2. `lr_at`, the learning rate of every iteration, and `scaled_lr`, the linear scaling rule;
# 3. named recipes (`get_recipe('pixpro_r50_100ep')`), frozen dataclasses whose fields use the glossary's names and
#    which say where each value comes from, and which values are *ours*.
#
# The reference here is the PixPro code, zdaxie/PixPro at commit e390d6b: `contrast/lars.py` (`add_weight_decay`,
# lines 7-31; `LARS.apply_adaptive_lrs` and `LARS.step`, lines 109-152), `contrast/lr_scheduler.py`
# (`GradualWarmupScheduler`, lines 6-62; `get_scheduler`, lines 65-85), `main_pretrain.py` (the LARS branch of
# `build_model`, lines 39-45, with the linear scaling rule on line 43) and the released scripts
# `tools/pixpro_base_r50_{100,400}ep.sh` (8 processes, `--nproc_per_node=8`, line 9; `--batch-size 128`, line 18;
# `--optimizer lars --base-lr 1.0 --weight-decay 1e-5 --warmup-epoch 5`, lines 24-27).

# %% [markdown]
# ## LARS, the reference's semantics
#
# LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks") gives every layer its own
# step size: the update of a weight tensor $w$ is rescaled so that its norm is a fixed fraction $\eta$ (the *trust
# coefficient*, 0.001) of $\lVert w\rVert$. Large layers and small layers then move at the same relative speed,
# which is what lets the learning rate grow with the batch to 1024 and beyond.
#
# The PixPro reference wraps `torch.optim.SGD(momentum=0.9)` in a LARS object that rewrites each gradient before
# SGD sees it. For a parameter with weight decay $\lambda$, trust coefficient $\eta$, $\epsilon = 10^{-8}$,
# momentum $\mu$ and learning rate $\text{lr}$:
#
# $$\tilde g = g + \lambda w, \qquad
# \hat g = \begin{cases} \eta\,\dfrac{\lVert w\rVert}{\lVert \tilde g\rVert + \epsilon}\;\tilde g
#   & \text{if } \lVert w\rVert > 0 \text{ and } \lVert \tilde g\rVert > 0\\[4pt]
#   \tilde g & \text{otherwise,}\end{cases}$$
#
# $$b \leftarrow \begin{cases}\hat g & \text{first step}\\ \mu\, b + \hat g & \text{later}\end{cases}, \qquad
# w \leftarrow w - \text{lr}\cdot b .$$
#
# Three details decide whether an implementation reproduces the paper:
#
# - the weight decay is added **before** the trust ratio, so $\lVert\tilde g\rVert$ includes it (other LARS versions
#   put $\lambda\lVert w\rVert$ in the denominator instead, a different optimiser);
# - the trust ratio multiplies the gradient, and the *same* global lr (4.0) then applies to every group;
# - 1-D parameters (BatchNorm weights and biases, all biases) get neither weight decay nor the trust ratio: plain
#   SGD with momentum at the full lr of 4.0.
#
# We keep the per-group switches as group options: `weight_decay` and `lars` (trust ratio on or off). The first
# implementation is the plain transcription, one parameter at a time; it is the *specification* the fast version is
# tested against.

# %%
#| exports
def _lars_reference_update(p:Tensor,  # a parameter with `.grad`
                           state:dict,  # its optimiser state (holds 'momentum_buffer')
                           group:dict,  # its param group: lr, momentum, weight_decay, trust_coefficient, eps, lars
                          ):
    "One LARS step for one parameter, written as the reference does it (per parameter, no vectorisation)."
    g = p.grad
    if group['weight_decay'] != 0: g = g.add(p, alpha=group['weight_decay'])  # g + wd * w
    if group['lars']:
        w_norm, g_norm = torch.norm(p), torch.norm(g)
        if w_norm > 0 and g_norm > 0: g = g.mul(group['trust_coefficient'] * w_norm / (g_norm + group['eps']))
    if group['momentum'] != 0:
        buf = state.get('momentum_buffer')
        if buf is None: buf = state['momentum_buffer'] = torch.clone(g).detach()  # first step: buf = g
        else: buf.mul_(group['momentum']).add_(g)
        g = buf
    p.add_(g, alpha=-group['lr'])


# %%
sgd = dict(lr=2.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8, lars=False)
b_ref, st_ref = torch.tensor([1., -1.], dtype=torch.float64), {}
for expected in ([0., -2.], [-1.9, -3.9]):  # plain SGD with momentum (the bias of the hand-computed example below)
    b_ref.grad = torch.tensor([0.5, 0.5], dtype=torch.float64); _lars_reference_update(b_ref, st_ref, sgd)
    test_close(b_ref, torch.tensor(expected, dtype=torch.float64), eps=1e-15)
test_close(st_ref['momentum_buffer'], torch.tensor([0.95, 0.95], dtype=torch.float64), eps=1e-15)
w_ref = torch.tensor([3., 4.], dtype=torch.float64); w_ref.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
_lars_reference_update(w_ref, {}, {**sgd, 'weight_decay': 0.1, 'lars': True})  # trust ratio 0.001 * 5 / (1 + eps)
test_close(w_ref, torch.tensor([3 - 0.006/(1 + 1e-8), 4 - 0.008/(1 + 1e-8)], dtype=torch.float64), eps=1e-15)


# %% [markdown]
# The fast version does the same arithmetic on *lists* of tensors with PyTorch's `torch._foreach_*` kernels: one
# call adds the weight decay to all gradients, one computes all weight norms (`_foreach_norm`), one all gradient
# norms, the trust ratios are a single tensor expression over the stacked norms, and three calls update the momentum
# buffers and the weights. On a GPU this replaces a few thousand tiny kernel launches per step (ResNet-RS-420 has
# over a thousand parameter tensors) with a few dozen, and no norm is copied back to the CPU (the reference's
# `if param_norm > 0` forces a device synchronisation per parameter; `torch.where` does not).
#
# Tensors are grouped by device and dtype first (a foreach call wants one of each); the only Python loops left
# collect the tensors and, on the very first step, clone the gradients into new momentum buffers.

# %%
#| exports
def _by_device_dtype(params:list[Tensor]) -> list[list[Tensor]]:
    "Split `params` into lists sharing device and dtype, keeping their order."
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params: buckets.setdefault((p.device, p.dtype), []).append(p)
    return list(buckets.values())


# %%
t32, t64, t32b = torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.ones(3)
test_eq([[id(t) for t in b] for b in _by_device_dtype([t32, t64, t32b])], [[id(t32), id(t32b)], [id(t64)]])


# %%
#| exports
def _lars_foreach_update(params:list[Tensor],  # parameters of one group, one device and dtype, all with `.grad`
                         state:dict,  # the optimiser's state (per parameter dicts)
                         group:dict,  # the param group: lr, momentum, weight_decay, trust_coefficient, eps, lars
                        ):
    "The same step as `_lars_reference_update` for a list of parameters, with `torch._foreach_*` kernels."
    grads = [p.grad for p in params]
    if group['weight_decay'] != 0: grads = torch._foreach_add(grads, params, alpha=group['weight_decay'])
    if group['lars']:
        w_norm = torch.stack(torch._foreach_norm(params))  # [P]
        g_norm = torch.stack(torch._foreach_norm(grads))  # [P]
        ratio = torch.where((w_norm > 0) & (g_norm > 0),
                            group['trust_coefficient'] * w_norm / (g_norm + group['eps']), torch.ones_like(w_norm))
        grads = torch._foreach_mul(grads, list(ratio.unbind(0)))
    if group['momentum'] != 0:
        bufs = [state[p].get('momentum_buffer') for p in params]
        old = [i for i, b in enumerate(bufs) if b is not None]
        if old:
            torch._foreach_mul_([bufs[i] for i in old], group['momentum'])
            torch._foreach_add_([bufs[i] for i in old], [grads[i] for i in old])
        for i, b in enumerate(bufs):  # first step of a parameter only: buf = g
            if b is None: bufs[i] = state[params[i]]['momentum_buffer'] = torch.clone(grads[i]).detach()
        grads = bufs
    torch._foreach_add_(params, grads, alpha=-group['lr'])


# %%
grp = dict(lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001, eps=1e-8, lars=True)
def two_params():  # a LARS weight, and a zero weight (ratio 1)
    ps = [torch.tensor([3., 4.], dtype=torch.float64), torch.tensor([0., 0.], dtype=torch.float64)]
    for p, g in zip(ps, ([0.3, 0.4], [0.5, -0.5])): p.grad = torch.tensor(g, dtype=torch.float64)
    return ps
fe, rf = two_params(), two_params()
st_fe, st_rf = {p: {} for p in fe}, [{} for _ in rf]
for _ in range(2):  # the first step creates the momentum buffers, the second uses them
    _lars_foreach_update(fe, st_fe, grp)
    for p, s in zip(rf, st_rf): _lars_reference_update(p, s, grp)
for a, b in zip(fe, rf): test_close(a, b, eps=1e-15)
for p, s in zip(fe, st_rf): test_close(st_fe[p]['momentum_buffer'], s['momentum_buffer'], eps=1e-15)


# %% [markdown]
# The optimiser itself is thin: options per group, `step` picks the update. `foreach=False` runs the reference
# transcription; it exists for the equality test below and for debugging.

# %%
#| exports
class LARS(torch.optim.Optimizer):
    "SGD with momentum and LARS trust ratios, exactly as the PixPro reference applies them; vectorised."
    def __init__(self,
                 params:Iterable,  # parameters or param groups (see `lars_param_groups`)
                 lr:float,  # learning rate, the same for every group (the global, already scaled lr)
                 momentum:float=0.9,  # SGD momentum; buf = momentum * buf + g, first step buf = g
                 weight_decay:float=0.0,  # added to the gradient (g + wd * w) before the trust ratio
                 trust_coefficient:float=0.001,  # eta: the update norm is eta * ||w|| (times lr)
                 eps:float=1e-8,  # added to the gradient norm in the trust ratio
                 lars:bool=True,  # apply the trust ratio (default for groups that do not say)
                 foreach:bool=True,  # vectorised update; False runs the per-parameter reference transcription
                ):
        check_range('lr', lr, 0)
        check_range('momentum', momentum, 0, 1, high_open=True)
        check_range('weight_decay', weight_decay, 0)
        check_range('trust_coefficient', trust_coefficient, 0, low_open=True)
        check_range('eps', eps, 0)
        self.foreach = foreach
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, lars=lars))

    @torch.no_grad()
    def step(self, closure:Callable|None=None):
        "One update of every parameter that has a gradient (parameters with `grad=None` are skipped)."
        loss = None
        if closure is not None:
            with torch.enable_grad(): loss = closure()
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if any(p.grad.is_sparse for p in params): raise RuntimeError('LARS does not support sparse gradients')
            if not self.foreach:
                for p in params: _lars_reference_update(p, self.state[p], group)
            else:
                for ps in _by_device_dtype(params): _lars_foreach_update(ps, self.state, group)
        return loss


# %% [markdown]
# > **Ours.** Three small departures from the reference's *code* (none from its arithmetic): (1) we do not overwrite
# > `p.grad` with the rewritten gradient, so whatever inspects gradients after `step` (logging, clipping) sees the raw
# > ones; (2) a parameter list passed without groups gets the trust ratio (`lars=True`), whereas the reference applies
# > LARS only to groups explicitly marked by its `add_weight_decay`; (3) the zero-norm tests happen on the device
# > (`torch.where`), without a host synchronisation per parameter.

# %% [markdown]
# First, a step we can do with pencil and paper. A LARS parameter $w = (3, 4)$, $\lVert w\rVert = 5$, gradient
# $g = (0.3, 0.4)$, $\lambda = 0.1$, lr 2: $\tilde g = (0.6, 0.8)$ with norm 1, the trust ratio is
# $0.001 \cdot 5 / (1 + 10^{-8})$, so $w \leftarrow (3, 4) - 2 \cdot (0.003, 0.004)/(1 + 10^{-8})$.
# A bias $b = (1, -1)$ in the excluded group (no decay, no ratio) with gradient $(0.5, 0.5)$ moves by plain SGD:
# $b \leftarrow (0, -2)$ after one step and, with the same gradient again, $b \leftarrow (0, -2) - 2\,(0.9 \cdot 0.5 +
# 0.5) = (-1.9, -3.9)$ after the second (momentum). Both implementations must give these numbers.

# %%
for foreach in (True, False):
    w = torch.tensor([3., 4.], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1., -1.], dtype=torch.float64, requires_grad=True)
    opt = LARS([dict(params=[w], weight_decay=0.1), dict(params=[b], weight_decay=0.0, lars=False)],
               lr=2.0, foreach=foreach)
    w.grad, b.grad = torch.tensor([0.3, 0.4], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    opt.step()
    test_close(w.detach(), torch.tensor([3 - 0.006/(1 + 1e-8), 4 - 0.008/(1 + 1e-8)], dtype=torch.float64), eps=1e-15)
    test_eq(b.detach(), torch.tensor([0., -2.], dtype=torch.float64))
    test_eq(w.grad, torch.tensor([0.3, 0.4], dtype=torch.float64))  # the raw gradient is left alone
    opt.step()
    test_close(b.detach(), torch.tensor([-1.9, -3.9], dtype=torch.float64), eps=1e-15)


# %% [markdown]
# Then the property that matters for a faster optimiser: **it is the same optimiser**. On random parameters in
# float64, over several steps with fresh random gradients, the vectorised step and the reference transcription agree
# to $10^{-12}$, weights and momentum buffers, including the edge cases: a weight tensor that is exactly zero (trust
# ratio 1, plain SGD on its gradient), a zero gradient in a group without weight decay (ratio 1, nothing moves), a
# parameter whose gradient is `None` (skipped, no state), and a 1-D group without LARS.

# %%
#| exports
def _random_lars_setup(seed:int=0, dtype=torch.float64):
    "Parameters and groups with every edge case, for the equality tests (same seed: same tensors)."
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 4, 3, 3), (8,), (16, 8), (16,), (3, 3), (5, 2), (7,), (4, 4)]
    ps = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    with torch.no_grad(): ps[4].zero_()  # a weight tensor that is exactly zero
    groups = [dict(params=[ps[0], ps[2], ps[4], ps[7]], weight_decay=0.05),  # LARS + decay; ps[7] never gets a grad
              dict(params=[ps[5]], weight_decay=0.0),  # LARS without decay: its zero gradient keeps ratio 1
              dict(params=[ps[1], ps[3], ps[6]], weight_decay=0.0, lars=False)]  # the 1-D group
    return ps, groups


# %%
ps_s, groups_s = _random_lars_setup()
test_eq([tuple(p.shape) for g in groups_s for p in g['params']],
        [(8, 4, 3, 3), (16, 8), (3, 3), (4, 4), (5, 2), (8,), (16,), (7,)])
test_eq(ps_s[4].abs().sum().item(), 0.0)  # the zero weight
test_eq(_random_lars_setup()[0][0].detach(), ps_s[0].detach())  # same seed: same tensors
assert not torch.equal(_random_lars_setup(seed=1)[0][0].detach(), ps_s[0].detach())


# %%
#| exports
def _random_grads(ps:list[Tensor], step:int, seed:int=0):
    "Fresh random gradients for step `step`; ps[5] gets a zero gradient, ps[7] none."
    gen = torch.Generator().manual_seed(1000 * seed + step)
    for i, p in enumerate(ps): p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    ps[5].grad.zero_()
    ps[7].grad = None


# %%
_random_grads(ps_s, 3); g3 = ps_s[0].grad.clone()
test_eq((ps_s[5].grad.abs().sum().item(), ps_s[7].grad), (0.0, None))
_random_grads(ps_s, 3); test_eq(ps_s[0].grad, g3)  # the same step: the same gradients
_random_grads(ps_s, 4); assert not torch.equal(ps_s[0].grad, g3)


# %%
def run_lars(foreach, steps=5, lr=4.0):
    ps, groups = _random_lars_setup()
    opt = LARS(groups, lr=lr, foreach=foreach)
    for s in range(steps):
        _random_grads(ps, s)
        opt.step()
    return ps, opt

(ps_f, opt_f), (ps_r, opt_r) = run_lars(True), run_lars(False)
for a, b in zip(ps_f, ps_r): assert (a - b).abs().max() <= 1e-12, (a - b).abs().max()
for a, b in zip(ps_f, ps_r):
    if a in opt_f.state: assert (opt_f.state[a]['momentum_buffer'] - opt_r.state[b]['momentum_buffer']).abs().max() <= 1e-12
ps0, _ = _random_lars_setup()
test_eq(ps_f[7].detach(), ps0[7].detach()); assert ps_f[7] not in opt_f.state  # grad None: untouched, no state
assert ps_f[4].abs().sum() > 0  # the zero weight moved (ratio 1)
max(float((a - b).detach().abs().max()) for a, b in zip(ps_f, ps_r))  # in practice: bit-identical

# %% [markdown]
# The trust ratio in numbers: after one step from a fresh state, a LARS weight moved by exactly
# $\text{lr}\cdot\eta\,\lVert w\rVert \,\lVert\tilde g\rVert/(\lVert\tilde g\rVert+\epsilon)$, whatever the size of
# its gradient. Multiply a gradient by 1000 and the step is the same; this is why LARS tolerates the huge lr.

# %%
for scale in (1.0, 1000.0):
    ps, groups = _random_lars_setup()
    w0 = ps[2].detach().clone()
    opt = LARS(groups, lr=4.0)
    _random_grads(ps, 0)
    ps[2].grad *= scale
    opt.step()
    test_close(float((ps[2].detach() - w0).norm()), 4.0 * 0.001 * float(w0.norm()), eps=1e-9)

# %% [markdown]
# A resumed run must continue with the same momentum buffers. The optimiser's `state_dict` holds them (plus the
# group options); it survives `torch.save`/`torch.load(weights_only=True)` (checkpoints are loaded that way), and a
# new optimiser loaded from it continues exactly like the uninterrupted one.

# %%
ps_a, groups_a = _random_lars_setup()
opt_a = LARS(groups_a, lr=1.0)
for s in range(2): _random_grads(ps_a, s); opt_a.step()
buffer = io.BytesIO(); torch.save(opt_a.state_dict(), buffer); buffer.seek(0)
saved = torch.load(buffer, weights_only=True)
ps_b, groups_b = _random_lars_setup()  # a fresh process: same model ...
with torch.no_grad():
    for a, b in zip(ps_a, ps_b): b.copy_(a)  # ... with the checkpoint's weights
opt_b = LARS(groups_b, lr=1.0)
opt_b.load_state_dict(saved)
test_eq(len(opt_b.state), 7)  # every parameter that had a gradient has its buffer back
for s in range(2, 4):
    _random_grads(ps_a, s); _random_grads(ps_b, s)
    opt_a.step(); opt_b.step()
for a, b in zip(ps_a, ps_b): test_eq(a.detach(), b.detach())


# %% [markdown]
# ## Which parameters get LARS
#
# The reference's `add_weight_decay` splits a model's trainable parameters by shape: every tensor with one dimension
# goes to a group with no weight decay and no trust ratio, the rest to a group with both. In a ResNet that is every
# BatchNorm weight and bias, the SE and projector conv biases and the PPM conv bias; the conv and linear weights get
# LARS. Parameters with `requires_grad=False` (the momentum target network) are left out.

# %%
#| exports
def lars_param_groups(model:nn.Module,  # the online network (encoder + projector + PPM ...)
                      weight_decay:float,  # for the weights with more than one dimension
                     ) -> list[dict]:
    "Two param groups for `LARS`: 1-D parameters without decay and trust ratio, the others with both."
    check_range('weight_decay', weight_decay, 0)
    skip, rest = [], []
    for p in model.parameters():  # `parameters()` yields a shared tensor once
        if p.requires_grad: (skip if p.ndim <= 1 else rest).append(p)
    return [dict(params=skip, weight_decay=0.0, lars=False),
            dict(params=rest, weight_decay=weight_decay, lars=True)]


# %% [markdown]
# > **Ours.** A 0-D parameter (a learned scalar, e.g. a temperature) joins the excluded group here; the reference's
# > `len(shape) == 1` test would give it decay and the trust ratio. PixPro has no 0-D parameter, so the recipes do not
# > change.

# %%
tiny = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Linear(2, 2))
tiny[4].weight.requires_grad_(False)
skip, rest = lars_param_groups(tiny, 1e-5)
test_eq([tuple(p.shape) for p in skip['params']], [(8,), (8,), (4,), (2,)])  # BN weight, BN bias, conv bias, linear bias
test_eq([tuple(p.shape) for p in rest['params']], [(8, 3, 3, 3), (4, 8, 1, 1)])  # the frozen linear weight is left out
test_eq((skip['weight_decay'], skip['lars'], rest['weight_decay'], rest['lars']), (0.0, False, 1e-5, True))
test_fail(lambda: lars_param_groups(tiny, -1.0), contains='weight_decay=-1.0')
opt = LARS(lars_param_groups(tiny, 1e-5), lr=4.0)
tiny(torch.randn(2, 3, 6, 4)).sum().backward()
opt.step()  # a real model step: runs

# %% [markdown]
# ## The learning rate of every iteration
#
# PixPro changes the learning rate after **every iteration**, not every epoch: a linear warm-up over $W$ iterations
# (5 epochs) from $\text{lr}/100$ to $\text{lr}$, then a cosine from $\text{lr}$ down to $10^{-6}$ over the remaining
# $T - W$ iterations. With start factor $s$ (0.01) and final value $\text{lr}_{\min}$, iteration $i$
# (0-based, counted over the whole run) uses
#
# $$\text{lr}(i) = \begin{cases}
#   \text{lr}\,\bigl(s + (1-s)\,\tfrac{i}{W}\bigr) & 0 \le i \le W,\\[4pt]
#   \text{lr}_{\min} + \tfrac{1}{2}(\text{lr} - \text{lr}_{\min})\bigl(1 + \cos\tfrac{\pi (i - W)}{T - W}\bigr)
#   & W < i < T .
# \end{cases}$$
#
# With $s = 0.01$ the first line is the reference's warm-up, `base_lr / multiplier * ((multiplier - 1.) *
# last_epoch / warmup_epoch + 1.)` with `multiplier` 100 (`contrast/lr_scheduler.py`, line 29), that is
# $\text{lr}/100\,(99\,i/W + 1)$; the cosine's $\text{lr}_{\min} = 10^{-6}$ is its `eta_min` (line 69).
#
# **Our reading of the reference's scheduler.** The reference chains its `GradualWarmupScheduler` (multiplier 100)
# with `CosineAnnealingLR(T_max=(epochs - warmup) * iters, eta_min=1e-6)` and calls `scheduler.step()` once after each
# `optimizer.step()`. At construction the scheduler's counter is 0, so the first iteration trains with
# $\text{lr}/100$; iteration $i$ trains with the value for counter $i$. The warm-up branch covers counters
# $0 \dots W$ inclusive, so iteration $W$ is the first at the full lr (the cosine would give the same value
# there). Afterwards the cosine scheduler is stepped with $i - W$ and uses its closed form. The last iteration,
# $i = T - 1$, therefore trains slightly *above* $10^{-6}$; the value $10^{-6}$ itself belongs to $i = T$, which never
# runs. `lr_at` returns $\text{lr}_{\min}$ for any $i \ge T$.

# %%
#| exports
LR_SCHEDULES = ('cosine', 'step')
STEP_EPOCHS = (30, 60, 80)  # the step schedule's decays, in epochs of a 90-epoch run (Goyal et al., arXiv 1706.02677)


# %%
#| exports
def lr_at(step:int,  # global iteration, 0-based: the lr the optimiser uses for this iteration
          *,
          base_lr:float,  # peak lr (already scaled to the global batch, e.g. 4.0)
          total_steps:int,  # T: iterations of the whole run (epochs x iterations per epoch)
          warmup_steps:int,  # W: iterations of linear warm-up (warm-up epochs x iterations per epoch)
          start_factor:float=0.01,  # s: the warm-up starts at s * base_lr (reference: 1/multiplier = 1/100)
          final_lr:float=1e-6,  # lr_min: where the cosine ends (reference: eta_min = 1e-6)
          schedule:str='cosine',  # 'cosine', or 'step': x0.1 at 30/90, 60/90 and 80/90 of the run
         ) -> float:
    "Learning rate of iteration `step`: linear warm-up then cosine, exactly as the PixPro reference schedules it."
    if isinstance(step, bool) or not isinstance(step, int) or step < 0: raise ConfigError('step', step, 'an int >= 0')
    check_positive('total_steps', total_steps); check_range('warmup_steps', warmup_steps, 0, total_steps)
    check_choice('schedule', schedule, LR_SCHEDULES)
    if schedule == 'step' and warmup_steps < step: return base_lr * 0.1 ** sum(step >= total_steps * k / 90 for k in STEP_EPOCHS)
    if step >= total_steps: return final_lr
    if step <= warmup_steps:
        return base_lr * (start_factor + (1 - start_factor) * step / warmup_steps) if warmup_steps else base_lr
    t = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * (1 + math.cos(math.pi * t)) / 2


# %%
test_close(lr_at(3, base_lr=2.0, total_steps=10, warmup_steps=0, final_lr=0.0), 1 + math.cos(0.3 * math.pi), eps=1e-12)
test_eq(lr_at(12, base_lr=2.0, total_steps=10, warmup_steps=2), 1e-6)  # past the end: final_lr
test_fail(lambda: lr_at(True, base_lr=2.0, total_steps=10, warmup_steps=2), contains='invalid step=True')  # not a bool


# %%
#| exports
def set_lr(optimizer:torch.optim.Optimizer,  # any optimiser
           lr:float,  # the value for this iteration (`lr_at(...)`)
          ):
    "Set the same lr in every param group (LARS's excluded group also trains at the full lr)."
    for group in optimizer.param_groups: group['lr'] = lr


# %%
opt_two = torch.optim.SGD([dict(params=[nn.Parameter(torch.zeros(1))]),
                           dict(params=[nn.Parameter(torch.zeros(1))], lr=0.5)], lr=1.0)
set_lr(opt_two, 0.25); test_eq([g['lr'] for g in opt_two.param_groups], [0.25, 0.25])

# %% [markdown]
# `lr_at` is a pure function of the iteration counter, on purpose: the training loop calls
# `set_lr(opt, lr_at(step, ...))` before each step and saves `step` in the checkpoint, so a resumed run cannot
# disagree with an uninterrupted one about the schedule (the momentum schedule is handled the same way).
#
# Hand-computed values for lr 4.0, $T = 100$, $W = 10$: iteration 0: $4/100 = 0.04$; iteration 5:
# $0.04\,(99 \cdot 5/10 + 1) = 0.04 \cdot 50.5 = 2.02$; iteration 10: 4.0; iteration 55 (half-way through the
# cosine, $\cos\frac{\pi}{2} = 0$): $(4 + 10^{-6})/2$; iteration 99: $10^{-6} + (4 - 10^{-6})\sin^2(\pi/180)
# = 0.001219345657\ldots$, since $\tfrac12(1 + \cos\tfrac{89\pi}{90}) = \sin^2\tfrac{\pi}{180}$.

# %%
kw = dict(base_lr=4.0, total_steps=100, warmup_steps=10)
test_close(lr_at(0, **kw), 0.04, eps=1e-15)
test_close(lr_at(5, **kw), 2.02, eps=1e-14)
test_eq(lr_at(10, **kw), 4.0)
test_close(lr_at(55, **kw), (4 + 1e-6) / 2, eps=1e-14)
test_close(lr_at(99, **kw), 0.001219345657221985, eps=1e-15)
test_close(lr_at(99, **kw), 1e-6 + (4 - 1e-6) * math.sin(math.pi / 180)**2, eps=1e-15)
test_eq(lr_at(100, **kw), 1e-6)
test_close(lr_at(11, **kw), lr_at(10, **kw), eps=1e-2)  # continuous at the junction
test_eq(lr_at(0, base_lr=4.0, total_steps=100, warmup_steps=0), 4.0)  # no warm-up: cosine from the start
test_fail(lambda: lr_at(-1, **kw), contains='invalid step=-1')
test_fail(lambda: lr_at(0, base_lr=4.0, total_steps=10, warmup_steps=20), contains='warmup_steps=20')
lrs = [lr_at(i, **kw) for i in range(100)]
assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))

# %% [markdown]
# The **step schedule** is the one ResNet-RS's additive study starts from and replaces by the cosine (arXiv 2103.07579,
# Table 1, "+ Cosine LR decay"): the lr of ImageNet ResNets since Goyal et al. (arXiv 1706.02677, section 5.1), divided
# by 10 after 30, 60 and 80 of 90 epochs; here the same fractions of any run, after the same warm-up. For $T = 90$,
# $W = 5$: 4.0 up to iteration 29, 0.4 from 30, 0.04 from 60, 0.004 from 80 on.

# %%
sk = dict(base_lr=4.0, total_steps=90, warmup_steps=5, schedule='step')
test_eq([lr_at(i, **sk) for i in (5, 6, 29)], [4.0] * 3)
test_close([lr_at(i, **sk) for i in (30, 59, 60, 79, 80, 89)], [0.4, 0.4, 0.04, 0.04, 0.004, 0.004], eps=1e-15)
test_close(lr_at(0, **sk), lr_at(0, **kw), eps=1e-15)  # the same warm-up as the cosine
test_fail(lambda: lr_at(0, base_lr=1.0, total_steps=9, warmup_steps=0, schedule='linear'), contains="schedule='linear'")

# %% [markdown]
# An independent check: PyTorch's own schedulers composed the same way (`LinearLR(start_factor=0.01,
# total_iters=W)` then `CosineAnnealingLR(T_max=T-W, eta_min=1e-6)` joined by `SequentialLR` at $W$, stepped after
# every iteration) give the same sequence, up to the rounding of their recursive formulas.

# %%
p = nn.Parameter(torch.zeros(1))
opt = torch.optim.SGD([p], lr=4.0)
sched = torch.optim.lr_scheduler.SequentialLR(opt, [torch.optim.lr_scheduler.LinearLR(opt, 0.01, 1.0, total_iters=10),
    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=90, eta_min=1e-6)], milestones=[10])
torch_lrs = []
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    for i in range(100): torch_lrs.append(opt.param_groups[0]['lr']); opt.step(); sched.step()
test_close(torch.tensor(torch_lrs, dtype=torch.float64), torch.tensor(lrs, dtype=torch.float64), eps=1e-9)


# %% [markdown]
# ## The linear scaling rule
#
# Recipes quote the learning rate for a batch of 256 and scale it linearly with the global batch (Goyal et al. 2017):
# PixPro's base lr 1.0 becomes $1.0 \times 1024/256 = 4.0$ on 8 GPUs of 128 images; the ResNet-RS lr 0.1 becomes
# $0.1 \times 4096/256 = 1.6$. The glossary's `lr` is always the per-256 value; the training entry point prints the
# scaled one.

# %%
#| exports
def scaled_lr(base_lr:float,  # lr for `reference_batch` images (the glossary's `lr`)
              global_batch:int,  # images per optimiser step over all processes (and accumulation steps)
              reference_batch:int=256,  # the batch `base_lr` is quoted for
             ) -> float:
    "The linear scaling rule: `base_lr * global_batch / reference_batch`."
    check_positive('batch_size', global_batch); check_positive('reference_batch', reference_batch)
    return base_lr * global_batch / reference_batch


# %%
test_eq(scaled_lr(1.0, 1024), 4.0)
test_close(scaled_lr(0.1, 4096), 1.6, eps=1e-15)
test_eq(scaled_lr(1.0, 16), 0.0625)
test_fail(lambda: scaled_lr(1.0, 0), contains='batch_size=0')

# %% [markdown]
# ## The schedules of a 100-epoch run
#
# ImageNet-1k has 1,281,167 training images. At a global batch of 1024 with `drop_last` (the reference's
# `DistributedSampler` gives each of the 8 GPUs 160,146 images, 1251 full batches of 128) an epoch is
# $\lfloor 1281167/1024 \rfloor = 1251$ iterations, so 100 epochs are $T = 125{,}100$ iterations and the 5-epoch
# warm-up $W = 6255$. The target network's EMA momentum follows its own cosine (the reference's
# `_momentum_update_key_encoder`, `contrast/models/PixPro.py`, line 165),
# $m(k) = 1 - (1 - 0.99)\,\bigl(\cos(\pi k/T) + 1\bigr)/2$, from 0.99 to 1.
#
# The momentum schedule belongs to the PixPro chapter (`pixpro_rs.pixpro.momentum_at`); the figure uses it and
# checks it against the formula written inline.

# %%
#| exports
IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k training images

def steps_per_epoch(dataset_size:int,  # images in the training set
                    global_batch:int,  # images per optimiser step
                   ) -> int:
    "Iterations per epoch with `drop_last=True` (the reference's loader): `dataset_size // global_batch`."
    check_positive('batch_size', global_batch)
    return dataset_size // global_batch


# %%
test_eq(steps_per_epoch(IMAGENET_TRAIN_IMAGES, 1024), 1251)
test_eq(steps_per_epoch(IMAGENET_TRAIN_IMAGES, 4096), 312)

# %%
E, W_EP = 100, 5
N = steps_per_epoch(IMAGENET_TRAIN_IMAGES, 1024)
T, W = E * N, W_EP * N
steps = torch.arange(T, dtype=torch.float64)
lr_curve = [lr_at(i, base_lr=scaled_lr(1.0, 1024), total_steps=T, warmup_steps=W) for i in range(T)]
m_curve = torch.tensor([momentum_at(k, T, 0.99) for k in range(T)], dtype=torch.float64)
test_close(m_curve, 1 - (1 - 0.99) * (torch.cos(math.pi * steps / T) + 1) / 2, eps=1e-15)  # PixPro.py line 165
fig, axs = plt.subplots(1, 3, figsize=(12, 3))
axs[0].plot(steps / N, lr_curve); axs[0].set(title='lr, 100 epochs', xlabel='epoch', ylabel='lr')
axs[1].plot(steps[:2 * W] / N, lr_curve[:2 * W]); axs[1].axvline(W_EP, ls=':', c='gray')
axs[1].set(title='lr, first 10 epochs (warm-up to 5)', xlabel='epoch')
axs[2].plot(steps / N, m_curve); axs[2].set(title='target momentum m(k)', xlabel='epoch')
plt.tight_layout(); plt.show()
print(f'T = {T} iterations, W = {W}; lr(0) = {lr_curve[0]:.3f}, lr(W) = {lr_curve[W]:.3f}, '
      f'lr(T-1) = {lr_curve[-1]:.4g}; m(0) = {m_curve[0]:.4f}, m(T-1) = {m_curve[-1]:.9f}')

# %% [markdown]
# *Figure 1: the learning rate (left, middle) and the target network's momentum (right) of the 100-epoch PixPro
# ResNet-50 recipe, per iteration, 1251 iterations per epoch.* The warm-up takes the first 5 % of the run; the
# cosine then spends most of its time at large values and drops steeply in the last third; the momentum rises in
# mirror image, so the target network freezes just as the learning rate vanishes.

# %%
test_eq((T, W), (125_100, 6255))
test_close(lr_curve[0], 0.04, eps=1e-15); test_eq(lr_curve[W], 4.0)
assert 1e-6 < lr_curve[-1] < 1e-5 and abs(float(m_curve[0]) - 0.99) < 1e-12 and float(m_curve[-1]) > 0.99999999


# %% [markdown]
# ## Named recipes
#
# A recipe is data: a frozen dataclass whose field names are the glossary's, plus two fields of provenance:
# `source` (where the values come from) and `ours` (the fields that are *our* choice, not the source's, each with its
# reason). `provenance()` answers "where does this number come from?" for every field. Every field name is an entry
# of the one glossary, `pixpro_rs.core.GLOSSARY`.
#
# The batch is recorded as the reference's layout, `batch_size` images on each of `devices` devices; what the
# recipe really fixes is their product, the global batch, from which the lr is scaled. On other hardware keep the
# global batch (gradient accumulation) or scale the lr with `scaled_lr`.

# %%
#| exports
@dataclass(frozen=True, kw_only=True)
class Recipe:
    "Hyper-parameters shared by every recipe, glossary names, with their provenance."
    name: str  # registry key
    arch: str  # backbone
    image_size: int  # view / crop side in pixels
    epochs: int  # passes over the data
    batch_size: int  # images per device in the recipe's layout
    devices: int  # devices in the recipe's layout (global batch = batch_size x devices)
    lr: float  # base lr per 256 images (scaled linearly with the global batch)
    weight_decay: float  # on weights with more than one dimension
    warmup_epochs: int = 5  # linear warm-up
    warmup_start_factor: float = 0.01  # warm-up starts at this fraction of the lr
    final_lr: float = 1e-6  # end of the cosine
    optimizer: str = 'lars'  # 'lars', 'sgd' or 'sgd_nesterov'
    optimizer_momentum: float = 0.9  # SGD momentum of the optimiser
    stochastic_depth: float = 0.0  # drop-path rate (0: off)
    source: str = ''  # where the values come from
    ours: dict = field(default_factory=dict, hash=False)  # field -> why it is our choice, not the source's

    def __post_init__(self):
        for k in ('image_size', 'epochs', 'batch_size', 'devices', 'lr'): check_positive(k, getattr(self, k))
        check_range('image_size', self.image_size, 64)  # C5 (stride 32) must be at least 2x2
        check_range('weight_decay', self.weight_decay, 0)
        check_range('warmup_epochs', self.warmup_epochs, 0, self.epochs)
        check_range('warmup_start_factor', self.warmup_start_factor, 0, 1)
        check_range('final_lr', self.final_lr, 0)
        check_choice('optimizer', self.optimizer, ['lars', 'sgd', 'sgd_nesterov'])
        check_range('optimizer_momentum', self.optimizer_momentum, 0, 1, high_open=True)
        check_range('stochastic_depth', self.stochastic_depth, 0, 1, high_open=True)
        unknown = set(self.ours) - {f.name for f in dataclasses.fields(self)}
        if unknown: raise ConfigError('ours', sorted(unknown), 'names of fields of the recipe')


# %%
base = Recipe(name='t', arch='resnet50', image_size=224, epochs=10, batch_size=32, devices=2, lr=0.5, weight_decay=0.0,
              source='src')
test_eq((base.warmup_epochs, base.optimizer, base.ours), (5, 'lars', {}))
test_fail(lambda: dataclasses.replace(base, image_size=32), contains='invalid image_size=32')
test_fail(lambda: dataclasses.replace(base, ours={'nope': 'why'}), contains="invalid ours=['nope']")


# %% [markdown]
# The derived quantities are properties and methods, so they cannot disagree with the fields: the global batch, the
# scaled lr, and the schedule arguments of `lr_at` for a data set of a given size.

# %%
#| exports
def _global_batch(self:Recipe) -> int:
    "Images per optimiser step: `batch_size * devices`."
    return self.batch_size * self.devices

def _global_lr(self:Recipe) -> float:
    "The lr the optimiser uses at the peak: `scaled_lr(lr, global_batch)`."
    return scaled_lr(self.lr, self.global_batch)

def _schedule(self:Recipe, dataset_size:int=IMAGENET_TRAIN_IMAGES) -> dict:
    "Keyword arguments of `lr_at` for a run over `dataset_size` images (drop_last)."
    n = steps_per_epoch(dataset_size, self.global_batch)
    return dict(base_lr=self.global_lr, total_steps=self.epochs * n, warmup_steps=self.warmup_epochs * n,
                start_factor=self.warmup_start_factor, final_lr=self.final_lr)

Recipe.global_batch, Recipe.global_lr, Recipe.schedule = property(_global_batch), property(_global_lr), _schedule

# %%
test_eq((base.global_batch, base.global_lr), (64, 0.125))
test_eq(base.schedule(2560), dict(base_lr=0.125, total_steps=400, warmup_steps=200, start_factor=0.01, final_lr=1e-6))


# %%
#| exports
def _to_dict(self:Recipe) -> dict:
    "Plain values (for checkpoints, `torch.load(weights_only=True)`-safe); `type(r)(**r.to_dict()) == r`."
    return dataclasses.asdict(self)

def _replace(self:Recipe, **changes) -> Recipe:
    "A copy with some fields overridden (validated again); unknown names raise `ConfigError`."
    names = [f.name for f in dataclasses.fields(self)]
    for k in changes: check_choice('recipe field', k, names)
    return dataclasses.replace(self, **changes)

def _provenance(self:Recipe) -> dict[str, str]:
    "For every field: 'ours: <reason>' or the recipe's source."
    return {f.name: ('ours: ' + self.ours[f.name] if f.name in self.ours else self.source)
            for f in dataclasses.fields(self) if f.name not in ('name', 'source', 'ours')}

Recipe.to_dict, Recipe.replace, Recipe.provenance = _to_dict, _replace, _provenance

# %% [markdown]
# (The second `class Recipe(Recipe)` grows the class across cells, as fastcore's `@patch` would, without making
# fastcore a dependency of the package: the same name, now with its methods.)

# %%
test_eq(type(base)(**base.to_dict()), base)
test_eq((base.replace(epochs=20).epochs, base.epochs), (20, 10))
test_fail(lambda: base.replace(epoch=20), contains="invalid recipe field='epoch'")
mine = base.replace(ours={'lr': 'our choice'})
test_eq((mine.provenance()['lr'], mine.provenance()['epochs']), ('ours: our choice', 'src'))
assert not {'name', 'source', 'ours'} & set(mine.provenance())


# %% [markdown]
# PixPro adds its own parameters, with the paper's values as defaults (the *released scripts*, not the code's
# option defaults, which are traps: threshold 0.5, gamma 1, no transform layer).

# %%
#| exports
@dataclass(frozen=True, kw_only=True)
class PixProRecipe(Recipe):
    "A PixPro pretraining recipe; defaults are the paper's (released scripts)."
    method: str = 'pixpro'  # pretext task
    threshold: float = 0.7  # T, positive pixel pairs
    gamma: float = 2.0  # PPM sharpness
    ppm_layers: int = 1  # layers of the PPM transform g
    momentum: float = 0.99  # base EMA momentum of the target network
    instance_weight: float = 0.0  # alpha of the instance branch
    trust_coefficient: float = 0.001  # LARS eta

    def __post_init__(self):
        super().__post_init__()
        check_choice('method', self.method, METHODS)  # the model's own list
        check_range('threshold', self.threshold, 0, 10, low_open=True)
        check_positive('gamma', self.gamma)
        check_choice('ppm_layers', self.ppm_layers, [0, 1, 2])
        check_range('momentum', self.momentum, 0, 1)
        check_range('instance_weight', self.instance_weight, 0)
        check_positive('trust_coefficient', self.trust_coefficient)


# %%
pp = PixProRecipe(name='t', arch='resnet50', image_size=224, epochs=10, batch_size=32, devices=2, lr=1.0, weight_decay=1e-5)
test_eq((pp.method, pp.threshold, pp.gamma, pp.ppm_layers, pp.momentum), ('pixpro', 0.7, 2.0, 1, 0.99))
test_fail(lambda: pp.replace(gamma=0), contains='invalid gamma=0')
test_fail(lambda: pp.replace(method='simclr'), contains="invalid method='simclr'")


# %% [markdown]
# The ResNet-RS supervised recipe (Bello et al., "Revisiting ResNets", arXiv 2103.07579, and its released configs,
# tensorflow/tpu `models/official/resnet/resnet_rs/configs/resnetrs{depth}_i{size}.yaml`: 350 epochs are
# `train_steps: 109475` at `train_batch_size: 4096`) is needed by the evaluation chapter (a supervised baseline for
# the transfer tables). Its regularisation depends on the model: dropout, stochastic depth and the RandAugment
# magnitude grow with depth and image size, so the table below is part of the recipe.

# %%
#| exports
@dataclass(frozen=True, kw_only=True)
class SupervisedRecipe(Recipe):
    "The ResNet-RS supervised ImageNet recipe (arXiv 2103.07579; tensorflow/tpu `resnet_rs/configs`)."
    label_smoothing: float = 0.1  # of the cross-entropy
    ema_decay: float = 0.9999  # EMA of the weights (warm-up min(decay, (1+t)/(10+t))), BN statistics included
    randaugment_ops: int = 2  # RandAugment operations per image
    randaugment_magnitude: int = 10  # on TF's scale (10 is "max")
    dropout: float = 0.25  # before the classifier

    def __post_init__(self):
        super().__post_init__()
        check_range('label_smoothing', self.label_smoothing, 0, 1, high_open=True)
        check_range('ema_decay', self.ema_decay, 0, 1, high_open=True)
        check_range('randaugment_ops', self.randaugment_ops, 0)
        check_range('randaugment_magnitude', self.randaugment_magnitude, 0, 30)
        check_range('dropout', self.dropout, 0, 1, high_open=True)

# per arch: (image_size, dropout, stochastic_depth, randaugment_magnitude): `image_size`, `dropout_rate`,
# `drop_connect_rate` (null: 0) and `randaug_magnitude` of tensorflow/tpu resnet_rs/configs/resnetrs{depth}_i{size}.yaml
RESNETRS_SUPERVISED: dict[str, list[tuple]] = {
    'resnetrs50': [(160, 0.25, 0.0, 10)],
    'resnetrs101': [(160, 0.25, 0.0, 10), (192, 0.25, 0.0, 15)],
    'resnetrs152': [(192, 0.25, 0.0, 15), (224, 0.25, 0.0, 15), (256, 0.25, 0.0, 15)],
    'resnetrs200': [(256, 0.25, 0.1, 15)],
    'resnetrs270': [(256, 0.25, 0.1, 15)],
    'resnetrs350': [(256, 0.25, 0.1, 15), (320, 0.4, 0.1, 15)],
    'resnetrs420': [(320, 0.4, 0.1, 15)],
}

# %%
sr = SupervisedRecipe(name='t', arch='resnetrs50', image_size=160, epochs=10, batch_size=32, devices=2, lr=0.1,
                      weight_decay=4e-5)
test_eq((sr.label_smoothing, sr.ema_decay, sr.randaugment_ops, sr.randaugment_magnitude, sr.dropout), (0.1, 0.9999, 2, 10, 0.25))
test_fail(lambda: sr.replace(dropout=1.0), contains='invalid dropout=1.0')
test_eq(sum(len(rows) for rows in RESNETRS_SUPERVISED.values()), 11)  # the paper's (model, image size) pairs

# %% [markdown]
# ### The registry
#
# - `pixpro_r50_100ep`, `pixpro_r50_400ep`: the paper, ResNet-50, every value from the released scripts.
# - `pixpro_rs{50,...,420}_{100,400}ep`: the same recipe on ResNet-RS. **Ours**, all of it beyond the PixPro values:
#   nobody has published PixPro on ResNet-RS. We keep 224 px (the 7x7 C5 grid on which T = 0.7 and the recipe were
#   tuned; RS-50's supervised 160 px would give 5x5) and turn stochastic depth **off** during pretraining: PixPro's
#   loss asks online pixels to agree with the target's, and randomly dropped residual branches in the online network
#   only add noise the target does not have (the objective is its own regulariser); the ResNet-RS paper's own
#   self-supervised comparison trains without stochastic depth, and the ResNet-50 recipe we compare against has none,
#   so the RS recipes differ from the paper's in the architecture only. The supervised fine-tuning or evaluation
#   recipe may turn it back on.
# - `pixpro_demo_cpu`: ours, for the embedded SyntheticScenes on 2 CPU cores.
# - `supervised_rs{50,...,420}_{size}_350ep`: the ResNet-RS paper's supervised recipe for each of its 11 (model,
#   image size) pairs (`supervised_rs50_160_350ep`, `supervised_rs101_192_350ep` ...), from
#   `supervised_recipe(arch, image_size)`; the fine-tuning chapter (11) runs them.
# - `supervised_demo_cpu`: ours, the supervised recipe shrunk to a minute on 2 CPU cores (chapter 11's demo).
#
# Every name reads `<task>_<arch>[_<size>]_<length>`: the task, which is also the recipe's kind (`pixpro` for
# pretraining, `supervised` for training a classifier), the backbone (`r50` for ResNet-50, `rs<depth>` for
# ResNet-RS), the image size where the source has more than one for a backbone, and the epochs, or `demo_cpu`
# for our CPU demonstrations.

# %%
#| exports
_PIXPRO_SOURCE = ("PixPro paper (Xie et al., CVPR 2021) and zdaxie/PixPro e390d6b tools/pixpro_base_r50_{epochs}ep.sh: "
                  "8 GPUs x 128, LARS base lr 1.0 per 256, wd 1e-5, 5 warm-up epochs from lr/100, cosine to 1e-6, "
                  "T 0.7, gamma 2, 1 PPM layer, momentum 0.99, 224 px, no instance loss")
_RS_OURS = {
    'arch': "PixPro on ResNet-RS is not in any paper; the recipe's other values are PixPro ResNet-50's, untuned",
    'image_size': "224 px gives the 7x7 C5 grid PixPro's threshold was tuned on (RS-50 trains supervised at 160: 5x5)",
    'stochastic_depth': ("off: the online/target agreement is its own regulariser; drop-path would only perturb the "
                         "online branch; the RS paper's self-supervised comparison also runs without it"),
}
RS_DEPTHS = (50, 101, 152, 200, 270, 350, 420)

def _pixpro_recipes() -> dict[str, Recipe]:
    out = {}
    for epochs in (100, 400):
        src = _PIXPRO_SOURCE.format(epochs=epochs)
        out[f'pixpro_r50_{epochs}ep'] = PixProRecipe(name=f'pixpro_r50_{epochs}ep', arch='resnet50', image_size=224,
            epochs=epochs, batch_size=128, devices=8, lr=1.0, weight_decay=1e-5, source=src)
    for epochs in (100, 400):
        for d in RS_DEPTHS:
            out[f'pixpro_rs{d}_{epochs}ep'] = out[f'pixpro_r50_{epochs}ep'].replace(
                name=f'pixpro_rs{d}_{epochs}ep', arch=f'resnetrs{d}', ours=dict(_RS_OURS))
    return out


# %%
pr = _pixpro_recipes()
test_eq(len(pr), 2 * (1 + len(RS_DEPTHS)))
test_eq((pr['pixpro_rs420_400ep'].arch, pr['pixpro_rs420_400ep'].epochs, pr['pixpro_r50_100ep'].global_lr), ('resnetrs420', 400, 4.0))


# %%
#| exports
def supervised_recipe(arch:str='resnetrs50',  # 'resnetrs50' ... 'resnetrs420'
                      image_size:int|None=None,  # one of the paper's sizes for `arch` (None: the first)
                     ) -> SupervisedRecipe:
    "The ResNet-RS supervised recipe for `arch` at one of the paper's image sizes, with its per-model regularisation."
    rows = RESNETRS_SUPERVISED[check_choice('arch', arch, RESNETRS_SUPERVISED)]
    sizes = [r[0] for r in rows]
    size, dropout, sd, mag = rows[sizes.index(check_choice('image_size', image_size or sizes[0], sizes))]
    name = f"supervised_{arch.removeprefix('resnet')}_{size}_350ep"  # 'supervised_rs50_160_350ep'
    return SupervisedRecipe(
        name=name, arch=arch, image_size=size, epochs=350, batch_size=128, devices=32, lr=0.1, weight_decay=4e-5,
        warmup_epochs=5, warmup_start_factor=0.0, final_lr=0.0, optimizer='sgd_nesterov', optimizer_momentum=0.9,
        stochastic_depth=sd, dropout=dropout, randaugment_magnitude=mag,
        source=("ResNet-RS paper (Bello et al., NeurIPS 2021) and tensorflow/tpu resnet_rs configs: 350 epochs, "
                "batch 4096, SGD Nesterov 0.9, lr 0.1 per 256, 5 warm-up epochs, cosine to 0, wd 4e-5 not on BN, "
                "label smoothing 0.1, EMA 0.9999, RandAugment 2 ops, per-model dropout/SD/magnitude"),
        ours={'devices': "only the global batch 4096 is the paper's (TPU); 32 x 128 is our GPU layout",
              'warmup_start_factor': ("linear warm-up from 0, as tensorflow/tpu's learning_rate_schedule "
                                      "(models/official/resnet/resnet_main.py) does")})


# %%
s350 = supervised_recipe('resnetrs350', 320)
test_eq((s350.name, s350.dropout, s350.stochastic_depth, s350.randaugment_magnitude), ('supervised_rs350_320_350ep', 0.4, 0.1, 15))
test_eq(supervised_recipe('resnetrs101', 192).randaugment_magnitude, 15)
test_fail(lambda: supervised_recipe('resnetrs152', 160), contains="invalid image_size=160: expected one of 192, 224, 256")
test_fail(lambda: supervised_recipe('resnet50'), contains="invalid arch='resnet50'")

# %%
#| exports
_DEMO = PixProRecipe(
    name='pixpro_demo_cpu', arch='resnetrs50', image_size=96, epochs=3, batch_size=16, devices=1, lr=16.0,
    weight_decay=1e-5, warmup_epochs=1,
    source="ours: a CPU demonstration on the embedded SyntheticScenes; PixPro's method values are the paper's",
    ours={'arch': ("the family's smallest member, so the demo trains what the full recipes train (a batch of 16 "
                   "96-pixel pairs takes about 2.5 s on 2 CPU cores; resnetrs_tiny for tests takes 0.1 s)"),
          'image_size': "96 px: a 3x3 C5 grid, the smallest on which positive pairs vary between crops",
          'epochs': "a demonstration, minutes on 2 CPU cores", 'warmup_epochs': "a third of the short run",
          'batch_size': "fits a laptop's memory", 'devices': "one CPU process",
          'lr': ("16 per 256 = 1.0 at batch 16: a run of a few hundred steps needs larger relative steps than the "
                 "paper's 125k; untuned")})

_DEMO_SUPERVISED = SupervisedRecipe(
    name='supervised_demo_cpu', arch='resnetrs_tiny', image_size=64, epochs=12, batch_size=32, devices=1, lr=1.0,
    weight_decay=4e-5, warmup_epochs=1, warmup_start_factor=0.0, final_lr=0.0, optimizer='sgd_nesterov',
    optimizer_momentum=0.9, stochastic_depth=0.0, dropout=0.0, randaugment_magnitude=5,
    source=("ours: a CPU demonstration on the embedded SyntheticScenes; label smoothing, EMA decay, RandAugment ops, "
            "optimiser, weight decay and schedule shape are ResNet-RS's"),
    ours={'arch': "resnetrs_tiny, our 1-block-per-stage CPU variant: a step of 32 images takes ~0.1 s on 2 cores",
          'image_size': "64 px crops of 96 px scenes", 'epochs': "a demonstration of under a minute (192 steps)",
          'batch_size': "small data (512 images): 16 steps per epoch", 'devices': "one CPU process",
          'warmup_epochs': "1 of 12 (the paper: 5 of 350)",
          'lr': ("1.0 per 256 = 0.125 at batch 32: a run of 200 steps needs larger steps than the paper's 110k (0.1 "
                 "per 256); 2.0 made the loss jump in the first epoch; untuned beyond that"),
          'dropout': "the tiny model has 512 features and barely fits 4 classes in a minute: no dropout",
          'randaugment_magnitude': ("5 on TF's scale: the demo's labels (SceneLooks: photo, gray, blurred) are the "
                                    "colour and sharpness cues that magnitude 10's Color and Sharpness ops erase")})

def _supervised_recipes() -> dict[str, Recipe]:
    rs = [supervised_recipe(a, row[0]) for a, rows in RESNETRS_SUPERVISED.items() for row in rows]
    return {r.name: r for r in rs}

RECIPES: dict[str, Recipe] = {**_pixpro_recipes(), 'pixpro_demo_cpu': _DEMO,
                              **_supervised_recipes(), 'supervised_demo_cpu': _DEMO_SUPERVISED}
RECIPE_KINDS = {'pixpro': PixProRecipe, 'supervised': SupervisedRecipe}  # kind (a name's first word) -> class

def get_recipe(name:str,  # a key of `RECIPES`
               kind:str|None=None,  # 'pixpro' or 'supervised': refuse a recipe of the other kind (None: any)
              ) -> Recipe:
    "The named recipe; an unknown name, or one of another `kind`, raises `ConfigError` listing the valid ones."
    if kind is None: return RECIPES[check_choice('recipe', name, RECIPES)]
    cls = RECIPE_KINDS[check_choice('kind', kind, RECIPE_KINDS)]
    names = [k for k, v in RECIPES.items() if isinstance(v, cls)]
    if name not in names: raise ConfigError('recipe', name, f'a {kind} recipe, one of ' + ', '.join(map(repr, names)))
    return RECIPES[name]


# %%
r = get_recipe('pixpro_r50_100ep')
test_eq((r.arch, r.global_batch, r.global_lr, r.weight_decay, r.warmup_epochs), ('resnet50', 1024, 4.0, 1e-5, 5))
test_eq((r.threshold, r.gamma, r.ppm_layers, r.momentum, r.image_size, r.instance_weight), (0.7, 2.0, 1, 0.99, 224, 0.0))
test_eq((r.optimizer, r.optimizer_momentum, r.trust_coefficient, r.final_lr, r.warmup_start_factor),
        ('lars', 0.9, 0.001, 1e-6, 0.01))
test_eq(get_recipe('pixpro_r50_400ep').epochs, 400)
test_eq(r.schedule(), dict(base_lr=4.0, total_steps=125_100, warmup_steps=6255, start_factor=0.01, final_lr=1e-6))
test_eq(lr_at(0, **r.schedule()), 0.04)
test_eq(r.ours, {}); assert 'pixpro_base_r50_100ep.sh' in r.provenance()['lr']
test_fail(lambda: get_recipe('pixpro_r50_200ep'), contains="invalid recipe='pixpro_r50_200ep': expected one of 'pixpro_r50_100ep'")

# %% [markdown]
# Every ResNet-RS depth has both schedules; they differ from the paper's recipe in exactly the fields they declare
# as ours, and `provenance()` says so.

# %%
for e in (100, 400):
    for d in RS_DEPTHS:
        rs = get_recipe(f'pixpro_rs{d}_{e}ep')
        paper = get_recipe(f'pixpro_r50_{e}ep')
        diff = {k for k, v in rs.to_dict().items() if v != paper.to_dict()[k]} - {'name', 'ours'}
        test_eq(diff, {'arch'})  # image size 224 and no stochastic depth: ours, but the same values as the paper's
        test_eq(set(rs.ours), {'arch', 'image_size', 'stochastic_depth'})
        assert rs.provenance()['stochastic_depth'].startswith('ours:') and rs.stochastic_depth == 0.0
test_eq(len(RECIPES), 2 + 2 * 7 + 1 + sum(len(rows) for rows in RESNETRS_SUPERVISED.values()) + 1)
for kind, cls in RECIPE_KINDS.items():  # the name's first word is the kind
    test_eq({k for k in RECIPES if k.startswith(kind + '_')}, {k for k, v in RECIPES.items() if isinstance(v, cls)})
test_eq(set(RECIPES), {k for kind in RECIPE_KINDS for k in RECIPES if k.startswith(kind + '_')})
sorted(RECIPES)

# %% [markdown]
# `kind` keeps each engine to its own recipes: the training chapter (07) runs `pixpro` recipes, the fine-tuning
# chapter (11) `supervised` ones, and each refuses the other's in one line naming the ones it accepts.

# %%
test_eq(get_recipe('pixpro_demo_cpu', kind='pixpro'), _DEMO)
test_eq(get_recipe('supervised_demo_cpu', kind='supervised'), _DEMO_SUPERVISED)
test_fail(lambda: get_recipe('supervised_rs50_160_350ep', kind='pixpro'),
          contains="invalid recipe='supervised_rs50_160_350ep': expected a pixpro recipe, one of 'pixpro_r50_100ep'")
test_fail(lambda: get_recipe('pixpro_r50_100ep', kind='supervised'),
          contains="invalid recipe='pixpro_r50_100ep': expected a supervised recipe, one of 'supervised_rs50_160_350ep'")
test_fail(lambda: get_recipe('pixpro_r50_100ep', kind='finetune'), contains="invalid kind='finetune'")
try: get_recipe('pixpro_r50_100ep', kind='supervised')
except ConfigError as e: assert '\n' not in str(e) and 'pixpro_' not in str(e).split(':', 1)[1]; print(e)

# %% [markdown]
# The supervised recipe and its per-model variants:

# %%
s = get_recipe('supervised_rs50_160_350ep')
test_eq((s.arch, s.image_size, s.epochs, s.global_batch, s.optimizer, s.weight_decay), ('resnetrs50', 160, 350, 4096, 'sgd_nesterov', 4e-5))
test_close(s.global_lr, 1.6, eps=1e-15)
test_eq((s.label_smoothing, s.ema_decay, s.randaugment_ops, s.randaugment_magnitude, s.dropout, s.stochastic_depth),
        (0.1, 0.9999, 2, 10, 0.25, 0.0))
test_eq(steps_per_epoch(IMAGENET_TRAIN_IMAGES, s.global_batch), 312)
test_eq(s.schedule()['final_lr'], 0.0)
test_eq(get_recipe('supervised_rs350_320_350ep'), s350)

# %% [markdown]
# Overrides go through `replace`, which validates again, so a bad override fails where it is written, naming the
# parameter. `to_dict()` is plain data: it round-trips through the class and through `torch.load(weights_only=True)`.

# %%
demo = get_recipe('pixpro_demo_cpu')
test_eq((demo.arch, demo.image_size, demo.global_lr), ('resnetrs50', 96, 1.0))
test_eq(demo.replace(epochs=1).epochs, 1); test_eq(demo.epochs, 3)  # frozen: the registry's recipe is unchanged
test_fail(lambda: demo.replace(threshold=0.0), contains='invalid threshold=0.0: expected a number in (0, 10]')
test_fail(lambda: demo.replace(ppm_layers=3), contains='invalid ppm_layers=3')
test_fail(lambda: demo.replace(image_size=32), contains='invalid image_size=32')
test_fail(lambda: demo.replace(tresh=0.5), contains="invalid recipe field='tresh'")
test_fail(lambda: s.replace(threshold=0.7), contains="invalid recipe field='threshold'")  # not a PixPro recipe
test_fail(lambda: demo.replace(warmup_epochs=4), contains='warmup_epochs=4')
for rec in RECIPES.values():
    test_eq(type(rec)(**rec.to_dict()), rec)
    buffer = io.BytesIO(); torch.save(rec.to_dict(), buffer); buffer.seek(0)
    test_eq(torch.load(buffer, weights_only=True), rec.to_dict())
fields = {f.name for rec in RECIPES.values() for f in dataclasses.fields(rec)}
test_eq(fields - set(GLOSSARY), set())  # every field name is in the glossary

# %% [markdown]
# Written out: the paper's 100-epoch recipe, then where each value of a ResNet-RS recipe comes from (truncated):

# %%
{k: v for k, v in get_recipe('pixpro_r50_100ep').to_dict().items() if k not in ('source', 'ours')}

# %%
{k: v[:72] for k, v in get_recipe('pixpro_rs101_400ep').provenance().items()}

# %% [markdown]
# ## Summary
#
# - `LARS` is SGD with momentum whose gradients are first decayed ($g + \lambda w$) and then rescaled to
#   $\eta\lVert w\rVert/(\lVert g\rVert + \epsilon)$ of their norm, per parameter group switches (`weight_decay`,
#   `lars`) exclude 1-D parameters; its vectorised `torch._foreach_*` step equals the reference transcription to
#   $10^{-12}$ in float64, and its state dict (momentum buffers) reloads with `weights_only=True`.
# - `lars_param_groups` makes the reference's two groups; `lr_at` gives the reference's per-iteration warm-up +
#   cosine (iteration $i$ uses the scheduler value for counter $i$; full lr first at $i = W$; $10^{-6}$ only at
#   $i = T$); `scaled_lr` is the linear scaling rule; `steps_per_epoch` uses `drop_last` (1251 for ImageNet at 1024).
# - `RECIPES` / `get_recipe`: the paper's `pixpro_r50_{100,400}ep`, our `pixpro_rs{50..420}_{100,400}ep` (224 px,
#   no stochastic depth), our `pixpro_demo_cpu`, the ResNet-RS paper's `supervised_rs{50..420}_{size}_350ep`
#   (`supervised_recipe(arch, image_size)`) and our `supervised_demo_cpu`, each with `source`, `ours` and
#   `provenance()`; names read `<task>_<arch>[_<size>]_<length>`, and `get_recipe(name, kind='pixpro')` (or
#   `'supervised'`) refuses a recipe of the other kind.
#
# ## Exercises
#
# 1. Put the weight decay in the trust ratio's denominator instead ($\eta\lVert w\rVert/(\lVert g\rVert +
#    \lambda\lVert w\rVert)$, the LARS paper's form) and measure how far the two optimisers drift apart on the tiny
#    model in 100 steps.
# 2. With `lr_at`, plot the lr of a run resumed at epoch 37 and check it overlays the uninterrupted curve. Which
#    state would a `torch.optim.lr_scheduler` need in the checkpoint to do the same?
# 3. Time `LARS(foreach=True)` against `foreach=False` on the parameters of a ResNet-RS-200 on a GPU.
