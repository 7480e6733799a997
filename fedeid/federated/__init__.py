"""Federated training with Flower: the logic behind ``server/`` and ``client/`` (thin shells).

Only the decoupler and decoder travel (:func:`fedeid.train.shared_state`); the frozen MFM encoder
is identical everywhere and the ReID network never leaves its site.
"""
