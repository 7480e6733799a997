"""How well method B's counterfactuals work: the finding changes, the patient does not.

For every finding and target value (0 and 1), the held-out images whose label is the *other*
value are given the target by :meth:`ReplaceDeIdentifier.counterfactual`. Two figures:

* **flip rate** — the evaluation's finding classifier (trained on originals, never on
  counterfactuals) now calls the target (probability >= 0.5); beside it the rate it already
  called the target on the unchanged images (``base_rate``), so a flip rate means something only
  above that;
* **identity kept** — the attacker's P@1 of counterfactual queries against the original gallery:
  the same patient should still be found (compare with the originals' P@1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedeid.data.imageset import ImageSet
from fedeid.eval.metrics import reid_metrics
from fedeid.train import as_tensor, batched


def _probabilities(classifier: nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    return torch.sigmoid(batched(classifier.eval(), as_tensor(images), device)).numpy()


def counterfactual_figures(deidentifier: Any, test: ImageSet, classifier: nn.Module, attacker: nn.Module,
                           gallery: np.ndarray, queries: np.ndarray, device: torch.device) -> dict[str, Any]:
    """Per finding and target: n, flip_rate, base_rate, identity-kept P@1 (see the module docstring)."""
    names = test.finding_names
    base = _probabilities(classifier, test.images, device)
    emb = lambda im: batched(attacker.eval(), as_tensor(im), device).numpy()  # noqa: E731
    gallery_emb = emb(test.images[gallery])
    q_ids, g_ids = test.patient_ids[queries], test.patient_ids[gallery]
    out: dict[str, Any] = {"p_at_1_original": reid_metrics(emb(test.images[queries]), q_ids, gallery_emb,
                                                           g_ids)["p_at_1"], "findings": {}}
    for k, name in enumerate(names):
        per: dict[str, Any] = {}
        for value in (0, 1):
            cf = deidentifier.counterfactual(test.images, {name: value})
            changed = test.labels[:, k] != value
            probs = _probabilities(classifier, cf, device)
            says = (probs[:, k] >= 0.5) == bool(value)
            said = (base[:, k] >= 0.5) == bool(value)
            kept = reid_metrics(emb(cf[queries]), q_ids, gallery_emb, g_ids)
            per[f"set_{value}"] = {
                "n": int(changed.sum()),
                "flip_rate": float(says[changed].mean()) if changed.any() else None,
                "base_rate": float(said[changed].mean()) if changed.any() else None,
                "mean_probability_change": float((probs[:, k] - base[:, k])[changed].mean()) if changed.any() else None,
                "identity_p_at_1": kept["p_at_1"],
            }
        out["findings"][name] = per
    return out
