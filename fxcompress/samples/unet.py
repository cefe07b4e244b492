"""UNet (Ronneberger et al., 2015) as in NNCF's segmentation sample: `depth` resolution levels,
`width` channels at the first level doubling per level, padded 3x3 convolutions (so the output has
the input's size and no cropping is needed), optional BatchNorm, transposed-conv or bilinear
upsampling. The forward is plain tensor code, so torch.fx traces it and every conv is compressible.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """Two padded 3x3 convolutions, each followed by BatchNorm (optional) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool):
        layers = []
        for channels in (in_channels, out_channels):
            layers.append(nn.Conv2d(channels, out_channels, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UpBlock(nn.Module):
    """Upsample by 2, concatenate the skip connection of the same level, ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool, up_mode: str):
        super().__init__()
        if up_mode == "upconv":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(in_channels, out_channels, 1))
        self.conv = ConvBlock(2 * out_channels, out_channels, batch_norm)

    def forward(self, x, skip):
        return self.conv(torch.cat([self.up(x), skip], 1))


class UNet(nn.Module):
    UP_MODES = ("upconv", "upsample")

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 5, width: int = 64,
                 batch_norm: bool = True, up_mode: str = "upconv"):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1 (got depth={depth}, width={width})")
        if up_mode not in self.UP_MODES:
            raise ValueError(f"up_mode must be one of {self.UP_MODES}, not {up_mode!r}")
        self.depth = depth
        channels = [width * 2 ** level for level in range(depth)]
        self.down = nn.ModuleList()
        previous = in_channels
        for c in channels:
            self.down.append(ConvBlock(previous, c, batch_norm))
            previous = c
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(UpBlock(channels[level + 1], channels[level], batch_norm, up_mode)
                                for level in reversed(range(depth - 1)))
        self.last = nn.Conv2d(channels[0], num_classes, 1)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (one 2x pooling per level below the top)."""
        return 2 ** (self.depth - 1)

    def forward(self, x):
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < self.depth - 1:
                skips.append(x)
                x = self.pool(x)
        for block in self.up:
            x = block(x, skips.pop())
        return self.last(x)
