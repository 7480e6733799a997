"""Method B's networks: an encoder splitting an image into identity, medical and residual vectors,
and a generator rebuilding the whole image from the three.

Montenegro & Cardoso's disentanglement, for chest radiographs:

* **identity** — a unit vector in the site ReID network's embedding space (trained with CosFace
  against the site's patients, whose proxies are their mean ReID embeddings). Living in that
  space is what lets the margin at which the ReID network would match two images serve as the
  margin a synthetic identity must keep from every real patient;
* **medical** — one logit per finding, then free dimensions (where a nodule is, how large the
  effusion): a counterfactual sets a finding's logit and keeps the rest;
* **other** — a small residual (acquisition: pose, exposure). Small on purpose: the swap
  consistency makes the generator take identity from the identity vector, and a residual too
  wide to be a bottleneck would let anatomy bypass it.

The encoder is a stack of the project's conv blocks on the pixels. The frozen MFM slot is not
used: re-encoding every swapped image through it (forward and backward) tripled a training step's
cost on a CPU, and the finding loss on the medical vector supervises the semantics it would have
supplied. The generator upsamples
by nearest-neighbour resize then convolution (no transposed-convolution checkerboard) up to the
full image size, with the code injected at every scale (FiLM). Only GroupNorm, and nothing mixes
samples, so Opacus' per-sample DP-SGD applies as it does to method A.

What travels in a federation (:func:`replace_state`, ``fed.method=replace``; see
:mod:`fedeid.federated.methods`): the encoder heads and the generator, nothing else. What
stays at the site: its ReID network and its patients' proxies (both are identities), and the
identity prior — the mixture is fitted to real patients' identity vectors
and its margin calibrated on their pairs; only the bank of accepted synthetic identities is kept,
and only in the site's own checkpoint. The shared generator is itself a risk worth naming: it
renders whatever identity vector it is given, so whoever holds a real patient's identity vector
(for instance by encoding an image of them) can render that patient; it cannot make an identity
out of nothing, and local DP-SGD bounds what one image contributes to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedeid.config import Config
from fedeid.models.backbone import conv_block
from fedeid.models.deid_model import cfg_findings

# What travels and what a checkpoint holds: the names of :meth:`ReplaceModel.trainable`'s state.
SHARED_PREFIXES = ("heads.", "generator.")
_GRID = 4  # both encoder branches are pooled to this grid before the heads (keeps where things are)
_START = 4  # the generator starts from a 4x4 map


@dataclass
class Vectors:
    identity: torch.Tensor  # [B, D] unit norm, in the site ReID embedding space
    medical: torch.Tensor  # [B, F + M]: finding logits first
    other: torch.Tensor  # [B, O]


def _group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4) or 1, channels, affine=affine)


class ReplaceEncoder(nn.Module):
    """Image -> (identity, medical, other) vectors: conv blocks to stride 16, a 4x4 grid, three heads."""

    def __init__(self, id_dim: int, medical_dim: int, other_dim: int, width: int) -> None:
        super().__init__()
        c = 2 * width
        self.body = nn.Sequential(conv_block(1, c, 2), conv_block(c, 2 * c, 2), conv_block(2 * c, 4 * c, 2),
                                  conv_block(4 * c, 4 * c), conv_block(4 * c, 4 * c, 2), conv_block(4 * c, 4 * c))
        self.trunk = nn.Sequential(nn.Linear(4 * c * _GRID * _GRID, 8 * c), nn.ReLU(inplace=True))
        self.identity = nn.Linear(8 * c, id_dim)
        self.medical = nn.Linear(8 * c, medical_dim)
        self.other = nn.Linear(8 * c, other_dim)

    def forward(self, x: torch.Tensor) -> Vectors:
        h = self.trunk(F.adaptive_avg_pool2d(self.body(x), _GRID).flatten(1))
        return Vectors(F.normalize(self.identity(h), dim=1), self.medical(h), self.other(h))


class _UpBlock(nn.Module):
    """x2 nearest resize, conv, GroupNorm, FiLM from the code, ReLU; then a plain conv block."""

    def __init__(self, cin: int, cout: int, code_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = _group_norm(cout, affine=False)
        self.film = nn.Linear(code_dim, 2 * cout)
        self.refine = conv_block(cout, cout)

    def forward(self, h: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(F.interpolate(h, scale_factor=2, mode="nearest")))
        gamma, beta = self.film(code)[:, :, None, None].chunk(2, dim=1)
        return self.refine(F.relu(h * (1 + gamma) + beta))


class ReplaceGenerator(nn.Module):
    """(identity, medical, other) -> image [B, 1, S, S] in [0, 1], at the full image size."""

    def __init__(self, code_dim: int, image_size: int, width: int) -> None:
        super().__init__()
        levels = int(math.log2(image_size // _START))
        if _START * 2**levels != image_size:
            raise ValueError(f"method B needs an image size of 4 x a power of two, got {image_size}")
        chans = [width * min(8, image_size // (_START * 2**i)) for i in range(levels + 1)]
        self.start = nn.Linear(code_dim, chans[0] * _START * _START)
        self.start_norm = _group_norm(chans[0])
        self.up = nn.ModuleList(_UpBlock(chans[i], chans[i + 1], code_dim) for i in range(levels))
        self.out = nn.Conv2d(chans[-1], 1, 3, padding=1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        h = self.start(code).view(len(code), -1, _START, _START)
        h = F.relu(self.start_norm(h))
        for block in self.up:
            h = block(h, code)
        return torch.sigmoid(self.out(h))


class ReplaceModel(nn.Module):
    """Encoder heads + generator; both are trained and both travel (``trainable``)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        r = cfg.replace
        self.n_findings = len(cfg_findings(cfg))
        self.heads = ReplaceEncoder(cfg.model.reid_dim, self.n_findings + r.medical_dim, r.other_dim, r.width)
        self.generator = ReplaceGenerator(cfg.model.reid_dim + self.n_findings + r.medical_dim + r.other_dim,
                                          cfg.data.image_size, r.width)

    def trainable(self) -> nn.ModuleDict:
        """The shared part as one module (what Opacus wraps and what a site sends)."""
        return nn.ModuleDict({"heads": self.heads, "generator": self.generator})

    def vectors(self, x: torch.Tensor) -> Vectors:
        return self.heads(x)

    def generate(self, identity: torch.Tensor, medical: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self.generator(torch.cat([identity, medical, other], dim=1))

    def finding_logits(self, v: Vectors) -> torch.Tensor:
        return v.medical[:, :self.n_findings]

    @property
    def free_dim(self) -> int:
        """The medical vector's free dimensions (after the finding logits)."""
        return self.heads.medical.out_features - self.n_findings

    @property
    def residual_dim(self) -> int:
        """Width of :meth:`residual`: the medical vector's free dimensions plus the residual vector."""
        return self.free_dim + self.heads.other.out_features

    def residual(self, v: Vectors) -> torch.Tensor:
        """What is neither identity nor a finding logit [B, R]: the free medical dimensions, then ``other``."""
        return torch.cat([v.medical[:, self.n_findings:], v.other], dim=1)

    def generate_from(self, identity: torch.Tensor, logits: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """:meth:`generate` from the identity, the finding logits and a :meth:`residual`-shaped vector."""
        free = self.free_dim
        return self.generate(identity, torch.cat([logits, residual[:, :free]], dim=1), residual[:, free:])


def toward(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Unit vectors ``t`` of the way from ``a`` to ``b`` (normalised linear interpolation): 0 = a, 1 = b."""
    return F.normalize((1 - t) * a + t * b, dim=1)


def replace_state(model: ReplaceModel) -> dict[str, torch.Tensor]:
    """Exactly the encoder-head and generator tensors (copies): what a site sends, what a checkpoint holds."""
    return {k: v.detach().cpu().clone() for k, v in model.trainable().state_dict().items()}


def load_replace_state(model: ReplaceModel, state: dict[str, torch.Tensor]) -> None:
    """Load heads + generator; any missing, extra or misshapen tensor raises (RuntimeError)."""
    model.trainable().load_state_dict(state, strict=True)
