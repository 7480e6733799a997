"""How detectable a release is: detectors trained to tell released images from originals.

The picture grid lets a person see whether synthesised regions look synthetic; this puts a
number beside it, measured the way privacy is: by detectors that learn, on the training images,
what a release looks like, then score the held-out patients' originals and releases. ROC AUC 0.5
means the releases pass for radiographs; 1.0 means every one of them gives itself away.

A detector trained on a method's own releases learns that method's signature, and even a light
blur has one, so its AUC says whether a release can be flagged as processed, not how far from a
radiograph it is. Beside it, :func:`frechet_distance` grades that distance without training on
the method: the Fréchet distance (FID's formula) between the frozen encoder's pooled features of
the held-out originals and of their releases, with the same distance between two sets of
originals (held-out patients against as many training patients' images) as the reference of
"as real as real".

Two detectors, the worst case (the higher AUC) reported with them:

* ``learned`` — the evaluation's small ConvNet (the finding classifier's architecture and its
  one training loop, :func:`fedeid.train.train_classifier`) with one output, "released";
* ``foundation`` — logistic regression on the frozen encoder's features, each channel's mean and
  standard deviation over the image (texture statistics as much as content).

A detector needs both classes in the training images; the test figure is over all held-out
originals and their releases, so it is a property of the method at one level, not of one image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedeid.config import Config
from fedeid.data.imageset import ImageSet
from fedeid.models.encoder import build_encoder
from fedeid.train import as_tensor, batched, classifier_scores, resolve_device, train_classifier

DETECTORS = ("learned", "foundation")


def _pair(real: np.ndarray, released: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Originals and releases -> one stack of images and their labels (0 original, 1 released)."""
    if real.shape != released.shape or real.ndim != 3:
        raise ValueError(f"originals {real.shape} and releases {released.shape} must be the same [N, H, W]")
    labels = np.concatenate([np.zeros(len(real)), np.ones(len(released))]).astype(np.float32)
    return np.concatenate([real, released]).astype(np.float32), labels


def encoder_statistics(images: np.ndarray, cfg: Config, encoder: torch.nn.Module | None = None) -> np.ndarray:
    """Images [N, H, W] -> the frozen encoder's per-channel mean and std over the image [N, 2C]."""
    device = resolve_device(cfg.train.device)
    enc = (encoder or build_encoder(cfg.model.encoder, cfg.data.image_size)).to(device).eval()

    def statistics(x: torch.Tensor) -> torch.Tensor:
        h = enc(x)
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)

    return batched(statistics, as_tensor(images), device).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (FID's formula).

    Biased upwards at small N, so compare figures only at equal sizes (the reference too).
    ``tr sqrt(S1 S2)`` is the sum of the square roots of ``S1 S2``'s eigenvalues (those of the
    positive semi-definite ``S1^1/2 S2 S1^1/2``), which stays defined when fewer samples than
    dimensions leave the covariances singular, where a matrix square root does not.
    """
    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(max(mu @ mu + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum(), 0.0))


def detectability(train_real: np.ndarray, train_released: np.ndarray, test_real: np.ndarray,
                  test_released: np.ndarray, cfg: Config, encoder: torch.nn.Module | None = None
                  ) -> dict[str, Any]:
    """Each detector's held-out ROC AUC at telling releases from originals, the worst case, and the
    feature Fréchet distance of the held-out releases to their originals (with its real-vs-real reference)."""
    x_train, y_train = _pair(train_real, train_released)
    x_test, y_test = _pair(test_real, test_released)
    out: dict[str, Any] = {}

    data = ImageSet(x_train, np.zeros(len(x_train), dtype=np.int64), y_train[:, None], ("released",),
                    np.zeros(len(x_train), dtype=np.int64))
    net = train_classifier(data, cfg, input_size=cfg.eval.classifier_size, epochs=cfg.eval.classifier_epochs)
    scores = classifier_scores(net, x_test, next(net.parameters()).device)[:, 0]
    out["learned"] = float(roc_auc_score(y_test, scores))

    enc = encoder or build_encoder(cfg.model.encoder, cfg.data.image_size)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    f_train, f_test = encoder_statistics(x_train, cfg, enc), encoder_statistics(x_test, cfg, enc)
    probe.fit(f_train, y_train)
    out["foundation"] = float(roc_auc_score(y_test, probe.decision_function(f_test)))

    worst = max(DETECTORS, key=lambda k: out[k])
    pooled = f_test.shape[1] // 2  # the channel means: FID's pooled features
    real_test, released_test = f_test[y_test == 0, :pooled], f_test[y_test == 1, :pooled]
    # the reference at the releases' own sample size (the distance's bias depends on it)
    real_train = f_train[y_train == 0, :pooled]
    pick = np.random.default_rng(cfg.train.seed).permutation(len(real_train))[:len(real_test)]
    return {"detect_auc": out[worst], "detector": worst, "by_detector": out,
            "feature_fd": frechet_distance(real_test, released_test),
            "feature_fd_reference": frechet_distance(real_test, real_train[pick])}
