"""The ClientApp's logic: one hospital's local training and local evaluation.

``client/app.py`` is a thin shell over :func:`handle_train` and :func:`handle_evaluate`.

A site's data comes from its node config: ``data`` (a CSV of images with patient ids and
findings, or a folder holding one, read by :func:`fedeid.data.loaders.load_csv`) or, without
it, the synthetic benchmark's site ``site-id`` (simulation: ``partition-id``). The site keeps,
in its state folder (node config ``state-dir``, else ``<fedeid.state-dir>/site-<id>``, else — a
simulation on one machine — ``<fedeid.out-dir>/sites/site-<id>``; a real SuperNode sets it):

* ``reid.pt`` — its ReID network, trained once on its own patients and reused every round (a
  fedeid checkpoint holding only ``reid_state``; ``DeIdentifier.load(global.pt, reid=...)``
  reads it). It never leaves the site.
* ``privacy_ledger.json`` — under local DP, the Opacus accountant history of every DP-SGD step
  taken on this site's data, so ε accumulates across rounds (and runs, and restarts); mirrored
  in ``context.state``.

* ``identity_prior.pt`` — under method B (``fed.method=replace``), the site's identity prior
  fitted to the latest global model it evaluated (:func:`site_prior`); with ``global.pt`` it is
  the site's de-identifier (``fedeid deid --model global.pt --prior identity_prior.pt``). It
  never leaves the site.

A train reply holds exactly the shared arrays of the configured method (decoupler/decoder, or
encoder heads/generator) and scalar metrics (see :mod:`fedeid.federated.arrays`); an evaluate
reply holds scalar metrics only.

The site's own privacy policy (node config ``require-local-dp``, ``min-noise-multiplier``,
``epsilon-budget``, ``max-delta``; :class:`fedeid.privacy.local.SitePolicy`) is checked before
training: a round the run configures with less protection, or one that would take the site's
ε over its budget, is answered with an error reply giving the reason and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedeid.config import Config
from fedeid.data.imageset import ImageSet
from fedeid.federated.arrays import (ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, REFUSED, record_to_state, scalar_metrics,
                                     spec_of, spec_problems, state_to_record)
from fedeid.federated.methods import federated_method
from fedeid.federated.runconfig import RunOptions, config_from_run, run_options
from fedeid.io import InputError, atomic_write_json
from fedeid.privacy.accountant import History, history_from_flat, history_to_flat
from fedeid.privacy.local import SitePolicy, make_private

log = logging.getLogger("fedeid.federated")

LEDGER = "privacy_ledger.json"
REID = "reid.pt"
_DATA_CACHE: dict[str, ImageSet] = {}


# ----------------------------------------------------------------------------- site resources

def site_id(context: Context) -> int:
    nc = context.node_config
    for key in ("site-id", "partition-id"):
        if key in nc and nc[key] != "":
            return int(nc[key])
    return 0


def site_dir(context: Context, opts: RunOptions, site: int) -> Path:
    explicit = context.node_config.get("state-dir")
    if explicit:
        path = Path(str(explicit)).expanduser()
    elif opts.state_dir:
        path = Path(opts.state_dir).expanduser() / f"site-{site}"
    else:  # a simulation on the server's machine: next to the server's folder
        path = opts.out_dir / "sites" / f"site-{site}"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _csv_of(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("labels.csv", "data.csv", "index.csv"):
            if (path / name).is_file():
                return path / name
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) == 1:
            return csvs[0]
        raise InputError(path, "data folder must hold labels.csv (or exactly one .csv)")
    raise InputError(path, "no such data file or folder")


def site_data(cfg: Config, context: Context, site: int, sdir: Path | None = None) -> ImageSet:
    """This site's images: its ``data`` CSV/folder, or the synthetic benchmark's site ``site``.

    Synthetic sites are cached in the site's state folder (``synthetic-<key>.npz``): a SuperNode
    starts a fresh ClientApp process per message, and regenerating a site costs seconds.
    """
    data_path = str(context.node_config.get("data", "") or "")
    key = _fingerprint(site, data_path, cfg.data)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    if data_path:
        from fedeid.data.loaders import load_csv

        data, errors = load_csv(_csv_of(Path(data_path).expanduser()), cfg.data.image_size)
        for err in errors[:20]:
            log.warning("site %d: skipped %s", site, err)
    else:
        cache = sdir / f"synthetic-{key}.npz" if sdir is not None else None
        data = _read_npz(cache) if cache is not None and cache.exists() else None
        if data is None:
            from fedeid.data.synthetic import generate_site

            data = generate_site(cfg.data, site)
            if cache is not None:
                _write_npz(cache, data)
    if len(data) == 0:
        raise InputError(data_path or f"synthetic site {site}", "no usable images")
    _DATA_CACHE.clear()  # one site per process: keep memory flat
    _DATA_CACHE[key] = data
    return data


def _write_npz(path: Path, data: ImageSet) -> None:
    from fedeid.io import atomic_save

    atomic_save(path, lambda fh: np.savez(fh, images=data.images, patient_ids=data.patient_ids, labels=data.labels,
                                          sites=data.sites, finding_names=np.asarray(data.finding_names)))


def _read_npz(path: Path) -> ImageSet | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return ImageSet(z["images"], z["patient_ids"], z["labels"], tuple(str(x) for x in z["finding_names"]),
                            z["sites"])
    except (OSError, ValueError, KeyError):
        return None


def reid_fingerprint(cfg: Config, data: ImageSet) -> str:
    return _fingerprint(cfg.data, cfg.model.reid_size, cfg.model.reid_dim, cfg.train.seed, cfg.train.reid_epochs,
                        cfg.train.lr, cfg.train.batch_size, len(data),
                        hashlib.sha256(np.ascontiguousarray(data.images[:8]).tobytes()).hexdigest())


def site_reid(cfg: Config, data: ImageSet, sdir: Path, site: int) -> Any:
    """The site's ReID network: loaded from ``reid.pt`` if trained for this data/config, else trained."""
    from fedeid.checkpoint import load_checkpoint, save_checkpoint
    from fedeid.deid.pipeline import reid_from_state
    from fedeid.train import train_reid

    path = sdir / REID
    fp = reid_fingerprint(cfg, data)
    if path.exists():
        try:
            ckpt = load_checkpoint(path)
            if ckpt["extra"].get("site_reid", {}).get("fingerprint") == fp and ckpt["reid_state"] is not None:
                return reid_from_state(cfg, ckpt["reid_state"])
            log.info("site %d: %s was trained for other data/config: retraining", site, path)
        except (InputError, RuntimeError, KeyError) as exc:
            log.warning("site %d: cannot reuse %s (%s): retraining", site, path, exc)
    t0 = time.perf_counter()
    net = train_reid(data, cfg)
    save_checkpoint(path, cfg, reid=net.state_dict(),
                    extra={"site_reid": {"site": site, "fingerprint": fp, "images": len(data),
                                         "patients": int(len(np.unique(data.patient_ids))),
                                         "train_seconds": time.perf_counter() - t0}})
    return net


# ----------------------------------------------------------------------------- privacy ledger

def load_ledger(context: Context, sdir: Path) -> History:
    path = sdir / LEDGER
    if path.exists():
        try:
            return [tuple(h) for h in json.loads(path.read_text())["history"]]  # type: ignore[misc]
        except (ValueError, KeyError) as exc:
            raise InputError(path, f"unreadable privacy ledger: {exc}") from exc
    rec = context.state.config_records.get("fedeid-local-dp")
    return history_from_flat(rec["history"]) if rec is not None and "history" in rec else []  # type: ignore[arg-type]


def save_ledger(context: Context, sdir: Path, history: History, delta: float, epsilon: float) -> None:
    atomic_write_json(sdir / LEDGER, {"history": [list(h) for h in history], "delta": delta, "epsilon": epsilon,
                                      "note": "Opacus RDP history (noise_multiplier, sample_rate, steps) of "
                                              "every DP-SGD step on this site's data"})
    context.state["fedeid-local-dp"] = ConfigRecord({"history": history_to_flat(history), "epsilon": float(epsilon)})


# ----------------------------------------------------------------------------- handlers

def _setup(msg: Message, context: Context) -> tuple[Config, RunOptions, int, Path, ImageSet]:
    cfg = config_from_run(dict(context.run_config))
    opts = run_options(dict(context.run_config))
    torch.set_num_threads(opts.threads)
    site = site_id(context)
    sdir = site_dir(context, opts, site)
    return cfg, opts, site, sdir, site_data(cfg, context, site, sdir)


def _global_model(cfg: Config, msg: Message) -> tuple[Any, dict[str, torch.Tensor]]:
    """The received global model of the configured method, refused unless its arrays fit this site's."""
    method = federated_method(cfg)
    torch.manual_seed(cfg.train.seed)
    model = method.build(cfg)
    incoming = msg.content.array_records.get(ARRAYS_KEY)
    if incoming is None:
        raise ValueError("message carries no 'arrays' record")
    problems = spec_problems(incoming, spec_of(method.shared(model)))
    if problems:
        raise ValueError(f"global arrays do not fit this site's {method.name} model: " + "; ".join(problems[:5]))
    state = record_to_state(incoming)
    method.load(model, state)
    return model, state


def site_prior(cfg: Config, model: Any, data: ImageSet, sdir: Path, site: int) -> Any:
    """This site's method-B de-identifier for the global ``model``: the identity prior fitted to the
    global encoder's identity vectors of the site's own images (``with_site_prior``, as after
    central training), kept in ``identity_prior.pt`` and reused while the weights and data are the
    same. The prior never leaves the site (see :mod:`fedeid.federated.methods`)."""
    from fedeid.checkpoint import load_checkpoint
    from fedeid.deid.replace import (PRIOR, ReplaceDeIdentifier, load_site_prior, replace_state, save_site_prior,
                                     with_site_prior)
    from fedeid.models.identity_prior import IdentityPrior

    path = sdir / PRIOR
    fp = _fingerprint(cfg.replace, reid_fingerprint(cfg, data))
    shared = replace_state(model)
    if path.exists():
        try:
            ckpt = load_checkpoint(path)
            if ckpt["extra"].get("site_prior", {}).get("data") == fp:
                state = load_site_prior(path, shared, "the global model")
                prior = IdentityPrior.from_state(state, cfg.model.reid_dim, model.residual_dim)
                return ReplaceDeIdentifier(model, prior, cfg, cfg.train.device)
        except (InputError, ValueError) as exc:
            log.info("site %d: %s is not for this global model (%s): refitting", site, path, exc)
    t0 = time.perf_counter()
    deidentifier, _ = with_site_prior(model, data, cfg, {}, device=cfg.train.device)
    save_site_prior(path, deidentifier, data=fp, site=site, images=len(data), fit_seconds=time.perf_counter() - t0)
    return deidentifier


def _site_model(cfg: Config, site: int, sdir: Path, data: ImageSet, msg: Message
                ) -> tuple[Any, Any, dict[str, torch.Tensor], ConfigRecord]:
    """What both handlers train/evaluate with: this site's ReID, the received global model, the config."""
    reid = site_reid(cfg, data, sdir, site)
    model, state = _global_model(cfg, msg)
    return reid, model, state, msg.content.config_records.get(CONFIG_KEY, ConfigRecord())


def refuse(msg: Message, site: int, why: str) -> Message:
    """An error reply carrying only the reason: no arrays, no metrics."""
    log.warning("site %d: %s: %s", site, REFUSED, why)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{REFUSED}: {why}"), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received shared part (method A: decoupler + decoder; method B: encoder heads +
    generator) on this site's data; reply with it and scalars."""
    t0 = time.perf_counter()
    cfg, opts, site, sdir, data = _setup(msg, context)
    conf = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    epochs = int(conf.get("local-epochs", cfg.fed.local_epochs))  # type: ignore[arg-type]
    policy = SitePolicy(dict(context.node_config))
    ledger = load_ledger(context, sdir)
    why = policy.refusal(cfg, len(data), epochs, ledger)
    if why is not None:  # before the model is even loaded: nothing is trained, nothing is sent
        return refuse(msg, site, why)
    method = federated_method(cfg)
    reid, model, state, conf = _site_model(cfg, site, sdir, data, msg)
    mu = float(conf.get("proximal-mu", 0.0))  # type: ignore[arg-type]
    private = make_private(cfg, ledger)
    try:
        metrics: dict[str, Any] = method.train(model, reid, data, cfg, epochs, private=private, proximal_mu=mu,
                                               global_state=state if mu > 0 else None)
    finally:
        if private is not None:
            private.close()
    if private is not None:
        eps = private.epsilon()
        save_ledger(context, sdir, private.history, cfg.privacy.delta, eps)  # the data were used: ε is spent
        why = policy.exceeded(eps)
        if why is not None:
            return refuse(msg, site, why)
        metrics.update(epsilon=eps, dp_steps=private.steps_this_round, dp_delta=cfg.privacy.delta)
    metrics.update(site_id=site, handler_seconds=time.perf_counter() - t0,
                   round=int(conf.get("server-round", 0)))  # type: ignore[arg-type]
    shared = method.shared(model)
    content = RecordDict({ARRAYS_KEY: state_to_record(shared, method.name), METRICS_KEY: scalar_metrics(metrics)})
    from fedeid.audit import record
    from fedeid.federated.arrays import state_nbytes
    record("train.round.site", state=sdir, bytes_sent=state_nbytes(shared), metrics_sent=sorted(metrics),
           **{k: metrics.get(k) for k in ("round", "site_id", "num_examples", "epsilon", "dp_delta")})
    return Message(content, reply_to=msg)


def local_figures(deidentifier: Any, reid: Any, findings: Any, data: ImageSet, level: float,
                  max_images: int = 96) -> dict[str, float]:
    """Privacy/utility on the site's own data with the site's own networks (no training).

    Privacy: the site's ReID network ``reid`` as attacker — P@1 of de-identified images (each
    patient's second half) against the originals of the first half, and the same for the originals.
    Utility: macro AUC of the model's own finding head (``findings``: images -> logits; method A's
    decoupler, method B's medical vector) read from the de-identified images (medical content that
    survives), and on the originals. Quality: SSIM.
    """
    from fedeid.eval.metrics import macro_auc, reid_metrics, ssim
    from fedeid.eval.report import split_gallery
    from fedeid.train import as_tensor, batched

    if len(data) > max_images:
        keep = np.flatnonzero(np.isin(data.patient_ids, np.unique(data.patient_ids)[: max(2, max_images // 4)]))
        data = data.subset(keep[:max_images])
    out, mask = deidentifier.deidentify(data.images, level)
    gallery, queries = split_gallery(data)
    dev = deidentifier.device
    model = deidentifier.model
    emb_orig = batched(reid, as_tensor(data.images), dev).numpy()
    emb_deid = batched(reid, as_tensor(out), dev).numpy()
    ids = data.patient_ids

    def finding_scores(images: np.ndarray) -> np.ndarray:
        return torch.sigmoid(batched(lambda x: findings(model, x), as_tensor(images), dev)).numpy()

    figures: dict[str, float] = {"eval_level": float(level), "blocked_fraction": float(mask.mean())}
    if len(queries):
        p_deid = reid_metrics(emb_deid[queries], ids[queries], emb_orig[gallery], ids[gallery])
        p_orig = reid_metrics(emb_orig[queries], ids[queries], emb_orig[gallery], ids[gallery])
        figures.update(local_p_at_1=p_deid["p_at_1"], local_p_at_1_original=p_orig["p_at_1"],
                       local_chance_p_at_1=p_deid["chance_p_at_1"])
    try:
        figures["local_utility_auc"] = macro_auc(data.labels, finding_scores(out))
        figures["local_utility_auc_original"] = macro_auc(data.labels, finding_scores(data.images))
    except ValueError:  # a finding with one class only at this site
        pass
    figures["local_ssim"] = ssim(out, data.images)
    return {k: float(v) for k, v in figures.items() if v is not None and np.isfinite(v)}


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Local privacy/utility figures of the received global model with this site's ReID (method B:
    with the site's identity prior fitted to it, kept for the site's own de-identification)."""
    from fedeid.deid.pipeline import DeIdentifier

    t0 = time.perf_counter()
    cfg, opts, site, sdir, data = _setup(msg, context)
    method = federated_method(cfg)
    reid, model, _, conf = _site_model(cfg, site, sdir, data, msg)
    level = float(conf.get("eval-level", opts.eval_level))  # type: ignore[arg-type]
    prior_figures: dict[str, float] = {}
    if method.name == "replace":
        deidentifier = site_prior(cfg, model, data, sdir, site)
        report = deidentifier.prior.report
        # TPR at the margin: whether the (federated) identity vectors separate this site's patients
        prior_figures = {"prior_margin": report.margin, "prior_tpr_at_margin": report.tpr_at_margin,
                         "prior_rejection_rate": report.rejection_rate}
    else:
        deidentifier = DeIdentifier.from_models(model, reid, cfg, device=cfg.train.device)
    figures = local_figures(deidentifier, reid, method.findings, data, level)
    figures.update(**prior_figures, num_examples=len(data), site_id=site, handler_seconds=time.perf_counter() - t0)
    return Message(RecordDict({METRICS_KEY: scalar_metrics(figures)}), reply_to=msg)
