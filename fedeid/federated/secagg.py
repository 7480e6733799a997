"""Secure aggregation (``fed.secure_aggregation``): the server learns the mean update, never a site's.

Flower 1.42's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) is written for the legacy
strategy API: the workflow needs a ``LegacyContext`` holding a legacy ``Strategy`` and
``ClientManager`` (``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``,
``__call__``, ``setup_stage``: ``context.strategy.configure_fit``, ``unmask_stage``:
``context.strategy.aggregate_fit``), and the client mod hands the app a legacy ``FitIns``
record and expects a legacy ``FitRes`` record back (``secaggplus_mod.py``,
``compat.recorddict_to_fitres``). Both are plain functions over a ``Grid`` and ``Message``s,
so they run inside fedeid's Message-API apps; this module is the adapter:

* **Site** (:func:`secure_aggregation_mod`, on the ClientApp's train handler). SecAgg+ messages
  go through Flower's ``secaggplus_mod``; at its masking stage fedeid's own train handler runs
  on the received global arrays, and the site sends ``clip(new - global, C)`` — its update
  clipped to L2 norm ``C`` (``privacy.clipping_norm``) *by the site* — masked. Other messages
  pass through untouched.
* **Server** (:func:`secure_train_round`, called by the round loop instead of
  ``send_and_receive`` + ``aggregate_train``). It runs the four SecAgg+ stages with the
  nodes the strategy sampled and gets the *sum* of the clipped updates of the ``m`` sites that
  finished (weights are equal: each site reports one "example" and ``max_weight`` is 1). With
  ``privacy.mode = "central"`` it adds Gaussian noise ``N(0, (zC/m)²)`` to the mean and composes
  the round in the strategy's accountant — the mechanism of fedeid's central DP, with the
  clipping moved to the sites.

What the server still sees: each site's scalar training metrics, and who took part. The
per-reply value checks and robust aggregation rules of the plain path need individual updates
and do not apply; a site's influence is bounded by its own clipping, which a hostile site can
skip (SecAgg+ has no proof of well-formed inputs): sending its own integers instead of Flower's
quantized vector, it can move every coordinate of the sum by up to ``2^32 / 2^22 · 2C = 2048·C``
(modulus / quantization range); only a non-finite or mis-shaped aggregate is caught. Reconstruction needs ``threshold`` shares:
the server together with that many colluding sites could unmask one site.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedeid.federated.arrays import ARRAYS_KEY, METRICS_KEY

log = logging.getLogger("fedeid.federated")

NAMES_KEY = "fedeid-array-names"  # the legacy record keeps the arrays' order, not their names
CLIP_KEY = "fedeid-secagg-clip"


# --------------------------------------------------------------------------- site

def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Answer SecAgg+ train messages with the masked, clipped update; pass everything else on."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, lambda m, c: _clipped_update(m, c, call_next))


def _clipped_update(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """fedeid's train handler on the legacy FitIns; reply a legacy FitRes holding clip(new - global, C)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    conf = dict(fitins.config)
    names = json.loads(str(conf.pop(NAMES_KEY)))
    clip = float(conf.pop(CLIP_KEY))  # type: ignore[arg-type]
    base = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(base) or not np.isfinite(clip) or clip <= 0:
        raise ValueError("secure aggregation: malformed round (array names or clipping norm)")
    msg.content = RecordDict({ARRAYS_KEY: ArrayRecord({n: Array(a) for n, a in zip(names, base)}),
                              "config": ConfigRecord(conf)})  # type: ignore[arg-type]
    reply = call_next(msg, ctxt)
    if reply.has_error():
        raise RuntimeError(f"secure aggregation: local training failed: {reply.error.reason}")
    new = reply.content[ARRAYS_KEY]
    delta = [new[n].numpy().astype(np.float64) - b.astype(np.float64) for n, b in zip(names, base)]
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta)))
    if not np.isfinite(norm):
        raise ValueError("secure aggregation: the local update is not finite; nothing is sent")
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    metrics = {k: v for k, v in reply.content[METRICS_KEY].items() if isinstance(v, (int, float))}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([d * scale for d in delta]), 1, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


# --------------------------------------------------------------------------- server

class _OneRound(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives: every registered node trains; keep the sum."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.result: Parameters | None = None
        self.metrics: dict[int, dict[str, Any]] = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in client_manager.all().values()]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: Any
                      ) -> tuple[Parameters | None, dict[str, Any]]:
        # every FitRes now holds the same unmasked aggregate (the workflow's doing)
        self.metrics = {int(proxy.node_id): dict(res.metrics) for proxy, res in results}  # type: ignore[attr-defined]
        self.result = results[0][1].parameters if results else None
        return self.result, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


def secure_train_round(grid: Grid, strategy: Any, server_round: int, arrays: ArrayRecord,
                       messages: list[Message], cfg: Any, timeout: float | None
                       ) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """One training round over SecAgg+ with the nodes of ``messages`` (the strategy's sample).

    Fills ``strategy.round_info[server_round]`` like the plain path does; returns the new global
    arrays (``None``: fewer than ``strategy.min_replies`` sites finished, the model is kept).
    """
    t0 = time.perf_counter()
    info = strategy.round_info.setdefault(server_round, {"round": server_round})
    nodes = sorted({int(m.metadata.dst_node_id) for m in messages})
    names = list(arrays.keys())
    base = [a.numpy() for a in arrays.values()]
    clip = float(cfg.privacy.clipping_norm)
    conf = dict(messages[0].content["config"]) if messages else {}
    legacy_cfg = {k: v for k, v in conf.items() if isinstance(v, (int, float, str, bool, bytes))}
    legacy_cfg.update({NAMES_KEY: json.dumps(names), CLIP_KEY: clip})

    clients = SimpleClientManager()
    for nid in nodes:
        clients.register(GridClientProxy(nid, grid, grid.run.run_id))
    one = _OneRound(legacy_cfg)
    ctx = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                run_config={}),
                        config=ServerConfig(num_rounds=server_round, round_timeout=timeout),
                        strategy=one, client_manager=clients)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(base), keep_input=True)
    # every coordinate of an update clipped to L2 norm C lies in [-C, C]: SecAgg+ quantizes exactly that range
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=2 / 3, max_weight=1.0, clipping_range=clip,
                       timeout=timeout)(grid, ctx)

    m = len(one.metrics)
    info.update(replies=m, valid=m, failures=len(nodes) - m, rejected=[],
                clients=[{"node": nid, **met} for nid, met in sorted(one.metrics.items())],
                secure_aggregation={"participants": m, "clipping_norm": clip, "seconds": time.perf_counter() - t0})
    if one.result is None or m < strategy.min_replies:
        log.warning("round %d: secure aggregation finished with %d sites (< %d): global model kept",
                    server_round, m, strategy.min_replies)
        info["aggregated"] = False
        return None, None
    mean = [np.asarray(d, dtype=np.float64) for d in parameters_to_ndarrays(one.result)]
    if not all(np.isfinite(d).all() for d in mean) or [d.shape for d in mean] != [b.shape for b in base]:
        log.warning("round %d: the secure aggregate is malformed: global model kept", server_round)
        info.update(aggregated=False, rejected=[{"node": None, "reason": "secure aggregate malformed"}])
        return None, None
    if strategy.dp is not None:  # central DP: the sites clipped, the server adds the noise
        noise_std = strategy.dp.noise_multiplier * clip / m
        for d in mean:
            d += strategy.noise_rng.normal(0.0, noise_std, d.shape)
        q = min(1.0, len(nodes) / max(1, info.get("available", len(nodes))))
        strategy.dp.step(sample_rate=q)
        info["central_dp"] = {"noise_std": noise_std, "clipping_norm": clip, "clipped_at": "sites",
                              "noise_multiplier": strategy.dp.noise_multiplier, "sample_rate": q,
                              "epsilon": strategy.dp.epsilon(), "delta": strategy.dp.delta,
                              "releases": strategy.dp.rounds}
    info["aggregated"] = True
    new = ArrayRecord({n: Array(np.asarray(b.astype(np.float64) + d, dtype=b.dtype))
                       for n, b, d in zip(names, base, mean)})
    keys = {k for met in one.metrics.values() for k in met}
    metrics = MetricRecord({k: float(np.mean([met[k] for met in one.metrics.values() if k in met])) for k in keys})
    return new, metrics
