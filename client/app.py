"""ClientApp: one hospital trains and evaluates locally (see fedeid.federated.client).

Node config: ``site-id`` (synthetic site, default: the simulation's partition-id), ``data``
(a CSV / folder of the site's own images), ``state-dir`` (where the site keeps its ReID network
and privacy ledger). Raw images, per-image features and the ReID network never leave the node.
The site's own privacy policy — ``require-local-dp=true``, ``min-noise-multiplier=...``,
``epsilon-budget=...``, ``max-delta=...`` — is enforced here, whatever the run config asks
(fedeid.privacy.local.SitePolicy): a round asking for less is refused and nothing is sent.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedeid.federated.client import handle_evaluate, handle_train
from fedeid.federated.logs import setup_logging
from fedeid.federated.secagg import secure_aggregation_mod

app = ClientApp()


@app.train(mods=[secure_aggregation_mod])  # passes all but SecAgg+ messages straight through
def train(msg: Message, context: Context) -> Message:
    setup_logging()
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    setup_logging()
    return handle_evaluate(msg, context)
