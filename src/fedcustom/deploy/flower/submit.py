"""`fedcustom submit`: send a run to a SuperLink as a Flower app and (optionally) wait for it.

The app submitted is a tiny Flower app (a pyproject.toml only) whose components are our ServerApp
and ClientApp from the installed fedcustom package, and which declares no dependencies: Flower
would otherwise install them into a fresh environment (a multi-GB CUDA torch). Start the SuperLink
with ``--disable-runtime-dependency-installation`` so it runs the app in its own environment.
The run's resolved config travels in the run config; submission goes through the ``flwr`` CLI with
a connection written to a private FLWR_HOME, so the user's ~/.flwr is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedcustom import __version__
from fedcustom.config import RunConfig
from fedcustom.deploy.flower.apps import CONFIG_KEY, RESUME_KEY, config_to_run_config
from fedcustom.deploy.flower.ping import PING_KEY
from fedcustom.deploy.flower.rag import RAG_KEY
from fedcustom.errors import FedCustomError

log = logging.getLogger(__name__)

CONNECTION = "fedcustom"
APP_PYPROJECT = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedcustom-app"
version = "{__version__}"
description = "fedcustom's ServerApp and ClientApp (from the installed fedcustom package)"
license = "Apache-2.0"
dependencies = []  # never let Flower install torch & co. into a fresh environment

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedcustom"

[tool.flwr.app.components]
serverapp = "fedcustom.deploy.flower.apps:server_app"
clientapp = "fedcustom.deploy.flower.apps:client_app"

[tool.flwr.app.config]
{CONFIG_KEY} = ""
{RAG_KEY} = ""
{RESUME_KEY} = ""
{PING_KEY} = ""
"""


@dataclass(frozen=True)
class Connection:
    """Where the SuperLink listens and how to trust it."""

    address: str  # host:port of the SuperLink (Fleet, Control and Runtime APIs share it in Flower 1.41)
    root_certificates: str | None = None  # CA certificate (PEM) that signed the SuperLink's; None with insecure
    insecure: bool = False

    def toml(self) -> str:
        lines = [f"[superlink]\ndefault = \"{CONNECTION}\"\n", f"[superlink.{CONNECTION}]",
                 f"address = {json.dumps(self.address)}"]
        if self.insecure:
            lines.append("insecure = true")
        elif self.root_certificates:
            lines.append(f"root-certificates = {json.dumps(str(Path(self.root_certificates).resolve()))}")
        return "\n".join(lines) + "\n"


def flwr_cli() -> str:
    """The flwr CLI of this environment."""
    path = Path(sys.executable).with_name("flwr")
    if not path.is_file():
        raise FedCustomError("the flwr command is missing; install Flower with `pip install 'fedcustom[flower]'`")
    return str(path)


def _flwr(args: list[str], home: Path, timeout: float = 120.0) -> dict:
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    done = subprocess.run([flwr_cli(), *args, "--format", "json"], capture_output=True, text=True, env=env,
                          timeout=timeout)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = {"success": False, "error-message": (done.stdout + done.stderr).strip()[-2000:]}
    if done.returncode != 0 or not answer.get("success", False):
        raise FedCustomError(f"flwr {args[0]}: {answer.get('error-message') or done.stderr.strip()[-2000:]}")
    return answer


class RunStatus:
    """A run's status from the SuperLink's Control API, asked from this process: ``flwr ls`` starts a Python process
    that imports Flower's CLI each time, about a second of CPU, which every 2 s of waiting took half a core from
    the ServerApp when both ran on one machine. Falls back to ``flwr ls`` where the direct request fails (e.g. a
    SuperLink with account authentication, which the CLI's login handles)."""

    def __init__(self, connection: Connection, home: Path) -> None:
        self.connection, self.home, self._client = connection, home, None
        self._direct = True

    def get(self, run_id: int) -> dict:
        """``{"status": "finished:completed", "status-details": ...}`` as ``flwr ls --format json`` gives it."""
        if self._direct:
            try:
                return self._ask(run_id)
            except Exception as exc:  # noqa: BLE001 - any failure: the CLI's own way, from now on
                log.debug("run status through the Control API failed (%s); using flwr ls", exc)
                self._direct = False
        return _flwr(["ls", CONNECTION, "--run-id", str(run_id)], self.home)["runs"][0]

    def _ask(self, run_id: int) -> dict:
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        if self._client is None:
            certificates = (Path(self.connection.root_certificates).read_bytes()
                            if self.connection.root_certificates and not self.connection.insecure else None)
            self._client = ControlHttpClient.from_server_address(
                server_address=self.connection.address, insecure=self.connection.insecure,
                root_certificates=certificates, interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
        runs = self._client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
        if run_id not in runs:
            raise FedCustomError(f"the SuperLink lists no run {run_id}")
        state = runs[run_id].status
        text = f"{state.status}:{state.sub_status}" if state.sub_status else state.status
        return {"status": text, "status-details": state.details}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def resume_blockers(cfg: RunConfig) -> list[str]:
    """What a resumed deployment could not continue exactly: state the nodes keep in Flower's per-run context, which
    a new run starts without (the server's own state is in its checkpoint)."""
    from fedcustom.assemble import codecs_for
    from fedcustom.methods import get_method
    from fedcustom.personalize import parse_personalize
    from fedcustom.protocols import protocol_of

    method = get_method(cfg.method.name)
    blockers = []
    if protocol_of(method).name != "parameter_sharing":
        blockers.append(f"--method {method.name} (its clients keep per-run state)")
    if cfg.federation.scaffold:
        blockers.append("--scaffold (each node's control variate)")
    if cfg.privacy.dp_sgd:
        blockers.append("--dp-sgd (each node's privacy accountant)")
    if any(not codec.stateless for codec in codecs_for(cfg, method)):
        blockers.append(f"--codec {cfg.codec.up}/{cfg.codec.down or cfg.codec.up} (each node's link references)")
    if parse_personalize(cfg.federation.personalize).keeps_private:
        blockers.append(f"--personalize {cfg.federation.personalize} (each node's private tensors)")
    return blockers


def resume_run_config(folder: str) -> tuple[RunConfig, dict[str, str]]:
    """`fedcustom submit --resume DIR`: the interrupted run's config and the run config that continues it."""
    from fedcustom.checkpoint import load_checkpoint
    from fedcustom.runner import check_settings_unmoved, resumed_config

    out = Path(folder).expanduser().resolve()
    checkpoint = load_checkpoint(out)
    cfg = resumed_config(out, checkpoint)
    check_settings_unmoved(out, checkpoint, cfg)  # before submitting: else the ServerApp's run fails with it
    blockers = resume_blockers(cfg)
    if blockers:
        raise FedCustomError(f"--resume {folder}: a deployment with {'; '.join(blockers)} cannot continue exactly: "
                             f"the nodes' state of the interrupted run is gone; start the run again instead")
    return cfg, {**config_to_run_config(cfg), RESUME_KEY: str(out)}


def submit(cfg: RunConfig | dict[str, str], connection: Connection, wait: bool = True, poll_seconds: float = 2.0,
           timeout: float | None = None) -> dict:
    """Submit ``cfg`` (or a ready run config, e.g. a retrieval job's) as a run; with ``wait``, block until it
    finishes. Returns {run_id, status[, details]}; a run that did not finish as completed raises FedCustomError
    with Flower's reason."""
    entries = cfg if isinstance(cfg, dict) else config_to_run_config(cfg)
    with tempfile.TemporaryDirectory(prefix="fedcustom-submit-") as tmp:
        home, app, run_config = Path(tmp, "flwr-home"), Path(tmp, "app"), Path(tmp, "run-config.toml")
        home.mkdir()
        app.mkdir()
        (home / "config.toml").write_text(connection.toml())
        (app / "pyproject.toml").write_text(APP_PYPROJECT)
        run_config.write_text("".join(f"{key} = {json.dumps(value)}\n"  # a JSON string is a TOML basic string
                                      for key, value in entries.items()))
        try:
            answer = _flwr(["run", str(app), CONNECTION, "--run-config", str(run_config)], home)
        except FedCustomError as exc:
            raise FedCustomError(f"could not submit to the SuperLink at {connection.address}: {exc}") from None
        run_id = int(answer["run-id"])
        if not wait:
            return {"run_id": run_id, "status": "submitted"}
        deadline = None if timeout is None else time.monotonic() + timeout
        status = RunStatus(connection, home)
        try:
            while True:
                run = status.get(run_id)
                if str(run["status"]).startswith("finished"):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise FedCustomError(f"run {run_id} did not finish within {timeout:g} s (status {run['status']})")
                time.sleep(poll_seconds)
        finally:
            status.close()
        result = {"run_id": run_id, "status": run["status"], "details": run.get("status-details", "")}
        if run["status"] != "finished:completed":
            raise FedCustomError(f"run {run_id} ended {run['status']}: {result['details']}")
        return result
