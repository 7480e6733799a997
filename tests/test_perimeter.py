"""`fedeid deploy` / `fedeid site` without processes: the nginx proxy forwards the Fleet API only,
the bundle hands each party what it needs and no more, the app pin refuses a foreign FAB, and a
broken site.toml is named with its reason. (tests/test_federated_deploy.py runs it all for real.)"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from fedeid.federated.perimeter import fleet_paths, nginx_conf, write_bundle
from fedeid.federated.site import FabRefused, SiteConfig, check_fab, fab_sha256
from fedeid.federated.simulation import project_dir
from fedeid.io import InputError


def _tiny_app(root: Path, body: str = "x = 1\n") -> Path:
    app = root / "tinyapp"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text('[project]\nname = "tinyapp"\nversion = "1.0.0"\n\n[tool.flwr.app]\n'
                                        'publisher = "p"\n\n[tool.flwr.app.components]\nserverapp = "s:app"\n'
                                        'clientapp = "c:app"\n')
    (app / "s.py").write_text(body)
    (app / "c.py").write_text(body)
    return app


def test_nginx_forwards_exactly_the_fleet_routes():
    paths = fleet_paths()
    assert "/v1/fleet/activate-node" in paths and "/v1/fleet/pull-messages" in paths
    conf = nginx_conf(listen="127.0.0.1:9", superlink_port=9093, cert="s.pem", key="s.key", ca="ca.crt")
    forwarded = re.findall(r"location ~ \^/v1/fleet/\(([^)]*)\)\$", conf)
    assert len(forwarded) == 1 and sorted(f"/v1/fleet/{r}" for r in forwarded[0].split("|")) == paths
    assert "location / { return 403; }" in conf and "limit_except POST" in conf
    assert conf.count("proxy_pass") == 1 and "proxy_ssl_verify on" in conf
    assert "control" not in conf.split("location ~")[1] and "runtime" not in conf.split("location ~")[1]


def test_fab_pin_is_deterministic_and_refuses_any_change(tmp_path):
    app = _tiny_app(tmp_path / "a")
    h = fab_sha256(app)
    assert re.fullmatch(r"[0-9a-f]{64}", h) and fab_sha256(app) == h
    other = _tiny_app(tmp_path / "b", body="import os; os.system('id')\n")
    assert fab_sha256(other) != h
    from flwr.cli.build import build_fab_from_disk

    assert check_fab(build_fab_from_disk(app), [h]) == h
    with pytest.raises(FabRefused, match="not one this site pinned"):
        check_fab(build_fab_from_disk(other), [h])


def test_bundle_gives_each_party_its_own_files(tmp_path):
    app = _tiny_app(tmp_path)
    b = write_bundle(tmp_path / "dep", ["north", "south"], app_dir=app, public_host="link.example",
                     fleet_port=7001, superlink_port=7002, runtime_port=7010)
    assert b.fab_sha256 == fab_sha256(app)
    coord = b.coordinator
    assert sorted(p.name for p in (coord / "sites").iterdir()) == ["north.pub", "south.pub"]
    assert not list(coord.glob("*.key.pub")) and not (coord / "ca.key").exists()
    cfg = tomllib.loads((coord / "flwr-home" / "config.toml").read_text())["superlink"]
    assert cfg["fedeid"]["address"] == "127.0.0.1:7002"  # the Control API: loopback only
    assert "--host 127.0.0.1 --port 7002" in (coord / "start-superlink.sh").read_text()
    assert "listen 0.0.0.0:7001 ssl" in (coord / "nginx.conf").read_text()
    for i, site in enumerate(b.sites):
        assert sorted(p.name for p in site.iterdir()) == ["ca.crt", "site.toml", "start-site.sh", "supernode.key",
                                                          "supernode.key.pub"]
        assert stat.S_IMODE((site / "supernode.key").stat().st_mode) == 0o600
        sc = SiteConfig.load(site / "site.toml")
        assert sc.superlink == "link.example:7001" and sc.allowed_fabs == [b.fab_sha256]
        assert sc.runtime_port == 7010 + i and sc.node_config["site-id"] == i
        cmd = sc.supernode_command()
        assert cmd[cmd.index("--isolation") + 1] == "process"  # the SuperNode itself runs no app code
        assert cmd[cmd.index("--superlink") + 1] == "link.example:7001"
    with pytest.raises(InputError, match="not empty"):
        write_bundle(tmp_path / "dep", ["north"], app_dir=app)
    if shutil.which("nginx"):
        r = subprocess.run(["nginx", "-t", "-p", f"{coord}/", "-c", "nginx.conf"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_pin_covers_fedeid_code():
    """Flower puts the FAB first on sys.path, so a hash over a FAB holding fedeid/ pins fedeid's code too."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    app = project_dir()
    assert app is not None
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert {"client/app.py", "server/app.py", "fedeid/federated/client.py", "fedeid/train.py"} <= set(names)


@pytest.mark.parametrize("text, reason", [
    ('superlink = "h:1"\nroot-certificates = "ca.crt"\nprivate-key = "k"\n', "missing allowed-fabs"),
    ('superlink = "h:1"\nroot-certificates = "ca.crt"\nprivate-key = "k"\nallowed-fabs = ["abc"]\n',
     "SHA-256 hex digests"),
    ('superlink = "h:1"\nroot-certificates = "ca.crt"\nprivate-key = "k"\nallowed-fabs = []\n', "non-empty"),
    ('superlink = \n', "cannot read site config"),
    ('superlink = "h:1"\nroot-certificates = "ca.crt"\nprivate-key = "k"\nallowed-fabs = ["' + "a" * 64 + '"]\n'
     '[node-config]\nx = [1]\n', "node-config"),
])
def test_bad_site_config_is_named(tmp_path, text, reason):
    p = tmp_path / "site.toml"
    p.write_text(text)
    with pytest.raises(InputError, match=reason) as e:
        SiteConfig.load(p)
    assert str(p) in str(e.value)
