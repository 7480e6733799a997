"""fedeid's Flower ServerApp (a thin shell over :mod:`fedeid.federated.server`)."""
