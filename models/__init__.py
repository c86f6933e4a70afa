"""Segmentation models. Every model returns logits (N, C, H, W) at input resolution.

C = 1: sigmoid (binary) head; C >= 2: softmax over classes, class 0 = background.
In training mode a model with auxiliary heads returns `[main, aux, ...]`; in eval mode one tensor.
"""

from torch import nn

from utils.base import InputError

from .deeplabv3 import DeepLabV3, load_backbone_weights
from .unet import UNet

_MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "deeplabv3": DeepLabV3}
MODEL_NAMES = tuple(_MODELS)

__all__ = ["MODEL_NAMES", "DeepLabV3", "UNet", "build_model", "load_backbone_weights"]


def build_model(name: str, in_channels: int = 1, num_classes: int = 1, **kwargs) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of `MODEL_NAMES`.
        in_channels: input image channels.
        num_classes: output channels (1 = binary/sigmoid, >= 2 = softmax).
        **kwargs: model-specific options (`width` for "unet", `aux` for "deeplabv3").

    Returns:
        The model; `build_model(name, **model.config)` rebuilds it, so a checkpoint stores
        `{"name": name, **model.config}`.
    """
    if name not in _MODELS:
        raise InputError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return _MODELS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
