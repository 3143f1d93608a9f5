"""The local GCP stack: real emulators speaking the real Google APIs, started by the project.

- Pub/Sub: the official emulator shipped with the Google Cloud CLI (Java).
- BigQuery: ``bqemulator`` (DuckDB-backed REST API) from its own virtualenv, because it pins duckdb.
- GCS: ``gcp-storage-emulator``, disk-backed, with GCS's generation rules
  (``pipeline/local/gcs_emulator.py``); its storage root is shared with bqemulator
  (``BQEMU_GCS_LOCAL_ROOT``) so BigQuery load jobs can read ``gs://`` objects.
- In front of each, a recording proxy (``pipeline/local/audit.py``): clients reach the emulators
  only through it, and every call is logged under the identity that made it.

Resources have the names the Terraform gives them for project ``tilestream-local``
(``templates/terraform``, ``name = "tilestream"``; a test keeps them equal), so a call recorded
here is a call on the production resource of the same name. Each stack lives in a run directory
(ports, PIDs, logs, data, audit) so several can run at once, e.g. a test session beside a demo.
Ports are free ones chosen at start; every process is the leader of its own process group, so
``down`` stops exactly what ``up`` started, children included.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = "stack.json"
DEFAULT_PROJECT = "tilestream-local"
NAME = "tilestream"  # the Terraform's var.name
INPUT_PREFIX, OUTPUT_PREFIX, REGISTRY_PREFIX = "incoming", "output", "registry"  # its prefixes
READY_TIMEOUT_S = 60.0
# Every process a stack starts carries its run directory in this variable (its children inherit
# it), so `down` finds all of them, also those of a start that never recorded its PIDs.
STACK_ENV = "TILESTREAM_STACK_OF"
LOCK_FILE = "stack.lock"
# A second `up` of the same run directory waits this long for the first to finish starting (then
# finds it running); `down` waits as long for an `up` under way.
LOCK_WAIT_S = 3 * READY_TIMEOUT_S


class StackError(RuntimeError):
    """The local stack could not be started, found or reached."""


@dataclass
class LocalStack:
    """A running (or recorded) local stack; ``stack.json`` in ``run_dir`` is this, serialised."""

    run_dir: str
    project: str = DEFAULT_PROJECT
    pubsub_port: int = 0  # what clients reach: the recording proxies
    bigquery_port: int = 0
    gcs_port: int = 0
    pubsub_upstream_port: int = 0  # the emulators behind them
    bigquery_upstream_port: int = 0
    bigquery_grpc_port: int = 0
    gcs_upstream_port: int = 0
    # Terraform's names (templates/terraform, var.name "tilestream", var.project the project)
    bucket: str = f"{DEFAULT_PROJECT}-{NAME}-tiles"
    models_bucket: str = f"{DEFAULT_PROJECT}-{NAME}-models"
    dataflow_bucket: str = f"{DEFAULT_PROJECT}-{NAME}-dataflow"
    dataset: str = "tilestream"
    topic: str = f"{NAME}-tiles"
    subscription: str = f"{NAME}-tiles-sub"
    dead_letter_topic: str = f"{NAME}-tiles-dead-letter"
    # Not a field: stack.json must stay readable by the previous release, whose LocalStack
    # takes exactly its own fields (docs/operations.md, "Releases and their predecessors").
    results_topic: ClassVar[str] = f"{NAME}-results"
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def pubsub_host(self) -> str:
        return f"127.0.0.1:{self.pubsub_port}"

    @property
    def bigquery_url(self) -> str:
        return f"http://127.0.0.1:{self.bigquery_port}"

    @property
    def gcs_url(self) -> str:
        return f"http://127.0.0.1:{self.gcs_port}"

    @property
    def output_prefix(self) -> str:
        """Where the stream writes, as on GCP: the output prefix of the tiles bucket."""
        return f"gs://{self.bucket}/{OUTPUT_PREFIX}"

    @property
    def registry_prefix(self) -> str:
        """The model registry, as on GCP: the registry prefix of the models bucket."""
        return f"gs://{self.models_bucket}/{REGISTRY_PREFIX}"

    @property
    def temp_location(self) -> str:
        return f"gs://{self.dataflow_bucket}/tmp"

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    @property
    def subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.subscription}"

    @property
    def subscription_b_path(self) -> str:
        """The second blue-green slot (templates/terraform/releases.tf): a green release's
        job reads it while the live one reads :attr:`subscription_path`."""
        return f"{self.subscription_path}-b"

    @property
    def dead_letter_topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.dead_letter_topic}"

    @property
    def dead_letter_subscription_path(self) -> str:
        """Where messages Pub/Sub gave up on wait to be read (``tilestream stats`` reports them)."""
        return f"projects/{self.project}/subscriptions/{self.dead_letter_topic}-sub"

    @property
    def results_topic_path(self) -> str:
        """Where a local stream publishes its events (``--results_topic``, docs/results.md)."""
        return f"projects/{self.project}/topics/{self.results_topic}"

    def env(self) -> dict[str, str]:
        """Environment that points Google clients, Beam and GDAL at this stack."""
        return {
            "TILESTREAM_STACK_DIR": self.run_dir,
            "GOOGLE_CLOUD_PROJECT": self.project,
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "PUBSUB_PROJECT_ID": self.project,
            "STORAGE_EMULATOR_HOST": self.gcs_url,
            "BIGQUERY_EMULATOR_HOST": self.bigquery_url,
            "NO_GCE_CHECK": "true",
            "CPL_GS_ENDPOINT": self.gcs_url + "/",
            "GS_NO_SIGN_REQUEST": "YES",
        }

    # Clients bound to this stack explicitly (not through os.environ), so two stacks can be
    # driven from one process.
    # Every client carries the identity of the thread that uses it (pipeline/local/patches.py).
    def publisher(self, identity: str | None = None):
        """A publisher; ``identity`` fixes who its calls are (its batches are sent from a
        thread of its own, outside any ``acting_as`` block)."""
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        from pipeline.local.identity import identity_channel

        channel = identity_channel(self.pubsub_host, identity=identity)
        return pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=channel))

    def subscriber(self):
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        from pipeline.local.identity import identity_channel

        channel = identity_channel(self.pubsub_host)
        return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))

    def bigquery(self):
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        from pipeline.local.identity import IDENTITY

        IDENTITY.install()
        return bigquery.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=self.bigquery_url),
        )

    def storage(self):
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        from pipeline.local.identity import IDENTITY

        IDENTITY.install()
        return storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=self.gcs_url),
        )

    def save(self) -> None:
        Path(self.run_dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def default_run_dir() -> Path:
    return Path(os.environ.get("TILESTREAM_STACK_DIR") or Path.cwd() / ".tilestream" / "stack")


def load(run_dir: str | Path | None = None) -> LocalStack:
    path = Path(run_dir or default_run_dir()).resolve() / STATE_FILE
    if not path.exists():
        raise StackError(f"no local stack recorded in {path.parent} (run `tilestream local up`)")
    return LocalStack(**json.loads(path.read_text()))


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all sockets stay bound until every port is picked, so the
    kernel cannot hand the same port out twice (two emulators on one port looked like a Pub/Sub
    emulator answering in gRPC)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def pubsub_emulator_command() -> list[str]:
    """The Cloud SDK's Pub/Sub emulator launcher (runs Java directly, no gcloud wrapper)."""
    candidates = [os.environ.get("TILESTREAM_PUBSUB_EMULATOR", "")]
    gcloud = shutil.which("gcloud")
    if gcloud:
        sdk_root = Path(os.path.realpath(gcloud)).parents[1]
        candidates.append(str(sdk_root / "platform/pubsub-emulator/bin/cloud-pubsub-emulator"))
    candidates += [
        shutil.which("cloud-pubsub-emulator") or "",
        "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return [candidate]
    raise StackError(
        "Pub/Sub emulator not found: install it with `apt-get install "
        "google-cloud-cli-pubsub-emulator` or `gcloud components install pubsub-emulator` "
        "(it needs Java 11+), or set TILESTREAM_PUBSUB_EMULATOR to its launcher"
    )


def bqemulator_venv() -> Path:
    return Path(os.environ.get("TILESTREAM_BQEMU_VENV") or REPO_ROOT / ".venv-bqemu")


def _bqemulator_home(run_dir: Path) -> Path:
    """A HOME whose DuckDB extension directory already holds spatial and avro.

    bqemulator loads them at start and would otherwise try to download them.
    """
    venv = bqemulator_venv()
    exts = glob.glob(
        str(venv / "lib/python*/site-packages/duckdb_extension_*/extensions/v*/*.duckdb_extension")
    )
    if not exts:
        raise StackError(
            f"DuckDB extensions not found in {venv}; run `make install` "
            "(pip install duckdb-extension-spatial==1.5.5 duckdb-extension-avro==1.5.5)"
        )
    home = run_dir / "bq-home"
    for ext in exts:
        version = Path(ext).parent.name  # e.g. v1.5.5
        target = home / ".duckdb" / "extensions" / version / "linux_amd64"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ext, target / Path(ext).name)
    return home


def _spawn(name: str, argv: list[str], run_dir: Path, env: dict[str, str],
           cwd: Path | None = None) -> int:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            cwd=cwd or run_dir,
            env={**os.environ, **env, STACK_ENV: str(run_dir)},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):
        # Not ready yet, or something else answers on the port: an emulator that lost the port
        # exits, and _wait_ready reports it.
        return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _health_checks(stack: LocalStack) -> dict[str, Callable[[], bool]]:
    """Each emulator answering on its own port, each proxy listening on the public one."""
    emulator = "http://127.0.0.1:{}"
    return {
        "pubsub": lambda: _http_ok(emulator.format(stack.pubsub_upstream_port) + "/"),
        "bigquery": lambda: _http_ok(
            emulator.format(stack.bigquery_upstream_port)
            + f"/bigquery/v2/projects/{stack.project}/datasets"),
        "gcs": lambda: _http_ok(emulator.format(stack.gcs_upstream_port)
                                + f"/storage/v1/b?project={stack.project}"),
        "pubsub-proxy": lambda: _listening(stack.pubsub_port),
        "bigquery-proxy": lambda: _listening(stack.bigquery_port),
        "gcs-proxy": lambda: _listening(stack.gcs_port),
    }


@contextlib.contextmanager
def hold(run_dir: str | Path, what: str = "stack", wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold ``run_dir``'s lock for ``what`` (``stack``: up and down; ``demo``: a whole demo).

    Waits up to ``wait_s`` for another holder (0: not at all), then refuses with its PID. The
    kernel releases the lock when its holder exits, however it exits.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / (LOCK_FILE if what == "stack" else f"{what}.lock")
    with open(path, "a+") as lock:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    lock.seek(0)
                    holder = lock.read().strip() or "?"
                    raise StackError(
                        f"{run_dir} is in use by another {what} (pid {holder}); wait for it to "
                        f"finish, or give this one its own directory") from None
                time.sleep(0.2)
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def _commands(stack: LocalStack) -> dict[str, tuple[list[str], Path, dict[str, str]]]:
    """How each process of the stack starts: (argv, working directory, environment)."""
    run_dir = Path(stack.run_dir)
    gcs_root = run_dir / "gcs"
    bq_venv = bqemulator_venv()
    if not (bq_venv / "bin/bqemulator").exists():
        raise StackError(f"bqemulator not found in {bq_venv}; run `make install`")
    commands = {
        "pubsub": ([*pubsub_emulator_command(), "--host=127.0.0.1",
                    f"--port={stack.pubsub_upstream_port}"], run_dir, {}),
        "bigquery": ([str(bq_venv / "bin/bqemulator"), "start",
                      "--rest-port", str(stack.bigquery_upstream_port),
                      "--grpc-port", str(stack.bigquery_grpc_port),
                      "--project", stack.project, "--log-level", "warning"],
                     run_dir, {"HOME": str(_bqemulator_home(run_dir)),
                               "BQEMU_GCS_LOCAL_ROOT": str(gcs_root / ".cloudstorage")}),
        "gcs": ([sys.executable, "-m", "pipeline.local.gcs_emulator", "start", "--host",
                 "127.0.0.1", "--port", str(stack.gcs_upstream_port), "--quiet"],
                gcs_root, {"STORAGE_BASE": str(gcs_root)}),
    }
    for service, protocol, listen, upstream in (
            ("storage", "http", stack.gcs_port, stack.gcs_upstream_port),
            ("bigquery", "http", stack.bigquery_port, stack.bigquery_upstream_port),
            ("pubsub", "grpc", stack.pubsub_port, stack.pubsub_upstream_port)):
        commands[f"{'gcs' if service == 'storage' else service}-proxy"] = (
            [sys.executable, "-m", "pipeline.local.audit", protocol, f"--listen={listen}",
             f"--upstream={upstream}", f"--service={service}", f"--run_dir={run_dir}"],
            run_dir, {})
    return commands


def up(run_dir: str | Path | None = None, project: str = DEFAULT_PROJECT) -> LocalStack:
    """Start the three emulators, wait until they answer, create the resources; idempotent.

    A recorded stack whose servers all answer is kept; one with dead servers gets those
    restarted on their ports (the live ones keep their data); if that fails, a fresh stack.
    Two ``up`` of one run directory at once: the second waits for the first, then finds it up.
    """
    run_dir = Path(run_dir or default_run_dir()).resolve()
    with hold(run_dir):
        if (run_dir / STATE_FILE).exists():
            existing = load(run_dir)
            health = status(existing)
            if all(health.values()):
                ensure_resources(existing)
                return existing
            try:
                return _restart_dead(existing, [n for n, ok in health.items() if not ok])
            except (StackError, OSError):
                _down(run_dir)
        return _start(run_dir, project)


def _restart_dead(stack: LocalStack, dead: list[str]) -> LocalStack:
    commands = _commands(stack)
    run_dir = Path(stack.run_dir)
    if "pubsub" in dead:  # a fresh Pub/Sub: the journal is about messages it never had
        shutil.rmtree(run_dir / "journal", ignore_errors=True)
    for name in dead:
        _stop_groups([stack.pids[name]])
        argv, cwd, env = commands[name]
        stack.pids[name] = _spawn(name, argv, run_dir, env, cwd)
    stack.save()
    _wait_ready(stack)
    ensure_resources(stack)
    return stack


def _start(run_dir: Path, project: str) -> LocalStack:
    _down(run_dir)  # whatever an earlier start left running, recorded or not
    # Fresh emulators have a fresh Pub/Sub (message ids start over): a journal of messages an
    # earlier incarnation pulled is about another stack and must not be replayed into this one.
    shutil.rmtree(run_dir / "journal", ignore_errors=True)
    (run_dir / "gcs").mkdir(exist_ok=True)
    ports = _free_ports(7)
    stack = LocalStack(
        run_dir=str(run_dir),
        project=project,
        pubsub_port=ports[0], bigquery_port=ports[1], gcs_port=ports[2],
        pubsub_upstream_port=ports[3], bigquery_upstream_port=ports[4],
        bigquery_grpc_port=ports[5], gcs_upstream_port=ports[6],
        bucket=f"{project}-{NAME}-tiles", models_bucket=f"{project}-{NAME}-models",
        dataflow_bucket=f"{project}-{NAME}-dataflow",
    )
    shutil.rmtree(run_dir / "audit", ignore_errors=True)  # the calls of this stack only
    try:
        for name, (argv, cwd, env) in _commands(stack).items():
            stack.pids[name] = _spawn(name, argv, run_dir, env, cwd)
            stack.save()  # each PID as soon as it exists
        _wait_ready(stack)
        ensure_resources(stack)
    except BaseException:
        _down(run_dir)
        raise
    return stack


def require_up(stack: LocalStack) -> None:
    """Raise, naming the servers that do not answer and the fix, unless all of the stack does."""
    dead = sorted(name for name, ok in status(stack).items() if not ok)
    if dead:
        raise StackError(
            f"the local stack in {stack.run_dir} is down in part: {', '.join(dead)} not "
            f"answering; `tilestream local up --stack_dir={stack.run_dir}` restarts dead servers")


def _wait_ready(stack: LocalStack) -> None:
    pending = _health_checks(stack)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            if not _alive(stack.pids[name]):
                log = Path(stack.run_dir, "logs", f"{name}.log").read_text(errors="replace")
                raise StackError(f"{name} emulator exited during start:\n{log[-2000:]}")
            if pending[name]():
                del pending[name]
        time.sleep(0.2)
    if pending:
        raise StackError(f"emulators not ready after {READY_TIMEOUT_S:.0f}s: {sorted(pending)}")


def ensure_resources(stack: LocalStack) -> None:
    """Topics (tiles, dead letters, results), subscription, bucket and dataset the pipeline
    needs."""
    from google.api_core.exceptions import AlreadyExists, Conflict
    from google.cloud import bigquery

    publisher = stack.publisher()
    for topic in (stack.topic_path, stack.dead_letter_topic_path, stack.results_topic_path):
        try:
            publisher.create_topic(name=topic)
        except AlreadyExists:
            pass
    subscriber = stack.subscriber()
    for slot in (stack.subscription_path, stack.subscription_b_path):
        try:
            subscriber.create_subscription(
                request={
                    "name": slot,
                    "topic": stack.topic_path,
                    # Short: a local stream killed mid-pull leaves the emulator an orphaned
                    # pull; what it took is redelivered after this deadline.
                    "ack_deadline_seconds": 10,
                    "dead_letter_policy": {
                        "dead_letter_topic": stack.dead_letter_topic_path,
                        "max_delivery_attempts": 5,
                    },
                }
            )
        except AlreadyExists:
            pass
    try:  # without a subscriber, the dead-letter topic would swallow what it is given
        subscriber.create_subscription(request={"name": stack.dead_letter_subscription_path,
                                                "topic": stack.dead_letter_topic_path,
                                                "ack_deadline_seconds": 10})
    except AlreadyExists:
        pass
    for bucket in (stack.bucket, stack.models_bucket, stack.dataflow_bucket):
        try:
            stack.storage().create_bucket(bucket)
        except Conflict:
            pass
    stack.bigquery().create_dataset(bigquery.Dataset(f"{stack.project}.{stack.dataset}"),
                                    exists_ok=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (the emulator and anything it forked)."""
    members = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(Path(stat).parent.name))
    return members


def status(stack: LocalStack) -> dict[str, bool]:
    checks = _health_checks(stack)
    return {name: _alive(pid) and checks[name]() for name, pid in stack.pids.items()}


def down(run_dir: str | Path | None = None, timeout_s: float = 10.0) -> list[int]:
    """Stop every process this stack started (recorded or not); returns the PIDs signalled."""
    run_dir = Path(run_dir or default_run_dir()).resolve()
    if not run_dir.is_dir():
        return []
    with hold(run_dir):
        return _down(run_dir, timeout_s)


def _down(run_dir: Path, timeout_s: float = 10.0) -> list[int]:
    recorded = []
    with contextlib.suppress(StackError, ValueError, TypeError):
        recorded = list(load(run_dir).pids.values())
    stopped = _stop_groups([*recorded, *started_by(run_dir)], timeout_s)
    Path(run_dir, STATE_FILE).unlink(missing_ok=True)
    return stopped


def started_by(run_dir: str | Path) -> list[int]:
    """Live processes that carry ``run_dir`` as their stack (:data:`STACK_ENV`)."""
    marker = f"{STACK_ENV}={Path(run_dir).resolve()}".encode()
    found = []
    for environ in glob.glob("/proc/[0-9]*/environ"):
        try:
            if marker in Path(environ).read_bytes().split(b"\0"):
                found.append(int(Path(environ).parent.name))
        except (OSError, ValueError):
            continue  # gone, or not ours to read
    return [pid for pid in found if _alive(pid)]


def _stop_groups(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """SIGTERM the process group of each PID (and the PID), SIGKILL what is left after
    ``timeout_s``; returns those signalled."""
    signalled = []
    for pid in dict.fromkeys(pids):
        if group_members(pid) or _alive(pid):
            signalled.append(pid)
            _signal_group(pid, signal.SIGTERM)
            _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(group_members(p) or _alive(p) for p in signalled) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in signalled:
        if group_members(pid):
            _signal_group(pid, signal.SIGKILL)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    return signalled


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
