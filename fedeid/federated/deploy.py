"""Start, drive and stop real Flower processes: SuperLink, SuperNodes, ``flwr run``.

Used by the deployment test, by ``fedeid simulate --engine flwr`` (a simulation SuperLink) and
by the overhead measurements in ``simulations/``. Every process is started in its own session
and stopped with its whole tree — including the children Flower detaches into sessions of their
own (the SuperLink's SuperExec, the ServerApp/ClientApp subprocesses) — so that nothing is left
running. ``FLWR_HOME`` is always set to a folder of the caller's, and every SuperLink gets
``--disable-runtime-dependency-installation`` (otherwise it runs ``uv sync`` for each run).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

BIN = Path(sys.executable).parent


def _exe(name: str) -> str:
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name}: not found next to {sys.executable} nor on PATH (pip install 'flwr[simulation]')")
    return found


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` consecutive free ports, below the kernel's ephemeral range.

    Why not ``bind(0)``: that hands out an ephemeral port, and between our check and the Flower
    process binding it, any outgoing connection on the machine (gRPC clients, HTTP probes) may take
    it or its neighbours -- CI once lost a SuperNode's Runtime API port that way. Ports below the
    ephemeral range are only ever taken by explicit binds. Consecutive, because a deployment gives
    site ``i`` the port ``runtime_port + i``.
    """
    top = max(_ephemeral_low(), 20000 + n + 1)
    rng = random.SystemRandom()
    for _ in range(200):
        base = rng.randrange(20000, top - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, port))
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports on {host} between 20000 and {top}")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def flower_env(flwr_home: str | os.PathLike[str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every Flower process of ours gets: our FLWR_HOME, no telemetry/update checks."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- process trees

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces/parens: split after the last ')'
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) >= 2:
            kids.setdefault(int(rest[1]), []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc), children first-found order."""
    if not Path("/proc").is_dir():
        return []
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): tells a reused pid apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and its live descendants (shared pages counted per process)."""
    return sum(rss_bytes(p) for p in [pid, *descendants(pid)])


def kill_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid`` and every descendant (any session), wait, then SIGKILL what is left."""
    tree = [pid, *descendants(pid)]
    for p in tree:
        try:
            os.kill(p, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # children spawned during shutdown join the tree
        tree += [d for d in descendants(pid) if d not in tree]
        if not any(_alive(p) for p in tree):
            return
        time.sleep(0.1)
    for p in tree + descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class ManagedProcess:
    """A Flower process of ours: its command, log file and Popen; :meth:`stop` ends its tree."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str]
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    _known: dict[int, int | None] = field(default_factory=dict)  # pid -> start time

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                          cwd=self.cwd, start_new_session=True)
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def remember_tree(self) -> None:
        """Note the current descendants: children that Flower/Ray detach, or whose parent exits
        first, are re-parented away from our tree but are still ours to stop."""
        if self.popen is not None:
            for d in descendants(self.pid):
                if d not in self._known:
                    self._known[d] = start_time(d)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None:
            return
        self.remember_tree()
        kill_tree(self.pid, timeout=timeout)
        for p, started in list(self._known.items()):
            # only a process we saw, never a pid the kernel has since given to someone else
            if _alive(p) and started is not None and start_time(p) == started:
                kill_tree(p, timeout=2.0)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
            self.popen.kill()
            self.popen.wait()


# --------------------------------------------------------------------------- Flower commands

def superlink_command(port: int, *, certs: Any | None = None, auth: bool = False, simulation: bool = False,
                      database: str | None = None, log_file: str | None = None, host: str = "127.0.0.1") -> list[str]:
    """``flower-superlink`` with TLS from a :class:`fedeid.privacy.certs.CertBundle` (or insecure)."""
    cmd = [_exe("flower-superlink"), "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
                "--ssl-keyfile", str(certs.server_key)]
    if auth:
        cmd.append("--enable-supernode-auth")
    if simulation:
        cmd.append("--simulation")
    if database:
        cmd += ["--database", database]
    if log_file:
        cmd += ["--log-file", log_file]
    return cmd


def _node_config_arg(node_config: Mapping[str, Any]) -> str:
    parts = []
    for k, v in node_config.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}={json.dumps(str(v))}")
    return " ".join(parts)


def supernode_command(superlink: str, port: int, *, ca_cert: str | os.PathLike[str] | None = None,
                      private_key: str | os.PathLike[str] | None = None,
                      node_config: Mapping[str, Any] | None = None, max_retries: int | None = 0) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` (host:port); ``port`` is its own ClientAppIo port."""
    cmd = [_exe("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    cmd += ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if node_config:
        cmd += ["--node-config", _node_config_arg(node_config)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def write_connection(flwr_home: str | os.PathLike[str], name: str, address: str, *,
                     root_certificates: str | os.PathLike[str] | None = None, insecure: bool | None = None,
                     default: bool = True) -> Path:
    """Add/replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml`` (where flwr 1.41 reads connections)."""
    import tomllib

    path = Path(flwr_home) / "config.toml"
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is not None:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    if insecure is not None:
        entry["insecure"] = insecure
    links[name] = entry
    if default:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def run_cli(args: list[str], env: Mapping[str, str], *, cwd: str | os.PathLike[str] | None = None,
            timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short Flower CLI command in its own session; its tree is killed on timeout."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(env),
                            cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid, timeout=3.0)
        out, _ = proc.communicate()
        raise TimeoutError(f"{' '.join(args[:3])} ... timed out after {timeout:.0f}s:\n{out[-4000:]}") from None
    result = subprocess.CompletedProcess(args, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(args))} "
                           f"exited {proc.returncode}:\n{out[-4000:]}")
    return result


def write_run_config(run_config: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Run-config overrides as a TOML file: ``flwr run --run-config FILE.toml`` takes any string
    (JSON, paths with spaces) that the ``key=value`` form cannot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in run_config.items()}))
    return path


def flwr_run(app_dir: str | os.PathLike[str], connection: str, env: Mapping[str, str], *,
             run_config: Mapping[str, Any] | None = None, federation_config: Mapping[str, Any] | None = None,
             timeout: float = 600.0, stream: bool = True) -> subprocess.CompletedProcess[str]:
    """``flwr run APP CONNECTION --stream``: returns when the run has finished (or raises on timeout)."""
    args = [_exe("flwr"), "run", str(app_dir), connection]
    if run_config:
        home = Path(env.get("FLWR_HOME", tempfile.gettempdir()))
        args += ["--run-config", str(write_run_config(run_config, home / f"run-config-{uuid.uuid4().hex[:8]}.toml"))]
    if federation_config:
        args += ["--federation-config", " ".join(f"{k}={v}" for k, v in federation_config.items())]
    if stream:
        args.append("--stream")
    return run_cli(args, env, cwd=app_dir, timeout=timeout)


def register_supernode(public_key: str | os.PathLike[str], connection: str, env: Mapping[str, str],
                       timeout: float = 60.0) -> str:
    return run_cli([_exe("flwr"), "supernode", "register", str(public_key), connection], env, timeout=timeout).stdout


def wait_until(predicate: Any, timeout: float, interval: float = 0.3, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 60.0,
                  proc: ManagedProcess | None = None) -> None:
    def up() -> bool:
        if proc is not None and not proc.running():
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode if proc.popen else '?'}:\n{proc.log()[-4000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.3)
            return s.connect_ex((host, port)) == 0

    wait_until(up, timeout, what=f"{host}:{port}")


class Deployment:
    """A SuperLink plus SuperNodes on one machine, all stopped by :meth:`close` (also on errors).

    ``with Deployment(workdir, certs=bundle, auth=True) as dep: dep.start_superlink(); ...``
    """

    def __init__(self, workdir: str | os.PathLike[str], *, certs: Any | None = None, auth: bool = False,
                 simulation: bool = False, connection: str = "fedeid") -> None:
        self.workdir = Path(workdir).resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.flwr_home)
        self.certs = certs
        self.auth = auth
        self.simulation = simulation
        self.connection = connection
        self.superlink: ManagedProcess | None = None
        self.supernodes: list[ManagedProcess] = []
        self.port: int | None = None
        self.peak_rss = 0  # bytes, all our Flower processes together, sampled during run()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_superlink(self, port: int | None = None, timeout: float = 60.0) -> ManagedProcess:
        self.port = port or free_port()
        cmd = superlink_command(self.port, certs=self.certs, auth=self.auth, simulation=self.simulation,
                                database=str(self.workdir / "superlink-state.db"))
        self.superlink = ManagedProcess("superlink", cmd, self.workdir / "logs" / "superlink.log", self.env,
                                        cwd=self.workdir).start()
        wait_for_port(self.port, timeout=timeout, proc=self.superlink)
        write_connection(self.flwr_home, self.connection, self.address,
                         root_certificates=None if self.certs is None else self.certs.ca_cert,
                         insecure=True if self.certs is None else None)
        return self.superlink

    def register(self, public_key: str | os.PathLike[str]) -> str:
        return register_supernode(public_key, self.connection, self.env)

    def start_supernode(self, name: str, *, private_key: str | os.PathLike[str] | None = None,
                        node_config: Mapping[str, Any] | None = None, port: int | None = None,
                        max_retries: int | None = 0) -> ManagedProcess:
        if self.port is None:
            raise RuntimeError("start the SuperLink first")
        cmd = supernode_command(self.address, port or free_port(),
                                ca_cert=None if self.certs is None else self.certs.ca_cert,
                                private_key=private_key, node_config=node_config, max_retries=max_retries)
        proc = ManagedProcess(name, cmd, self.workdir / "logs" / f"{name}.log", self.env, cwd=self.workdir).start()
        self.supernodes.append(proc)
        return proc

    def run(self, app_dir: str | os.PathLike[str], run_config: Mapping[str, Any] | None = None,
            timeout: float = 600.0, federation_config: Mapping[str, Any] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """``flwr run`` against this SuperLink, noting every process the run spawns meanwhile."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.5):
                for p in self.processes():
                    p.remember_tree()
                self.peak_rss = max(self.peak_rss, sum(tree_rss(p.pid) for p in self.processes() if p.running()))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            return flwr_run(app_dir, self.connection, self.env, run_config=run_config,
                            federation_config=federation_config, timeout=timeout)
        finally:
            stop.set()
            watcher.join()
            for p in self.processes():
                p.remember_tree()

    def processes(self) -> list[ManagedProcess]:
        return [p for p in [self.superlink, *self.supernodes] if p is not None]

    def close(self) -> None:
        for p in reversed(self.supernodes):
            p.stop()
        if self.superlink is not None:
            self.superlink.stop()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def logs_tail(procs: Iterable[ManagedProcess], n: int = 3000) -> str:
    return "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log()[-n:]}" for p in procs)
