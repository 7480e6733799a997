"""``fedeid simulate`` (the main job), ``fedeid certs``, ``fedeid deploy`` and ``fedeid site``.

``fedeid simulate --preset quick --out reports/main`` trains fedeid federatedly over the
synthetic hospitals of the preset with Flower's simulation runtime, then evaluates the global
model — with site 0's own ReID network, as site 0 would use it — on the held-out patients through
the same evaluation as ``fedeid evaluate`` (:func:`fedeid.eval.benchmark.evaluate_and_report`),
and writes into ``--out``: ``results.json`` + ``privacy_utility.png`` (the report),
``federated.json`` (per-round metrics, bytes, timings, ε), ``federated_rounds.png``, and
``federation/`` (round checkpoints, ``global.pt``, each site's ``reid.pt``).

``--method replace`` federates method B instead (``fed.method``): the sites train the encoder
heads and generator; site 0's identity prior, fitted to the global model on its own images and
kept in ``federation/sites/site-0/identity_prior.pt``, de-identifies the held-out patients, and
the report holds method B's curve (as ``replace``) and its counterfactual figures.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

from fedeid.io import atomic_write_json


def register(sub: argparse._SubParsersAction) -> None:
    from fedeid.commands import add_config_args
    from fedeid.config import METHODS

    p = sub.add_parser(
        "simulate", help="federated training over simulated hospitals (Flower), then the report",
        description="Train the decoupler + decoder with Flower over N synthetic hospitals (non-IID sites; "
                    "each trains its own ReID network, only decoupler/decoder weights travel), optionally "
                    "with central or local differential privacy, then evaluate the global model on the "
                    "held-out patients and write the report (JSON + PNG) into --out.")
    add_config_args(p)
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--engine", choices=("flwr", "inprocess"), default="flwr",
                   help="flwr: Flower simulation runtime (SuperLink + Ray, default); inprocess: same apps "
                        "called in this process, no Ray")
    p.add_argument("--method", choices=METHODS,
                   help="what the sites train (fed.method): blocking = method A (decoupler + decoder travel, "
                        "default); replace = method B (encoder heads + generator travel; each site's identity "
                        "prior stays at the site)")
    p.add_argument("--sites", type=int, help="number of simulated hospitals (data.n_sites)")
    p.add_argument("--rounds", type=int, help="federated rounds (fed.rounds)")
    p.add_argument("--privacy", choices=("none", "central", "local"), help="differential privacy (privacy.mode)")
    p.add_argument("--noise-multiplier", type=float, help="DP noise multiplier (privacy.noise_multiplier)")
    p.add_argument("--resume", action="store_true", help="continue from the last round checkpoint in --out")
    p.add_argument("--no-report", action="store_true", help="train only; skip the held-out evaluation")
    p.add_argument("--adaptive", action="store_true",
                   help="also evaluate against the adaptive (retrained) attacker: slow, one retraining per level")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "certs", help="create a CA, the SuperLink TLS certificate and SuperNode keys",
        description="Write ca.crt/ca.key, server.pem/server.key (for flower-superlink --ssl-*) and one "
                    "ECDSA P-384 OpenSSH key pair per SuperNode (for --auth-supernode-private-key and "
                    "`flwr supernode register`) into --out.")
    p.add_argument("--out", required=True, type=Path, help="folder for the certificates and keys")
    p.add_argument("--nodes", type=int, default=3, help="number of SuperNode key pairs (default 3)")
    p.add_argument("--host", action="append", default=None, metavar="NAME_OR_IP",
                   help="a name or IP the SuperLink is reached at (repeatable; default 127.0.0.1, ::1, localhost)")
    p.add_argument("--force", action="store_true", help="replace an existing set")
    p.set_defaults(func=certs_command)

    p = sub.add_parser(
        "deploy", help="write a whole deployment: certificates, nginx Fleet-only proxy, start scripts, site configs",
        description="Write into --out one folder per party: coordinator/ (SuperLink on loopback, nginx forwarding "
                    "only the Fleet API to the hospitals, flwr connection, register/run scripts) and one per site "
                    "(site.toml with its key, the CA and the pinned app hash; start-site.sh), plus certs/ "
                    "(the CA: keep ca.key offline).")
    p.add_argument("--out", required=True, type=Path, help="deployment folder")
    p.add_argument("--sites", type=int, default=3, help="number of hospitals (site-0 ... site-N-1; default 3)")
    p.add_argument("--site", action="append", default=None, metavar="NAME", help="site names instead of --sites")
    p.add_argument("--public-host", default="127.0.0.1", help="name or IP the hospitals reach the coordinator at")
    p.add_argument("--listen", default=None, help="nginx listen address (default 0.0.0.0:<fleet-port>)")
    p.add_argument("--fleet-port", type=int, default=9092, help="the hospitals' port (nginx; default 9092)")
    p.add_argument("--superlink-port", type=int, default=9093, help="the SuperLink's loopback port (default 9093)")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="site i's SuperNode Runtime API port is this + i, on loopback (default 9094)")
    p.add_argument("--app", type=Path, default=None, help="the Flower app folder to pin (default: this fedeid's)")
    p.add_argument("--force", action="store_true", help="write over an existing deployment folder")
    p.set_defaults(func=deploy_command)

    p = sub.add_parser("site", help="a hospital's SuperNode that runs only its pinned app; the app pin",
                       description="`fedeid site run site.toml`: start the SuperNode and run only ClientApps "
                                   "whose FAB hash site.toml pins; exit 3 if the SuperLink refuses the node, 4 if "
                                   "it ends on its own. `fedeid site pin APP_DIR`: the FAB hash `flwr run APP_DIR` "
                                   "submits.")
    ss = p.add_subparsers(dest="site_command", required=True)
    q = ss.add_parser("run", help="start this site's SuperNode (see site.toml)")
    q.add_argument("site_toml", type=Path)
    q.set_defaults(func=site_run_command)
    q = ss.add_parser("pin", help="print the SHA-256 of the FAB built from an app folder")
    q.add_argument("app_dir", type=Path)
    q.set_defaults(func=site_pin_command)


def deploy_command(args: argparse.Namespace) -> int:
    from fedeid.federated.perimeter import write_bundle
    from fedeid.federated.simulation import project_dir

    app = args.app or project_dir()
    if app is None:
        print("fedeid: --app: no Flower app folder found next to this fedeid; name one", file=sys.stderr)
        return 2
    sites = args.site or [f"site-{i}" for i in range(args.sites)]
    b = write_bundle(args.out, sites, app_dir=app, public_host=args.public_host, listen=args.listen,
                     fleet_port=args.fleet_port, superlink_port=args.superlink_port,
                     runtime_port=args.runtime_port, force=args.force)
    print(f"coordinator: {b.coordinator}  (start-superlink.sh, start-proxy.sh, register-sites.sh, run.sh)")
    for d in b.sites:
        print(f"site:        {d}  (start-site.sh)")
    print(f"pinned app:  {app}  FAB sha256 {b.fab_sha256}")
    print(f"CA key:      {b.out / 'certs' / 'ca.key'}  (keep offline; hand each site only its own folder)")
    return 0


def site_run_command(args: argparse.Namespace) -> int:
    from fedeid.federated.site import run_site

    return run_site(args.site_toml)


def site_pin_command(args: argparse.Namespace) -> int:
    from fedeid.federated.site import fab_sha256

    print(fab_sha256(args.app_dir))
    return 0


def certs_command(args: argparse.Namespace) -> int:
    from fedeid.privacy.certs import DEFAULT_HOSTS, create_certificates

    hosts = args.host or list(DEFAULT_HOSTS)
    b = create_certificates(args.out, n_nodes=args.nodes, hosts=hosts, overwrite=args.force)
    print(f"CA:                 {b.ca_cert}  (keep {b.ca_key.name} offline)")
    print(f"SuperLink:          {b.server_cert}, {b.server_key}  (valid for {', '.join(hosts)})")
    for priv, pub in zip(b.node_keys, b.node_public_keys):
        print(f"SuperNode key:      {priv}  (register {pub.name})")
    print("\nflower-superlink --disable-runtime-dependency-installation --enable-supernode-auth \\\n"
          f"  --ssl-ca-certfile {b.ca_cert} --ssl-certfile {b.server_cert} --ssl-keyfile {b.server_key}")
    print("\n(for a whole deployment, with the Control API kept off the hospitals' address: fedeid deploy)")
    return 0


def _config(args: argparse.Namespace) -> Any:
    from fedeid.commands import config_from_args

    cfg = config_from_args(args)
    if args.method is not None:
        cfg.set("fed.method", args.method)
    if args.sites is not None:
        cfg.set("data.n_sites", args.sites)
    if args.rounds is not None:
        cfg.set("fed.rounds", args.rounds)
    if args.privacy is not None:
        cfg.set("privacy.mode", args.privacy)
    if args.noise_multiplier is not None:
        cfg.set("privacy.noise_multiplier", args.noise_multiplier)
    cfg.fed.num_supernodes = cfg.data.n_sites
    cfg.fed.min_clients = min(cfg.fed.min_clients, cfg.data.n_sites)
    return cfg


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedeid.federated.simulation import simulate

    t0 = time.perf_counter()
    cfg = _config(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"federated simulation of method {cfg.fed.method}: {cfg.data.n_sites} sites, "
          f"{cfg.fed.rounds} rounds x {cfg.fed.local_epochs} "
          f"local epochs, {cfg.fed.strategy}, privacy={cfg.privacy.mode}, engine={args.engine}", file=sys.stderr)
    fed = simulate(cfg, out, engine=args.engine, resume=args.resume)
    fed_summary = federated_summary(fed, cfg)
    atomic_write_json(out / "federated.json", {**fed, "summary_table": fed_summary})
    plot_rounds(fed, out / "federated_rounds.png")
    print_fed_summary(fed_summary)
    if args.no_report:
        return 0
    report = evaluate_global(cfg, fed, out, adaptive=args.adaptive)
    print(f"report: {out / 'results.json'}  plots: {out / 'privacy_utility.png'}, {out / 'federated_rounds.png'} "
          f"({time.perf_counter() - t0:.0f} s in all)")
    return 0 if report else 1


def evaluate_global(cfg: Any, fed: dict[str, Any], out: Path, site: int = 0, adaptive: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """The held-out evaluation of the global model as site ``site`` would use it (fedeid.eval).

    Method A with the site's ReID network; method B with the site's identity prior, fitted to the
    global model on the site's own images (:func:`fedeid.federated.client.site_prior`: the one the
    site wrote at its last evaluate step, else fitted now) and loaded the way a site loads it
    (``DeIdentifier.load(global.pt, prior=...)``). Then the report path of ``fedeid evaluate``
    (:func:`fedeid.eval.benchmark.evaluate_and_report`: same evaluator, baselines, picture grid,
    method B's counterfactual figures); the no-decoupler ablation (a second training) is left out,
    and so is the adaptive attacker unless ``adaptive`` (it retrains attacker and classifier for
    every method and level: most of the evaluation's time on 2 cores).
    """
    from fedeid.data.imageset import ImageSet
    from fedeid.data.synthetic import generate
    from fedeid.deid.pipeline import DeIdentifier
    from fedeid.checkpoint import add_extra
    from fedeid.eval.benchmark import evaluate_and_report, method_name
    from fedeid.eval.calibration import calibration_from_results
    from fedeid.eval.report import Evaluator

    use_adaptive = adaptive

    class _Evaluator(Evaluator):
        def score(self, method: Any, level: float, adaptive: bool = True) -> dict[str, float]:
            return super().score(method, level, adaptive=adaptive and use_adaptive)

    sites, test = generate(cfg.data)
    sdir = Path(fed["paths"]["site_reid"][site]).parent
    extra: dict[str, Any] = {"mode": "federated", "reid_site": site, "adaptive_attacker": adaptive,
                             "federated": federated_summary(fed, cfg)}
    if cfg.fed.method == "replace":
        prior = site_prior_path(cfg, fed["paths"]["global"], sites[site], sdir, site)
        deid = DeIdentifier.load(fed["paths"]["global"], prior=prior, device=cfg.train.device, method="replace")
        extra["replace"] = {"identity_prior": dict(vars(deid.prior.report)), "prior_site": site}
    else:
        deid = DeIdentifier.load(fed["paths"]["global"], reid=fed["paths"]["site_reid"][site],
                                 device=cfg.train.device, method="blocking")
    eval_cfg = copy.deepcopy(cfg)
    eval_cfg.eval.baselines = tuple(b for b in cfg.eval.baselines if b != "no_decoupler")
    train = ImageSet.concat(sites)
    results = evaluate_and_report(deid, train, test, eval_cfg, out, extra=extra, progress=progress,
                                  evaluator=_Evaluator(train, test, eval_cfg, progress=progress))
    # what each level bought, stored in the global model as `fedeid evaluate` stores it in its
    # checkpoint (fedeid deid prints it); measured with this site's ReID / prior, and said so
    calibration = {**calibration_from_results(results, method_name(deid)), "site": site}
    add_extra(fed["paths"]["global"], calibration=calibration)
    return results


def site_prior_path(cfg: Any, global_path: str | Path, data: Any, sdir: Path, site: int) -> Path:
    """Site ``site``'s identity prior for the method-B model at ``global_path``, as the site keeps it."""
    from fedeid.checkpoint import load_checkpoint
    from fedeid.deid.replace import PRIOR
    from fedeid.federated.client import site_prior
    from fedeid.federated.methods import federated_method

    method = federated_method(cfg)
    model = method.build(cfg)
    method.load(model, load_checkpoint(global_path)["shared_state"])
    site_prior(cfg, model, data, sdir, site)
    return sdir / PRIOR


def federated_summary(fed: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """Bytes per round vs the full model, round overhead vs local training, ε: the README figures."""
    rounds = fed.get("rounds", [])
    if not rounds:
        return {}
    last = rounds[-1]
    b = last["bytes"]
    per_round = [r["bytes"]["down"] + r["bytes"]["up"] for r in rounds]
    sec = [r["seconds"] for r in rounds]

    def mean(key: str) -> float | None:
        vals = [s[key] for s in sec if s.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    out = {
        "sites": cfg.data.n_sites, "rounds": len(rounds), "engine": fed.get("engine"),
        "shared_bytes_per_site_each_way": b["shared_bytes"],
        "full_model_bytes": b["full_model_bytes"],
        "shared_fraction_of_full_model": b["shared_bytes"] / b["full_model_bytes"],
        "bytes_per_round_all_sites": sum(per_round) / len(per_round),
        "bytes_per_round_if_full_model": 2 * b["full_model_bytes"] * (last.get("sampled") or cfg.data.n_sites),
        "round_seconds_mean": mean("round"),
        "train_phase_seconds_mean": mean("train_phase"),
        "client_train_seconds_mean": mean("client_train_mean"),
        "client_train_seconds_max_mean": mean("client_train_max"),
        "client_handler_seconds_max_mean": mean("client_handler_max"),
        "evaluate_phase_seconds_mean": mean("evaluate_phase"),
        "wall_seconds": fed.get("wall_seconds"),
        "failures": sum(int(r.get("failures") or 0) for r in rounds),
        "peak_rss_bytes": fed.get("peak_rss_bytes"),
    }
    # Share of the train phase's CPU-slot time not spent in train_deid: Flower transport and
    # scheduling, ClientApp start-up, model building, data and ReID loading. Slots = sites that can
    # train at once (the simulation gives each site one CPU; the in-process engine runs them in turn).
    slots = fed.get("cpu_slots") or 1
    busy = [r["seconds"].get("client_train_sum") for r in rounds]
    tp = [r["seconds"].get("train_phase") for r in rounds]
    if all(b is not None for b in busy) and all(tp):
        frac = [1 - b / (min(slots, r.get("valid_replies") or 1) * t) for b, t, r in zip(busy, tp, rounds)]
        out["cpu_slots"] = slots
        out["train_phase_overhead_fraction_mean"] = sum(frac) / len(frac)
        out["local_training_seconds_per_round_mean"] = sum(busy) / len(busy)
    s = fed.get("summary", {})
    if s.get("central_dp"):
        out["central_dp"] = s["central_dp"]
    if s.get("local_dp"):
        out["local_dp"] = s["local_dp"]
    return out


def print_fed_summary(s: dict[str, Any]) -> None:
    if not s:
        return
    mb = 1024 ** 2
    print(f"sent per site and direction: {s['shared_bytes_per_site_each_way'] / mb:.2f} MB "
          f"({100 * s['shared_fraction_of_full_model']:.1f} % of the full de-identifier, "
          f"{s['full_model_bytes'] / mb:.2f} MB); per round, all sites: {s['bytes_per_round_all_sites'] / mb:.2f} MB")
    if s.get("round_seconds_mean") is not None:
        print(f"round: {s['round_seconds_mean']:.1f} s; train phase {s['train_phase_seconds_mean']:.1f} s of which "
              f"slowest site's local training {s['client_train_seconds_max_mean'] or 0:.1f} s")
    if s.get("central_dp"):
        print(f"central DP: epsilon={s['central_dp']['epsilon']:.2f} at delta={s['central_dp']['delta']:g}")
    if s.get("local_dp"):
        print(f"local DP: per-site epsilon {s['local_dp']['per_site_epsilon']}")


def plot_rounds(fed: dict[str, Any], path: Path) -> None:
    """Per-round training losses, local evaluation figures and ε."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedeid.io import atomic_save

    rounds = fed.get("rounds", [])
    if not rounds:
        return
    x = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("rec", "sem", "med", "id"):
        y = [(r.get("train_metrics") or {}).get(key) for r in rounds]
        if any(v is not None for v in y):
            axes[0].plot(x, [v if v is not None else float("nan") for v in y], marker="o", label=key)
    axes[0].set(title="training losses (site mean)", xlabel="round")
    axes[0].legend(fontsize=8)
    for key, label in (("local-p-at-1", "local ReID P@1 (de-id)"), ("local-utility-auc", "local finding AUC (de-id)"),
                       ("local-ssim", "SSIM")):
        y = [(r.get("evaluate_metrics") or {}).get(key) for r in rounds]
        if any(v is not None for v in y):
            axes[1].plot(x, [v if v is not None else float("nan") for v in y], marker="o", label=label)
    axes[1].set(title="sites' local evaluation", xlabel="round", ylim=(0, 1.02))
    axes[1].legend(fontsize=8)
    eps_c = [r.get("central_dp", {}).get("epsilon") for r in rounds]
    eps_l = [r.get("local_dp", {}).get("epsilon_max") for r in rounds]
    if any(e is not None for e in eps_c):
        axes[2].plot(x, eps_c, marker="o", label="central DP ε (client level)")
    if any(e is not None for e in eps_l):
        axes[2].plot(x, eps_l, marker="s", label="local DP ε (max over sites)")
    if not any(e is not None for e in eps_c + eps_l):
        axes[2].bar(x, [r["seconds"]["round"] for r in rounds], label="round seconds")
        axes[2].set(title="round time", xlabel="round", ylabel="s")
    else:
        axes[2].set(title="privacy spent", xlabel="round", ylabel="ε")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x)
    fig.tight_layout()
    atomic_save(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
