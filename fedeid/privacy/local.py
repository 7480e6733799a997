"""Local differential privacy: per-sample DP-SGD with Opacus inside each client.

:class:`LocalDP` is what a client passes as ``private=`` to :func:`fedeid.train.train_deid`;
the training loop calls it once, right before its first step, with the trainable part (the
module holding decoupler and decoder), its optimizer and its data loader, and trains with the
three objects it returns: a ``GradSampleModule`` computing per-sample gradients, a
``DPOptimizer`` clipping each to ``privacy.clipping_norm`` and adding Gaussian noise of
``privacy.noise_multiplier`` × that norm, and a Poisson-sampling loader (what the accountant
assumes).

The accountant's history is handed in and read back out, so a site's ε accumulates over all the
rounds it took part in: the client keeps the history in ``context.state`` and on its node's disk
(:mod:`fedeid.federated.client`). The module wrapper shares parameters with the model, so the
model's own ``state_dict`` (no ``_module.`` prefix) is what is sent; :meth:`LocalDP.close`
removes Opacus' hooks afterwards.
"""

from __future__ import annotations

import math
import secrets
import warnings
from typing import Any

import torch

from fedeid.privacy.accountant import History, epsilon_of


class LocalDP:
    """Callable ``private(module, optimizer, data_loader) -> (module, optimizer, data_loader)``."""

    def __init__(self, noise_multiplier: float, max_grad_norm: float, delta: float,
                 history: History | None = None, *, secure_mode: bool = False) -> None:
        if noise_multiplier <= 0:
            raise ValueError("local DP needs privacy.noise_multiplier > 0")
        if max_grad_norm <= 0:
            raise ValueError("local DP needs privacy.clipping_norm > 0")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta)
        self.secure_mode = secure_mode
        self._start_history: History = list(history or [])
        self.engine: Any = None
        self.module: Any = None
        self.sample_rate: float | None = None

    @classmethod
    def from_config(cls, cfg: Any, history: History | None = None) -> LocalDP:
        p = cfg.privacy
        return cls(p.noise_multiplier, p.clipping_norm, p.delta, history)

    def __call__(self, module: Any, optimizer: Any, data_loader: Any) -> tuple[Any, Any, Any]:
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(module, strict=False)
        if errors:
            raise ValueError("model is not Opacus-compatible (use GroupNorm, no BatchNorm): "
                             + "; ".join(str(e) for e in errors[:5]))
        # Opacus' backward hooks return views that an in-place activation would overwrite
        # ("Output 0 of BackwardHookFunction is a view and is being modified inplace"):
        # switch in-place activations to their out-of-place form (same function, same weights).
        for sub in module.modules():
            if getattr(sub, "inplace", False) is True:
                sub.inplace = False
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            self.engine = PrivacyEngine(accountant="rdp", secure_mode=self.secure_mode)
        self.engine.accountant.history = [tuple(h) for h in self._start_history]
        wrapped, optimizer, loader = self.engine.make_private(
            module=module, optimizer=optimizer, data_loader=data_loader,
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            poisson_sampling=True, grad_sample_mode="hooks",
            # train_deid seeds torch's global RNG for reproducibility; DP noise must not be
            # predictable from that seed, so it gets its own generator seeded from OS entropy.
            noise_generator=torch.Generator().manual_seed(secrets.randbits(63)))
        self.module = wrapped
        self.sample_rate = 1.0 / max(1, len(loader))
        return wrapped, optimizer, loader

    @property
    def history(self) -> History:
        """The whole composition: earlier rounds plus the steps taken in this one."""
        if self.engine is None:
            return list(self._start_history)
        return [(float(z), float(q), int(n)) for z, q, n in self.engine.accountant.history]

    @property
    def steps_this_round(self) -> int:
        return sum(n for _, _, n in self.history) - sum(n for _, _, n in self._start_history)

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta)

    def close(self) -> None:
        """Remove the per-sample-gradient hooks from the (shared) model modules."""
        if self.module is not None:
            for name in ("cleanup", "_close", "remove_hooks"):
                fn = getattr(self.module, name, None)
                if callable(fn):
                    try:
                        fn()
                    except Exception:  # noqa: BLE001 - best effort, hooks may already be gone
                        pass
                    break
            self.module = None


def make_private(cfg: Any, history: History | None = None) -> LocalDP | None:
    """The ``private=`` argument for :func:`fedeid.train.train_deid` under ``cfg.privacy``."""
    if cfg.privacy.mode != "local":
        return None
    return LocalDP.from_config(cfg, history)


def _flag(value: Any) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"} if isinstance(value, str) else bool(value)


class SitePolicy:
    """A hospital's own privacy demands, from its SuperNode's node config.

    The run config is the coordinator's; a site that must not release non-private updates
    cannot rely on it. Node config keys (any of the first three turns the policy on):

    * ``require-local-dp`` — train only under ``privacy.mode = "local"``;
    * ``min-noise-multiplier`` — the run's DP-SGD noise multiplier must be at least this;
    * ``epsilon-budget`` — ε (at the run's δ) this site's data may spend over all rounds and
      runs (its privacy ledger); a round that would exceed it is not trained;
    * ``max-delta`` — the largest δ the site accepts (default 1e-5): a large δ makes any ε small.

    :meth:`refusal` says why a round must not be trained (``None``: it may).
    """

    def __init__(self, node_config: dict[str, Any]) -> None:
        nc = node_config
        self.min_noise = float(nc.get("min-noise-multiplier", 0) or 0)
        self.budget = float(nc.get("epsilon-budget", 0) or 0)
        self.max_delta = float(nc.get("max-delta", 1e-5) or 1e-5)
        self.active = _flag(nc.get("require-local-dp", False)) or self.min_noise > 0 or self.budget > 0

    def refusal(self, cfg: Any, n_examples: int, epochs: int, history: History) -> str | None:
        if not self.active:
            return None
        p = cfg.privacy
        if p.mode != "local":
            return f"the site requires local DP, the run asks for privacy.mode={p.mode!r}"
        if p.noise_multiplier < self.min_noise:
            return f"privacy.noise_multiplier {p.noise_multiplier:g} < the site's minimum {self.min_noise:g}"
        if not 0 < p.delta <= self.max_delta:
            return f"privacy.delta {p.delta:g} > the site's maximum {self.max_delta:g}"
        if self.budget > 0:
            spent = epsilon_of(history, p.delta)
            after = epsilon_of(history + [projected_round(p.noise_multiplier, n_examples, cfg.train.batch_size,
                                                          epochs)], p.delta)
            if after > self.budget:
                return (f"this round would bring the site's ε from {spent:.3g} to {after:.3g} "
                        f"(δ={p.delta:g}), over its budget {self.budget:g}")
        return None

    def exceeded(self, epsilon: float) -> str | None:
        """After training: the ledger's actual ε over the budget (the update is then not sent)."""
        if self.budget > 0 and epsilon > self.budget:
            return f"the site's ε {epsilon:.3g} is over its budget {self.budget:g}"
        return None


def projected_round(noise_multiplier: float, n_examples: int, batch_size: int, epochs: int) -> tuple[float, float, int]:
    """The accountant entry one round of DP-SGD will add: Poisson sampling at rate 1/batches, batches per epoch."""
    batches = max(1, math.ceil(n_examples / max(1, batch_size)))
    return (float(noise_multiplier), 1.0 / batches, int(epochs) * batches)
