"""Real-data readers and loaders: every format, every way an input can be bad, and the CLI round trip."""

import csv
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fedeid.cli import main
from fedeid.config import FINDINGS, preset
from fedeid.data.loaders import NIH_FINDINGS, load_chestxray14, load_csv, load_dataset, read_image
from fedeid.imaging import resize_array as resize
from fedeid.data.synthetic import generate
from fedeid.io import InputError

torch.set_num_threads(1)
RAMP = (np.arange(48 * 40).reshape(48, 40) % 256).astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **extra) -> Path:
    """A minimal DICOM file: grey [R, C] or [frames, R, C]; colour [R, C, 3] with an RGB photometric."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    if photometric.startswith("MONOCHROME"):
        ds.SamplesPerPixel = 1
        ds.Rows, ds.Columns = pixels.shape[-2:]
        if pixels.ndim == 3:
            ds.NumberOfFrames = pixels.shape[0]
    else:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.Rows, ds.Columns = pixels.shape[:2]
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- single files -----------------------------------------------------------------------------

def test_png_8_and_16_bit_use_the_dtype_range(tmp_path):
    img = read_image(write_png(tmp_path / "a.png", RAMP))
    assert img.dtype == np.float32 and img.shape == RAMP.shape
    np.testing.assert_array_equal(img, RAMP / np.float32(255))
    deep = (np.arange(30 * 20).reshape(30, 20) * 100).astype(np.uint16)
    np.testing.assert_allclose(read_image(write_png(tmp_path / "b.png", deep)), deep / 65535.0, atol=1e-7)


def test_colour_and_jpeg_become_grey(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 255
    red = read_image(write_png(tmp_path / "red.png", rgb))
    assert red.shape == (16, 16)
    np.testing.assert_allclose(red, 76 / 255, atol=1 / 255)  # ITU-R 601 luma of pure red
    rgba = np.dstack([rgb, np.full((16, 16), 128, np.uint8)])
    np.testing.assert_allclose(read_image(write_png(tmp_path / "red_alpha.png", rgba)), red)
    Image.fromarray(RAMP).save(tmp_path / "g.jpg", quality=95)
    assert np.abs(read_image(tmp_path / "g.jpg") - RAMP / 255).mean() < 0.05


def test_npy_scaling_rules(tmp_path):
    np.save(tmp_path / "u16.npy", np.array([[0, 65535], [1, 2]], np.uint16))
    np.testing.assert_allclose(read_image(tmp_path / "u16.npy"), [[0, 1], [1 / 65535, 2 / 65535]])
    unit = np.random.default_rng(0).random((8, 9)).astype(np.float32)
    np.save(tmp_path / "unit.npy", unit)
    np.testing.assert_array_equal(read_image(tmp_path / "unit.npy"), unit)  # already in [0, 1]: kept
    np.save(tmp_path / "hu.npy", np.array([[-1000.0, 0.0], [1000.0, 3000.0]]))
    np.testing.assert_allclose(read_image(tmp_path / "hu.npy"), [[0, 0.25], [0.5, 1.0]])  # min-max
    np.save(tmp_path / "flat.npy", np.full((4, 4), 7, np.int32))
    assert not read_image(tmp_path / "flat.npy").any()


def test_dicom_modality_lut_window_and_monochrome1(tmp_path):
    raw = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    plain = read_image(write_dicom(tmp_path / "m2.dcm", raw, RescaleSlope=2, RescaleIntercept=-100))
    np.testing.assert_allclose(plain, raw / raw.max(), atol=1e-6)  # linear LUT, then min-max
    inverted = read_image(write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-100))
    np.testing.assert_allclose(inverted, 1 - plain, atol=1e-6)
    # The window is in modality units: with slope 2 and intercept -100, [800, 1200] is raw [450, 650].
    windowed = read_image(write_dicom(tmp_path / "win", raw, RescaleSlope=2, RescaleIntercept=-100,
                                      WindowCenter=1000, WindowWidth=400))
    hu = raw * 2.0 - 100
    np.testing.assert_allclose(windowed, np.clip((hu - 800) / 400, 0, 1), atol=0.01)


@pytest.mark.parametrize("name, make, reason", [
    ("missing.png", None, "no such file"),
    ("garbage.png", lambda p: p.write_bytes(b"this is not an image at all" * 10), "not an image"),
    ("empty.png", lambda p: p.write_bytes(b""), "empty file"),
    ("cut.png", lambda p: p.write_bytes(_png_bytes()[: len(_png_bytes()) // 2]), "truncated or corrupt"),
    ("cube.npy", lambda p: np.save(p, np.zeros((2, 8, 8))), "3-D array"),
    ("obj.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "pickle"),
    ("nan.npy", lambda p: np.save(p, np.array([[0.0, np.nan]])), "NaN"),
    ("garbage.dcm", lambda p: p.write_bytes(b"\0" * 300), "not a DICOM"),
    ("rgb.dcm", lambda p: write_dicom(p, np.zeros((8, 8, 3), np.uint8), "RGB"), "colour DICOM"),
    ("frames.dcm", lambda p: write_dicom(p, np.zeros((3, 8, 8), np.uint16)), "multi-frame"),
    ("nopixels.dcm", lambda p: _dicom_without_pixels(p), "without pixel data"),
    ("folder", lambda p: p.mkdir(), "folder"),
])
def test_bad_files_raise_input_error_naming_file_and_reason(tmp_path, name, make, reason):
    path = tmp_path / name
    if make:
        make(path)
    with pytest.raises(InputError) as info:
        read_image(path)
    assert info.value.path == str(path) and reason in info.value.reason
    assert str(info.value).startswith(str(path))


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _dicom_without_pixels(path: Path) -> None:
    write_dicom(path, np.zeros((4, 4), np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)


def test_resize_is_square_antialiased_and_batched():
    img = np.zeros((40, 60), np.float32)
    img[:, ::2] = 1.0  # finest stripes: antialiasing averages them to grey
    out = resize(img, 16)
    assert out.shape == (16, 16) and out.dtype == np.float32
    assert np.abs(out - 0.5).max() < 0.15
    assert resize(np.stack([img, img]), 8).shape == (2, 8, 8)


# --- CSV -----------------------------------------------------------------------------------------

def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        write_png(folder / f"img{i}.png", np.full((20, 24), 20 * i, np.uint8))
        names.append(f"img/img{i}.png")
    return names


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def test_csv_with_0_1_columns_loads_good_rows_and_reports_bad_ones(tmp_path):
    names = _images(tmp_path / "img", 4)
    (tmp_path / "img" / "broken.png").write_bytes(b"garbage")
    rows = [[names[0], "bob", 1, 0], [names[1], "alice", 0, 1], [names[2], "bob", 1, 1],
            ["img/absent.png", "carol", 0, 0], ["img/broken.png", "dave", 0, 0], [names[3], "erin", "maybe", 0],
            [names[3], "", 0, 0]]
    csv_path = _write_csv(tmp_path / "labels.csv", ["path", "patient_id", "nodule", "effusion"], rows)
    before = digest(tmp_path)
    data, errors = load_csv(csv_path, 16)
    assert digest(tmp_path) == before  # inputs untouched
    assert data.finding_names == ("nodule", "effusion") and data.images.shape == (3, 16, 16)
    assert list(data.patient_ids) == [1, 0, 1]  # sorted ids: alice=0, bob=1
    np.testing.assert_array_equal(data.labels, [[1, 0], [0, 1], [1, 1]])
    assert list(data.sites) == [0, 0, 0] and data.sources[0] == str(tmp_path / names[0])
    np.testing.assert_allclose(data.images[1], 20 / 255, atol=1e-6)
    reasons = {Path(e.path).name: e.reason for e in errors}
    assert len(errors) == 4
    assert reasons["absent.png"] == "no such file" and "not an image" in reasons["broken.png"]
    csv_errors = sorted(e.reason for e in errors if e.path == str(csv_path))
    assert csv_errors == ["line 7: column 'nodule': expected 0 or 1, got 'maybe'", "line 8: empty patient_id"]


def test_csv_with_a_labels_column_a_site_column_and_another_root(tmp_path):
    names = _images(tmp_path / "data" / "img", 3)
    rows = [[names[0], "7", "effusion|nodule", 2], [names[1], "10", "No Finding", 1], [names[2], "7", "", 2]]
    csv_path = _write_csv(tmp_path / "meta.csv", ["path", "patient_id", "labels", "site"], rows)
    data, errors = load_csv(csv_path, 16, root=tmp_path / "data")
    assert not errors
    assert data.finding_names == ("effusion", "nodule")
    np.testing.assert_array_equal(data.labels, [[1, 1], [0, 0], [0, 0]])
    assert list(data.patient_ids) == [0, 1, 0]  # numeric ids sort numerically: 7 before 10
    assert list(data.sites) == [2, 1, 2]


@pytest.mark.parametrize("content, reason", [
    (None, "no such file"),
    ("", "empty CSV"),
    ("file,patient\na.png,1\n", "missing required column(s) ['path', 'patient_id']"),
    ("path,path,patient_id\n", "duplicate column"),
])
def test_unusable_csv_raises_naming_the_csv(tmp_path, content, reason):
    csv_path = tmp_path / "labels.csv"
    if content is not None:
        csv_path.write_text(content)
    with pytest.raises(InputError) as info:
        load_csv(csv_path, 16)
    assert info.value.path == str(csv_path) and reason in info.value.reason


# --- ChestX-ray14 --------------------------------------------------------------------------------

def _fake_nih(root: Path) -> Path:
    (root / "images_001" / "images").mkdir(parents=True)
    (root / "images").mkdir()
    rows = [("00000001_000.png", "Cardiomegaly", 0, 1, "images_001"),
            ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, "images_001"),
            ("00000002_000.png", "No Finding", 0, 2, "images"),
            ("00000003_000.png", "Hernia|Effusion", 0, 3, "images"),
            ("00000004_000.png", "Nodule", 0, 4, None),  # listed, not downloaded
            ("00000005_000.png", "Flu", 0, 5, "images")]  # not an NIH label
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        for name, labels, follow, pid, folder in rows:
            w.writerow([name, labels, follow, pid, 50, "M", "PA", 32, 32, 0.14, 0.14])
            if folder:
                write_png(root / folder / ("images" if folder != "images" else "") / name, RAMP[:32, :32])
    return root


def test_chestxray14_layout(tmp_path):
    root = _fake_nih(tmp_path / "nih")
    data, errors = load_chestxray14(root, 16)
    assert data.finding_names == NIH_FINDINGS and len(NIH_FINDINGS) == 14
    assert list(data.patient_ids) == [1, 1, 2, 3] and data.images.shape == (4, 16, 16)
    lab = {n: data.labels[:, i] for i, n in enumerate(NIH_FINDINGS)}
    assert list(lab["Cardiomegaly"]) == [1, 1, 0, 0] and list(lab["Emphysema"]) == [0, 1, 0, 0]
    assert list(lab["Hernia"]) == [0, 0, 0, 1] and data.labels[2].sum() == 0
    assert sorted(e.reason.split(":")[0] for e in errors) == [
        "1 image(s) listed in Data_Entry_2017.csv are not in images/ or images_*/images/ (partial download?); "
        "loaded the others", "line 7"]
    assert load_chestxray14(root, 16, limit=2)[0].patient_ids.tolist() == [1, 1]
    with pytest.raises(InputError, match="not a ChestX-ray14 folder"):
        load_chestxray14(tmp_path, 16)


# --- load_dataset ----------------------------------------------------------------------------------

def test_load_dataset_splits_real_data_by_patient(tmp_path, capsys):
    names = _images(tmp_path / "img", 4)
    rows = [[names[i % 4], f"p{i // 2}", i % 2, (i // 2) % 2] for i in range(20)] + [["img/absent.png", "p0", 0, 0]]
    csv_path = _write_csv(tmp_path / "labels.csv", ["path", "patient_id", "nodule", "opacity"], rows)
    cfg = dataclasses.replace(preset("test").data, source=str(csv_path), n_sites=2, test_patients=3)
    sites, test = load_dataset(cfg)
    assert f"fedeid: {tmp_path / 'img' / 'absent.png'}: no such file" in capsys.readouterr().err
    assert cfg.findings == ("nodule", "opacity")
    assert len(np.unique(test.patient_ids)) == 3 and (test.sites == -1).all()
    assert [len(np.unique(s.patient_ids)) for s in sites] == [4, 3]
    assert [set(s.sites) for s in sites] == [{0}, {1}]
    ids = [set(s.patient_ids) for s in sites] + [set(test.patient_ids)]
    assert sum(len(i) for i in ids) == 10 and len(set().union(*ids)) == 10
    again, _ = load_dataset(dataclasses.replace(cfg, findings=("opacity",)))
    assert again[0].finding_names == ("opacity",)
    np.testing.assert_array_equal(again[0].labels[:, 0], sites[0].labels[:, 1])
    with pytest.raises(InputError, match="need at least"):
        load_dataset(dataclasses.replace(cfg, test_patients=9, findings=()))
    with pytest.raises(InputError, match="does not have"):
        load_dataset(dataclasses.replace(cfg, findings=("hernia",)))
    with pytest.raises(InputError, match="data.source must be"):
        load_dataset(dataclasses.replace(cfg, source=str(tmp_path / "nothing_here")))


def test_load_dataset_synthetic_and_chestxray14(tmp_path):
    cfg = dataclasses.replace(preset("test").data, patients_per_site=2, test_patients=1, images_per_patient=2)
    sites, test = load_dataset(cfg)
    assert len(sites) == cfg.n_sites and sites[0].finding_names == FINDINGS and cfg.findings == ()
    nih = dataclasses.replace(cfg, source=str(_fake_nih(tmp_path / "nih")), n_sites=2, test_patients=1)
    sites, test = load_dataset(nih)
    assert nih.findings == NIH_FINDINGS and len(np.unique(test.patient_ids)) == 1


# --- fedeid generate -------------------------------------------------------------------------------

def test_generate_round_trips_through_load_csv(tmp_path):
    out = tmp_path / "synthetic"
    argv = ["generate", "--preset", "test", "--out", str(out), "--set", "data.patients_per_site=2",
            "--set", "data.test_patients=2", "--set", "data.images_per_patient=2"]
    assert main(argv) == 0
    assert not [p for p in out.rglob(".*.tmp")]  # atomic writes leave no temporaries
    cfg = dataclasses.replace(preset("test").data, patients_per_site=2, test_patients=2, images_per_patient=2)
    sites, test = generate(cfg)
    expected = [*sites, test]
    loaded, errors = load_csv(out / "labels.csv", cfg.image_size)
    assert not errors and len(loaded) == sum(len(s) for s in expected)
    with Image.open(out / loaded.sources[0]) as im:
        assert im.mode == "I;16"
    images = np.concatenate([s.images for s in expected])
    labels = np.concatenate([s.labels for s in expected])
    true_ids = np.concatenate([s.patient_ids for s in expected])
    np.testing.assert_allclose(loaded.images, images, atol=1 / 65535)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.finding_names == FINDINGS
    np.testing.assert_array_equal(loaded.sites, np.concatenate([s.sites for s in expected]))
    # The same grouping into patients (ids are renumbered, partitions are equal).
    pairs = set(zip(true_ids.tolist(), loaded.patient_ids.tolist()))
    assert len(pairs) == len(set(true_ids)) == len(set(loaded.patient_ids))


def test_generate_refuses_bad_overrides(tmp_path, capsys):
    assert main(["generate", "--preset", "test", "--out", str(tmp_path), "--set", "data.image_size=32"]) == 2
    assert "image_size" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
