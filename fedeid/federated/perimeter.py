"""The coordinator's side of a deployment: hospitals reach the Fleet API and nothing else.

flwr 1.42 serves all of the SuperLink's APIs — Fleet (SuperNodes), Control (``flwr run``,
``flwr supernode register``, ``flwr ls``, stop run) and Runtime (the ServerApp's SuperExec) —
on the one HTTP port of ``--host``/``--port`` (``flwr/superlink/cli/flower_superlink.py``,
``_run_superlink_http_api``; ``--fleet-api-address`` and ``--control-api-address`` are
deprecated no-ops), and open-source Flower has no Control authentication (``flwr/superlink/
config_loader.py``, ``load_control_authn_plugin``: OIDC only in the enterprise build). So the
SuperLink listens on loopback only, and nginx, on the address the hospitals reach, forwards
exactly the Fleet routes of the installed flwr (``/v1/fleet/<rpc>``, POST) to it and answers
403 to everything else. TLS ends at nginx with the SuperLink's certificate and is verified
again from nginx to the SuperLink; SuperNode authentication (signed headers) passes through.

``fedeid deploy --out deploy --sites 3`` (:func:`write_bundle`) writes one folder per party::

    deploy/certs/          the CA (ca.key: keep offline) and the master copies of all keys
    deploy/coordinator/    start-superlink.sh, start-proxy.sh (nginx), register-sites.sh, run.sh,
                           nginx.conf, flwr-home/config.toml, the SuperLink's cert/key, sites/*.pub
    deploy/<site>/         start-site.sh, site.toml (SuperLink address, CA, key, node config,
                           the pinned FAB hash), ca.crt, supernode.key(.pub)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedeid.io import InputError, atomic_write_bytes


def fleet_paths() -> list[str]:
    """The Fleet API routes of the installed flwr: all a SuperNode ever calls."""
    from flwr.superlink.routers.fleet.router import router

    paths = sorted({r.path for r in router.routes})  # type: ignore[attr-defined]
    if not paths or not all(p.startswith("/v1/fleet/") for p in paths):
        raise RuntimeError(f"unexpected Fleet API routes in this flwr: {paths}")
    return paths


def nginx_conf(*, listen: str, superlink_port: int, cert: str, key: str, ca: str,
               upstream_name: str = "localhost", max_body: str = "1g") -> str:
    """An nginx config (paths relative to the prefix folder ``nginx -p DIR``) for the Fleet-only proxy.

    Request and response buffering are off: model arrays stream through without temp files
    (which nginx's unprivileged worker could not write in a private folder anyway).
    """
    rpcs = "|".join(p.rsplit("/", 1)[1] for p in fleet_paths())
    return f"""# fedeid: hospitals' entry to the SuperLink. Only the Fleet API is forwarded; the Control API
# (flwr run/ls/stop, node registration) and the Runtime API stay on the SuperLink's loopback port.
# Start: nginx -p "$PWD/" -c nginx.conf -g 'daemon off;'   (from this folder)
worker_processes 1;
pid nginx/nginx.pid;
error_log nginx/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log nginx/access.log;
    client_body_temp_path nginx/client_body;
    proxy_temp_path nginx/proxy;
    fastcgi_temp_path nginx/fastcgi;
    uwsgi_temp_path nginx/uwsgi;
    scgi_temp_path nginx/scgi;
    server_tokens off;
    client_max_body_size {max_body};
    upstream superlink {{ server 127.0.0.1:{superlink_port}; keepalive 16; }}
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location ~ ^/v1/fleet/({rpcs})$ {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name {upstream_name};
            proxy_ssl_server_name on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
        location / {{ return 403; }}
    }}
}}
"""


@dataclass
class Bundle:
    """Where :func:`write_bundle` put everything."""

    out: Path
    coordinator: Path
    sites: list[Path]
    fab_sha256: str


def _script(path: Path, body: str) -> None:
    atomic_write_bytes(path, ("#!/usr/bin/env bash\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + body).encode())
    os.chmod(path, 0o755)


def _copy_private(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)


def write_bundle(out: str | os.PathLike[str], sites: list[str], *, app_dir: str | os.PathLike[str],
                 public_host: str = "127.0.0.1", listen: str | None = None, fleet_port: int = 9092,
                 superlink_port: int = 9093, runtime_port: int = 9094, force: bool = False) -> Bundle:
    """Write every file the coordinator and the hospitals need (see the module docstring).

    ``public_host`` is the name/IP hospitals use for the coordinator (it goes into the TLS
    certificate and each ``site.toml``); nginx listens on ``listen`` (default
    ``0.0.0.0:<fleet_port>``). Site *i*'s SuperNode serves its Runtime API on loopback port
    ``runtime_port + i``, so that all sites can share one machine in a trial.
    """
    from fedeid.federated.site import fab_sha256
    from fedeid.privacy.certs import DEFAULT_HOSTS, create_certificates

    out = Path(out).resolve()
    app = Path(app_dir).resolve()
    if not (app / "pyproject.toml").is_file():
        raise InputError(app, "not a Flower app folder (no pyproject.toml)")
    if len(set(sites)) != len(sites) or not sites or not all(s.replace("-", "").replace("_", "").isalnum()
                                                             for s in sites):
        raise InputError(out, f"site names must be distinct, non-empty, letters/digits/-/_: {sites}")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(out, "not empty (use --force to write a new deployment over it)")
    for reserved in ("certs", "coordinator"):
        if reserved in sites:
            raise InputError(out, f"a site cannot be called {reserved!r}")
    hosts = list(dict.fromkeys([public_host, *DEFAULT_HOSTS]))  # nginx checks the SuperLink as "localhost"
    certs = create_certificates(out / "certs", hosts=hosts, node_names=sites, overwrite=force)
    digest = fab_sha256(app)

    coord = out / "coordinator"
    (coord / "sites").mkdir(parents=True, exist_ok=True)
    (coord / "nginx").mkdir(exist_ok=True)
    (coord / "flwr-home").mkdir(exist_ok=True)
    shutil.copyfile(certs.ca_cert, coord / "ca.crt")
    shutil.copyfile(certs.server_cert, coord / "server.pem")
    _copy_private(certs.server_key, coord / "server.key")
    for name, pub in zip(sites, certs.node_public_keys):
        shutil.copyfile(pub, coord / "sites" / f"{name}.pub")
    listen = listen or f"0.0.0.0:{fleet_port}"
    atomic_write_bytes(coord / "nginx.conf", nginx_conf(listen=listen, superlink_port=superlink_port,
                                                       cert="server.pem", key="server.key", ca="ca.crt").encode())
    # flwr resolves root-certificates against the working directory: an absolute path
    atomic_write_bytes(coord / "flwr-home" / "config.toml", tomli_w.dumps({"superlink": {
        "default": "fedeid",
        "fedeid": {"address": f"127.0.0.1:{superlink_port}", "root-certificates": str(coord / "ca.crt")}}}).encode())
    env = 'export FLWR_HOME="$PWD/flwr-home"\n'
    _script(coord / "start-superlink.sh",
            env + "# the SuperLink listens on loopback only: Control and Runtime APIs never face the hospitals\n"
            "exec flower-superlink --disable-runtime-dependency-installation --enable-supernode-auth \\\n"
            "  --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key \\\n"
            f"  --host 127.0.0.1 --port {superlink_port} --database \"$PWD/superlink.db\"\n")
    _script(coord / "start-proxy.sh",
            f"# the hospitals' entry ({listen}): nginx forwards only the Fleet API\n"
            "mkdir -p nginx\nPATH=\"$PATH:/usr/sbin\"  # Debian's nginx\n"
            "exec nginx -p \"$PWD/\" -c nginx.conf -g 'daemon off;'\n")
    _script(coord / "register-sites.sh",
            env + "for pub in sites/*.pub; do flwr supernode register \"$pub\" fedeid; done\n")
    _script(coord / "run.sh",
            env + f"# flwr run through the loopback Control API; extra arguments go to flwr run\n"
            f"exec flwr run \"${{FEDEID_APP:-{app}}}\" fedeid --stream \"$@\"\n")

    site_dirs = []
    for i, (name, key) in enumerate(zip(sites, certs.node_keys)):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(certs.ca_cert, d / "ca.crt")
        _copy_private(key, d / "supernode.key")
        shutil.copyfile(key.with_name(key.name + ".pub"), d / "supernode.key.pub")
        cfg = {
            "superlink": f"{public_host}:{fleet_port}",
            "root-certificates": "ca.crt",
            "private-key": "supernode.key",
            "runtime-port": runtime_port + i,
            "allowed-fabs": [digest],
            "node-config": {"site-id": i, "state-dir": str(d / "state")},
        }
        text = ("# fedeid site configuration (`fedeid site run site.toml`). allowed-fabs: the SHA-256 of the\n"
                "# only apps this SuperNode runs; check it yourself: `fedeid site pin APP_DIR` on the release\n"
                "# you reviewed. node-config: add data = \"/path/to/labels.csv\" (else synthetic site site-id).\n"
                + tomli_w.dumps(cfg))
        atomic_write_bytes(d / "site.toml", text.encode())
        _script(d / "start-site.sh", "exec fedeid site run site.toml\n")
        site_dirs.append(d)
    return Bundle(out, coord, site_dirs, digest)
