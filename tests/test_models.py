"""Networks, shared state, training loop, checkpoint round trip and the DeIdentifier."""

import numpy as np
import pytest
import torch

from fedeid.config import preset
from fedeid.data.imageset import ImageSet
from fedeid.deid.pipeline import DeIdentifier
from fedeid.io import InputError
from fedeid.models import build_deid_model, load_shared_state, shared_state
from fedeid.models.encoder import EfficientNetLite0Features, build_encoder
from fedeid.train import train_deid, train_reid


@pytest.fixture(scope="module")
def cfg():
    return preset("test")


@pytest.fixture(scope="module")
def data(cfg):
    rng = np.random.default_rng(0)
    n = 12
    return ImageSet(rng.random((n, 64, 64), dtype=np.float32), np.repeat(np.arange(4), 3),
                    (rng.random((n, 4)) < 0.4).astype(np.float32), ("nodule", "effusion", "cardiomegaly", "opacity"),
                    np.zeros(n, dtype=np.int64))


def test_pretrained_encoder_loads_real_weights_and_is_frozen():
    enc = build_encoder("efficientnet-lite0", 64)
    random = EfficientNetLite0Features()
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.training
    # the packaged ImageNet weights, not an initialisation
    assert not torch.allclose(enc._conv_stem.weight, random._conv_stem.weight)
    feats = enc(torch.rand(2, 1, 64, 64))
    assert feats.shape == (2, 112, 4, 4)


def test_frozen_encoder_passes_gradients_to_its_input():
    enc = build_encoder("efficientnet-lite0", 64)
    x = torch.rand(1, 1, 64, 64, requires_grad=True)
    enc(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_shared_state_is_exactly_decoupler_and_decoder(cfg):
    model = build_deid_model(cfg)
    state = shared_state(model)
    assert state and all(k.startswith(("decoupler.", "decoder.")) for k in state)
    expected = {f"decoupler.{k}" for k in model.decoupler.state_dict()} | {
        f"decoder.{k}" for k in model.decoder.state_dict()}
    assert set(state) == expected
    other = build_deid_model(cfg)
    load_shared_state(other, state)
    assert all(torch.equal(v, shared_state(other)[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="non-shared"):
        load_shared_state(other, {"encoder._bn0.weight": torch.ones(32)})


def test_training_moves_only_shared_weights_and_reports_every_loss(cfg, data):
    reid = train_reid(data, cfg, epochs=1)
    model = build_deid_model(cfg)
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    before = shared_state(model)
    metrics = train_deid(model, reid, data, cfg, epochs=1, proximal_mu=0.1, global_state=before)
    after = shared_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in enc_before.items())
    for term in ("rec", "fill", "sem", "med", "id", "rate", "indep", "adv", "idcode"):
        assert np.isfinite(metrics[term]), term
    assert metrics["num_examples"] == len(data)


def test_releases_are_random_unless_seeded_and_copy_no_pixel(cfg, data):
    d = DeIdentifier.build(cfg)
    out0, mask0 = d.deidentify(data.images, 0.0)
    assert np.array_equal(out0, data.images) and not mask0.any()
    out, mask = d.deidentify(data.images, 0.5, seed=7)
    again, _ = d.deidentify(data.images, 0.5, seed=7)
    other, other_mask = d.deidentify(data.images, 0.5)  # a fresh seed from the OS
    assert not np.array_equal(mask, other_mask)  # the blocked patches are drawn per release too
    assert out.shape == data.images.shape and out.dtype == np.float32
    assert np.array_equal(out, again)
    assert np.abs(out - other).mean() > 1e-3  # two releases of one image differ, also where visible
    assert np.abs(out - other)[~mask].mean() > 1e-3
    assert (out[~mask] != data.images[~mask]).mean() > 0.99  # visible regions are re-rendered too
    assert abs(mask.mean() - 0.5) < 0.02
    assert out.min() >= 0 and out.max() <= 1


def test_released_code_keeps_findings_and_forgets_the_rest_with_the_level(cfg):
    """Known answers of the level-tied bottleneck: level 0 is the identity; at every level the
    finding head reads the same logits from the released code; at level 1 two images' released
    codes (same noise) differ only by their finding parts — nothing else of the image survives."""
    from fedeid.models.decoupler import Codes

    torch.manual_seed(0)
    model = build_deid_model(cfg).eval()
    dec = model.decoupler
    code = torch.randn(2, cfg.model.medical_channels, 4, 4)
    codes = Codes(medical=code, mu=code, logvar=torch.zeros_like(code), identity=torch.zeros(2, 4, 4, 4))
    assert torch.equal(model.release_code(codes, 0.0), code)
    for level in (0.3, 1.0):
        released = model.release_code(codes, level, torch.Generator().manual_seed(1))
        assert torch.allclose(dec.finding_logits(released), dec.finding_logits(code), atol=1e-4)
    a = model.release_code(codes, 1.0, torch.Generator().manual_seed(2))
    b = model.release_code(Codes(medical=code.flip(0), mu=code, logvar=codes.logvar, identity=codes.identity), 1.0,
                           torch.Generator().manual_seed(2))
    diff = a - b  # the images swapped places, the noise did not: only the spatially flat finding part differs
    assert torch.allclose(diff, diff.mean(dim=(2, 3), keepdim=True).expand_as(diff), atol=1e-5)
    assert float(diff.abs().max()) > 1e-3


def test_deidentifier_refuses_wrong_sizes_and_levels(cfg):
    d = DeIdentifier.build(cfg)
    with pytest.raises(ValueError, match="expected images"):
        d.deidentify(np.zeros((1, 32, 32), np.float32), 0.5)
    with pytest.raises(ValueError, match="level"):
        d.deidentify(np.zeros((1, 64, 64), np.float32), 1.2)


def test_checkpoint_round_trip_is_self_describing(cfg, data, tmp_path):
    d = DeIdentifier.build(cfg)
    path = tmp_path / "model.pt"
    d.save(path, extra={"round": 3})
    loaded = DeIdentifier.load(path)
    assert loaded.cfg == cfg and loaded.image_size == 64 and loaded.level_range == (0.0, 1.0)
    assert loaded.modalities == ("CR", "DX")
    a, _ = d.deidentify(data.images, 0.7, seed=3)
    b, _ = loaded.deidentify(data.images, 0.7, seed=3)
    assert np.array_equal(a, b)
    raw = torch.load(path, weights_only=True)
    assert raw["versions"]["fedeid"] and raw["extra"] == {"round": 3}


def test_bad_checkpoints_name_the_file(tmp_path):
    missing = tmp_path / "none.pt"
    with pytest.raises(InputError, match="none.pt: checkpoint not found"):
        DeIdentifier.load(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="garbage.pt: not a readable checkpoint"):
        DeIdentifier.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(InputError, match="not a fedeid checkpoint"):
        DeIdentifier.load(foreign)


def test_native_resolution_composition(cfg):
    d = DeIdentifier.build(cfg)
    image = np.random.default_rng(1).random((150, 97), dtype=np.float32)
    out, mask = d.deidentify_native(image, 0.0)
    assert np.array_equal(out, image)
    out, mask = d.deidentify_native(image, 0.6, seed=0)
    assert out.shape == image.shape and 0.5 < mask.mean() < 0.7
    assert (out[~mask] != image[~mask]).mean() > 0.99
    assert out.min() >= 0 and out.max() <= 1


def test_site_reid_gives_embedding_and_findings_from_one_pass(cfg):
    from fedeid.deid.pipeline import build_site_reid
    from fedeid.models.deid_model import cfg_findings
    from fedeid.models.reid import ReIDNet

    torch.manual_seed(0)
    net = build_site_reid(cfg).eval()
    x = torch.rand(3, 1, 64, 64)
    emb, logits = net.embed_with_findings(x)
    assert torch.allclose(emb, net(x), atol=1e-6)  # the same embedding forward() gives
    assert logits is not None and logits.shape == (3, len(cfg_findings(cfg)))
    attacker_emb, none = ReIDNet(cfg.model.reid_size, cfg.model.reid_dim).eval().embed_with_findings(x)
    assert none is None and attacker_emb.shape == (3, cfg.model.reid_dim)


def test_decoder_prints_no_checkerboard():
    """Resize-convolution: even an untrained decoder's output has no energy at the 2-px period
    that a transposed convolution or a pixel shuffle prints into every synthesised patch."""
    from fedeid.models.decoder import CompensationDecoder

    torch.manual_seed(0)
    dec = CompensationDecoder(8, width=8, code_stride=16).eval()
    with torch.no_grad():
        out = dec(torch.full((1, 1, 64, 64), 0.5), torch.ones(1, 1, 64, 64), torch.randn(1, 8, 4, 4))[0, 0]
    interior = out[8:-8, 8:-8] - out[8:-8, 8:-8].mean()
    power = torch.fft.fft2(interior).abs() ** 2
    n = interior.shape[0]
    nyquist = power[n // 2, :].sum() + power[:, n // 2].sum()
    assert nyquist / power.sum() < 0.01


def test_site_reid_carries_cohort_matchability_through_its_checkpoint(cfg, data, tmp_path):
    reid = train_reid(data, cfg, epochs=1)
    assert reid.matchability is not None and reid.matchability.shape == (64,)
    assert reid.matchability.abs().sum() > 0
    d = DeIdentifier.from_models(build_deid_model(cfg), reid, cfg, device="cpu")
    d.save(tmp_path / "site.pt")
    assert torch.equal(DeIdentifier.load(tmp_path / "site.pt").reid.matchability, reid.matchability)
    attacker = train_reid(data, cfg, epochs=1, findings=False)
    assert attacker.matchability is None


def test_old_checkpoint_format_is_refused_with_a_reason(cfg, tmp_path):
    d = DeIdentifier.build(cfg)
    path = tmp_path / "old.pt"
    d.save(path)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 3  # the linear low-pass schedule: its calibration would not hold
    torch.save(raw, path)
    with pytest.raises(InputError, match="old.pt: checkpoint format 3 is not supported.*sqrt.*retrain"):
        DeIdentifier.load(path)


def test_visible_low_pass_grows_as_the_square_root_of_the_level(cfg):
    """σ(level) = σ_full·√level: none at 0, full at 1, half of it at 0.25 (and per image in a batch)."""
    model = build_deid_model(cfg)
    full = cfg.model.visible_sigma
    sig = model.visible_sigma(torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(sig, torch.tensor([0.0, 0.5 * full, full]))
    assert float(model.visible_sigma(0.04)[0]) == pytest.approx(0.2 * full)


def test_level_one_release_adds_no_texture_energy_of_the_original(cfg):
    """At level 1 the release is the decoder's rendering alone: the texture noise's amplitude is a
    scalar of the original (its high-band energy) and keeps the code's weight 1 - level, so
    nothing measured on the original image is added; below level 1 the texture is there."""
    model = build_deid_model(cfg).eval()
    s = cfg.data.image_size
    x = torch.rand(2, 1, s, s)
    full = torch.ones(2, 1, s, s)
    with torch.no_grad():
        out, gen, _, _ = model(x, full, 1.0, generator=torch.Generator().manual_seed(0))
        half, gen_half, _, _ = model(x, full, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, gen)
    assert (half - gen_half).abs().mean() > 1e-3
