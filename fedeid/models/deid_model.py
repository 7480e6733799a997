"""The de-identification network of method A: frozen MFM -> MDL decoupler -> compensation decoder.

No pixel of the input reaches the output verbatim once the level is above 0. Blocked patches are
synthesised; visible regions are re-rendered: their low-pass (a Gaussian whose sigma grows with
the level) keeps the macro anatomy a reader needs, while the fine texture above it — vessel and
bone detail that keypoint and patch matchers identify a patient by — is replaced by the decoder's
own high frequencies plus noise of the same energy (times 1 - level, like the code: the energy
is a measurement of the original). The medical code is sampled and the noise is drawn per
release, so two releases of one image differ (a model holder cannot link them by re-running the
model). Blocked and re-rendered regions are blended over a feathered mask.

The medical code itself passes a bottleneck tied to the level (:meth:`DeIdModel.release_code`):
what the finding head reads from it (its projection on the head's rows, pooled over the image) is
kept whole, and the rest — layout and shape, which identify a patient even after decoupling —
is mixed with fresh noise, all noise at level 1. A model holder who de-identifies an original
twice then gets two different synthetic anatomies with the same findings (measured before this
bottleneck: the foundation-feature linkage of two releases reached P@1 0.6 at level 0.8).

Only ``decoupler`` and ``decoder`` are trained and travel between a site and the server
(:func:`shared_state`); the encoder is frozen and identical everywhere, and the ReID network
that chooses what to block stays at its site (it is passed in, never held here).
"""

from __future__ import annotations

import torch
from torch import nn

from fedeid.config import FINDINGS, Config
from fedeid.models.decoder import CompensationDecoder
from fedeid.imaging import feather, gaussian_blur, normalised_blur
from fedeid.models.decoupler import Codes, MDLDecoupler, randn_like
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
        self.sigma_at_full = m.visible_sigma
        self.feather_sigma = m.feather

    def train(self, mode: bool = True) -> DeIdModel:
        super().train(mode)
        self.encoder.eval()  # frozen: its BatchNorm statistics never move
        return self

    def trainable(self) -> nn.ModuleDict:
        """The shared part as one module (what Opacus wraps); state keys equal :func:`shared_state`'s."""
        return nn.ModuleDict({"decoupler": self.decoupler, "decoder": self.decoder})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def visible_sigma(self, level: float | torch.Tensor) -> torch.Tensor:
        """Low-pass sigma (pixels at the model's size) of the visible regions at ``level``.

        It grows as ``sqrt(level)``, not linearly: at low levels the worst-case attacker was
        keypoint matching on the visible regions' fine edges (P@1 0.93 at level 0.2 with
        sigma 1.2 px), while the finding AUC lost there comes from the blocked patches, not from
        the low-pass (re-rendering without blocking kept 0.90 up to sigma 3.6). Measured on one
        model: sigma 2.7 px at level 0.2 took the worst case to 0.80 at the same AUC.
        """
        return torch.as_tensor(level, dtype=torch.float32).reshape(-1).clamp(min=0).sqrt() * self.sigma_at_full

    def release_code(self, codes: Codes, level: float | torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The code the decoder renders from at ``level``: findings kept, the rest ``level``-noised.

        ``F`` projects onto the finding head's rows (the directions the findings are read along);
        the finding part is ``F`` of the image-wide mean code, the residual is everything else,
        and the residual's weight ``1 - level`` is made up by unit noise outside those directions
        (the prior the rate term pulls the code towards), so the decoder sees codes of one scale
        at every level. Level 0 returns the code unchanged.
        """
        code = codes.medical
        w = self.decoupler.finding_head.weight.detach()  # [F, C]; the projection is not trained through
        proj = torch.linalg.pinv(w) @ w  # [C, C]: orthogonal projector onto the row space
        onto = lambda t: torch.einsum("dc,bchw->bdhw", proj, t)  # noqa: E731
        findings = onto(code.mean(dim=(2, 3), keepdim=True)).expand_as(code)
        noise = randn_like(code, generator)
        noise = noise - onto(noise)
        keep = original_weight(level, code).view(-1, 1, 1, 1)
        return keep * code + (1 - keep) * findings + (1 - keep.pow(2)).clamp(min=0).sqrt() * noise

    def forward(self, x: torch.Tensor, mask: torch.Tensor, level: float | torch.Tensor,
                feats: torch.Tensor | None = None, sample: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, Codes]:
        """Block ``x`` where ``mask`` is 1, re-render the rest: (output, raw decoder output, codes).

        ``level`` (a float or one per image) sets the visible low-pass; at level 0 (empty mask,
        sigma 0) the output equals the input exactly.
        """
        if feats is None:
            feats = self.encode(x)
        sigma = self.visible_sigma(level).to(x.device)
        codes = self.decoupler(feats, sample=sample, generator=generator)
        # the visible pixels' own low-pass: no blocked pixel bleeds into it across the border
        low = normalised_blur(x, 1 - mask, sigma)[0] * (1 - mask)
        released = self.release_code(codes, level, generator)
        gen = self.decoder(low, mask, released)
        gen_high = gen - gaussian_blur(gen, sigma)
        # Noise fills the part of the original's high band that the decoder does not render
        # (one amplitude per image: the texture's energy, not its pattern). That energy is a
        # scalar of the original, so it keeps the code's weight 1 - level: at full weight it
        # reached even level-1 releases (correlation 0.98 with the original's high-band std).
        noise = randn_like(x, generator)
        noise_high = noise - gaussian_blur(noise, sigma)
        x_high = x - gaussian_blur(x, sigma)
        keep = original_weight(level, x).clamp(min=0)
        missing = keep * (x_high.flatten(1).var(1) - gen_high.detach().flatten(1).var(1)).clamp(min=0)
        scale = missing.sqrt() / (noise_high.flatten(1).std(1) + 1e-8)
        texture = noise_high * scale.view(-1, 1, 1, 1)
        soft = feather(mask, self.feather_sigma)
        out = soft * gen + (1 - soft) * (low + gen_high) + texture
        return out, gen, codes, released


def original_weight(level: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``1 - level`` per image ([B], or [1] for a float), on ``like``'s device and dtype: the weight
    anything measured on the original keeps in a release (the code's residual, the texture energy)."""
    return 1 - torch.as_tensor(level, dtype=like.dtype, device=like.device).reshape(-1)


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
