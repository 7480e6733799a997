"""Medical-semantics compensation: a U-Net that renders an image from a low-pass and the medical code.

Inputs are the visible low-pass (blocked pixels zeroed, the rest low-passed at the level's
strength, so fine identifying texture never reaches the network), the block mask, and the
medical code at the encoder's stride; the code is injected at the bottleneck, so everything the
decoder paints into a blocked patch that it cannot infer from the visible context must come
through the decoupled medical code.

Upsampling is resize-convolution (bilinear upsample, then a 3x3 convolution) all the way to full
resolution: a transposed convolution or a pixel shuffle at the output writes each of a 2x2 cell's
pixels from different weights, which prints a regular checkerboard into every synthesised patch.
The full-resolution stage is kept narrow (half the width) because it dominates the CPU cost.
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
        levels = int(math.log2(code_stride))
        if levels < 2 or 2**levels != code_stride:
            raise ValueError(f"code stride {code_stride} must be a power of two >= 4")
        full = max(4, width // 2)
        chans = [full] + [min(width * 2 ** (i - 1), 4 * width) for i in range(1, levels + 1)]
        self.stem = conv_block(2, chans[0])
        self.down = nn.ModuleList(conv_block(chans[i], chans[i + 1], 2) for i in range(levels))
        self.fuse = conv_block(chans[-1] + code_channels, chans[-1])
        self.up = nn.ModuleList(conv_block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(levels)))
        self.out = nn.Conv2d(chans[0], 1, 3, padding=1)

    def forward(self, visible: torch.Tensor, mask: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([visible, mask], dim=1))
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
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = layer(torch.cat([h, skip], dim=1))
        return torch.sigmoid(self.out(h))
