"""The central commands: clear errors naming the file, batches that go on, inputs untouched."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from fedeid.cli import build_parser, main
from fedeid.config import preset
from fedeid.deid.pipeline import DeIdentifier


@pytest.fixture()
def model(tmp_path):
    path = tmp_path / "model.pt"
    DeIdentifier.build(preset("test")).save(path)
    return path


def digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("generate", "train", "deid", "evaluate", "simulate", "certs", "dicom"):
        assert command in out
    sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public accessor
    assert all(p.description for p in sub.values())


def test_deid_folder_goes_on_past_bad_files_and_keeps_inputs(tmp_path, model, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((90, 70)) * 65535).astype(np.uint16)).save(src / "a.png")
    np.save(src / "sub" / "b.npy", rng.random((64, 64)).astype(np.float32))
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    np.save(src / "volume.npy", np.zeros((2, 8, 8)))
    before = digest(src)
    out = tmp_path / "out"
    code = main(["deid", str(src), str(out), "--model", str(model), "--level", "0.5"])
    err = capsys.readouterr().err
    assert code == 1  # some files failed
    assert "corrupt.png:" in err and "volume.npy:" in err
    assert digest(src) == before
    a = np.asarray(Image.open(out / "a.png"))
    assert a.shape == (90, 70) and a.dtype == np.uint16  # native resolution kept
    assert (out / "sub" / "b.png").is_file()
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temporaries


def test_level_zero_returns_the_image(tmp_path, model):
    src = tmp_path / "x.png"
    pixels = (np.random.default_rng(1).random((40, 40)) * 65535).astype(np.uint16)
    Image.fromarray(pixels).save(src)
    assert main(["deid", str(src), str(tmp_path / "out"), "--model", str(model), "--level", "0"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), pixels)


@pytest.mark.parametrize("args, message", [
    (["--level", "0.5", "--model", "{tmp}/missing.pt"], "missing.pt: checkpoint not found"),
    (["--level", "1.5", "--model", "{model}"], "--level must lie in [0, 1]"),
])
def test_deid_errors_name_the_problem(tmp_path, model, capsys, args, message):
    args = [a.format(tmp=tmp_path, model=model) for a in args]
    assert main(["deid", str(tmp_path), str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_input_folder(tmp_path, model, capsys):
    assert main(["deid", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--model", str(model),
                 "--level", "0.5"]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err


def test_bad_config_override(tmp_path, capsys):
    assert main(["train", "--preset", "test", "--set", "train.epochz=3", "--out", str(tmp_path / "m.pt")]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_train_then_deid_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "trained.pt"
    assert main(["train", "--preset", "test", "--out", str(ckpt)]) == 0
    d = DeIdentifier.load(ckpt)
    images = np.random.default_rng(2).random((2, 64, 64), dtype=np.float32)
    out, mask = d.deidentify(images, 0.5)
    assert out.shape == images.shape and abs(mask.mean() - 0.5) < 0.05
