"""Hostile participants and operations faults, on the real ServerApp logic (in-process grid).

Honest sites here answer with the global model plus a fixed small update (no training: the
screen, the rules, the lock, resume and liveness are what is under test); one site is hostile.
The site-policy tests use the real ClientApp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedeid.checkpoint import load_checkpoint
from fedeid.config import preset
from fedeid.federated.checkpoints import exclusive
from fedeid.federated.inprocess import InProcessGrid
from fedeid.federated.robust import RULES, aggregate, sensitivity
from fedeid.federated.runconfig import config_from_run, run_config_for, run_options
from fedeid.federated.server import FederationStalled, run_federation
from fedeid.io import InputError
from fedeid.privacy.local import SitePolicy

CLAIM = 24


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path, monkeypatch):
    """Nothing of Flower's may touch ~/.flwr."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    torch.set_num_threads(1)


def _cfg(rounds: int = 1, n_sites: int = 4, **sets):
    cfg = preset("test")
    cfg.fed.rounds = rounds
    cfg.data.n_sites = n_sites
    cfg.fed.min_clients = n_sites
    for k, v in sets.items():
        cfg.set(k.replace("__", "."), v)
    return cfg


def honest_update(site: int, global_arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """A site's 'trained' arrays: the global model plus a small, site-specific, fixed update."""
    rng = np.random.default_rng(site)
    return {k: (a.numpy() + 1e-3 + rng.normal(0.0, 1e-3, a.shape)).astype(a.numpy().dtype)
            for k, a in global_arrays.items()}


def reply(msg: Message, arrays: dict[str, np.ndarray] | None, site: int, claim: float = CLAIM) -> Message:
    metrics = MetricRecord({"num-examples": claim, "site-id": site})
    content = {"metrics": metrics} if arrays is None else {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                                          "metrics": metrics}
    return Message(RecordDict(content), reply_to=msg)


def federation(attack=None, hostile: int = 0):
    """A ClientApp-like callable: honest sites, and ``attack(arrays, global) -> (arrays, claim)`` at ``hostile``."""
    def app(msg: Message, context) -> Message:
        site = int(context.node_config["partition-id"])
        if msg.metadata.message_type != "train":
            return reply(msg, None, site)
        arrays = honest_update(site, msg.content["arrays"])
        claim: float = CLAIM
        if attack is not None and site == hostile:
            arrays, claim = attack(arrays, msg.content["arrays"])
        return reply(msg, arrays, site, claim)
    return app


def _run(tmp_path, cfg, app, n_sites=None, **options):
    n = n_sites if n_sites is not None else cfg.data.n_sites
    options.setdefault("evaluate", False)
    rc = run_config_for(cfg, out_dir=tmp_path / "server", state_dir=tmp_path / "sites", threads=1, **options)
    grid = InProcessGrid(app, [{"partition-id": i} for i in range(n)], rc)
    return run_federation(grid, config_from_run(rc), run_options(rc)), tmp_path / "server"


def _global(out) -> torch.Tensor:
    state = load_checkpoint(out / "global.pt")["shared_state"]
    return torch.cat([v.flatten().double() for v in state.values()])


def _with(fn):
    return lambda arrays, glob: ({k: fn(v, glob[k].numpy()) for k, v in arrays.items()}, CLAIM)


def _poison_first(value):
    def fn(v, g):
        v = v.copy()
        v.flat[0] = value
        return v
    return fn


def _hide_image(arrays, glob):
    """Pixels of a 64x64 'image' written over the largest weight array (right name, shape, dtype)."""
    arrays = dict(arrays)
    key = max(arrays, key=lambda k: arrays[k].size)
    carrier = arrays[key].copy()
    n = min(carrier.size, 64 * 64)
    carrier.flat[:n] = np.random.default_rng(7).random(n).astype(carrier.dtype)
    arrays[key] = carrier
    return arrays, CLAIM


ATTACKS = {
    "image-in-weights": (_hide_image, "update-norm"),
    "nan": (_with(_poison_first(np.nan)), "non-finite"),
    "inf": (_with(_poison_first(np.inf)), "non-finite"),
    "scaled-1e6": (_with(lambda v, g: (g + 1e6 * (v - g)).astype(v.dtype)), "update-norm"),
    "float64": (_with(lambda v, g: v.astype(np.float64)), "contract"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_hostile_reply_is_rejected_and_the_global_model_unharmed(tmp_path, name):
    attack, kind = ATTACKS[name]
    cfg = _cfg()
    honest, honest_out = _run(tmp_path / "honest", _cfg(n_sites=3), federation(), n_sites=3)
    result, out = _run(tmp_path / name, cfg, federation(attack, hostile=3))
    row = result["history"][0]
    assert row["aggregated"] and row["valid_replies"] == 3
    assert row["rejections"] == {kind: 1}
    assert row["rejected"][0]["site"] == 3 and row["rejected"][0]["kind"] == kind
    saved = json.loads((out / "metrics.json").read_text())["rounds"][0]
    assert saved["rejections"] == {kind: 1}
    assert torch.isfinite(_global(out)).all()
    # the honest sites' aggregate (up to float32 rounding: Flower samples the nodes in random order)
    assert torch.allclose(_global(out), _global(honest_out), rtol=0, atol=1e-7)


def test_claiming_1e9_examples_is_capped(tmp_path):
    target = lambda arrays, glob: ({k: (g.numpy() + 0.01).astype(g.numpy().dtype) for k, g in glob.items()}, 1e9)  # noqa: E731
    _, start = _run(tmp_path / "start", _cfg(rounds=0, n_sites=3), federation(), n_sites=3)
    result, out = _run(tmp_path / "claim", _cfg(), federation(target, hostile=3))
    screen = result["history"][0]["screen"]
    assert sorted(screen["weights"]) == [CLAIM, CLAIM, CLAIM, 3 * CLAIM]  # capped at 3 x the median claim
    assert screen["weights_capped_nodes"] == [1003]
    # with plain (claimed) weights the attacker's model would be the global model
    result, plain = _run(tmp_path / "plain", _cfg(fed__weighting="claimed"), federation(target, hostile=3))
    g0 = _global(start)
    moved_capped = float((_global(out) - g0).mean())
    moved_plain = float((_global(plain) - g0).mean())
    assert moved_plain == pytest.approx(0.01, rel=1e-3)
    assert moved_capped == pytest.approx(0.5 * 0.01 + 0.5 * 1e-3, rel=0.05)  # half the weight, not all


def test_central_dp_survives_an_unchanged_model_and_a_nan(tmp_path):
    """An unchanged model (norm 0) crashed the ServerApp with ZeroDivisionError; one NaN switched clipping off."""
    unchanged = lambda arrays, glob: ({k: a.numpy().copy() for k, a in glob.items()}, CLAIM)  # noqa: E731
    cfg = _cfg(n_sites=3, privacy__mode="central", privacy__noise_multiplier=0.0, privacy__clipping_norm=1e-3)
    result, out = _run(tmp_path / "zero", cfg, federation(unchanged, hostile=2))
    row = result["history"][0]
    assert row["aggregated"] and row["valid_replies"] == 3 and 0.0 in row["central_dp"]["update_norms"]
    _, start = _run(tmp_path / "start", _cfg(rounds=0, n_sites=3), federation(), n_sites=3)
    assert float((_global(out) - _global(start)).norm()) <= 1e-3 * (1 + 1e-4)

    nan = ATTACKS["nan"][0]
    result, out = _run(tmp_path / "nan", cfg, federation(nan, hostile=2))
    row = result["history"][0]
    assert row["rejections"] == {"non-finite": 1} and row["central_dp"]["clipped_fraction"] == 1.0
    assert float((_global(out) - _global(start)).norm()) <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("rule", RULES)
def test_robust_rules_hold_an_outlier_that_passes_the_screen(tmp_path, rule):
    """Norm bound off: the mean follows a x1000 site, the robust rules stay near the honest sites."""
    n = 7 if rule == "bulyan" else 5  # Bulyan needs 4f + 3
    big = _with(lambda v, g: (g + 1e3 * (v - g)).astype(v.dtype))
    cfg = _cfg(n_sites=n, fed__aggregation=rule, fed__update_norm_factor=0.0)
    result, out = _run(tmp_path / rule, cfg, federation(big, hostile=0))
    _, start = _run(tmp_path / "start", _cfg(rounds=0, n_sites=n), federation(), n_sites=n)
    moved = float((_global(out) - _global(start)).abs().max())
    assert result["history"][0]["aggregation"]["rule"] == rule
    if rule == "mean":
        assert moved > 0.1
    else:
        assert moved < 0.01  # honest updates are ~1e-3 + 3 sigma of 1e-3


def test_sensitivity_bounds_one_sites_influence():
    """Replacing one clipped update by another never moves a rule's output further than its sensitivity."""
    rng = np.random.default_rng(0)
    clip_norm, m = 1.0, 7

    def clipped(shape):
        v = rng.normal(size=shape)
        return [v * min(1.0, clip_norm / np.linalg.norm(v))]

    for rule in RULES:
        worst = 0.0
        for _ in range(30):
            ups = [clipped(40) for _ in range(m)]
            other = list(ups)
            other[rng.integers(m)] = [-ups[0][0] if rng.random() < 0.5 else clipped(40)[0]]
            weights = [1.0] * m
            a = aggregate(ups, weights, rule, byzantine=1)[0][0]
            b = aggregate(other, weights, rule, byzantine=1)[0][0]
            worst = max(worst, float(np.linalg.norm(a - b)))
        bound = sensitivity(rule, m, clip_norm, byzantine=1)
        assert worst <= (2 * bound if rule == "mean" else bound) + 1e-9, rule  # mean: add/remove bound C/m


def test_a_second_server_on_the_same_out_dir_is_refused(tmp_path):
    cfg = _cfg(n_sites=2)
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / ".lock").write_text("999999\n")  # a stale lock file of a dead process blocks nothing
    with exclusive(tmp_path / "server"):  # the first ServerApp, still running
        with pytest.raises(InputError, match="another ServerApp .* is writing this folder"):
            _run(tmp_path, cfg, federation())
    assert not (tmp_path / "server" / "metrics.json").exists()
    _run(tmp_path, cfg, federation())  # once it is gone, the folder is free
    assert (tmp_path / "server" / "global.pt").exists()


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    """Another process' ServerApp holds the folder; once it is killed (SIGKILL: no clean-up), it is free."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "from fedeid.federated.checkpoints import exclusive\n"
            "with exclusive(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "server"), str(root)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=f"pid {proc.pid}"):
            with exclusive(tmp_path / "server"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with exclusive(tmp_path / "server") as lock:  # the kernel released it with the dead process
        assert lock.read_text().strip() == str(os.getpid())


def test_checkpoint_and_accountant_are_saved_before_a_model_is_released(tmp_path):
    cfg = _cfg(rounds=3, n_sites=2, privacy__mode="central", privacy__noise_multiplier=1.0)
    out = tmp_path / "server"
    honest = federation()
    released: list[int] = []

    def watch(msg: Message, context) -> Message:
        if int(context.node_config["partition-id"]) == 0:
            kind = msg.metadata.message_type
            r = int(msg.content["config"]["server-round"])
            if kind == "evaluate" or r > 1:  # this model is the output of a noisy release
                noisy = r if kind == "evaluate" else r - 1
                state = json.loads((out / "state.json").read_text())
                ckpt = load_checkpoint(out / state["checkpoint"])
                releases = sum(n for _, _, n in ckpt["extra"]["federated"]["central_dp"]["history"])
                released.append(noisy)
                assert state["round"] == noisy and releases == noisy
        return honest(msg, context)

    _run(tmp_path, cfg, watch, evaluate=True)
    assert released == [1, 1, 2, 2, 3]


def test_resume_with_changed_privacy_is_refused_unless_forced_and_keeps_epsilon(tmp_path):
    central = dict(privacy__mode="central", privacy__noise_multiplier=1.0)
    first, _ = _run(tmp_path, _cfg(rounds=1, n_sites=2, **central), federation())
    eps1 = first["summary"]["central_dp"]["epsilon"]
    changed = _cfg(rounds=2, n_sites=2, privacy__mode="central", privacy__noise_multiplier=0.3)
    with pytest.raises(InputError, match=r"privacy.noise_multiplier 1.0 -> 0.3.*force-resume"):
        _run(tmp_path, changed, federation(), resume=True)
    forced, _ = _run(tmp_path, changed, federation(), resume=True, force_resume=True)
    dp = forced["summary"]["central_dp"]
    assert dp["releases"] == 2 and dp["epsilon"] > eps1
    # mode=none on resume (forced) keeps the epsilon already spent in the summary
    off, out = _run(tmp_path, _cfg(rounds=3, n_sites=2), federation(), resume=True, force_resume=True)
    assert off["summary"]["central_dp"]["epsilon"] == pytest.approx(dp["epsilon"])
    assert off["summary"]["central_dp"]["releases"] == 2
    assert json.loads((out / "metrics.json").read_text())["summary"]["central_dp"]["releases"] == 2


def test_waiting_for_sites_gives_up_after_the_wait_timeout(tmp_path):
    cfg = _cfg(n_sites=3)  # min-clients 3, one hospital down for good
    with pytest.raises(FederationStalled, match=r"only 2 of fed.min-clients=3 sites connected after 0.3 s"):
        _run(tmp_path, cfg, federation(), n_sites=2, wait_timeout=0.3)


def _real_round(tmp_path, cfg, node_configs):
    from client.app import app as client_app

    captured: list[Message] = []
    rc = run_config_for(cfg, out_dir=tmp_path / "server", state_dir=tmp_path / "sites", threads=1, evaluate=False)
    grid = InProcessGrid(client_app, node_configs, rc, on_reply=lambda m, r: captured.append(r))
    return run_federation(grid, config_from_run(rc), run_options(rc)), captured


def test_a_site_demanding_local_dp_refuses_a_run_without_it(tmp_path):
    cfg = _cfg(n_sites=2, fed__min_clients=2)
    strict = {"partition-id": 1, "require-local-dp": "true", "min-noise-multiplier": 0.8}
    result, replies = _real_round(tmp_path / "none", cfg, [{"partition-id": 0}, strict])
    row = result["history"][0]
    assert row["rejections"] == {"refused": 1} and row["valid_replies"] == 1 and row["aggregated"]
    refused = [r for r in replies if r.has_error()]
    assert len(refused) == 1 and "requires local DP" in refused[0].error.reason
    assert not (tmp_path / "none" / "sites" / "site-1" / "reid.pt").exists()  # refused before any training

    # under local DP, a budget the round would exceed: refused before training too
    cfg = _cfg(n_sites=2, privacy__mode="local", privacy__noise_multiplier=1.0)
    budget = {"partition-id": 1, "epsilon-budget": 0.01}
    result, replies = _real_round(tmp_path / "budget", cfg, [budget, {**budget, "partition-id": 0}])
    assert result["history"][0]["rejections"] == {"refused": 2} and not result["history"][0]["aggregated"]
    assert all("over its budget" in r.error.reason for r in replies)


def test_site_policy_checks_noise_delta_and_budget():
    cfg = preset("test")
    cfg.privacy.mode = "local"
    cfg.privacy.noise_multiplier = 0.5
    assert SitePolicy({}).refusal(cfg, 24, 1, []) is None  # no policy: the run decides
    assert "minimum 1" in SitePolicy({"min-noise-multiplier": "1.0"}).refusal(cfg, 24, 1, [])
    cfg.privacy.noise_multiplier = 1.0
    cfg.privacy.delta = 0.1
    assert "maximum" in SitePolicy({"require-local-dp": True}).refusal(cfg, 24, 1, [])
    cfg.privacy.delta = 1e-5
    policy = SitePolicy({"epsilon-budget": 50})
    assert policy.refusal(cfg, 24, 1, []) is None
    spent = [(1.0, 1 / 3, 1200)]
    assert "over its budget" in policy.refusal(cfg, 24, 1, spent)
    assert policy.exceeded(51.0) and policy.exceeded(49.0) is None
