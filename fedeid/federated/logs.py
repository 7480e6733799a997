"""Make ``fedeid.federated`` log lines visible in Flower's logs (``flwr run --stream``, SuperNode logs)."""

from __future__ import annotations

import logging

_DONE = False


def setup_logging(level: int = logging.INFO) -> None:
    global _DONE
    if _DONE:
        return
    logger = logging.getLogger("fedeid.federated")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedeid %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    _DONE = True
