"""ServerApp: aggregates only the shared part of every site's model (see fedeid.federated.server):
method A's decoupler and decoder, or method B's encoder heads and generator (``fed.method``).

Run with ``flwr run . <connection>``; the run config (``[tool.flwr.app.config]``) carries the
Config keys and the ``fedeid.*`` options (out-dir, resume, round-timeout, ...).
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedeid.federated.logs import setup_logging
from fedeid.federated.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    run_server(grid, context)
