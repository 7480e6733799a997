"""De-identification throughput, its cost relative to the semantic encoder, and what the
pretrained encoder buys.

Prints its figures and writes them as JSON:

* images/s of ``DeIdentifier.deidentify`` per batch size and level, on every available device;
* images/s of the frozen encoder's forward pass alone, and the ratio (the cost of ReID saliency,
  blocking and the decoder on top of the MFM);
* a linear probe of the findings on pooled encoder features, pretrained EfficientNet-Lite0 vs the
  same network randomly initialised (macro AUC on held-out patients): whether the packaged
  ImageNet weights carry more usable semantics than an untrained net on these images.

Usage: ``python simulations/benchmarks/throughput.py --out reports/throughput.json [--preset quick]``
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from fedeid.config import preset
from fedeid.data.synthetic import generate
from fedeid.data.imageset import ImageSet
from fedeid.deid.pipeline import DeIdentifier
from fedeid.eval.metrics import macro_auc
from fedeid.io import atomic_write_json
from fedeid.models.encoder import build_encoder
from fedeid.train import as_tensor, batched


def rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up (allocations, kernels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n_images * repeats / (time.perf_counter() - t0)


def linear_probe(spec: str, train: ImageSet, test: ImageSet, size: int, seed: int = 0) -> float:
    torch.manual_seed(seed)  # the random-init twin must be the same network every run
    enc = build_encoder(spec, size)
    device = torch.device("cpu")

    def feats(images: np.ndarray) -> np.ndarray:
        return batched(lambda x: enc(x).mean(dim=(2, 3)), as_tensor(images), device).numpy()

    ftr, fte = feats(train.images), feats(test.images)
    mean, std = ftr.mean(0), ftr.std(0) + 1e-6
    scores = np.stack([LogisticRegression(max_iter=2000, C=0.1).fit((ftr - mean) / std, train.labels[:, j])
                       .predict_proba((fte - mean) / std)[:, 1] for j in range(train.labels.shape[1])], 1)
    return macro_auc(test.labels, scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--out", default="reports/throughput.json")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = preset(args.preset)
    sites, test = generate(cfg.data)
    train = ImageSet.concat(sites)
    size = cfg.data.image_size
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results: dict = {"machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                                 "torch": str(torch.__version__),
                                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                     "image_size": size, "throughput": []}
    for device in devices:
        d = DeIdentifier.build(cfg, device=device)  # speed does not depend on training
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            x = as_tensor(test.images[:bs]).to(device)
            enc_rate = rate(lambda: d.model.encode(x), bs, args.repeats)
            for level in (0.5, 1.0):
                deid_rate = rate(lambda: d.deidentify_tensor(x, level), bs, args.repeats)
                row = {"device": device, "batch_size": bs, "level": level,
                       "deid_images_per_s": deid_rate, "encoder_images_per_s": enc_rate,
                       "cost_vs_encoder": enc_rate / deid_rate}
                results["throughput"].append(row)
                print(f"{device:5s} batch {bs:3d} level {level:.1f}: de-id {deid_rate:8.1f} img/s, "
                      f"encoder alone {enc_rate:8.1f} img/s, de-id costs {enc_rate / deid_rate:.2f}x the encoder")
    results["encoder_probe_macro_auc"] = {
        "efficientnet-lite0 (ImageNet, packaged)": linear_probe("efficientnet-lite0", train, test, size),
        "efficientnet-lite0 (random init)": linear_probe("efficientnet-lite0-random", train, test, size),
    }
    for k, v in results["encoder_probe_macro_auc"].items():
        print(f"linear probe of findings on {k}: macro AUC {v:.3f}")
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
