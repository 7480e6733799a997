"""The commands a user types: clear one-line refusals, batches that go on, inputs untouched,
outputs that never collide or replace what fedeid did not write, honest exit codes."""

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fedeid
from fedeid.cli import COMMANDS, build_parser, main
from fedeid.config import preset
from fedeid.deid.pipeline import DeIdentifier
from fedeid.io import MANIFEST_NAME, InputError, atomic_write_bytes, atomic_write_json
from fedeid.progress import Progress, format_mib

ROOT = Path(fedeid.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    DeIdentifier.build(preset("test")).save(path)
    return path


def digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_png(path, seed=0, shape=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random(shape) * 65535).astype(np.uint16)
    Image.fromarray(pixels).save(path, format="PNG")
    return pixels


def fedeid_cli(*args, cwd=None):
    """The real command in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fedeid.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


def test_help_lists_every_command_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
    assert "exit status: 0" in out and "1 some inputs failed" in out and "2 usage error" in out
    sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public accessor
    assert list(sub) == list(COMMANDS)  # the light table lists exactly what the modules register
    assert all(p.description for p in sub.values())


def test_help_and_parsing_never_import_torch():
    probe = ("import sys, contextlib, io\n"
             "from fedeid.cli import main\n"
             "for argv in (['--help'], *([c, '--help'] for c in sys.argv[1:]), ['dicom', 'deid', '--help']):\n"
             "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
             "        main(argv)\n"
             "print(sorted(m for m in ('torch', 'fedeid.models', 'fedeid.deid.pipeline') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe, *COMMANDS], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_deid_folder_goes_on_past_bad_files_and_keeps_inputs(tmp_path, model, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_png(src / "a.png", shape=(90, 70))
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
    assert (out / "sub" / "b.npy.png").is_file()
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temporaries
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["counts"] == {"deidentified": 2, "failed": 2}
    assert manifest["outputs"] == ["a.png", "sub/b.npy.png"]


def test_level_zero_returns_the_image(tmp_path, model):
    src = tmp_path / "in" / "x.png"
    pixels = write_png(src, seed=1)
    assert main(["deid", str(src), str(tmp_path / "out"), "--model", str(model), "--level", "0"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), pixels)


def test_names_keep_the_extension_so_inputs_never_collide(tmp_path, model):
    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "x.png", seed=1)
    Image.fromarray((np.random.default_rng(2).random((40, 40)) * 255).astype(np.uint8)).save(src / "x.jpg")
    assert main(["deid", str(src), str(out), "--model", str(model), "--level", "0"]) == 0
    assert sorted(p.name for p in out.glob("x*")) == ["x.jpg.png", "x.png"]
    assert not np.array_equal(np.asarray(Image.open(out / "x.png")), np.asarray(Image.open(out / "x.jpg.png")))


def test_the_one_shared_name_left_is_a_per_file_error(tmp_path, model, capsys):
    src = tmp_path / "in"
    write_png(src / "x.jpg.png", seed=3)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(src / "x.jpg")
    assert main(["deid", str(src), str(tmp_path / "out"), "--model", str(model), "--level", "0"]) == 1
    err = capsys.readouterr().err
    assert "x.jpg.png: its output" in err and "is also the output of" in err
    assert (tmp_path / "out" / "x.jpg.png").is_file()


def test_foreign_files_are_kept_unless_overwrite_and_reruns_replace_their_own(tmp_path, model, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "a.png", seed=1)
    write_png(src / "b.png", seed=2)
    out.mkdir()
    (out / "a.png").write_bytes(b"the user's own file")
    (out / "notes.txt").write_bytes(b"unrelated")
    args = ["deid", str(src), str(out), "--model", str(model), "--level", "0"]
    assert main(args) == 1  # a.png refused, b.png done
    assert "its output" in capsys.readouterr().err
    assert (out / "a.png").read_bytes() == b"the user's own file" and (out / "b.png").is_file()
    assert main(args) == 1  # a rerun replaces its own b.png, still keeps the user's a.png
    assert (out / "a.png").read_bytes() == b"the user's own file"
    assert main([*args, "--overwrite"]) == 0
    assert (out / "a.png").read_bytes() != b"the user's own file"
    assert main(args) == 0  # now every output is fedeid's, recorded in the manifest
    assert (out / "notes.txt").read_bytes() == b"unrelated"


def test_a_batch_keeps_each_images_size_and_a_failing_batch_names_its_bad_image(tmp_path, model, monkeypatch,
                                                                                capsys):
    """Images of different sizes share a batch and come back at their own sizes; when the batch's
    network call fails, each image is retried alone, so only the bad one fails and names itself."""
    import fedeid.deid.native as native
    from fedeid.io import InputError

    src, out = tmp_path / "in", tmp_path / "out"
    shapes = {"a.png": (40, 40), "b.png": (97, 150), "c.png": (64, 31)}
    for i, (name, shape) in enumerate(shapes.items()):
        write_png(src / name, seed=i, shape=shape)
    real = native.deidentify_natives

    def refuse_tall(model_, images, level, seed=None, batch_size=16):
        if any(image.shape == (97, 150) for image in images):
            raise InputError("b.png", "refused by the test")
        return real(model_, images, level, seed, batch_size)

    monkeypatch.setattr(native, "deidentify_natives", refuse_tall)
    assert main(["deid", str(src), str(out), "--model", str(model), "--level", "0.5", "--no-progress"]) == 1
    assert "b.png: refused by the test" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "c.png"]
    for name in ("a.png", "c.png"):
        assert np.asarray(Image.open(out / name)).shape == shapes[name]
    monkeypatch.setattr(native, "deidentify_natives", real)
    assert main(["deid", str(src), str(out), "--model", str(model), "--level", "0.5", "--no-progress"]) == 0
    assert np.asarray(Image.open(out / "b.png")).shape == (97, 150)


@pytest.mark.parametrize("batch", [1, 16])
def test_an_interrupted_batch_leaves_its_manifest_and_resumes(tmp_path, model, monkeypatch, capsys, batch):
    """Images go through the network ``--batch-size`` at a time: an interrupt loses the images
    read but not yet written (none with batch 1), and the rerun does exactly those."""
    import fedeid.data.loaders as loaders

    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_png(src / f"{i}.png", seed=i)
    read = loaders.read_image
    calls, stop_at = [], [2]

    def read_then_stop(path):
        calls.append(path)
        if len(calls) in stop_at:
            raise KeyboardInterrupt
        return read(path)

    monkeypatch.setattr(loaders, "read_image", read_then_stop)
    args = ["deid", str(src), str(out), "--model", str(model), "--batch-size", str(batch), "--level", "0"]
    assert main(args) == 130
    if batch == 1:
        written = ["0.png"]
        assert json.loads((out / MANIFEST_NAME).read_text())["outputs"] == written
    else:  # 0.png was still waiting for its batch: nothing was written, so no manifest either
        written = []
        assert not out.exists() or not any(out.iterdir())
    calls.clear()
    stop_at.clear()
    assert main(args) == 0 and sorted(p.name for p in out.glob("*.png")) == ["0.png", "1.png", "2.png"]
    assert [p.name for p in calls] == [f"{i}.png" for i in range(len(written), 3)]  # what was done is kept
    done = capsys.readouterr().out
    assert ("3 image(s) at level 0 (1 unchanged since the last run, kept)" in done if written
            else "de-identified 3 image(s) at level 0;" in done)
    assert main([*args[:-1], "0.5"]) == 0  # other settings: everything is redone
    assert len(calls) == 6 - len(written)


def test_generate_reruns_into_its_own_folder_but_never_over_a_users_file(tmp_path, capsys):
    out = tmp_path / "synthetic"
    argv = ["generate", "--preset", "test", "--out", str(out), "--no-progress", "--set", "data.patients_per_site=1",
            "--set", "data.test_patients=1", "--set", "data.images_per_patient=1"]
    assert main(argv) == 0
    assert main(argv) == 0
    mine = next(out.glob("site0/*.png"))
    mine.write_bytes(b"edited by the user")
    (out / MANIFEST_NAME).write_text(json.dumps({"outputs": []}))
    assert main(argv) == 2
    assert f"{mine}: the output exists and was not written by fedeid" in capsys.readouterr().err
    assert mine.read_bytes() == b"edited by the user"


def make_nan_model(path, model):
    ckpt = torch.load(model, weights_only=True)
    key = next(iter(ckpt["shared_state"]))
    ckpt["shared_state"][key] = torch.full_like(ckpt["shared_state"][key], float("nan"))
    torch.save(ckpt, path)


# Each user mistake: (how to set it up, the command line, what the one-line reason says).
# IN holds a.png; "{x}" names paths under the test's folder.
MISTAKES = {
    "in-equals-out": (["deid", "{in}", "{in}"], "is the input itself"),
    "out-inside-in": (["deid", "{in}", "{in}/out"], "lies inside the input"),
    "out-holds-in": (["deid", "{in}", "{root}"], "holds the input"),
    "single-file-out-its-folder": (["deid", "{in}/a.png", "{in}"], "holds the input"),
    "single-file-out-is-it": (["deid", "{in}/a.png", "{in}/a.png"], "is the input itself"),
    "out-through-symlink-into-in": (["deid", "{in}", "{root}/link/out"], "lies inside the input"),
    "existing-file-out": (["deid", "{in}", "{root}/file.txt"], "file.txt: exists and is not a folder"),
    "empty-in": (["deid", "{root}/empty", "{root}/out"], "empty: no images found"),
    "dicom-without-suffix": (["deid", "{root}/dicomish", "{root}/out"], "use `fedeid dicom deid`"),
    "generate-out-file": (["generate", "--preset", "test", "--out", "{root}/file.txt"], "exists and is not a folder"),
    "train-out-exists": (["train", "--preset", "test", "--out", "{root}/file.txt"], "file.txt: exists; refusing"),
    "train-out-folder": (["train", "--preset", "test", "--out", "{in}"], "is a folder"),
    "folder-model": (["deid", "{in}", "{root}/out", "--model", "{in}"], "is a folder, not a checkpoint file"),
    "garbage-model": (["deid", "{in}", "{root}/out", "--model", "{root}/file.txt"], "file.txt: not a readable checkpoint (not a PyTorch archive"),
    "nan-model": (["deid", "{in}", "{root}/out", "--model", "{root}/nan.pt"], "NaN or Inf"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_get_a_one_line_reason_and_touch_nothing(tmp_path, model, mistake):
    argv, reason = MISTAKES[mistake]
    write_png(tmp_path / "in" / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dicomish").mkdir()
    (tmp_path / "dicomish" / "IM0001").write_bytes(b"\0" * 128 + b"DICM")
    (tmp_path / "file.txt").write_bytes(b"garbage, not a model\n" * 10)
    (tmp_path / "link").symlink_to(tmp_path / "in")
    if mistake == "nan-model":
        make_nan_model(tmp_path / "nan.pt", model)
    before = digest(tmp_path)
    argv = [a.format(**{"in": tmp_path / "in", "root": tmp_path}) for a in argv]
    if argv[0] == "deid" and "--model" not in argv:
        argv += ["--model", str(model)]
    if argv[0] == "deid":
        argv += ["--level", "0.5"]
    done = fedeid_cli(*argv)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedeid: ") and reason in lines[0], done.stderr
    assert digest(tmp_path) == before  # inputs byte-identical, nothing written anywhere


def test_every_input_refused_exits_1(tmp_path, model, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"not a png")
    assert main(["deid", str(src), str(tmp_path / "out"), "--model", str(model), "--level", "0.5"]) == 1
    assert "a.png:" in capsys.readouterr().err


def test_a_checkpoint_that_needs_code_is_refused_without_unsafe_advice(tmp_path):
    import fractions

    torch.save({"format": "fedeid-checkpoint", "payload": fractions.Fraction(1, 3)}, tmp_path / "code.pt")
    with pytest.raises(InputError, match=r"code\.pt: not a fedeid checkpoint \(it holds objects other than") as info:
        DeIdentifier.load(tmp_path / "code.pt")
    assert "weights_only" not in str(info.value)


def test_nan_weights_are_refused_by_load(tmp_path, model):
    make_nan_model(tmp_path / "nan.pt", model)
    with pytest.raises(InputError, match=r"nan\.pt: weights hold NaN or Inf values \(shared_state: "):
        DeIdentifier.load(tmp_path / "nan.pt")


@pytest.mark.parametrize("args, message", [
    (["--level", "0.5", "--model", "{tmp}/missing.pt"], "missing.pt: checkpoint not found"),
    (["--level", "1.5", "--model", "{model}"], "--level must lie in [0, 1]"),
])
def test_deid_errors_name_the_problem(tmp_path, model, capsys, args, message):
    write_png(tmp_path / "in" / "a.png")
    args = [a.format(tmp=tmp_path, model=model) for a in args]
    assert main(["deid", str(tmp_path / "in"), str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_input_folder(tmp_path, model, capsys):
    assert main(["deid", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--model", str(model),
                 "--level", "0.5"]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("extra, reason", [
    (["--set", "model.patch_size=4"], "--set model.patch_size: with --model only eval., data.test_patients, "
                                      "train.device* can change"),
    (["--set", "data.patients_per_site=3"], "--set data.patients_per_site: with --model only"),
    (["--preset", "full"], "--preset full does not apply: the checkpoint's configuration is used"),
])
def test_evaluate_with_a_model_refuses_settings_that_describe_another_model(tmp_path, model, capsys, extra, reason):
    """`evaluate --model` once ignored --set and --preset without a word: a user asking for other
    levels or more held-out patients got the checkpoint's and did not know."""
    assert main(["evaluate", "--model", str(model), "--out", str(tmp_path / "rep"), *extra]) == 2
    err = capsys.readouterr().err
    assert f"{model}: " in err and reason in err
    assert not (tmp_path / "rep").exists()


def test_evaluate_with_a_model_applies_what_is_measured(model):
    import argparse

    from fedeid.commands import evaluation_config

    stored = DeIdentifier.load(model).cfg
    args = argparse.Namespace(model=model, preset=None,
                              overrides=["eval.levels=0,1", "data.test_patients=12", "eval.baselines="])
    cfg = evaluation_config(stored, args)
    assert cfg.eval.levels == (0.0, 1.0) and cfg.data.test_patients == 12 and cfg.eval.baselines == ()
    assert cfg.model == stored.model and cfg.train.reid_epochs == stored.train.reid_epochs
    assert stored.eval.levels != (0.0, 1.0)  # the loaded model's own config is left as it was


def test_evaluate_takes_a_global_model_with_the_sites_reid(tmp_path, model, capsys, monkeypatch):
    from fedeid.checkpoint import save_checkpoint
    from fedeid.models.deid_model import shared_state

    site = DeIdentifier.load(model)
    save_checkpoint(tmp_path / "global.pt", site.cfg, shared=shared_state(site.model), reid=None)
    assert main(["evaluate", "--model", str(tmp_path / "global.pt"), "--out", str(tmp_path / "rep")]) == 2
    assert "pass the site's ReID checkpoint too" in capsys.readouterr().err
    assert main(["evaluate", "--reid", str(model), "--out", str(tmp_path / "rep")]) == 2
    assert "goes with --model" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr("fedeid.eval.benchmark.evaluate_and_report",
                        lambda deid, train, test, cfg, out: seen.update(deid=deid, cfg=cfg))
    assert main(["evaluate", "--model", str(tmp_path / "global.pt"), "--reid", str(model),
                 "--set", "eval.levels=0,1", "--out", str(tmp_path / "rep")]) == 0
    assert seen["cfg"].eval.levels == (0.0, 1.0)
    for name, value in site.reid.state_dict().items():
        assert torch.equal(seen["deid"].reid.state_dict()[name].cpu(), value.cpu())


def test_bad_config_override(tmp_path, capsys):
    assert main(["train", "--preset", "test", "--set", "train.epochz=3", "--out", str(tmp_path / "m.pt")]) == 2
    assert "unknown config key" in capsys.readouterr().err


@pytest.mark.parametrize("umask, private, expected", [(0o022, False, 0o644), (0o002, False, 0o664),
                                                      (0o077, False, 0o600), (0o022, True, 0o600)])
def test_outputs_follow_the_umask_and_secrets_stay_private(tmp_path, umask, private, expected):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x", private=private)
        atomic_write_json(tmp_path / "f.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == expected
    if not private:
        assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == expected


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_prints_plain_lines_off_a_terminal():
    log = io.StringIO()
    with Progress(3, "federated", "round", stream=log, every=0) as progress:
        for loss in (0.5, 0.4, 0.3):
            progress.update(status=f"loss {loss}")
        progress.message("fedeid: a.png: broken")
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("federated: 1/3 rounds") and "ETA" in lines[0] and lines[0].endswith("loss 0.5")
    assert lines[2].startswith("federated: 3/3 rounds") and "ETA" not in lines[2]
    assert lines[3] == "fedeid: a.png: broken" and "\r" not in log.getvalue()
    quiet = io.StringIO()
    with Progress(100, "de-identify", stream=quiet, every=3600) as progress:
        for _ in range(100):
            progress.update()
    assert quiet.getvalue() == ""  # a fast run leaves no lines in a log


def test_progress_messages_are_never_glued_onto_the_bar():
    tty = Tty()
    with Progress(2, "de-identify", stream=tty) as progress:
        progress.update()
        progress.message("fedeid: b.png: broken")
        progress.update()
    assert any(line.rstrip() == "fedeid: b.png: broken" for line in tty.getvalue().replace("\r", "\n").split("\n"))
    assert format_mib(3 * 2**20) == "3.00 MiB"


def test_train_then_deid_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "trained.pt"
    assert main(["train", "--preset", "test", "--out", str(ckpt)]) == 0
    d = DeIdentifier.load(ckpt)
    images = np.random.default_rng(2).random((2, 64, 64), dtype=np.float32)
    out, mask = d.deidentify(images, 0.5)
    assert out.shape == images.shape and abs(mask.mean() - 0.5) < 0.05
