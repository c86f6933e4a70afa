"""Classic U-Net (Ronneberger et al., 2015) with batch norm and same-size padding."""

import torch
from torch import Tensor, nn

from base import InputError

from .common import init_prior_bias

# Four 2x2 max-pools: each input side must divide by 2**4 so that skips and upsampled maps align.
DOWNSAMPLE_FACTOR = 16


class _DoubleConv(nn.Sequential):
    """(Conv3x3 -> BN -> ReLU) x 2; conv bias is redundant before BN."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    """2x2 transposed-conv upsampling, concatenation with the skip, then a double conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = _DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net returning logits; no sigmoid/softmax inside.

    Args:
        in_channels: input image channels.
        num_classes: output channels; 1 for a sigmoid (binary) head, >= 2 for softmax.
        width: channels of the first level; the levels have width * (1, 2, 4, 8, 16).

    Shape:
        input (N, in_channels, H, W) with H and W divisible by 16; output (N, num_classes, H, W).

    The same single tensor is returned in training and eval mode (no deep supervision).
    `config` holds the constructor arguments: `UNet(**model.config)` rebuilds the model.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 1, width: int = 32) -> None:
        super().__init__()
        for arg, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if value < 1:
                raise InputError(f"UNet {arg} must be >= 1, got {value}")
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width}
        channels = [width * m for m in (1, 2, 4, 8, 16)]
        self.stem = _DoubleConv(in_channels, channels[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _DoubleConv(c_in, c_out))
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.ups = nn.ModuleList(
            _Up(c_in, c_out) for c_in, c_out in zip(channels[:0:-1], channels[-2::-1])
        )
        self.head = nn.Conv2d(channels[0], num_classes, 1)
        init_prior_bias(self.head)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[-2] % DOWNSAMPLE_FACTOR or x.shape[-1] % DOWNSAMPLE_FACTOR:
            raise ValueError(
                f"UNet input must be (N, C, H, W) with H and W divisible by {DOWNSAMPLE_FACTOR}, "
                f"got {tuple(x.shape)}; resize or pad the slices in the data pipeline"
            )
        x = self.stem(x)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.head(x)


def load_pretrained_weights(model: UNet, state: dict) -> list[str]:
    """Load a pretrained U-Net's weights (pretrain.py --model unet) into ``model``, all but its output convolution.

    The encoder (``stem.*``, ``downs.*``) must be in ``state`` with the model's shapes; the decoder (``ups.*``)
    is loaded when ``state`` holds it. Returns the model keys loaded. Raises ValueError naming what does not fit.
    """
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    encoder = [k for k in own if k.startswith(("stem.", "downs."))]
    missing = [k for k in encoder if k not in state]
    if missing:
        raise ValueError(f"holds no U-Net encoder: {len(missing)} of the model's {len(encoder)} encoder weights are "
                         f"not in it ({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''}); "
                         f"pretrain.py --model unet writes one")
    loaded = [k for k in own if k in state]
    for key in loaded:
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise ValueError(f"{key} is {tuple(state[key].shape)} in the file, {tuple(own[key].shape)} in the model "
                             f"(pretrain.py's --width must be train.py's)")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return loaded
