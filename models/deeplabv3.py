"""DeepLabV3-ResNet50 (torchvision) with an `in_channels`-channel stem, and ResNet-50 weight loading."""

import os
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from base import InputError

from .common import init_prior_bias

# ImageNet ResNet stems are RGB.
_RGB_CHANNELS = 3


class DeepLabV3(nn.Module):
    """torchvision DeepLabV3-ResNet50 (output stride 8) returning logits; no pretrained weights are fetched.

    Args:
        in_channels: input image channels; `backbone.conv1` is a fresh `in_channels`-channel 7x7/2 conv.
        num_classes: output channels; 1 for a sigmoid (binary) head, >= 2 for softmax.
        aux: add torchvision's auxiliary FCN head on layer3.

    Shape:
        input (N, in_channels, H, W); output (N, num_classes, H, W) (bilinear upsampling, any H, W).

    Returns:
        eval mode: the main logits. Training mode: `[main, aux]` if `aux`, else the main logits.
        torchvision's `{"out", "aux"}` dict is never exposed.

    In training mode the ASPP image-pooling branch applies BatchNorm to a 1x1 map, so batches need N >= 2.
    Submodule names (`backbone`, `classifier`, `aux_classifier`) match torchvision's, so state-dict keys do too.
    `config` holds the constructor arguments: `DeepLabV3(**model.config)` rebuilds the model.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, aux: bool = False) -> None:
        super().__init__()
        for arg, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if value < 1:
                raise InputError(f"DeepLabV3 {arg} must be >= 1, got {value}")
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "aux": aux}
        # imported here: torchvision pulls in torch._dynamo (3 s of every script start on a 2-core CPU),
        # which U-Net runs need not wait for
        from torchvision.models.segmentation import deeplabv3_resnet50

        net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux)
        net.backbone.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # Same init torchvision's ResNet gives its convs.
        nn.init.kaiming_normal_(net.backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.backbone = net.backbone
        self.classifier = net.classifier
        self.aux_classifier = net.aux_classifier
        for head in (self.classifier, self.aux_classifier):
            if head is not None:
                init_prior_bias(head[-1])

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = F.interpolate(self.classifier(features["out"]), size=size, mode="bilinear", align_corners=False)
        # The aux head only feeds the training loss, so eval skips its cost.
        if not self.training or self.aux_classifier is None:
            return out
        aux = F.interpolate(self.aux_classifier(features["aux"]), size=size, mode="bilinear", align_corners=False)
        return [out, aux]


def _adapt_conv1(weight: Tensor, in_channels: int) -> Tensor:
    """Map an RGB stem (64, 3, 7, 7) to (64, in_channels, 7, 7).

    The RGB kernels are summed, then split evenly over the new channels: a grey image repeated on every
    input channel then gives the same activations as the RGB model on that grey image. For in_channels=1
    this is the plain channel sum; otherwise it is the channel mean scaled by 3 / in_channels, repeated.
    """
    if weight.ndim != 4 or weight.shape[1] != _RGB_CHANNELS or in_channels == _RGB_CHANNELS:
        return weight
    return (weight.sum(dim=1, keepdim=True) / in_channels).repeat(1, in_channels, 1, 1)


def load_backbone_weights(
    model: DeepLabV3, path_or_state_dict: str | os.PathLike | Mapping[str, Tensor]
) -> tuple[list[str], list[str]]:
    """Load ResNet-50 weights into `model.backbone` (strict=False, but nothing is dropped silently).

    Args:
        model: the DeepLabV3 to load into (in place).
        path_or_state_dict: a file (read with `torch.load(..., map_location="cpu", weights_only=True)`) or a
            state dict, optionally wrapped as `{"state_dict": ...}` or `{"model": ...}`. Keys are either a
            torchvision ResNet-50's (`conv1.weight`, `layer1.0...`, `fc.weight`) or a DeepLabV3 checkpoint's
            (`backbone.*`; its `classifier.*`/`aux_classifier.*` keys are not loaded).
            An RGB `conv1.weight` is adapted to the model's input channels (see `_adapt_conv1`).

    Returns:
        (missing, unexpected): model keys (`backbone.*`) left at their initial values, and source keys that
        were not loaded (e.g. `fc.weight`, `fc.bias`). Both are also reported with `warnings.warn`.

    Raises:
        ValueError: a source key's tensor has a different shape from the model's (after the conv1 adaptation),
            or no key of the source is a backbone weight.
    """
    if not isinstance(model, DeepLabV3):
        raise TypeError(f"load_backbone_weights expects a models.deeplabv3.DeepLabV3, got {type(model).__name__}")
    state = path_or_state_dict
    if isinstance(state, (str, os.PathLike)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict (mapping of name -> tensor), got {type(state).__name__}")

    is_deeplab = any(key.startswith("backbone.") for key in state)
    own = model.backbone.state_dict()
    to_load, unexpected = {}, []
    for key, value in state.items():
        name = key.removeprefix("backbone.") if is_deeplab else key
        if (is_deeplab and name == key) or name not in own:
            unexpected.append(key)
            continue
        if name == "conv1.weight":
            value = _adapt_conv1(value, own[name].shape[1])
        if value.shape != own[name].shape:
            raise ValueError(
                f"backbone weight {key!r} has shape {tuple(value.shape)} in the checkpoint "
                f"but {tuple(own[name].shape)} in the model"
            )
        to_load[name] = value

    if not to_load:
        raise ValueError(f"holds no ResNet-50 weights ({len(state)} keys, e.g. {', '.join(list(state)[:2])}); "
                         f"expected a torchvision ResNet-50's (conv1.weight, layer1.0...) or a DeepLabV3's (backbone.*)")
    result = model.backbone.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, "keys were filtered against the backbone's own state dict"
    missing = [f"backbone.{key}" for key in result.missing_keys]
    if missing or unexpected:
        warnings.warn(
            f"load_backbone_weights: {len(missing)} missing keys {missing}; "
            f"{len(unexpected)} unexpected keys (not loaded) {unexpected}",
            stacklevel=2,
        )
    return missing, unexpected
