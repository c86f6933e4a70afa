import pytest
import torch
from torchvision.models import resnet50

from models import MODEL_NAMES, DeepLabV3, UNet, build_model, load_backbone_weights


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return resnet50(weights=None).state_dict()


@pytest.mark.parametrize("num_classes", [1, 2])
def test_unet_shapes_train_and_eval(num_classes):
    model = UNet(num_classes=num_classes, width=8)
    x = torch.randn(2, 1, 64, 48)
    model.train()
    assert model(x).shape == (2, num_classes, 64, 48)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, num_classes, 64, 48)


@pytest.mark.parametrize("num_classes", [1, 2])
@pytest.mark.parametrize("aux", [False, True])
def test_deeplabv3_shapes_train_and_eval(num_classes, aux):
    torch.manual_seed(0)
    model = DeepLabV3(in_channels=1, num_classes=num_classes, aux=aux)
    # Training needs N >= 2: the ASPP pooling branch batch-norms a 1x1 map.
    x = torch.randn(2, 1, 64, 64)
    model.train()
    out = model(x)
    if aux:
        assert isinstance(out, list) and len(out) == 2
        assert all(o.shape == (2, num_classes, 64, 64) for o in out)
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes, 64, 64)
    model.eval()
    with torch.no_grad():
        out = model(x[:1])
    assert isinstance(out, torch.Tensor) and out.shape == (1, num_classes, 64, 64)


def test_unet_default_param_count():
    count = n_params(UNet())
    print(f"UNet(width=32) parameters: {count:,}")
    assert 6_000_000 <= count <= 9_000_000


def test_unet_rejects_size_not_divisible_by_16():
    model = UNet(width=4)
    with pytest.raises(ValueError, match="40"):
        model(torch.randn(1, 1, 40, 64))


def test_deeplabv3_has_single_channel_stem():
    model = DeepLabV3(in_channels=1, num_classes=2)
    assert model.backbone.conv1.weight.shape == (64, 1, 7, 7)
    assert model.backbone.conv1.bias is None


def test_logits_are_not_squashed():
    torch.manual_seed(0)
    model = UNet(width=4).eval()
    # Scaled input and head weights push raw logits well outside [0, 1] unless a sigmoid is applied inside.
    with torch.no_grad():
        model.head.weight.mul_(50)
        out = model(10 * torch.randn(2, 1, 32, 32))
    assert out.min() < 0 or out.max() > 1


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="resnet"):
        build_model("resnet")


@pytest.mark.parametrize(
    "name, kwargs", [("unet", {"num_classes": 3, "width": 8}), ("deeplabv3", {"in_channels": 2, "aux": True})]
)
def test_build_model_rebuilds_from_config(name, kwargs):
    assert name in MODEL_NAMES
    model = build_model(name, **kwargs)
    rebuilt = build_model(name, **model.config)
    assert rebuilt.config == model.config
    assert n_params(rebuilt) == n_params(model)


def test_load_backbone_weights_from_resnet_file(tmp_path, resnet_state):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet_state, path)
    model = DeepLabV3(in_channels=1, num_classes=2)
    with pytest.warns(UserWarning, match="fc.weight"):
        missing, unexpected = load_backbone_weights(model, path)
    assert missing == []
    assert sorted(unexpected) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.backbone.conv1.weight, resnet_state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, resnet_state["layer1.0.conv1.weight"])
    torch.testing.assert_close(model.backbone.layer4[2].bn3.running_var, resnet_state["layer4.2.bn3.running_var"])


def test_load_backbone_weights_from_deeplab_checkpoint(resnet_state):
    source = DeepLabV3(in_channels=1, num_classes=2, aux=True)
    target = DeepLabV3(in_channels=1, num_classes=3)
    with pytest.warns(UserWarning):
        missing, unexpected = load_backbone_weights(target, {"model": source.state_dict()})
    assert missing == []
    # The head does not belong to the backbone: reported, not loaded.
    assert unexpected and all(k.startswith(("classifier.", "aux_classifier.")) for k in unexpected)
    torch.testing.assert_close(target.backbone.conv1.weight, source.backbone.conv1.weight)


def test_load_backbone_weights_multi_channel_stem(resnet_state):
    model = DeepLabV3(in_channels=2, num_classes=2)
    with pytest.warns(UserWarning):
        load_backbone_weights(model, {"state_dict": resnet_state})
    rgb_sum = resnet_state["conv1.weight"].sum(1, keepdim=True)
    torch.testing.assert_close(model.backbone.conv1.weight, (rgb_sum / 2).repeat(1, 2, 1, 1))


def test_load_backbone_weights_reports_missing(resnet_state):
    partial = {k: v for k, v in resnet_state.items() if not k.startswith("layer4.")}
    with pytest.warns(UserWarning, match="missing"):
        missing, _ = load_backbone_weights(DeepLabV3(), partial)
    assert "backbone.layer4.0.conv1.weight" in missing


def test_load_backbone_weights_refuses_a_file_with_no_backbone_weight():
    model = DeepLabV3()
    before = model.backbone.conv1.weight.clone()
    with pytest.raises(ValueError, match="holds no ResNet-50 weights.*stem.0.weight"):
        load_backbone_weights(model, UNet(width=4).state_dict())
    assert torch.equal(model.backbone.conv1.weight, before)


def test_load_backbone_weights_wrong_shape_raises(resnet_state):
    bad = dict(resnet_state)
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 32, 1, 1)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight.*\(64, 32, 1, 1\).*\(64, 64, 1, 1\)"):
        load_backbone_weights(DeepLabV3(), bad)


@pytest.mark.parametrize("name,num_classes", [("unet", 1), ("unet", 3), ("deeplabv3", 2)])
def test_untrained_models_start_at_the_foreground_prior(name, num_classes):
    from models.common import FOREGROUND_PRIOR

    torch.manual_seed(0)
    model = build_model(name, 1, num_classes).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 1, 64, 64))
    probs = torch.sigmoid(logits) if num_classes == 1 else logits.softmax(1)[:, 1:].sum(1, keepdim=True)
    # near the prior (a zero bias would give 0.5); the random weights of the head spread the logits a little
    assert probs.mean().item() == pytest.approx(FOREGROUND_PRIOR, rel=0.25)
