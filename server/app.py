"""ServerApp: aggregates only the decoupler and decoder of every site (see fedeid.federated.server).

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
