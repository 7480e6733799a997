"""What secure aggregation (SecAgg+) costs per round: time and bytes, paired against the plain path.

    python simulations/secagg_overhead.py --preset test --sites 3 --rounds 2 --out reports/secagg

Runs the same federation in this process (fedeid's real ServerApp logic and ClientApp on
the in-process grid, central DP on in both) with ``fed.secure_aggregation`` off and on,
alternating ``--repeats`` times after a discarded warm-up, and records for each round the wall time and the bytes the sites sent the server (arrays,
or SecAgg+'s keys, shares and masked vectors). In a deployment each SecAgg+ round is four
message exchanges, i.e. four ClientApp process starts per site instead of one; that start-up is
not in these figures. Writes ``secagg_overhead.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fedeid.commands import config_from_args  # noqa: E402
from fedeid.io import atomic_write_json  # noqa: E402


def reply_bytes(msg: object) -> int:
    """Payload bytes of a reply: arrays plus bytes values of config records (SecAgg+'s vectors)."""
    content = msg.content  # type: ignore[attr-defined]
    n = sum(a.numpy().nbytes for rec in content.array_records.values() for a in rec.values())
    for rec in content.config_records.values():
        for v in rec.values():
            vals = v if isinstance(v, list) else [v]
            n += sum(len(x) for x in vals if isinstance(x, bytes))
    return n


def run(cfg: object, secure: bool, workdir: Path) -> dict[str, object]:
    from client.app import app as client_app

    from fedeid.federated.inprocess import InProcessGrid
    from fedeid.federated.runconfig import config_from_run, run_config_for, run_options
    from fedeid.federated.server import run_federation

    cfg.fed.secure_aggregation = secure  # type: ignore[attr-defined]
    sent: list[int] = []
    rc = run_config_for(cfg, out_dir=workdir / "server", state_dir=workdir / "sites", threads=1, evaluate=False)
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(cfg.data.n_sites)], rc,  # type: ignore[attr-defined]
                         on_reply=lambda q, r: sent.append(reply_bytes(r)))
    t0 = time.perf_counter()
    result = run_federation(grid, config_from_run(rc), run_options(rc))
    rounds = result["history"]
    return {"secure_aggregation": secure, "wall_seconds": time.perf_counter() - t0,
            "round_seconds": [r["seconds"]["round"] for r in rounds],
            "valid_replies": [r["valid_replies"] for r in rounds],
            "upload_bytes_all_sites": sum(sent), "messages": len(sent),
            "epsilon": (result["summary"]["central_dp"] or {}).get("epsilon")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="test", choices=("quick", "full", "test"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating (median reported)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows = []
    # alternating, after a discarded warm-up run (imports, first-use costs): plain, secure, plain, secure, ...
    for i, secure in enumerate([False] + [False, True] * args.repeats):
        cfg = config_from_args(args)
        cfg.data.n_sites = args.sites
        cfg.fed.rounds = args.rounds
        cfg.fed.min_clients = args.sites
        cfg.privacy.mode = "central"
        with tempfile.TemporaryDirectory() as tmp:
            r = run(cfg, secure, Path(tmp))
        if i == 0:
            continue
        rows.append(r)
        print(f"secure_aggregation={secure}: {r['wall_seconds']:.1f} s for {args.rounds} rounds "
              f"(per round {', '.join(f'{s:.1f}' for s in r['round_seconds'])} s), "
              f"sites sent {r['upload_bytes_all_sites'] / 1e6:.2f} MB in {r['messages']} messages, eps={r['epsilon']:.2f}")

    def median(secure: bool, key: str) -> float:
        return float(np.median([r[key] for r in rows if r["secure_aggregation"] is secure]))

    summary = {"time_ratio": median(True, "wall_seconds") / median(False, "wall_seconds"),
               "upload_ratio": median(True, "upload_bytes_all_sites") / median(False, "upload_bytes_all_sites"),
               "median_wall_seconds": {"plain": median(False, "wall_seconds"), "secure": median(True, "wall_seconds")}}
    print(f"SecAgg+ / plain: time x{summary['time_ratio']:.2f}, bytes sent x{summary['upload_ratio']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "secagg_overhead.json", {"preset": args.preset, "sites": args.sites,
                                                          "rounds": args.rounds, "runs": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
