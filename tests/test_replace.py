"""Method B: synthetic identities outside the margin, swap consistency, counterfactuals,
self-describing checkpoints, local DP and the command line."""

import numpy as np
import pytest
import torch
from PIL import Image

from fedeid.checkpoint import load_checkpoint, save_checkpoint
from fedeid.cli import main
from fedeid.config import preset
from fedeid.data.synthetic import generate_site
from fedeid.deid.pipeline import DeIdentifier
from fedeid.deid.replace import ReplaceDeIdentifier, parse_findings
from fedeid.eval.counterfactual import counterfactual_figures
from fedeid.io import InputError
from fedeid.models.identity_prior import IdentityPrior, ResidualPrior, calibrate_margin, closest_cosine
from fedeid.models.reid import ReIDNet
from fedeid.models.replace import ReplaceModel, Vectors, replace_state
from fedeid.privacy.local import LocalDP
from fedeid.train import as_tensor, train_reid
from fedeid.train_replace import CF_LOGIT, fit_identity_prior, patient_proxies, swap_targets, train_replace


def clustered_identities(patients=12, per=4, dim=16, spread=0.25, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((patients, dim))
    v = np.repeat(centres, per, axis=0) + spread * rng.standard_normal((patients * per, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True), np.repeat(np.arange(patients), per)


def test_no_synthetic_identity_lies_within_the_margin_of_a_real_patient():
    real, ids = clustered_identities()
    prior = IdentityPrior.fit(real, ids, residual=real[:, :3], components=4, fpr=1e-3, bank_size=512, seed=0)
    r = prior.report
    closest = closest_cosine(prior.bank.double().numpy(), real, block=7)  # blocks agree with one product
    assert np.allclose(closest, (prior.bank.double().numpy() @ real.T).max(axis=1))
    assert closest.max() < r.margin and np.isclose(closest.max(), r.max_cos_accepted)
    # the margin is the site's own different-patient cosine at the configured false-positive rate
    margin, tpr = calibrate_margin(real, ids, 1e-3)
    assert (margin, tpr) == (r.margin, r.tpr_at_margin)
    iu = np.triu_indices(len(real), 1)
    diff = (real @ real.T)[iu][ids[iu[0]] != ids[iu[1]]]
    assert (diff > margin).mean() <= 1e-3 and tpr > 0.5  # the margin does match a patient's own images
    # the mixture does propose identities near real patients, and they are the ones rejected
    assert r.n_rejected > 0 and r.rejection_rate == r.n_rejected / r.n_drawn
    assert len(prior.bank) == 512 and np.allclose(prior.bank.norm(dim=1), 1, atol=1e-5)


def test_a_crowded_identity_space_is_refused():
    real, ids = clustered_identities(patients=40, per=2, dim=2, spread=0.05)
    with pytest.raises(ValueError, match="too crowded"):
        IdentityPrior.fit(real, ids, residual=real, components=4, fpr=0.2, bank_size=64)


def test_prior_state_round_trip_and_validation():
    real, ids = clustered_identities()
    prior = IdentityPrior.fit(real, ids, residual=real[:, :5], components=2, fpr=1e-3, bank_size=64)
    again = IdentityPrior.from_state(prior.state(), dim=16, residual_dim=5)
    assert torch.equal(again.bank, prior.bank) and again.report == prior.report
    assert torch.equal(again.residual.mean, prior.residual.mean) and torch.equal(again.residual.scale, prior.residual.scale)
    with pytest.raises(ValueError):
        IdentityPrior.from_state(prior.state(), dim=8, residual_dim=5)
    with pytest.raises(ValueError, match="residual prior has dimension 5"):
        IdentityPrior.from_state(prior.state(), dim=16, residual_dim=6)
    with pytest.raises(ValueError):
        IdentityPrior.from_state({"bank": prior.bank}, dim=16, residual_dim=5)
    # a prior saved before the residual prior existed is refused with what to do
    old = {k: v for k, v in prior.state().items() if k != "residual"}
    with pytest.raises(ValueError, match="holds no residual prior.*retrain, or rerun the federation"):
        IdentityPrior.from_state(old, dim=16, residual_dim=5)
    bad = prior.state()
    bad["residual"]["mean"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        IdentityPrior.from_state(bad, dim=16, residual_dim=5)


def test_residual_prior_fits_the_site_and_moves_by_the_kept_weight():
    rng = np.random.default_rng(0)
    mix = np.array([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.3, 1.0]])
    vectors = rng.standard_normal((4000, 3)) @ mix.T + np.array([1.0, -2.0, 0.5])
    prior = ResidualPrior.fit(vectors)
    np.testing.assert_allclose(prior.mean.numpy(), [1.0, -2.0, 0.5], atol=0.1)
    np.testing.assert_allclose((prior.scale @ prior.scale.T).numpy(), np.cov(vectors.T), rtol=1e-3, atol=1e-3)
    own = torch.tensor(vectors[:3], dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(prior.move(own, 1.0, gen), own, atol=1e-5)
    # nothing of the own vectors is left at keep 0: two different inputs, one draw, one output
    first = prior.move(own, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(first, prior.move(own.flip(0), 0.0, torch.Generator().manual_seed(1)))
    drawn = prior.move(torch.zeros(20000, 3), 0.0, torch.Generator().manual_seed(2)).double()
    np.testing.assert_allclose(torch.cov(drawn.T).numpy(), np.cov(vectors.T), rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="at least two vectors"):
        ResidualPrior.fit(vectors[:1])


@pytest.fixture(scope="module")
def trained():
    """A tiny method-B model trained a few epochs on one test-preset site (about 10 s)."""
    torch.set_num_threads(1)
    cfg = preset("test")
    data = generate_site(cfg.data, 0)
    reid = train_reid(data, cfg, epochs=8)
    model = ReplaceModel(cfg)
    before = swap_errors(model, reid, data)
    train_replace(model, reid, data, cfg, 10)
    prior = fit_identity_prior(model, data, cfg)
    return cfg, data, reid, ReplaceDeIdentifier(model, prior, cfg, "cpu"), before


@torch.no_grad()
def swap_errors(model, reid, data):
    """Per swap: cosine of the re-encoded identity to the one put in, relative error of the kept vectors."""
    model.eval()
    x, y = as_tensor(data.images), torch.from_numpy(data.labels)
    proxies, target, _ = patient_proxies(reid, data, torch.device("cpu"))
    v = model.vectors(x)
    identity, medical, labels, swapped = swap_targets(v, y, target, proxies, model.n_findings,
                                                      torch.Generator().manual_seed(0))
    w = model.vectors(model.generate(identity, medical, v.other))
    nf = model.n_findings
    rel = lambda a, b: ((a - b).pow(2).mean(1) / b.pow(2).mean(1)).mean().item()  # noqa: E731
    cos = (w.identity * identity).sum(1)
    return {"swapped_cos": cos[swapped].mean().item(), "kept_cos": cos[~swapped].mean().item(),
            "other": rel(w.other, v.other), "medical": rel(w.medical[:, nf:], medical[:, nf:])}


def test_swap_consistency_kept_vectors_come_back(trained):
    cfg, data, reid, d, before = trained
    after = swap_errors(d.model, reid, data)
    assert after["kept_cos"] > 0.9 and after["other"] < 0.1 and after["medical"] < 0.1
    # learnt, not by chance: the untrained networks do not give the kept vectors back
    assert before["kept_cos"] < after["kept_cos"] and before["other"] > 5 * after["other"]
    assert before["medical"] > 5 * after["medical"]


def test_swap_targets_never_swap_in_the_own_patient_and_flip_one_finding():
    torch.manual_seed(0)
    b, p, d, nf = 64, 5, 8, 4
    proxies = torch.nn.functional.normalize(torch.eye(p, d), dim=1)
    target = torch.randint(p, (b,))
    from fedeid.models.replace import Vectors

    v = Vectors(proxies[target], torch.randn(b, nf + 3), torch.randn(b, 2))
    labels = torch.randint(2, (b, nf)).float()
    identity, medical, new_labels, swapped = swap_targets(v, labels, target, proxies, nf)
    assert (identity[swapped] * proxies[target[swapped]]).sum(1).abs().max() < 1e-6  # orthogonal proxies
    assert torch.equal(identity[~swapped], v.identity[~swapped])
    changed = (new_labels != labels).sum(1)
    assert torch.equal(changed, (~swapped).long())
    flipped = new_labels != labels
    assert torch.allclose(medical[:, :nf][flipped], CF_LOGIT * (2 * new_labels[flipped] - 1))
    assert torch.equal(medical[:, nf:], v.medical[:, nf:])


def test_counterfactual_changes_the_medical_vector_and_keeps_the_identity(trained):
    cfg, data, _, d, _ = trained
    x = as_tensor(data.images[:8])
    v = d.model.vectors(x)
    cf = d.counterfactual_vectors(v, {"cardiomegaly": 1, "nodule": 0})
    k, n = d.findings.index("cardiomegaly"), d.findings.index("nodule")
    assert torch.equal(cf.identity, v.identity) and torch.equal(cf.other, v.other)
    assert torch.all(cf.medical[:, k] == CF_LOGIT) and torch.all(cf.medical[:, n] == -CF_LOGIT)
    rest = [i for i in range(v.medical.shape[1]) if i not in (k, n)]
    assert torch.equal(cf.medical[:, rest], v.medical[:, rest])
    # on images: the same patients at native resolution, the change added to the original
    image = data.images[0]
    native = np.kron(image, np.ones((2, 2), dtype=np.float32))
    out = d.counterfactual_native(native, {"cardiomegaly": 1})
    assert out.shape == native.shape and 0 <= out.min() and out.max() <= 1 and not np.array_equal(out, native)
    assert np.abs(d.counterfactual(data.images[:4], {"cardiomegaly": 1}) - data.images[:4]).mean() < 0.2


def test_parse_findings():
    names = ("nodule", "cardiomegaly")
    assert parse_findings(["cardiomegaly=0", "nodule=1"], names) == {"cardiomegaly": 0, "nodule": 1}
    for bad in (["cardiomegaly"], ["cardiomegaly=2"], ["heart=1"]):
        with pytest.raises(ValueError):
            parse_findings(bad, names)


def test_strength_zero_is_the_input_and_one_is_a_bank_identity(trained):
    _, data, _, d, _ = trained
    images = data.images[:6]
    out0, mask0 = d.deidentify(images, 0.0)
    assert np.array_equal(out0, images) and not mask0.any()
    a, mask = d.deidentify(images, 1.0, seed=3)
    b, _ = d.deidentify(images, 1.0, seed=3)
    c, _ = d.deidentify(images, 0.5, seed=3)
    assert mask.all() and np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError):
        d.deidentify(images, 1.5)


def test_evaluated_methods_draw_anew_per_call_and_repeat_per_seed(trained):
    """The model holder de-identifies the archive in a call of its own: it must not get the
    releases' draws again (same seed, same position, same noise ties images by position)."""
    from fedeid.deid.replace import replace_method
    from fedeid.eval.report import baseline_method

    _, data, _, d, _ = trained
    images = data.images[:4]
    for make in (lambda: replace_method(d, 0), lambda: baseline_method("dppix", 0)):
        method, again = make(), make()
        first, second = method(images, 1.0), method(images, 1.0)
        assert not np.array_equal(first, second)
        assert np.array_equal(first, again(images, 1.0)) and np.array_equal(second, again(images, 1.0))


def test_at_strength_one_a_release_knows_only_the_finding_decisions(trained, monkeypatch):
    """Two different images whose finding logits have the same signs give the same release under
    the same draws: identity, free medical dimensions, residual and logit sizes are all gone."""
    _, data, _, d, _ = trained
    x = torch.as_tensor(data.images[:2, None])
    v = d.model.vectors(x)
    other = Vectors(v.identity.flip(0), v.medical.flip(0) * 3 + 1, v.other.flip(0) - 2)
    other.medical[:, :d.model.n_findings] = v.medical[:, :d.model.n_findings].sign() * 7  # same decisions
    outs = []
    for vectors in (v, other):
        monkeypatch.setattr(d.model, "vectors", lambda _x, vectors=vectors: vectors)
        outs.append(d.replace_tensor(x, 1.0, torch.Generator().manual_seed(5)))
    assert torch.equal(outs[0], outs[1])
    outs = []
    for vectors in (v, other):  # below full strength the own vectors still count
        monkeypatch.setattr(d.model, "vectors", lambda _x, vectors=vectors: vectors)
        outs.append(d.replace_tensor(x, 0.5, torch.Generator().manual_seed(5)))
    assert not torch.equal(outs[0], outs[1])


def test_checkpoint_round_trip_and_dispatch(trained, tmp_path):
    cfg, data, _, d, _ = trained
    path = tmp_path / "b.pt"
    d.save(path)
    ckpt = load_checkpoint(path)
    assert ckpt["method"] == "replace" and ckpt["reid_state"] is None  # no site ReID needed or stored
    assert "identity_prior" in ckpt["extra"] and ckpt["extra"]["identity_prior"]["report"]["margin"] < 1
    loaded = DeIdentifier.load(path)
    assert isinstance(loaded, ReplaceDeIdentifier) and loaded.prior.report == d.prior.report
    assert np.array_equal(loaded.deidentify(data.images[:4], 0.7, seed=1)[0],
                          d.deidentify(data.images[:4], 0.7, seed=1)[0])
    # method A's checkpoints still load as method A (old ones carry no method key)
    a_path = tmp_path / "a.pt"
    DeIdentifier.build(cfg).save(a_path)
    assert isinstance(DeIdentifier.load(a_path), DeIdentifier)
    # a method-B checkpoint without its prior, or with foreign weights, is refused naming the file
    save_checkpoint(tmp_path / "noprior.pt", cfg, shared=replace_state(d.model), method="replace")
    with pytest.raises(InputError, match="noprior.pt: .*identity prior"):
        DeIdentifier.load(tmp_path / "noprior.pt")
    save_checkpoint(tmp_path / "foreign.pt", cfg, shared={"heads.x": torch.zeros(1)}, method="replace",
                    extra={"identity_prior": d.prior.state()})
    with pytest.raises(InputError, match="foreign.pt: weights do not fit"):
        DeIdentifier.load(tmp_path / "foreign.pt")
    payload = torch.load(path, weights_only=True)
    payload["method"] = "mystery"
    torch.save(payload, tmp_path / "mystery.pt")
    with pytest.raises(InputError, match="mystery"):
        load_checkpoint(tmp_path / "mystery.pt")


def test_local_dp_step_with_per_sample_losses():
    cfg = preset("test")
    data = generate_site(cfg.data, 1)
    torch.manual_seed(0)
    reid = ReIDNet(cfg.model.reid_size, cfg.model.reid_dim, len(data.finding_names))
    model = ReplaceModel(cfg)
    names = set(replace_state(model))
    before = torch.cat([p.detach().flatten() for p in model.trainable().parameters()])
    dp = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    try:
        metrics = train_replace(model, reid, data, cfg, 1, private=dp)
    finally:
        dp.close()
    after = torch.cat([p.detach().flatten() for p in model.trainable().parameters()])
    assert dp.steps_this_round > 0 and dp.epsilon() > 0 and np.isfinite(metrics["swap"])
    assert not torch.equal(before, after) and set(replace_state(model)) == names


def test_counterfactual_figures_shape(trained):
    cfg, data, _, d, _ = trained
    torch.manual_seed(0)
    classifier = ReIDNet(cfg.model.reid_size, len(data.finding_names))  # any [B, F] scorer will do
    attacker = ReIDNet(cfg.model.reid_size, cfg.model.reid_dim)
    gallery, queries = np.arange(0, len(data), 3), np.setdiff1d(np.arange(len(data)), np.arange(0, len(data), 3))
    figures = counterfactual_figures(d, data, classifier, attacker, gallery, queries, torch.device("cpu"))
    assert set(figures["findings"]) == set(data.finding_names)
    for per in figures["findings"].values():
        for value in (0, 1):
            entry = per[f"set_{value}"]
            assert entry["n"] >= 0 and 0 <= entry["identity_p_at_1"] <= 1
            assert entry["flip_rate"] is None or 0 <= entry["flip_rate"] <= 1


def _pngs(folder, n=2):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((80, 72)) * 65535).astype(np.uint16)).save(folder / f"{i}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def test_cli_train_deid_and_counterfactual(trained, tmp_path, capsys):
    cfg, _, _, d, _ = trained
    model = tmp_path / "b.pt"
    d.save(model)
    src = tmp_path / "in"
    _pngs(src)
    before = {p: p.read_bytes() for p in src.iterdir()}
    assert main(["deid", str(src), str(tmp_path / "deid"), "--model", str(model), "--level", "1",
                 "--method", "replace"]) == 1
    assert "corrupt.png:" in capsys.readouterr().err
    out = np.asarray(Image.open(tmp_path / "deid" / "0.png"))
    assert out.shape == (80, 72) and out.dtype == np.uint16
    assert main(["counterfactual", str(src), str(tmp_path / "cf"), "--model", str(model),
                 "--set-finding", "cardiomegaly=0"]) == 1
    assert (tmp_path / "cf" / "1.png").is_file() and not (tmp_path / "cf" / "corrupt.png").exists()
    assert {p: p.read_bytes() for p in src.iterdir()} == before
    a_model = tmp_path / "a.pt"
    DeIdentifier.build(cfg).save(a_model)
    capsys.readouterr()
    assert main(["deid", str(src), str(tmp_path / "x"), "--model", str(a_model), "--level", "1",
                 "--method", "replace"]) == 2
    assert "a.pt: is a 'blocking' checkpoint" in capsys.readouterr().err
    assert main(["counterfactual", str(src), str(tmp_path / "x"), "--model", str(a_model),
                 "--set-finding", "cardiomegaly=0"]) == 2
    assert "a.pt: is a 'blocking' checkpoint, not 'replace'" in capsys.readouterr().err
    assert main(["counterfactual", str(src), str(tmp_path / "x"), "--model", str(model),
                 "--set-finding", "heart=1"]) == 2
    assert "unknown finding 'heart'" in capsys.readouterr().err


def test_cli_train_method_replace(tmp_path, capsys):
    ckpt = tmp_path / "b.pt"
    assert main(["train", "--preset", "test", "--method", "replace", "--set", "data.n_sites=1",
                 "--out", str(ckpt)]) == 0
    assert "synthetic identities rejected" in capsys.readouterr().out
    assert isinstance(DeIdentifier.load(ckpt), ReplaceDeIdentifier)


def test_dicom_pixel_path_takes_a_method_b_model(trained):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    from fedeid.dicom.pixels import deidentify_pixels

    _, data, _, d, _ = trained
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, "1.2.3.4.5", "CR"
    arr = np.round(np.kron(data.images[0], np.ones((2, 2))) * 4000).astype(np.uint16)
    ds.set_pixel_data(arr, photometric_interpretation="MONOCHROME2", bits_stored=12, generate_instance_uid=False)
    result = deidentify_pixels(ds, d, level=1.0)
    out = ds.pixel_array
    assert result.blocked_fraction == 1.0 and out.shape == arr.shape and out.dtype == arr.dtype
    assert not np.array_equal(out, arr)  # every pixel comes from the generator


def test_central_benchmark_scores_method_b_beside_a(tmp_path):
    """``--set eval.baselines=...,replace``: method B in the same JSON and picture grid, counterfactuals."""
    from fedeid.data.synthetic import generate
    from fedeid.eval.benchmark import run_central_benchmark

    cfg = preset("test")
    cfg.eval.baselines = ("replace",)
    cfg.eval.levels = (0.0, 1.0)
    sites, test = generate(cfg.data)
    results = run_central_benchmark(sites, test, cfg, tmp_path, progress=False)
    b = results["methods"]["replace"]
    assert b["levels"] == [0.0, 1.0] and b["ssim"][0] == 1.0 and b["ssim"][1] < 1.0
    assert all(0 <= p <= 1 for p in b["p_at_1"] + b["adaptive_p_at_1"])
    cf = results["counterfactuals"]["findings"]
    assert set(cf) == set(test.finding_names) and "identity_p_at_1" in cf["cardiomegaly"]["set_1"]
    assert results["replace"]["identity_prior"]["rejection_rate"] >= 0
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the counterfactual grid: 3 held-out images x (original + each finding set to 0 and 1), 1:1 pixels
    from PIL import Image

    with Image.open(tmp_path / "counterfactuals.png") as cf_grid:
        size = cfg.data.image_size
        assert cf_grid.mode == "L"
        assert cf_grid.width == 120 + (1 + 2 * len(test.finding_names)) * (size + 4)
        assert cf_grid.height == 16 + 3 * (size + 4)
    assert isinstance(DeIdentifier.load(tmp_path / "replace_central.pt"), ReplaceDeIdentifier)


def test_risk_report_on_a_federated_method_b_model_takes_the_site_prior(trained, tmp_path, monkeypatch, capsys):
    """``fedeid report --model global.pt --prior identity_prior.pt``: the report is on method B by
    default and names the prior it was measured with; a method-A site part is refused by name."""
    import json

    from fedeid.audit import keys
    from fedeid.deid.replace import save_site_prior

    cfg, _, _, d, _ = trained
    monkeypatch.setenv("FEDEID_STATE_DIR", str(tmp_path / "state"))
    save_checkpoint(tmp_path / "global.pt", cfg, shared=replace_state(d.model), method="replace")  # no prior inside
    save_site_prior(tmp_path / "identity_prior.pt", d, site=0)
    keys.generate_key(tmp_path / "site.key")
    args = ["report", "--model", str(tmp_path / "global.pt"), "--level", "1", "--key", str(tmp_path / "site.key"),
            "--attackers", "keypoint,patch", "--bootstrap", "20"]
    assert main([*args, "--out", str(tmp_path / "out"), "--prior", str(tmp_path / "identity_prior.pt")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    text = json.dumps(rep)
    assert '"replace"' in text and file_digest(tmp_path / "identity_prior.pt") in text
    assert file_digest(tmp_path / "identity_prior.pt") in (tmp_path / "out" / "report.html").read_text()
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "out2")]) == 2  # the global model alone has no prior: nothing done
    assert "global.pt: method-B checkpoint holds no identity prior" in capsys.readouterr().err
    a = tmp_path / "a.pt"
    DeIdentifier.build(cfg).save(a)
    assert main(["report", "--model", str(a), "--prior", str(tmp_path / "identity_prior.pt"), "--level", "1",
                 "--key", str(tmp_path / "site.key"), "--out", str(tmp_path / "out3")]) == 2
    assert "identity_prior.pt: an identity prior goes with a method-B model" in capsys.readouterr().err


def file_digest(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
