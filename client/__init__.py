"""fedeid's Flower ClientApp (a thin shell over :mod:`fedeid.federated.client`)."""
