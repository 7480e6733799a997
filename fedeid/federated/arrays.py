"""What travels, and the checks that nothing else does.

A train reply from a site is a :class:`~flwr.app.RecordDict` with exactly two records:
``"arrays"`` — an :class:`~flwr.app.ArrayRecord` whose names, shapes and dtypes equal the shared
state of the method the run federates (method A: :func:`fedeid.models.shared_state`, the
decoupler and decoder; method B: :func:`fedeid.models.replace.replace_state`, the encoder heads
and generator; nothing else), and ``"metrics"`` —
a :class:`~flwr.app.MetricRecord` of scalars. :func:`reply_problems` is checked by the server on
every reply (a reply that fails is dropped and counted as a failure) and by the tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedeid.models import deid_model, replace

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
WEIGHT_KEY = "num-examples"
#: The reason of an error reply by which a site refuses a round under its own privacy policy.
REFUSED = "refused by site policy"

Spec = dict[str, tuple[tuple[int, ...], str]]
#: The names each method's shared state may hold (fedeid.config.METHODS): what may travel.
METHOD_PREFIXES: dict[str, tuple[str, ...]] = {"blocking": deid_model.SHARED_PREFIXES,
                                               "replace": replace.SHARED_PREFIXES}


def state_to_record(state: Mapping[str, torch.Tensor], method: str = "blocking") -> ArrayRecord:
    """A ``method``'s shared state (in its order) -> ArrayRecord; refuses any other tensor."""
    foreign = [k for k in state if not k.startswith(METHOD_PREFIXES[method])]
    if foreign:
        raise ValueError(f"refusing to send non-shared tensors: {foreign[:3]}")
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def spec_of(state: Mapping[str, Any]) -> Spec:
    """Names -> (shape, dtype) of a state dict (tensors or numpy arrays)."""
    out: Spec = {}
    for k, v in state.items():
        arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        out[k] = (tuple(int(s) for s in arr.shape), str(arr.dtype))
    return out


def record_spec(record: ArrayRecord) -> Spec:
    return {k: (tuple(int(s) for s in a.shape), str(np.dtype(a.numpy().dtype))) for k, a in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (the serialised tensors; framing is a few hundred bytes)."""
    return int(sum(len(a.data) for a in record.values()))


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return int(sum(v.numel() * v.element_size() for v in state.values()))


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def method_of(names: Any) -> str | None:
    """The method whose shared state these array names belong to (None: no one method's)."""
    names = list(names)
    found = [m for m, prefixes in METHOD_PREFIXES.items() if names and all(n.startswith(prefixes) for n in names)]
    return found[0] if len(found) == 1 else None


def spec_problems(record: ArrayRecord, expected: Spec) -> list[str]:
    got = record_spec(record)
    problems = []
    theirs, ours = method_of(got), method_of(expected)
    if theirs is not None and ours is not None and theirs != ours:  # say it first: the rest is its consequence
        problems.append(f"arrays of method {theirs!r}, expected method {ours!r} (fed.method)")
    extra = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    if extra:
        problems.append(f"unexpected arrays {extra[:5]}")
    if missing:
        problems.append(f"missing arrays {missing[:5]}")
    for k in sorted(set(got) & set(expected)):
        if got[k][0] != expected[k][0]:
            problems.append(f"{k}: shape {got[k][0]} != {expected[k][0]}")
        if got[k][1] != expected[k][1]:
            problems.append(f"{k}: dtype {got[k][1]} != {expected[k][1]}")
    return problems


def metric_problems(record: MetricRecord) -> list[str]:
    problems = []
    for k, v in record.items():
        if not is_scalar(v):
            problems.append(f"metric {k!r} is not a scalar ({type(v).__name__})")
        elif isinstance(v, float) and not math.isfinite(v):
            problems.append(f"metric {k!r} is not finite")
    return problems


def reply_problems(content: RecordDict, expected: Spec | None, *, train: bool = True) -> list[str]:
    """Why a reply breaks the contract (empty list: it is exactly shared arrays + scalar metrics)."""
    problems: list[str] = []
    keys = set(content.keys())
    allowed = {ARRAYS_KEY, METRICS_KEY} if train else {METRICS_KEY}
    if keys != allowed:
        problems.append(f"records {sorted(keys)} != {sorted(allowed)}")
    if train:
        arrays = content.array_records.get(ARRAYS_KEY)
        if arrays is None:
            problems.append("no ArrayRecord 'arrays'")
        elif expected is not None:
            problems += spec_problems(arrays, expected)
    elif content.array_records:
        problems.append("an evaluate reply carries arrays")
    if content.config_records:
        problems.append("reply carries a ConfigRecord")
    metrics = content.metric_records.get(METRICS_KEY)
    if metrics is None:
        problems.append("no MetricRecord 'metrics'")
    else:
        problems += metric_problems(metrics)
        w = metrics.get(WEIGHT_KEY)
        if not is_scalar(w) or w <= 0:  # type: ignore[operator]
            problems.append(f"metric {WEIGHT_KEY!r} missing or not positive")
    return problems


def scalar_metrics(values: Mapping[str, Any]) -> MetricRecord:
    """Floats/ints only, underscores to hyphens (Flower's style); ``num_examples`` -> ``num-examples``."""
    out: dict[str, int | float] = {}
    for k, v in values.items():
        key = k.replace("_", "-")
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (np.generic,)):
            v = v.item()
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if not isinstance(v, (int, float)):
            raise TypeError(f"metric {k!r} is not a scalar: {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            continue  # nan/inf are dropped (Flower aggregation would propagate them)
        out[key] = v
    if WEIGHT_KEY in out:
        out[WEIGHT_KEY] = int(out[WEIGHT_KEY])
    return MetricRecord(out)


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in values.items() if v is not None})
