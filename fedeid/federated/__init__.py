"""Federated training with Flower: the logic behind ``server/`` and ``client/`` (thin shells).

Only the configured method's shared part travels (:mod:`fedeid.federated.methods`): method A's
decoupler and decoder, or method B's encoder heads and generator. The frozen MFM encoder is
identical everywhere; the ReID network, and under method B the identity prior, never leave their site.
"""
