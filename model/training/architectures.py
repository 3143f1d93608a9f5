"""Teacher and student segmentation networks.

Both are the same small U-Net family so that distillation only changes capacity: the student has
fewer resolution levels and narrower layers (InstaGeo shrinks Prithvi the same way, by dropping
blocks). Everything is convolutional and pads odd sizes internally, so a network trained on
64 x 64 chips scores any chip size the stream sends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetSpec:
    """Enough to rebuild a network from a model card (``card.architecture``)."""

    in_channels: int
    num_classes: int
    widths: tuple[int, ...]
    name: str = "unet"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetSpec:
        if data.get("name", "unet") != "unet":
            raise ValueError(f"unknown architecture {data.get('name')!r}")
        return cls(
            in_channels=int(data["in_channels"]),
            num_classes=int(data["num_classes"]),
            widths=tuple(int(w) for w in data["widths"]),
        )


def teacher_spec(in_channels: int, num_classes: int) -> UNetSpec:
    return UNetSpec(in_channels, num_classes, (32, 64, 128, 256))


def student_spec(in_channels: int, num_classes: int) -> UNetSpec:
    """Narrow at full resolution, where a small network spends most of its CPU time; on the
    validation blocks (8, 16, 48) scored like (12, 24, 48) at about twice the speed, while
    (8, 16, 32, 64) never learned water."""
    return UNetSpec(in_channels, num_classes, (8, 16, 48))


class ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """1x1 projection + bilinear upsampling: cheaper than a transposed conv, no checkerboard.

    Both are linear, so projecting first gives the same result while upsampling half the channels
    (upsampling is a large share of the student's CPU time).
    """

    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(c_in, c_skip, 1, bias=False)
        self.block = ConvBlock(2 * c_skip, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.project(x), size=skip.shape[-2:], mode="bilinear",
                          align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        if len(spec.widths) < 2:
            raise ValueError("a U-Net needs at least two widths")
        widths = list(spec.widths)
        self.factor = 2 ** (len(widths) - 1)
        self.encoders = nn.ModuleList(
            ConvBlock(c_in, c_out)
            for c_in, c_out in zip([spec.in_channels, *widths[:-1]], widths, strict=True)
        )
        self.decoders = nn.ModuleList(
            Up(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], spec.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        pad_h = (self.factor - h % self.factor) % self.factor
        pad_w = (self.factor - w % self.factor) % self.factor
        if pad_h or pad_w:
            x = F.pad(x, [0, pad_w, 0, pad_h])
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        skips.pop()
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.head(x)[..., :h, :w]


def build(spec: UNetSpec) -> UNet:
    return UNet(spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, in_channels: int, chip_size: int) -> int:
    """FLOPs of one forward pass on one chip, as counted by torch's FlopCounterMode.

    It counts convolutions and matrix products (2 FLOPs per multiply-add); normalisation,
    activations and interpolation are not counted, so this is a lower bound.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, in_channels, chip_size, chip_size))
    model.train(was_training)
    return int(counter.get_total_flops())
