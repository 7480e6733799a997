"""How many simulated hospitals fit on this machine: memory and round time vs N (Flower + Ray).

    python simulations/capacity.py --preset quick --sites 2,4,8 --out reports/capacity

Runs one Flower simulation per N (the real runtime: SuperLink --simulation, Ray, one CPU per
virtual SuperNode) for ``--rounds`` rounds of ``--local-epochs`` epochs, samples the resident
memory of every process of the run (SuperLink, ServerApp, Ray and its workers) every 0.5 s, and
records the peak and the round times. Ray runs as many ClientApps at once as there are CPUs, so
memory is bounded by the CPU count, not by N; N costs time, about linearly. Writes
``capacity.json`` and ``capacity.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedeid.commands import config_from_args  # noqa: E402
from fedeid.io import atomic_save, atomic_write_json  # noqa: E402


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=("quick", "full", "test"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sites", default="2,4,8")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from fedeid.federated.commands import federated_summary
    from fedeid.federated.simulation import simulate

    rows = []
    for n in [int(x) for x in args.sites.split(",") if x.strip()]:
        cfg = config_from_args(args)
        cfg.data.n_sites = n
        cfg.fed.num_supernodes = n
        cfg.fed.min_clients = n
        cfg.fed.rounds = args.rounds
        cfg.fed.local_epochs = args.local_epochs
        fed = simulate(cfg, args.out / f"sites-{n}", engine="flwr", evaluate=False)
        s = federated_summary(fed, cfg)
        rows.append({"sites": n, "peak_rss_bytes": fed.get("peak_rss_bytes"), "wall_seconds": fed["wall_seconds"],
                     "round_seconds": [r["seconds"]["round"] for r in fed["rounds"]],
                     "client_train_seconds_mean": s.get("client_train_seconds_mean"),
                     "train_phase_overhead_fraction_mean": s.get("train_phase_overhead_fraction_mean")})
        print(rows[-1], file=sys.stderr)
        atomic_write_json(args.out / "capacity.json", {"cpus": os.cpu_count(), "mem_total_bytes": mem_total(),
                                                       "preset": args.preset, "rows": rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ns = [r["sites"] for r in rows]
    ax[0].plot(ns, [r["peak_rss_bytes"] / 2**30 for r in rows], marker="o")
    ax[0].set(xlabel="simulated hospitals", ylabel="peak resident memory, GiB", title=f"{os.cpu_count()} CPUs")
    ax[1].plot(ns, [sum(r["round_seconds"]) / len(r["round_seconds"]) for r in rows], marker="o")
    ax[1].set(xlabel="simulated hospitals", ylabel="seconds per round")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save(args.out / "capacity.png", lambda fh: fig.savefig(fh, format="png", dpi=120))
    return 0


if __name__ == "__main__":
    sys.exit(main())
