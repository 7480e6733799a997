"""The de-identification network of method A: frozen MFM -> MDL decoupler -> compensation decoder.

Only ``decoupler`` and ``decoder`` are trained and travel between a site and the server
(:func:`shared_state`); the encoder is frozen and identical everywhere, and the ReID network
that chooses what to block stays at its site (it is passed in, never held here).
"""

from __future__ import annotations

import torch
from torch import nn

from fedeid.config import FINDINGS, Config
from fedeid.models.decoder import CompensationDecoder
from fedeid.models.decoupler import Codes, MDLDecoupler
from fedeid.models.encoder import build_encoder

SHARED_PREFIXES = ("decoupler.", "decoder.")


class DeIdModel(nn.Module):
    def __init__(self, cfg: Config, encoder: nn.Module | None = None) -> None:
        super().__init__()
        m = cfg.model
        self.encoder = encoder if encoder is not None else build_encoder(m.encoder, cfg.data.image_size)
        self.decoupler = MDLDecoupler(self.encoder.out_channels, m.medical_channels, m.identity_channels,
                                      n_findings=len(cfg_findings(cfg)), reid_dim=m.reid_dim,
                                      variational=m.decouple)
        self.decoder = CompensationDecoder(m.medical_channels, m.decoder_width, self.encoder.stride)

    def train(self, mode: bool = True) -> DeIdModel:
        super().train(mode)
        self.encoder.eval()  # frozen: its BatchNorm statistics never move
        return self

    def trainable(self) -> nn.ModuleDict:
        """The shared part as one module (what Opacus wraps); state keys equal :func:`shared_state`'s."""
        return nn.ModuleDict({"decoupler": self.decoupler, "decoder": self.decoder})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor | None = None,
                sample: bool = False) -> tuple[torch.Tensor, torch.Tensor, Codes]:
        """Block ``x`` where ``mask`` is 1 and refill it: (composited output, raw decoder output, codes).

        Visible pixels are copied from the input, so at level 0 the output equals the input.
        """
        if feats is None:
            feats = self.encode(x)
        codes = self.decoupler(feats, sample=sample)
        gen = self.decoder(x * (1 - mask), mask, codes.medical)
        return mask * gen + (1 - mask) * x, gen, codes


def build_deid_model(cfg: Config) -> DeIdModel:
    """A fresh (untrained) decoupler + decoder over the configured frozen encoder."""
    return DeIdModel(cfg)


def cfg_findings(cfg: Config) -> tuple[str, ...]:
    """The finding names the networks predict: the data's own, or the synthetic benchmark's."""
    return cfg.data.findings or FINDINGS


def shared_state(model: DeIdModel) -> dict[str, torch.Tensor]:
    """Exactly the decoupler and decoder tensors (copies, never views of live weights): what a site sends."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(SHARED_PREFIXES)}


def load_shared_state(model: DeIdModel, state: dict[str, torch.Tensor]) -> None:
    """Load a shared state; any key outside decoupler/decoder, or any missing one, is an error."""
    foreign = [k for k in state if not k.startswith(SHARED_PREFIXES)]
    if foreign:
        raise ValueError(f"shared state holds non-shared tensors: {foreign[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(SHARED_PREFIXES)]
    if missing or unexpected:
        raise ValueError(f"shared state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
