"Cross-checks of pixpro_rs.resnet_rs against timm (a dev dependency) and the checkpoint loader's errors."
import pytest
import torch

from pixpro_rs.resnet_rs import CheckpointError, DropPath, create_model, load_pretrained

from helpers import randomise_bn

timm = pytest.importorskip('timm')


@pytest.mark.parametrize('arch', ['resnetrs50', 'resnetrs101'])
def test_timm_state_dict_loads_strictly_and_logits_match(arch, tmp_path):
    torch.manual_seed(0)
    ref = randomise_bn(timm.create_model(arch, pretrained=False)).eval()
    sd = ref.state_dict()
    ours = create_model(arch).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ref(x), ours(x)
        assert a.abs().max() > 1e-2, 'the comparison must not be trivially zero'
        assert (a - b).abs().max().item() < 1e-4
        assert torch.allclose(ref.forward_features(x), ours.forward_features(x), atol=1e-4)
    # the same weights through a file, as a user would load a timm checkpoint
    torch.save({'state_dict': {f'module.{k}': v for k, v in sd.items()}}, tmp_path / f'{arch}.pth')
    again = load_pretrained(create_model(arch).eval(), tmp_path / f'{arch}.pth')
    with torch.no_grad():
        assert (again(x) - a).abs().max().item() < 1e-4


def test_timm_rule_matches_timm_drop_path_rates():
    with torch.device('meta'):
        ref = timm.create_model('resnetrs200', pretrained=False, drop_path_rate=0.1)
        ours = create_model('resnetrs200', drop_path_rule='timm', drop_path_rate=0.1)
    theirs = [getattr(b.drop_path, 'drop_prob', 0.0) if b.drop_path is not None else 0.0
              for s in (ref.layer1, ref.layer2, ref.layer3, ref.layer4) for b in s]
    mine = [b.drop_path.p if isinstance(b.drop_path, DropPath) else 0.0
            for s in (ours.layer1, ours.layer2, ours.layer3, ours.layer4) for b in s]
    assert len(mine) == len(theirs) == 66
    assert max(abs(p - q) for p, q in zip(mine, theirs)) < 1e-12


def test_bad_checkpoint_error_names_file_and_keys(tmp_path):
    path = tmp_path / 'timm_rs50.pth'
    torch.save(timm.create_model('resnetrs50', pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(create_model('resnetrs101'), path)
    msg = str(e.value)
    assert str(path) in msg and 'resnetrs101' in msg
    assert '0 unexpected keys' in msg and 'missing (first 5): layer3.6.conv1.weight' in msg
    path2 = tmp_path / 'rs50_10classes.safetensors'
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in create_model('resnetrs50', num_classes=10).state_dict().items()}, str(path2))
    with pytest.raises(CheckpointError, match=r'2 shape conflicts\n.*fc.bias: file \[10\] vs model \[1000\], fc.weight: file \[10, 2048\] vs model \[1000, 2048\]'):
        load_pretrained(create_model('resnetrs50'), path2)
    load_pretrained(create_model('resnetrs50', num_classes=0), path2)  # a backbone ignores the head
