"""The ServerApp's logic: rounds of train + evaluate, per-round metrics and checkpoints, resume.

``server/app.py`` is a thin shell that calls :func:`run_server`. The round loop is Flower's
``Strategy.start`` loop written out, because fedeid needs what ``start`` has not: one
ServerApp per out-dir (a lock), a checkpoint after every round written before the round's model
leaves the server, resuming at round k+1 from the checkpoint of round k (``fedeid.resume``;
changed privacy settings only with ``fedeid.force-resume``), a time limit on waiting for sites
(``fedeid.wait-timeout``), and per-round bookkeeping (bytes, timings, per-site metrics,
rejected replies, ε). The strategy methods it calls
are Flower's (:mod:`fedeid.federated.strategy`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid

from fedeid.audit import record
from fedeid.config import Config
from fedeid.federated.arrays import record_to_state, spec_of, state_nbytes, state_to_record
from fedeid.federated.checkpoints import RunDir, check_resumable, exclusive
from fedeid.federated.methods import federated_method
from fedeid.federated.runconfig import RunOptions, config_from_run, run_options
from fedeid.federated.secagg import secure_train_round
from fedeid.federated.strategy import make_strategy
from fedeid.privacy.accountant import CentralAccountant

log = logging.getLogger("fedeid.federated")

RoundHook = Callable[[int, dict[str, Any]], None]


def run_server(grid: Grid, context: Context) -> dict[str, Any]:
    """Entry point of the ServerApp: the run config names the Config and the run options."""
    cfg = config_from_run(dict(context.run_config))
    opts = run_options(dict(context.run_config))
    return run_federation(grid, cfg, opts)


def initial_model(cfg: Config) -> torch.nn.Module:
    """Round 1's global model: a fresh network of the configured method (``fed.method``), seeded."""
    torch.manual_seed(cfg.train.seed)
    return federated_method(cfg).build(cfg)


def full_model_bytes(cfg: Config, model: torch.nn.Module) -> dict[str, int]:
    """Sizes for the bytes-per-round comparison: what is sent vs the whole de-identifier."""
    from fedeid.deid.pipeline import build_site_reid

    shared = state_nbytes(federated_method(cfg).shared(model))
    everything = state_nbytes(model.state_dict())
    reid = state_nbytes(build_site_reid(cfg).state_dict())
    return {"shared_bytes": shared, "deid_model_bytes": everything, "reid_bytes": reid,
            "full_model_bytes": everything + reid}


def _client_stat(clients: list[dict[str, Any]], key: str, fn: Callable[[list[float]], float]) -> float | None:
    vals = [float(c[key]) for c in clients if key in c]
    return fn(vals) if vals else None


class FederationStalled(RuntimeError):
    """Fewer sites than ``fed.min-clients`` stayed connected for ``fedeid.wait-timeout`` seconds."""


def wait_for_sites(grid: Grid, needed: int, timeout: float, out_dir: Path, poll: float = 1.0) -> int:
    """Block until ``needed`` nodes are connected; give up after ``timeout`` seconds.

    Flower's strategies wait in ``sample_nodes`` with no time limit: with ``min-clients`` equal
    to the number of hospitals, one hospital down for good stalled the federation forever.
    """
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= needed:
            return connected
        if time.monotonic() >= deadline:
            raise FederationStalled(f"fedeid: {out_dir}: only {connected} of fed.min-clients={needed} sites "
                                    f"connected after {timeout:g} s (fedeid.wait-timeout); giving up. "
                                    "Resume with fedeid.resume=true once the sites are back, or lower "
                                    "fed.min-clients.")
        log.info("waiting for sites: %d of %d connected", connected, needed)
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def run_federation(grid: Grid, cfg: Config, opts: RunOptions, *, on_round_end: RoundHook | None = None
                   ) -> dict[str, Any]:
    """Run (or resume) ``cfg.fed.rounds`` rounds; returns the summary also written to metrics.json.

    Holds the out-dir's lock for the whole run (:func:`fedeid.federated.checkpoints.exclusive`).
    """
    with exclusive(opts.out_dir):
        return _run_federation(grid, cfg, opts, on_round_end)


def _resumed_accountant(cfg: Config, acc_state: dict[str, Any] | None) -> CentralAccountant | None:
    """The central accountant of this run: it carries the ε already spent, whatever the mode now.

    A forced resume with another noise multiplier or delta keeps the old rounds' history (each
    round is composed at the noise it had) and composes new rounds at the new setting; a resume
    with ``mode=none`` keeps the old history, reports it and adds nothing.
    """
    p = cfg.privacy
    history = CentralAccountant.from_state(acc_state).history if acc_state else []
    if p.mode == "central":
        return CentralAccountant(p.noise_multiplier, p.delta, history)
    if history:
        return CentralAccountant.from_state(acc_state)  # type: ignore[arg-type]
    return None


def _run_federation(grid: Grid, cfg: Config, opts: RunOptions, on_round_end: RoundHook | None
                    ) -> dict[str, Any]:
    torch.set_num_threads(max(1, opts.threads))
    run_dir = RunDir(opts.out_dir)
    method = federated_method(cfg)
    model = initial_model(cfg)
    state = method.shared(model)
    expected = spec_of(state)
    sizes = full_model_bytes(cfg, model)
    start, history, acc_state = 1, [], None
    if opts.resume:
        last = run_dir.last()
        if last is None:
            log.warning("resume asked but %s holds no finished round: starting at round 1", run_dir.root)
        else:
            check_resumable(last["checkpoint"]["config_obj"], cfg, last["path"], force=opts.force_resume)
            state = {k: v.clone() for k, v in last["checkpoint"]["shared_state"].items()}
            if spec_of(state) != expected:
                raise ValueError(f"{last['path']}: checkpoint arrays do not match the model")
            start, history, acc_state = last["round"] + 1, last["history"], last["central_dp"]
            log.info("resuming after round %d from %s", last["round"], last["path"])
    accountant = _resumed_accountant(cfg, acc_state)
    strategy = make_strategy(cfg, expected, min_replies=opts.min_replies,
                             accountant=accountant if cfg.privacy.mode == "central" else None,
                             evaluate=opts.evaluate)
    arrays = state_to_record(state, method.name)
    t_run = time.perf_counter()
    for server_round in range(start, cfg.fed.rounds + 1):
        log.info("[ROUND %d/%d]", server_round, cfg.fed.rounds)
        wait_for_sites(grid, cfg.fed.min_clients, opts.wait_timeout, run_dir.root)
        t0 = time.perf_counter()
        train_cfg = ConfigRecord({"local-epochs": int(cfg.fed.local_epochs)})
        messages = strategy.configure_train(server_round, arrays, train_cfg, grid)
        if cfg.fed.secure_aggregation:  # SecAgg+ instead of per-site replies: fedeid.federated.secagg
            new_arrays, train_metrics = secure_train_round(grid, strategy, server_round, arrays, list(messages),
                                                           cfg, opts.round_timeout)
            t_train = time.perf_counter() - t0
        else:
            replies = list(grid.send_and_receive(messages, timeout=opts.round_timeout))
            t_train = time.perf_counter() - t0
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        t_agg = time.perf_counter() - t0 - t_train
        info = strategy.round_info.get(server_round, {})  # type: ignore[attr-defined]
        clients = info.get("clients", [])
        handler_max = _client_stat(clients, "handler-seconds", max)
        row: dict[str, Any] = {
            "round": server_round,
            "aggregated": bool(info.get("aggregated", False)),
            "sampled": info.get("sampled"), "available": info.get("available"),
            "valid_replies": info.get("valid", 0), "failures": info.get("failures", 0),
            "rejected": info.get("rejected", []), "rejections": info.get("rejections", {}),
            "screen": info.get("screen"), "aggregation": info.get("aggregation"),
            "train_metrics": dict(train_metrics) if train_metrics is not None else None,
            "evaluate_metrics": None,
            "clients": clients,
            "evaluate_clients": [],
            "bytes": {"down": info.get("bytes_down", 0), "up": info.get("bytes_up", 0),
                      "per_client_each_way": info.get("array_bytes", 0), **sizes},
            "seconds": {
                "train_phase": t_train, "aggregate": t_agg, "evaluate_phase": 0.0,
                "client_train_max": _client_stat(clients, "train-seconds", max),
                "client_train_mean": _client_stat(clients, "train-seconds", lambda v: float(np.mean(v))),
                "client_handler_max": handler_max,
                "client_train_sum": _client_stat(clients, "train-seconds", sum),
                "client_handler_sum": _client_stat(clients, "handler-seconds", sum),
                # beyond the slowest site's whole handler (only meaningful when every site has its own CPU)
                "overhead": (t_train - handler_max) if handler_max is not None else None,
            },
        }
        if "central_dp" in info:
            row["central_dp"] = info["central_dp"]
        local_eps = [c["epsilon"] for c in clients if "epsilon" in c]
        if local_eps:
            row["local_dp"] = {"epsilon_max": max(local_eps), "delta": cfg.privacy.delta,
                               "per_site": {str(int(c.get("site-id", c["node"]))): c["epsilon"]
                                            for c in clients if "epsilon" in c}}
        history.append(row)
        # saved (with the accountant) before this round's model goes to anyone: evaluate, next round
        run_dir.save_round(cfg, server_round, record_to_state(arrays), history,
                           accountant.state_dict() if accountant is not None else None)
        if opts.evaluate:
            t1 = time.perf_counter()
            wait_for_sites(grid, cfg.fed.min_clients, opts.wait_timeout, run_dir.root)
            ecfg = ConfigRecord({"eval-level": float(opts.eval_level)})
            emsgs = strategy.configure_evaluate(server_round, arrays, ecfg, grid)
            ereplies = list(grid.send_and_receive(emsgs, timeout=opts.round_timeout))
            eval_metrics = strategy.aggregate_evaluate(server_round, ereplies)
            row["evaluate_metrics"] = dict(eval_metrics) if eval_metrics is not None else None
            row["evaluate_clients"] = info.get("evaluate_clients", [])
            row["seconds"]["evaluate_phase"] = time.perf_counter() - t1
        row["seconds"]["round"] = time.perf_counter() - t0
        run_dir.write_metrics(cfg, history)
        log.info("round %d: %d/%s valid replies, %.1fs", server_round, row["valid_replies"], row["sampled"],
                 row["seconds"]["round"])
        record("train.round", round=server_round, sites=[c.get("site-id", c.get("node")) for c in clients],
               rejected=len(row["rejected"]), bytes=row["bytes"], central_dp=row.get("central_dp"),
               local_dp=row.get("local_dp"))
        if on_round_end is not None:
            on_round_end(server_round, row)
    summary = {
        "rounds": cfg.fed.rounds, "resumed_from": start - 1 if start > 1 else None,
        "seconds_this_process": time.perf_counter() - t_run, "bytes": sizes,
        "central_dp": ({"epsilon": accountant.epsilon(), "delta": accountant.delta, "releases": accountant.rounds,
                        "mode_now": cfg.privacy.mode}
                       if accountant is not None else None),
        "local_dp": _last_local(history),
    }
    final_state = record_to_state(arrays)
    run_dir.write_metrics(cfg, history, summary)
    run_dir.save_final(cfg, final_state, {"rounds": cfg.fed.rounds, "summary": summary})
    record("model.release", model=run_dir.global_path, mode="federated", rounds=cfg.fed.rounds, summary=summary)
    log.info("global model: %s", run_dir.global_path)
    return {"summary": summary, "history": history, "global": str(run_dir.global_path)}


def _last_local(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    per_site: dict[str, float] = {}
    for row in history:
        per_site.update(row.get("local_dp", {}).get("per_site", {}))
    return {"per_site_epsilon": per_site, "epsilon_max": max(per_site.values())} if per_site else None
