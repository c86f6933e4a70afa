"""Segmentation models. Every model returns logits (N, C, H, W) at input resolution.

C = 1: sigmoid (binary) head; C >= 2: softmax over classes, class 0 = background.
In training mode a model with auxiliary heads returns `[main, aux, ...]`; in eval mode one tensor.
"""

from pathlib import Path

import torch
from torch import nn

from base import InputError

from .deeplabv3 import DeepLabV3, load_backbone_weights
from .unet import UNet, load_pretrained_weights

_MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "deeplabv3": DeepLabV3}
MODEL_NAMES = tuple(_MODELS)
# the constructor options each model takes from the command line (train.py --width, --aux)
_OPTIONS: dict[str, tuple[str, ...]] = {"unet": ("width",), "deeplabv3": ("aux",)}

__all__ = ["MODEL_NAMES", "DeepLabV3", "UNet", "build_model", "load_backbone_weights", "load_pretrained",
           "model_from_checkpoint", "model_options", "pretrained_state"]


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


def model_options(name: str, **options) -> dict:
    """The options of ``options`` (e.g. every training flag) that model ``name`` takes, for :func:`build_model`.

    ``model_options("unet", width=32, aux=False)`` -> ``{"width": 32}``.
    """
    if name not in _MODELS:
        raise InputError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return {k: options[k] for k in _OPTIONS[name] if k in options}


def load_pretrained(model: nn.Module, state: dict) -> None:
    """Start ``model`` from pretrained weights (train.py --backbone-weights), in place: a DeepLabV3 from a
    ResNet-50 or DeepLabV3 state dict (:func:`load_backbone_weights`), a U-Net from pretrain.py's encoder.pth
    (:func:`load_pretrained_weights`). ``state`` may be wrapped as ``{"model": ...}``.

    Raises ValueError (or TypeError) saying what in ``state`` does not fit the model.
    """
    if isinstance(model, DeepLabV3):
        load_backbone_weights(model, state)
        return
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise TypeError(f"expected a state dict (mapping of name -> tensor), got {type(state).__name__}")
    load_pretrained_weights(model, state)


def pretrained_state(model: nn.Module) -> dict:
    """What :func:`load_pretrained` starts a model from, taken from a pretrained ``model`` (pretrain.py keeps
    it): DeepLabV3's backbone (``backbone.*``), all of the U-Net but its output convolution; on the CPU."""
    state = model.state_dict()
    if isinstance(model, DeepLabV3):
        kept = [k for k in state if k.startswith("backbone.")]
    else:
        kept = [k for k in state if not k.startswith("head.")]
    return {k: state[k].detach().cpu().contiguous() for k in kept}


def _describe_mismatch(held: dict, wanted: dict) -> str:
    """What a state dict holds that a model does not take: shape mismatches, then missing/unexpected keys."""
    parts = []
    for key in wanted:
        if key in held and hasattr(held[key], "shape") and tuple(held[key].shape) != tuple(wanted[key].shape):
            parts.append(f"{key} is {tuple(held[key].shape)} in the checkpoint, "
                         f"{tuple(wanted[key].shape)} in the model")
    missing = [k for k in wanted if k not in held]
    unexpected = [k for k in held if k not in wanted]
    if missing:
        parts.append(f"{len(missing)} weight(s) missing from the checkpoint ({', '.join(missing[:2])}"
                     f"{', ...' if len(missing) > 2 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) the model has no place for ({', '.join(unexpected[:2])}"
                     f"{', ...' if len(unexpected) > 2 else ''})")
    return "; ".join(parts[:3]) + ("; ..." if len(parts) > 3 else "")


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (strictly).

    Raises InputError naming what the checkpoint holds when its description or its weights do not make a
    model of this repository.
    """
    config = dict(ckpt["model_config"])
    name = config.pop("name")
    try:
        model = build_model(name, **config)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: describes a model this code cannot build ({name} {config}): {e}") from None
    state = ckpt["model"]
    wanted = model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: its 'model' entry is not a state dict of tensors")
    problem = _describe_mismatch(state, wanted)
    if problem:
        raise InputError(f"{path}: holds weights that do not fit the {name} {config} it describes: {problem}")
    model.load_state_dict(state)
    return model
