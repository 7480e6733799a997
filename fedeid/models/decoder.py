"""Medical-semantics compensation: a U-Net that refills blocked patches from the medical code.

Inputs are the blocked image (blocked pixels zeroed), the block mask, and the medical code at
the encoder's stride; the code is injected at the bottleneck, so everything the decoder can
paint into a blocked patch that it cannot infer from the visible context must come through the
decoupled medical code. The network works at half resolution (pixel unshuffle in, pixel shuffle
out): full-resolution convolutions tripled its cost on a CPU for no visible gain in the
synthesised patches, and visible pixels are copied from the input anyway.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedeid.models.backbone import conv_block


class CompensationDecoder(nn.Module):
    def __init__(self, code_channels: int, width: int = 16, code_stride: int = 16) -> None:
        super().__init__()
        levels = int(math.log2(code_stride)) - 1
        if levels < 1 or 2 ** (levels + 1) != code_stride:
            raise ValueError(f"code stride {code_stride} must be a power of two >= 4")
        chans = [min(width * 2**i, 4 * width) for i in range(levels + 1)]
        self.stem = nn.Sequential(nn.PixelUnshuffle(2), conv_block(8, chans[0]))
        self.down = nn.ModuleList(conv_block(chans[i], chans[i + 1], 2) for i in range(levels))
        self.fuse = conv_block(chans[-1] + code_channels, chans[-1])
        self.up = nn.ModuleList(conv_block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(levels)))
        self.out = nn.Sequential(nn.Conv2d(chans[0], 4, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, blocked: torch.Tensor, mask: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([blocked, mask], dim=1))
        skips = [h]
        for layer in self.down:
            h = layer(h)
            skips.append(h)
        skips.pop()
        if code.shape[-2:] != h.shape[-2:]:
            code = F.interpolate(code, size=h.shape[-2:], mode="bilinear", align_corners=False)
        h = self.fuse(torch.cat([h, code], dim=1))
        for layer in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = layer(torch.cat([h, skip], dim=1))
        return torch.sigmoid(self.out(h))
