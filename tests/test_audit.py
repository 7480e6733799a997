"""The audit log: chain, checkpoints, proofs, concurrent writers, tampering, and no PHI in it."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from phi_dicom import PHI, phi_dicom

from fedeid.audit import keys, merkle
from fedeid.audit.log import AuditLog, countersign, record
from fedeid.cli import main
from fedeid.io import InputError

# RFC 6962 test vectors (certificate-transparency's merkle tree tests): leaves and tree heads
RFC6962_LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
RFC6962_ROOTS = {
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}


def test_tree_heads_match_rfc6962_vectors_and_proofs_verify():
    leaves = [bytes.fromhex(x) for x in RFC6962_LEAVES]
    tree = merkle.build_tree(leaves)
    for size, expected in RFC6962_ROOTS.items():
        assert merkle.root(tree, size) == expected
    for size in range(1, 9):
        for i in range(size):
            merkle.check_inclusion(leaves[i], RFC6962_ROOTS[size], merkle.prove_inclusion(tree, i, size))
        with pytest.raises(ValueError):
            merkle.check_inclusion(b"not a leaf", RFC6962_ROOTS[size], merkle.prove_inclusion(tree, 0, size))
    merkle.check_consistency(RFC6962_ROOTS[3], RFC6962_ROOTS[8], merkle.prove_consistency(tree, 3, 8))
    with pytest.raises(ValueError):  # a head of 3 other leaves is not extended by the head of 8
        merkle.check_consistency(RFC6962_ROOTS[2], RFC6962_ROOTS[8], merkle.prove_consistency(tree, 3, 8))


@pytest.fixture
def signed_log(tmp_path):
    keys.generate_key(tmp_path / "site.key")
    log = AuditLog(tmp_path / "state")
    for i in range(6):
        log.append("deid.images", {"level": 0.5, "outcome": {"done": i, "failed": 0}})
    cp = log.checkpoint(keys.load_private_key(tmp_path / "site.key"))
    return log, cp, tmp_path


def _lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def _rewrite(log: AuditLog, lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(lines))


def _edit(line: bytes) -> bytes:
    entry = json.loads(line)
    entry["data"]["level"] = 0.0
    return keys.canonical(entry) + b"\n"


def _edit_and_rehash_all(lines: list[bytes]) -> list[bytes]:
    """The careful forger: edit entry 2, then recompute every hash and link after it."""
    from fedeid.audit.log import entry_hash

    out, prev = [], "0" * 64
    for i, line in enumerate(lines):
        e = json.loads(line)
        if i == 2:
            e["data"]["level"] = 0.0
        e["prev"] = prev
        e["hash"] = prev = entry_hash(e)
        out.append(keys.canonical(e) + b"\n")
    return out


TAMPERING = {
    "edited": lambda ls: ls[:2] + [_edit(ls[2])] + ls[3:],
    "removed": lambda ls: ls[:2] + ls[3:],
    "reordered": lambda ls: ls[:2] + [ls[3], ls[2]] + ls[4:],
    "inserted": lambda ls: ls[:3] + [ls[1]] + ls[3:],
    "truncated": lambda ls: ls[:-1],
    "rewritten": _edit_and_rehash_all,
    "garbled": lambda ls: ls[:2] + [b"{not json\n"] + ls[3:],
}


def test_untampered_log_and_checkpoint_verify(signed_log):
    log, cp, tmp = signed_log
    result = log.verify(trusted=[keys.fingerprint(keys.load_public_key(tmp / "site.key.pub"))])
    assert result["ok"] and result["entries"] == 6 and result["checkpoints"] == 1, result
    entry = log.entries()[4]
    merkle.check_inclusion(keys.canonical(entry), cp["root"], log.inclusion(4, cp))
    log.append("deid.images", {"level": 0.2})  # appending after a checkpoint is what a log does
    assert log.verify()["ok"]


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_every_kind_of_tampering_is_detected(signed_log, kind, capsys):
    log, _, tmp = signed_log
    _rewrite(log, TAMPERING[kind](_lines(log)))
    result = log.verify()
    assert not result["ok"] and result["problems"]
    assert main(["audit", "verify", "--state-dir", str(log.root.parent)]) == 1
    assert "TAMPERED" in capsys.readouterr().out
    if kind not in ("truncated", "rewritten"):  # a chain that is itself broken is never signed
        with pytest.raises(InputError, match="broken chain|not a JSON entry"):
            log.checkpoint(keys.load_private_key(tmp / "site.key"))


def test_checkpoints_from_an_untrusted_key_or_forged_signature_fail(signed_log):
    log, cp, tmp = signed_log
    keys.generate_key(tmp / "other.key")
    other = keys.fingerprint(keys.load_public_key(tmp / "other.key.pub"))
    assert not log.verify(trusted=[other])["ok"]
    forged = dict(cp, root="00" * 32)  # a root the signature does not cover
    assert any("checkpoint 1" in p for p in log.verify([forged])["problems"])


def test_coordinator_countersignature_detects_a_deleted_checkpoint_file(signed_log):
    log, cp, tmp = signed_log
    keys.generate_key(tmp / "coord.key")
    (tmp / "cp.json").write_text(json.dumps(cp))
    site_pub = str(tmp / "site.key.pub")
    assert main(["audit", "countersign", str(tmp / "cp.json"), "--key", str(tmp / "coord.key"), "--trust", site_pub]) == 0
    counter = json.loads((tmp / "cp.json").read_text())
    assert [s["role"] for s in counter["signatures"]] == ["site", "coordinator"]
    # the site's forger truncates the log and deletes its own checkpoints: the coordinator's copy still catches it
    _rewrite(log, _lines(log)[:-2])
    log.checkpoints_path.unlink()
    assert log.verify()["ok"]  # nothing local left to contradict the chain
    assert main(["audit", "verify", "--state-dir", str(log.root.parent), "--checkpoint", str(tmp / "cp.json")]) == 1
    with pytest.raises(ValueError):  # a countersigner refuses a checkpoint the site did not sign
        countersign(dict(cp, size=2), keys.load_private_key(tmp / "coord.key"))


def _append_many(state: str, n: int, tag: int) -> None:
    log = AuditLog(state)
    for i in range(n):
        log.append("concurrency", {"writer": tag, "i": i})


def test_two_processes_appending_at_once_keep_one_valid_chain(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), 60, w)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    log = AuditLog(tmp_path)
    result = log.verify()
    assert result["ok"] and result["entries"] == 120, result["problems"][:5]
    writers = [e["data"]["writer"] for e in log.entries()]
    assert writers.count(0) == writers.count(1) == 60


def test_record_refuses_file_names_and_counts_inputs_by_keyed_hash(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "in" / name).write_bytes(name.encode() * 10)
    with pytest.raises(TypeError):
        record("deid.images", state=tmp_path / "s", where=tmp_path / "in")
    e = record("deid.images", state=tmp_path / "s", inputs=tmp_path / "in", model=tmp_path / "in" / "a.png")
    assert e["data"]["inputs"]["count"] == 2
    assert e["data"]["model_sha256"] == hashlib.sha256(b"a.png" * 10).hexdigest()
    # keyed: another site (another key) gets another digest for the same files
    other = record("deid.images", state=tmp_path / "s2", inputs=tmp_path / "in")
    assert other["data"]["inputs"]["digest"] != e["data"]["inputs"]["digest"]
    assert b"a.png" not in (tmp_path / "s" / "audit" / "log.jsonl").read_bytes()


def test_no_phi_in_the_log_after_a_dicom_batch_of_phi_laden_files(tmp_path):
    src = tmp_path / "Quixote_Dulcinea_MRN-88231"
    src.mkdir()
    identifiers = set(PHI.values()) | {"Quixote", "Dulcinea", "Sancho", src.name}
    for i in range(3):
        identifiers |= set(phi_dicom(src / f"Quixote_Dulcinea_{i}.dcm", i))
    state = tmp_path / "state"
    assert main(["dicom", "keygen", str(tmp_path / "secret")]) == 0
    import os

    os.environ["FEDEID_STATE_DIR"], saved = str(state), os.environ.get("FEDEID_STATE_DIR", "")
    try:
        assert main(["dicom", "deid", str(src), str(tmp_path / "out"), "--secret-file", str(tmp_path / "secret"),
                     "--workers", "1", "--no-progress"]) == 0
    finally:
        os.environ["FEDEID_STATE_DIR"] = saved
    log = AuditLog(state)
    (entry,) = log.entries()
    assert entry["kind"] == "deid.dicom" and entry["data"]["inputs"]["count"] == 3
    assert entry["data"]["counts"]["deidentified"] == 3
    raw = b"".join(p.read_bytes() for p in log.root.iterdir() if p.is_file() and p.name != "input-hash.key")
    leaks = [v for v in identifiers if v.encode().lower() in raw.lower()]
    assert not leaks


def test_central_training_release_and_deid_runs_are_logged(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("FEDEID_STATE_DIR", str(tmp_path / "state"))
    assert main(["train", "--preset", "test", "--out", str(tmp_path / "m.pt")]) == 0
    (tmp_path / "in").mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((64, 64)) * 255).astype(np.uint8)).save(
            tmp_path / "in" / f"Quixote_{i}.png")
    assert main(["deid", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tmp_path / "m.pt"),
                 "--level", "0.5"]) == 0
    log = AuditLog()
    assert log.verify()["ok"]
    train, release, deid = log.entries()
    assert (train["kind"], release["kind"], deid["kind"]) == ("train.central", "model.release", "deid.images")
    sha = hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest()
    assert release["data"]["model_sha256"] == deid["data"]["model_sha256"] == sha
    assert deid["data"]["inputs"]["count"] == 2 and deid["data"]["outcome"] == {"done": 2, "kept": 0, "failed": 0}
    assert b"Quixote" not in log.path.read_bytes()


def test_federated_rounds_are_logged_by_the_server_and_every_site(tmp_path, monkeypatch):
    from client.app import app as client_app

    from fedeid.config import preset
    from fedeid.federated.inprocess import InProcessGrid
    from fedeid.federated.runconfig import config_from_run, run_config_for, run_options
    from fedeid.federated.server import run_federation

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FEDEID_STATE_DIR", str(tmp_path / "server-state"))
    cfg = preset("test")
    cfg.fed.rounds = 1
    cfg.set("privacy.mode", "local")
    rc = run_config_for(cfg, out_dir=tmp_path / "server", state_dir=tmp_path / "sites", threads=1, evaluate=False)
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(cfg.data.n_sites)], rc)
    run_federation(grid, config_from_run(rc), run_options(rc))
    server = AuditLog()
    assert server.verify()["ok"]
    rnd, release = server.entries()
    assert rnd["kind"] == "train.round" and sorted(rnd["data"]["sites"]) == list(range(cfg.data.n_sites))
    assert set(rnd["data"]["local_dp"]["per_site"]) == {str(s) for s in range(cfg.data.n_sites)}
    assert release["data"]["model_sha256"] == hashlib.sha256((tmp_path / "server" / "global.pt").read_bytes()).hexdigest()
    for site in range(cfg.data.n_sites):
        (entry,) = AuditLog(tmp_path / "sites" / f"site-{site}").entries()
        assert entry["kind"] == "train.round.site" and entry["data"]["site_id"] == site
        assert entry["data"]["bytes_sent"] > 0 and entry["data"]["epsilon"] > 0
    # the report reads the same facts from the checkpoint: rounds, sites, every site's ε, the hash
    from fedeid.riskreport.document import provenance

    prov = provenance(tmp_path / "server" / "global.pt", None)
    assert prov["mode"] == "federated" and prov["sha256"] == release["data"]["model_sha256"]
    fed = prov["federated"]
    assert fed["rounds"] == 1 and fed["sites"] == [str(s) for s in range(cfg.data.n_sites)]
    assert fed["local_epsilon"] == rnd["data"]["local_dp"]["per_site"] and fed["central_epsilon"] is None


def test_an_unwritable_state_folder_is_a_clear_error(tmp_path):
    from fedeid.io import InputError

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InputError, match="cannot write the audit log"):
        record("deid.images", state=tmp_path / "file", level=0.5)
