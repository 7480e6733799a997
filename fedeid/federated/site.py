"""A hospital's side of a deployment: its SuperNode runs only the app the hospital pinned.

``fedeid site run site.toml`` is the one process a hospital starts. It

1. starts ``flower-supernode`` with ``--isolation process``: the SuperNode then launches *no*
   app code by itself, it only queues tasks on its Runtime API (loopback);
2. acts as that SuperNode's executor (what ``flower-superexec`` would be): it takes only
   ClientApp tasks and starts each in ``python -m fedeid.federated.site clientapp``, which is
   Flower's own ``flwr-clientapp`` with one check added: the SHA-256 of the FAB's bytes must be
   one the hospital pinned (``allowed-fabs``), *before* the FAB is unpacked, put on
   ``sys.path`` or imported. A foreign app gets an error reply and never runs;
3. exits non-zero when the SuperNode ends on its own: refused by the SuperLink (unregistered
   key: "Failed to activate"), unregistered while running (HTTP 401, after which flwr 1.42's
   SuperNode logs "terminated gracefully" and exits 0), or crashed. Only a SIGTERM/SIGINT to
   this launcher is a normal end.

Why not Flower's ``--trusted-entities``: in flwr 1.42 only FABs fetched from Flower Hub carry
verification records (``flwr/superlink/servicer/control/control_handlers.py``, ``_get_remote_fab``
and ``_format_verification``); a FAB submitted with ``flwr run`` gets none, so a SuperNode with
trusted entities refuses *every* locally built app, fedeid's included.

The pin is a hash of the whole FAB, which ``flwr run`` builds deterministically from the app
folder (sorted files, fixed timestamps). fedeid's FAB carries the ``fedeid`` package itself and
Flower puts the FAB first on ``sys.path``, so the pin covers all code that runs at the site.
``fedeid site pin APP_DIR`` prints the hash of the app folder the hospital reviewed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedeid.io import InputError

EXIT_REFUSED = 3  # the SuperLink refused this SuperNode (key not registered / revoked)
EXIT_NODE_ENDED = 4  # the SuperNode ended without being asked to
REFUSAL_MARKERS = ("Failed to activate", "Failed to initialize the connection", "401 Unauthorized",
                   "Invalid SuperNode authentication", "does not recognize this SuperNode")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def fab_sha256(app_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of the FAB that ``flwr run APP_DIR`` would submit (Flower's own deterministic build)."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()
    except (ValueError, OSError) as e:
        raise InputError(app_dir, f"not a Flower app folder: {e}") from e


class FabRefused(PermissionError):
    """A FAB whose hash the site did not pin: raised before anything of it is installed."""


def check_fab(content: bytes, allowed: Iterable[str]) -> str:
    digest = hashlib.sha256(content).hexdigest()
    if digest not in set(allowed):
        raise FabRefused(f"fedeid site: app refused before it ran: FAB sha256 {digest} is not one this site "
                         "pinned (allowed-fabs in its site.toml)")
    return digest


# --------------------------------------------------------------------------- site.toml

@dataclass
class SiteConfig:
    """What ``site.toml`` holds (paths relative to the file's folder)."""

    path: Path
    superlink: str
    root_certificates: Path
    private_key: Path
    allowed_fabs: list[str]
    runtime_port: int = 9094
    node_config: dict[str, Any] = field(default_factory=dict)
    max_retries: int = 5

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SiteConfig:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError(p, f"cannot read site config: {e}") from e
        base = p.resolve().parent
        missing = [k for k in ("superlink", "root-certificates", "private-key", "allowed-fabs") if k not in raw]
        if missing:
            raise InputError(p, f"missing {', '.join(missing)}")
        fabs = raw["allowed-fabs"]
        if not isinstance(fabs, list) or not fabs or not all(isinstance(h, str) and _HEX64.match(h) for h in fabs):
            raise InputError(p, "allowed-fabs must be a non-empty list of SHA-256 hex digests "
                                "(`fedeid site pin APP_DIR` prints one)")
        node_config = raw.get("node-config", {})
        if not isinstance(node_config, dict) or not all(
                isinstance(v, (str, int, float, bool)) for v in node_config.values()):
            raise InputError(p, "node-config must be a table of strings, numbers and booleans")
        return cls(p, str(raw["superlink"]), base / raw["root-certificates"], base / raw["private-key"],
                   list(fabs), int(raw.get("runtime-port", 9094)), dict(node_config),
                   int(raw.get("max-retries", 5)))

    def supernode_command(self) -> list[str]:
        from fedeid.federated.deploy import supernode_command

        cmd = supernode_command(self.superlink, self.runtime_port, ca_cert=self.root_certificates,
                                private_key=self.private_key, node_config=self.node_config,
                                max_retries=self.max_retries)
        return cmd + ["--isolation", "process"]


# --------------------------------------------------------------------------- the pinned ClientApp process

def run_pinned_clientapp(argv: Sequence[str]) -> None:
    """Flower's ``flwr-clientapp`` with the pin check in front of its FAB installation.

    ``run_clientapp`` pulls the task (message, context, run, FAB bytes: data only), then calls
    ``install_from_fab``, which unpacks the FAB and is followed by the import of its ClientApp.
    That call is the one point before any of the app's code exists on disk or on ``sys.path``;
    replacing it with a checked version makes a refusal an ordinary ClientApp error, which
    Flower reports back to the ServerApp as an error reply.
    """
    import flwr.supernode.runtime.run_clientapp as rc
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp

    parser = _parse_args_run_flwr_clientapp()
    parser.add_argument("--allow-fab", action="append", required=True, help="pinned FAB SHA-256 (repeatable)")
    args = parser.parse_args(list(argv))
    install = getattr(rc, "install_from_fab", None)
    if install is None:  # a Flower whose ClientApp runner changed: refuse rather than run unchecked
        sys.exit("fedeid site: flwr.supernode.runtime.run_clientapp.install_from_fab not found; "
                 "this flwr release is not supported by the app pin")

    def checked_install(fab_content: bytes, *a: Any, **kw: Any) -> Any:
        check_fab(fab_content, args.allow_fab)
        return install(fab_content, *a, **kw)

    rc.install_from_fab = checked_install  # type: ignore[attr-defined]
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    rc.run_clientapp(runtime_api_address=args.runtime_api_address, token=args.token, insecure=args.insecure,
                     certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
                     parent_pid=args.parent_pid, runtime_dependency_install=False)


# --------------------------------------------------------------------------- the site launcher

class SiteLauncher:
    """The SuperNode plus fedeid's executor for it; see the module docstring."""

    def __init__(self, cfg: SiteConfig, *, poll_interval: float = 1.0, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.poll_interval = poll_interval
        self.env = env if env is not None else dict(os.environ)
        self.node: subprocess.Popen[str] | None = None
        self.stopping = threading.Event()
        self.refused = threading.Event()
        self.children: list[subprocess.Popen[bytes]] = []

    def _echo(self) -> None:
        assert self.node is not None and self.node.stdout is not None
        for line in self.node.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if any(m in line for m in REFUSAL_MARKERS):
                self.refused.set()

    def _client(self) -> Any:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        # no retry invoker: the poll loop retries, and notices meanwhile when the SuperNode is gone
        return RuntimeHttpClient.from_server_address(
            server_address=f"127.0.0.1:{self.cfg.runtime_port}", insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])

    def _launch(self, token: str) -> None:
        cmd = [sys.executable, "-m", "fedeid.federated.site", "clientapp",
               "--runtime-api-address", f"127.0.0.1:{self.cfg.runtime_port}", "--token", token, "--insecure",
               "--parent-pid", str(os.getpid())]
        for h in self.cfg.allowed_fabs:
            cmd += ["--allow-fab", h]
        self.children = [c for c in self.children if c.poll() is None]
        self.children.append(subprocess.Popen(cmd, env=self.env))

    def run(self) -> int:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.constant import TaskType

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.node = subprocess.Popen(self.cfg.supernode_command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env, start_new_session=True)
        echo = threading.Thread(target=self._echo, daemon=True)
        echo.start()
        client = None
        waiting_said = False
        try:
            while not self.stopping.is_set() and self.node.poll() is None:
                try:
                    client = client or self._client()
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                    if res.HasField("task") and res.token:
                        self._launch(res.token)
                except Exception as e:  # noqa: BLE001 - the Runtime API is not up yet / restarting
                    if not waiting_said and self.node.poll() is None:
                        print(f"fedeid site: waiting for the SuperNode's Runtime API ({type(e).__name__})",
                              file=sys.stderr)
                        waiting_said = True
                self.stopping.wait(self.poll_interval)
        finally:
            if client is not None:
                client.close()
            asked = self.stopping.is_set()
            self._stop()
            echo.join(timeout=5)
        if asked:
            return 0
        code = self.node.returncode
        if self.refused.is_set():
            print(f"fedeid site: the SuperLink refused this SuperNode (key not registered or revoked); "
                  f"flower-supernode exited {code}", file=sys.stderr)
            return EXIT_REFUSED
        print(f"fedeid site: flower-supernode ended on its own (exit {code})", file=sys.stderr)
        return EXIT_NODE_ENDED

    def _stop(self) -> None:
        from fedeid.federated.deploy import kill_tree

        for c in self.children:
            if c.poll() is None:
                kill_tree(c.pid, timeout=5.0)
        if self.node is not None and self.node.poll() is None:
            kill_tree(self.node.pid, timeout=10.0)
            self.node.wait()


def run_site(path: str | os.PathLike[str]) -> int:
    return SiteLauncher(SiteConfig.load(path)).run()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["clientapp"]:
        run_pinned_clientapp(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m fedeid.federated.site")
    p.add_argument("site_toml", type=Path)
    return run_site(p.parse_args(argv).site_toml)


if __name__ == "__main__":
    sys.exit(main())
