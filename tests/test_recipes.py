"""Recipes chapter, checked from outside the notebook: LARS (vectorised == reference, float64, 1e-12), lr_at, recipes."""
import io
import math

import pytest
import torch
from torch import nn

from pixpro_rs.core import ConfigError
from pixpro_rs.recipes import (LARS, RECIPES, _random_grads, _random_lars_setup, get_recipe, lars_param_groups, lr_at,
                               scaled_lr)


def _run(foreach, steps=6, lr=4.0, dtype=torch.float64, seed=0):
    ps, groups = _random_lars_setup(seed, dtype)
    opt = LARS(groups, lr=lr, foreach=foreach)
    for s in range(steps):
        _random_grads(ps, s, seed)
        opt.step()
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_foreach_lars_equals_reference_float64(seed):
    (pf, of), (pr, orf) = _run(True, seed=seed), _run(False, seed=seed)
    for a, b in zip(pf, pr): assert (a - b).abs().max().item() <= 1e-12
    bufs_f = [s['momentum_buffer'] for s in of.state.values()]
    bufs_r = [s['momentum_buffer'] for s in orf.state.values()]
    assert len(bufs_f) == len(bufs_r) == 7
    for a, b in zip(bufs_f, bufs_r): assert (a - b).abs().max().item() <= 1e-12


def test_lars_one_step_by_hand():
    w = nn.Parameter(torch.tensor([3., 4.], dtype=torch.float64))
    opt = LARS([w], lr=2.0, weight_decay=0.1)
    w.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    opt.step()
    expected = torch.tensor([3 - 0.006 / (1 + 1e-8), 4 - 0.008 / (1 + 1e-8)], dtype=torch.float64)
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-15)


def test_lars_state_dict_roundtrip_weights_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 5, 5))
    opt = LARS(lars_param_groups(model, 1e-5), lr=0.5)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    buf = io.BytesIO(); torch.save(opt.state_dict(), buf); buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt2 = LARS(lars_param_groups(model, 1e-5), lr=0.5)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        assert torch.equal(opt.state[p]['momentum_buffer'], opt2.state[p]['momentum_buffer'])
    assert [g['lars'] for g in opt2.param_groups] == [False, True]


def test_lr_at_hand_values():
    kw = dict(base_lr=4.0, total_steps=100, warmup_steps=10)
    assert lr_at(0, **kw) == pytest.approx(0.04, abs=1e-15)
    assert lr_at(5, **kw) == pytest.approx(2.02, abs=1e-14)
    assert lr_at(10, **kw) == 4.0
    assert lr_at(55, **kw) == pytest.approx((4 + 1e-6) / 2, abs=1e-14)
    assert lr_at(99, **kw) == pytest.approx(1e-6 + (4 - 1e-6) * math.sin(math.pi / 180) ** 2, abs=1e-15)
    assert lr_at(100, **kw) == 1e-6
    with pytest.raises(ConfigError): lr_at(-1, **kw)


def test_recipes_registry():
    r = get_recipe('pixpro_r50_100ep')
    assert (r.global_batch, r.global_lr, scaled_lr(r.lr, 1024)) == (1024, 4.0, 4.0)
    assert {f'pixpro_rs{d}_{e}ep' for d in (50, 101, 152, 200, 270, 350, 420) for e in (100, 400)} <= set(RECIPES)
    with pytest.raises(ConfigError, match="invalid recipe='nope'"): get_recipe('nope')
