"""A real Flower deployment on 127.0.0.1 for tests: certificates, node keys, a SuperLink and SuperNodes
as processes (each in its own process group, so the SuperExec and ClientApp processes it spawns are
stopped with it). Every process started here is stopped when the cluster's ``with`` block ends,
whatever happened inside it."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flower-superexec, flwr


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def make_certs(out_dir: Path) -> dict[str, Path]:
    """A CA and a server certificate for localhost/127.0.0.1 (ECDSA P-384): ca.crt, server.pem, server.key."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(minutes=5)  # tolerate small clock skew
    end = now + datetime.timedelta(days=30)

    # --- CA ---
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flwr-test-ca")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    # --- server cert (SAN: localhost, 127.0.0.1, ::1) ---
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    paths = {
        "ca_cert": _write(out / "ca.crt", ca_cert.public_bytes(pem)),
        "ca_key": _write(out / "ca.key", ca_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600),
        "server_cert": _write(out / "server.pem", srv_cert.public_bytes(pem)),
        "server_key": _write(out / "server.key", srv_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600),
    }
    return paths


def make_node_keypair(out_dir: Path, name: str = "node") -> dict[str, Path]:
    """ECDSA P-384 keypair in OpenSSH format (what flower-supernode
    --auth-supernode-private-key and `flwr supernode register` expect)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    return {
        "private": _write(out / name, priv, 0o600),
        "public": _write(out / f"{name}.pub", pub + b"\n"),
    }


def _ancestors(pid: int) -> list[int]:
    """The parent, grandparent, ... of process ``pid`` (from /proc)."""
    chain = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: ppid
        chain.append(pid)
    return chain


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """Environment for every Flower process: a private FLWR_HOME, no telemetry, this venv's bin on PATH
    (the SuperLink and SuperNodes start flower-superexec by name)."""
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # Flower's SuperExecs look for a new task every second by default: a second of idle wait per message
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}


class Cluster:
    """A SuperLink plus SuperNodes; use as a context manager."""

    def __init__(self, root: Path, certs: dict[str, Path] | None = None, node_auth: bool = False) -> None:
        self.root, self.certs, self.node_auth = root, certs, node_auth
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        # Each worker node's wake socket (fedcustom supernode/worker --wake-socket), by Runtime API port; in a short
        # folder of its own, since a Unix socket's path may not exceed about 100 bytes (pytest's tmp_path can)
        self.sockets = Path(tempfile.mkdtemp(prefix="fcwake-"))
        self.wake = True

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        for name in list(self.processes):
            self.stop(name)
        shutil.rmtree(self.sockets, ignore_errors=True)

    def wake_socket(self, port: int) -> str:
        return str(self.sockets / f"{port}.sock")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def _start(self, name: str, args: list[str], ready: str, timeout: float = 60.0) -> subprocess.Popen:
        process = self._launch(name, args)
        self._wait_ready(name, ready, timeout)
        return process

    def _launch(self, name: str, args: list[str]) -> subprocess.Popen:
        out = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def _wait_ready(self, name: str, ready: str, timeout: float) -> None:
        process, deadline = self.processes[name], time.monotonic() + timeout
        while not re.search(ready, self.log(name)):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{self.log(name)[-3000:]}")
            time.sleep(0.1)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Signal the process group of ``name`` and wait for it (SIGKILL after 10 s)."""
        process = self.processes.pop(name)
        for signal_now, wait in ((sig, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, signal_now)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def kill_serverapps(self) -> int:
        """SIGKILL every ServerApp process this cluster's SuperLink started (``flwr-serverapp``, a child of the
        SuperExec the SuperLink runs in its own session); returns how many were killed."""
        superlink = self.processes["superlink"].pid
        killed = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "flwr-serverapp" in command and superlink in _ancestors(int(entry.name)):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed += 1
            except (OSError, ValueError):
                continue
        return killed

    def start_superlink(self) -> None:
        args = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.certs:
            args += ["--ssl-ca-certfile", str(self.certs["ca_cert"]), "--ssl-certfile", str(self.certs["server_cert"]),
                     "--ssl-keyfile", str(self.certs["server_key"])]
        else:
            args.append("--insecure")
        if self.node_auth:
            args.append("--enable-supernode-auth")
        self._start("superlink", args, r"Uvicorn running on https?://")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """The flwr CLI against this SuperLink (connection "test" in FLWR_HOME/config.toml)."""
        trust = (f'root-certificates = "{self.certs["ca_cert"]}"' if self.certs else "insecure = true")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "{self.address}"\n{trust}\n')
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=self.env, timeout=60)

    def register(self, public_key: Path) -> None:
        done = self.cli("supernode", "register", str(public_key), "test", "--format", "json")
        assert '"success": true' in done.stdout, done.stdout + done.stderr

    def start_supernode(self, name: str, node_config: str, private_key: Path | None = None,
                        ready: str = r"SuperNode ID: \d+", poll: float | None = 0.05) -> subprocess.Popen:
        """A SuperNode whose SuperExec starts a ClientApp process per message (Flower's default isolation). With
        ``poll``, it is ``fedcustom supernode --poll`` (Flower's SuperNode polling the SuperLink every ``poll`` s
        instead of every 3 s: the same per-message processes, without seconds of idle wait around each message);
        ``poll=None`` runs the plain ``flower-supernode``."""
        start = ([sys.executable, "-m", "fedcustom.cli", "supernode", "--poll", str(poll)] if poll is not None
                 else [str(BIN / "flower-supernode")])
        args = [*start, "--superlink", self.address, "--port", str(free_port()), "--node-config", node_config]
        args += ["--root-certificates", str(self.certs["ca_cert"])] if self.certs else ["--insecure"]
        if private_key is not None:
            args += ["--auth-supernode-private-key", str(private_key)]
        return self._start(name, args, ready)

    def start_worker_node(self, name: str, node_config: str, private_key: Path | None = None,
                          worker_args: tuple[str, ...] = ()) -> int:
        """A SuperNode that leaves its ClientApp tasks to a persistent ``fedcustom worker`` (``name``-worker), via
        ``fedcustom supernode`` (Flower's SuperNode, polling from 0.05 s); returns its Runtime API port."""
        return self.start_worker_nodes({name: node_config}, private_key, worker_args)[name]

    def start_worker_nodes(self, configs: dict[str, str], private_key: Path | None = None,
                           worker_args: tuple[str, ...] = ()) -> dict[str, int]:
        """Several worker nodes (name -> node config) started side by side: every SuperNode, then every worker,
        then the wait until all are ready (a worker's start is mostly importing torch and transformers, which
        one node after another would pay in turn); returns each node's Runtime API port."""
        ports = {name: free_port() for name in configs}
        for name, node_config in configs.items():
            wake = ["--wake-socket", self.wake_socket(ports[name])] if self.wake else []  # before Flower's arguments
            args = [sys.executable, "-m", "fedcustom.cli", "supernode", "--poll", "0.05", *wake, "--superlink",
                    self.address, "--port", str(ports[name]), "--isolation", "process", "--node-config", node_config]
            args += ["--root-certificates", str(self.certs["ca_cert"])] if self.certs else ["--insecure"]
            if private_key is not None:
                args += ["--auth-supernode-private-key", str(private_key)]
            self._launch(name, args)
            self._launch(f"{name}-worker", self._worker_args(ports[name], worker_args))
        for name in configs:
            self._wait_ready(name, r"SuperNode ID: \d+", 60)
            self._wait_ready(f"{name}-worker", r"fedcustom worker: serving", 120)
        return ports

    def _worker_args(self, port: int, extra: tuple[str, ...]) -> list[str]:
        wake = ["--wake-socket", self.wake_socket(port)] if self.wake else []
        return [sys.executable, "-m", "fedcustom.cli", "worker", "--runtime-api", f"127.0.0.1:{port}", "--threads", "1",
                *wake, *extra]

    def start_worker(self, name: str, port: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        """``fedcustom worker`` for the SuperNode whose Runtime API is on ``port`` (one torch thread: the nodes of a
        test share the machine's cores)."""
        return self._start(name, self._worker_args(port, extra), r"fedcustom worker: serving", timeout=120)
