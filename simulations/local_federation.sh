#!/usr/bin/env bash
# A local simulation federation of N synthetic hospitals with `flwr run . local-sim`.
#
#   simulations/local_federation.sh [N_SITES] [OUT_DIR] [RUN_CONFIG]
#   simulations/local_federation.sh 3 runs/sim 'fed.rounds=5 privacy.mode="local"'
#
# Starts its own simulation SuperLink (no runtime dependency installation, FLWR_HOME under OUT_DIR),
# runs the app of this repository on N virtual SuperNodes (one CPU each, non-IID synthetic sites:
# each site has its own scanner and population), and stops the SuperLink and everything it started
# on exit. The server writes OUT_DIR/federation/{metrics.json,checkpoints/,global.pt}, the sites
# OUT_DIR/federation/sites/site-<i>/reid.pt. `fedeid simulate` does the same and then evaluates.
# RUN_CONFIG is one string of key=value pairs (flwr keeps only the last --run-config's section).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-3}"
mkdir -p "${2:-runs/local-sim}"
OUT="$(cd "${2:-runs/local-sim}" && pwd)"
EXTRA="${3:-}"
export FLWR_HOME="$OUT/flwr-home"
mkdir -p "$FLWR_HOME"
cp simulations/federations.toml "$FLWR_HOME/config.toml"
BIN="$(dirname "$(command -v python)")"
setsid "$BIN/flower-superlink" --simulation --insecure --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port 39191 --database "$OUT/superlink.db" > "$OUT/superlink.log" 2>&1 &
LINK=$!
# SIGTERM lets the SuperLink stop the SuperExec it detached; then the whole group goes
stop() { kill -TERM "$LINK" 2>/dev/null || true; sleep 3; kill -KILL -- "-$LINK" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 60); do (echo > /dev/tcp/127.0.0.1/39191) 2>/dev/null && break; sleep 0.5; done
"$BIN/flwr" run . local-sim --stream \
  --federation-config "num-supernodes=$N client-resources-num-cpus=1" \
  --run-config "fedeid.out-dir=\"$OUT/federation\" data.n-sites=$N fed.num-supernodes=$N $EXTRA"
