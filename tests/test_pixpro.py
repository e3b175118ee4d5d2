"""Cross-component tests of PixPro: real backbones (this book's ResNet-RS, torchvision's ResNet-50), the package's
public names, and a property of the mask on any map size. The chapters' own tests (04_positives, 05_pixpro) are not
repeated here."""
import pytest
import torch
import torchvision
from torch import nn

from pixpro_rs.pixpro import PixPro, momentum_at, positive_mask


def _batch(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    c1 = torch.tensor([[.1, .2, .9, .8], [0., 0, 1, 1]]).repeat(n // 2, 1)
    c2 = torch.tensor([[.3, .3, .6, .7], [1., 0, 0, 1]]).repeat(n // 2, 1)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g), c1, c2


def _train_step(model, batch):
    model.zero_grad()
    out = model(*batch)
    out.loss.backward()
    return out


def test_public_names_importable_from_pixpro():
    import pixpro_rs.pixpro as pp
    for name in ('positive_mask', 'pixpro_loss', 'pixcontrast_loss', 'PPM', 'momentum_at', 'PixPro'):
        assert hasattr(pp, name), name


def test_resnet_rs_backbone():
    resnet_rs = pytest.importorskip('pixpro_rs.resnet_rs')
    torch.manual_seed(0)
    bb = resnet_rs.create_model('resnetrs_tiny', num_classes=0)
    model = PixPro(bb, hidden_dim=64, proj_dim=16, total_steps=5, instance_weight=1.)
    assert model.projector[0].in_channels == bb.num_features
    out = _train_step(model, _batch(size=64))  # 2x2 C5 maps
    assert torch.isfinite(out.loss) and -8 <= float(out.loss.detach()) <= 8
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith('target.'))
    assert all(p.grad is None for p in model.target.parameters())


def test_torchvision_resnet50_trunk_channels_by_dry_run():
    trunk = nn.Sequential(*list(torchvision.models.resnet50(weights=None).children())[:-2])  # no avgpool, no fc
    model = PixPro(trunk, hidden_dim=128, proj_dim=32, total_steps=3)
    assert model.projector[0].in_channels == 2048 and trunk.training
    out = _train_step(model, _batch(size=64))
    assert torch.isfinite(out.loss) and out.momentum == momentum_at(0, 3)


@pytest.mark.parametrize('size', [(7, 7), (5, 5), (4, 6)])
def test_mask_flip_symmetry_any_size(size):
    "Flipping both views horizontally mirrors the columns of both maps: the mask is permuted, its count unchanged."
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(16, 2, generator=g) * .5
    cq = torch.cat([xy, xy + .3 + .2 * torch.rand(16, 2, generator=g)], 1)
    xy = torch.rand(16, 2, generator=g) * .5
    ck = torch.cat([xy, xy + .3 + .2 * torch.rand(16, 2, generator=g)], 1)
    flip = lambda c: c[:, [2, 1, 0, 3]]
    _, m = positive_mask(cq, ck, size)
    _, mf = positive_mask(flip(cq), flip(ck), size)
    H, W = size
    perm = torch.arange(H * W).view(H, W).flip(1).flatten()
    assert torch.equal(mf, m[:, perm][:, :, perm])
