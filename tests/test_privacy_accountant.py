"""Central DP accounting (RDP) and local DP-SGD with Opacus, on toy modules (no core needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedeid.privacy.accountant import (CentralAccountant, epsilon_of, history_from_flat, history_to_flat,
                                       noise_for_epsilon)
from fedeid.privacy.local import LocalDP


def test_central_epsilon_grows_with_rounds_and_shrinks_with_noise():
    a = CentralAccountant(noise_multiplier=1.0, delta=1e-5)
    eps = []
    for _ in range(4):
        a.step(sample_rate=1.0)
        eps.append(a.epsilon())
    assert all(e2 > e1 > 0 for e1, e2 in zip(eps, eps[1:]))
    noisier = CentralAccountant(noise_multiplier=3.0, delta=1e-5)
    for _ in range(4):
        noisier.step(1.0)
    assert noisier.epsilon() < eps[-1]
    # subsampling clients amplifies privacy
    sub = CentralAccountant(noise_multiplier=1.0, delta=1e-5)
    for _ in range(4):
        sub.step(0.1)
    assert sub.epsilon() < eps[-1]


def test_central_state_round_trip_resumes_accounting():
    a = CentralAccountant(1.2, 1e-5)
    for _ in range(3):
        a.step(0.5)
    b = CentralAccountant.from_state(a.state_dict())
    assert b.rounds == 3 and b.epsilon() == pytest.approx(a.epsilon())
    a.step(0.5)
    b.step(0.5)
    assert b.epsilon() == pytest.approx(a.epsilon())
    assert history_from_flat(history_to_flat(a.history)) == a.history


def test_noise_for_epsilon_hits_target():
    z = noise_for_epsilon(4.0, 1e-5, sample_rate=1.0, steps=5)
    eps = epsilon_of([(z, 1.0, 5)], 1e-5)
    assert eps <= 4.0 and eps > 3.5
    assert epsilon_of([], 1e-5) == 0.0
    assert math.isinf(epsilon_of([(0.0, 1.0, 1)], 1e-5))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 8 * 8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def _round(model, private):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randn(32, 1))
    loader = DataLoader(data, batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    module, opt, loader = private(model, opt, loader)
    for x, y in loader:
        if len(x) == 0:
            continue
        opt.zero_grad()
        nn.functional.mse_loss(module(x), y).backward()
        opt.step()
    return module


def test_local_dp_accumulates_epsilon_across_rounds_and_keeps_names():
    torch.set_num_threads(1)
    model = _Tiny()
    names = set(model.state_dict())
    dp1 = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    wrapped = _round(model, dp1)
    assert set(wrapped.state_dict()) == {f"_module.{k}" for k in names}  # the wrapper's prefix ...
    assert set(model.state_dict()) == names  # ... never reaches what is sent
    eps1 = dp1.epsilon()
    assert eps1 > 0 and dp1.steps_this_round > 0
    dp1.close()
    dp2 = LocalDP(1.0, 1.0, 1e-5, history=dp1.history)
    _round(model, dp2)
    dp2.close()
    assert dp2.epsilon() > eps1
    # no hooks left behind: a plain forward/backward works without per-sample gradients
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_local_dp_changes_update_and_refuses_batchnorm():
    torch.manual_seed(1)
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 1))
    with pytest.raises(ValueError, match="Opacus"):
        _round(bn, LocalDP(1.0, 1.0, 1e-5))
    m = _Tiny()
    before = np.concatenate([p.detach().numpy().ravel() for p in m.parameters()])
    dp = LocalDP(5.0, 0.1, 1e-5)
    _round(m, dp)
    dp.close()
    after = np.concatenate([p.detach().numpy().ravel() for p in m.parameters()])
    assert not np.allclose(before, after)
