"""The pipeline on a CUDA device gives the CPU's result (skipped where there is no GPU)."""

import numpy as np
import pytest
import torch

from fedeid.config import preset
from fedeid.deid.pipeline import DeIdentifier

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_matches_cpu(tmp_path):
    cfg = preset("test")
    cpu = DeIdentifier.build(cfg, device="cpu")
    path = tmp_path / "m.pt"
    cpu.save(path)
    gpu = DeIdentifier.load(path, device="cuda")
    images = np.random.default_rng(0).random((4, 64, 64), dtype=np.float32)
    a, ma = cpu.deidentify(images, 0.5, seed=0)  # one release seed: the same noise on both devices
    b, mb = gpu.deidentify(images, 0.5, seed=0)
    assert np.array_equal(ma, mb)
    assert np.abs(a - b).max() < 1e-3
