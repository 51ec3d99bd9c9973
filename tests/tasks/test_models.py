"""The model registry: paper models build and train a step; weights load from local files only."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cxrfl_ray.tasks.models import ModelError, create_model, known_models


@pytest.mark.parametrize("name, task, size", [
    ("unetplusplus-efficientnet-b4", "segmentation", 64),
    ("resnet50", "classification", 64),
    ("densenet121", "classification", 64),
])
def test_paper_models_construct_and_take_one_step(name, task, size):
    torch.manual_seed(0)
    model = create_model(name, task, in_chans=1, num_classes=3)
    x = torch.randn(2, 1, size, size)
    out = model(x)
    assert out.shape == ((2, 1, size, size) if task == "segmentation" else (2, 3))
    before = [p.detach().clone() for p in model.parameters()][:3]
    target = torch.rand_like(out) if task == "segmentation" else torch.tensor([0, 2])
    loss = (torch.nn.functional.binary_cross_entropy_with_logits(out, target) if task == "segmentation"
            else torch.nn.functional.cross_entropy(out, target))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, list(model.parameters())[:3]))


def test_three_channel_variant():
    assert create_model("resnet18", "classification", in_chans=3, num_classes=3)(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelError, match="unknown model 'resnet51'.*resnet18.*resnet50"):
        create_model("resnet51", "classification")
    with pytest.raises(ModelError, match="'resnet18' is a classification model, not segmentation.*unet-resnet18"):
        create_model("resnet18", "segmentation")
    assert "unetplusplus-efficientnet-b4" in known_models("segmentation")


def test_timm_weights_from_a_local_file_adapt_the_stem(tmp_path):
    torch.manual_seed(1)
    source = create_model("resnet18", "classification", in_chans=3, num_classes=1000)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    model = create_model("resnet18", "classification", in_chans=1, num_classes=3, pretrained=str(path))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.fc.out_features == 3


def test_smp_encoder_weights_from_a_pth_file(tmp_path):
    torch.manual_seed(2)
    donor = create_model("unet-resnet18", "segmentation", in_chans=3)
    path = tmp_path / "encoder.pth"
    torch.save(donor.encoder.state_dict(), path)
    model = create_model("unet-resnet18", "segmentation", in_chans=1, pretrained=str(path))
    torch.testing.assert_close(model.encoder.conv1.weight, donor.encoder.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.encoder.layer2[0].conv1.weight, donor.encoder.layer2[0].conv1.weight)
    (tmp_path / "junk.pth").write_bytes(b"")
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(ModelError, match="no weight in .*junk.pth fits the encoder"):
        create_model("unet-resnet18", "segmentation", pretrained=str(tmp_path / "junk.pth"))


def test_missing_file_and_offline_hub_fail_fast(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="pretrained weights file not found"):
        create_model("resnet18", "classification", pretrained=str(tmp_path / "nope.pth"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=0.*local weights file"):
        create_model("resnet18", "classification", pretrained="hub")


def test_groupnorm_replaces_every_batchnorm_and_survives_a_checkpoint(tmp_path):
    from cxrfl_ray.config import build_config
    from cxrfl_ray.tasks.checkpoint import load_checkpoint, save_checkpoint

    batch = create_model("unet-resnet18", "segmentation", norm="batch")
    group = create_model("unet-resnet18", "segmentation", norm="group")
    kinds = lambda m: {type(x).__name__ for x in m.modules()}  # noqa: E731
    assert "BatchNorm2d" in kinds(batch) and "GroupNorm" not in kinds(batch)
    assert "BatchNorm2d" not in kinds(group) and "GroupNorm" in kinds(group)
    # No running statistics are left for FedAvg to average.
    assert not any("running_mean" in k for k in group.state_dict())
    cfg = build_config({"task": "segmentation", "model": {"name": "unet-resnet18", "norm": "group"}})
    path = save_checkpoint(tmp_path / "gn.safetensors", group, cfg, 1, [])
    loaded, _, _ = load_checkpoint(path)
    x = torch.randn(1, 1, 64, 64)
    assert torch.allclose(loaded.eval()(x), group.eval()(x))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_smp_warm_start_from_our_whole_checkpoint_loads_decoder_and_encoder(tmp_path, norm):
    from cxrfl_ray.config import build_config
    from cxrfl_ray.tasks.checkpoint import save_checkpoint

    torch.manual_seed(3)
    donor = create_model("unet-resnet18", "segmentation", norm=norm)
    with torch.no_grad():  # weights a fresh build cannot have by chance (BatchNorm starts at 1 and 0)
        for p in donor.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = build_config({"task": "segmentation", "model": {"name": "unet-resnet18", "norm": norm}})
    path = save_checkpoint(tmp_path / "donor.safetensors", donor, cfg, 1, [])
    torch.manual_seed(4)
    fresh = create_model("unet-resnet18", "segmentation", norm=norm)
    torch.manual_seed(4)
    warm = create_model("unet-resnet18", "segmentation", norm=norm, pretrained=str(path))
    decoder_key = "decoder.blocks.0.conv1.0.weight"
    assert not torch.equal(fresh.state_dict()[decoder_key], donor.state_dict()[decoder_key])
    own, given = warm.state_dict(), donor.state_dict()
    assert set(own) == set(given)
    for key in own:  # every tensor: encoder, decoder, head, norms (and BatchNorm statistics)
        assert torch.equal(own[key], given[key]), key
    x = torch.randn(2, 1, 64, 64)
    assert torch.equal(warm.eval()(x), donor.eval()(x))


def test_smp_warm_start_from_a_plain_safetensors_state_dict_with_a_three_channel_stem(tmp_path):
    torch.manual_seed(5)
    donor = create_model("unet-resnet18", "segmentation", in_chans=3)
    path = tmp_path / "smp.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, path)
    model = create_model("unet-resnet18", "segmentation", in_chans=1, pretrained=str(path))
    torch.testing.assert_close(model.encoder.conv1.weight, donor.encoder.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.decoder.blocks[1].conv2[0].weight, donor.decoder.blocks[1].conv2[0].weight)
    torch.testing.assert_close(model.segmentation_head[0].weight, donor.segmentation_head[0].weight)
    # A whole-model file where nothing fits is refused, as an encoder file is.
    save_file({"decoder.unrelated.weight": torch.zeros(3)}, tmp_path / "junk.safetensors")
    with pytest.raises(ModelError, match="no weight in .*junk.safetensors fits the model"):
        create_model("unet-resnet18", "segmentation", pretrained=str(tmp_path / "junk.safetensors"))


def test_groupnorm_keeps_the_activation_of_timms_batchnorm_act_layers():
    """EfficientNet's norm layers apply SiLU themselves (timm's BatchNormAct2d); with GroupNorm the
    activations stay, so the model computes the same kind of function."""
    import torch

    count = lambda m, kind: sum(isinstance(x, kind) for x in m.modules())  # noqa: E731
    batch = create_model("efficientnet_b0", "classification", 1, 3, norm="batch")
    group = create_model("efficientnet_b0", "classification", 1, 3, norm="group")
    assert count(group, torch.nn.SiLU) == count(batch, torch.nn.SiLU) > 10
    assert count(group, torch.nn.BatchNorm2d) == 0 and count(group, torch.nn.GroupNorm) == count(batch, torch.nn.BatchNorm2d)
    x = torch.rand(2, 1, 64, 64)
    group.eval()
    assert group(x).shape == (2, 3)
    assert float(group.bn1(group.conv_stem(x)).min()) >= -0.2785  # SiLU's minimum: the act ran
