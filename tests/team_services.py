"""The team set-up's services on loopback: PostgreSQL, an S3 endpoint (moto) and an MLflow server.

    python tests/team_services.py [DIR]   # start all three on 127.0.0.1, print the settings to
                                          # use, stop them all on Ctrl-C (`make team-services`);
                                          # their logs go to DIR, kept (default: a temporary folder)

tests/test_team.py runs the whole team flow against them. Real components, throw-away state:
PostgreSQL from the system's package, `initdb` into a temporary folder and listening on 127.0.0.1
only (no Unix socket); `moto[server]` as the S3 endpoint, holding its objects in memory; `mlflow
server` with the database as its backend store and a bucket as its artifact store, serving the
artifacts itself, so its clients need no S3 credentials. Every process runs in its own process
group and is stopped, group and all, when the `services()` block is left, also on failure; every
wait is bounded. Durability is traded for speed (fsync off): nothing here is meant to be kept.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
BUCKET = "rnn-team"
# moto accepts any credentials; real ones are never wanted here.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}
START_TIMEOUT_S = 180.0     # ~15 s idle for all three; far more on a loaded 2-core machine
STOP_TIMEOUT_S = 15.0
PYTHON_MODULES = {"psycopg": "psycopg[binary]", "boto3": "boto3", "moto": "moto[server]", "dvc_s3": "dvc-s3"}


@dataclass(frozen=True)
class Services:
    database_uri: str       # postgresql+psycopg://mlflow@127.0.0.1:<port>/mlflow
    s3_endpoint: str        # http://127.0.0.1:<port>
    bucket: str
    tracking_uri: str       # http://127.0.0.1:<port>, the MLflow server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path | None:
    """The folder holding initdb and postgres: $PG_BINDIR, Debian's newest /usr/lib/postgresql/<v>/bin,
    or wherever initdb is on PATH."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent.name),
                         reverse=True)
    candidates.append(str(Path(shutil.which("initdb") or "/nonexistent").resolve().parent))
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "postgres").is_file():
            return Path(folder)
    return None


def _version(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in name.split("."))


def missing() -> str | None:
    """Why the services cannot run here, or None."""
    if postgres_bindir() is None:
        return ("PostgreSQL server binaries not found (apt-get install postgresql, or set PG_BINDIR "
                "to the folder holding initdb)")
    absent = [pkg for module, pkg in PYTHON_MODULES.items() if importlib.util.find_spec(module) is None]
    if absent:
        return f"missing Python packages: {', '.join(absent)} (pip install -e '.[dev]')"
    return None


def _database_user() -> str | None:
    """initdb refuses to run as root: then the server runs as the `postgres` account (Debian's
    package creates it), else `nobody`. None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists")


def _spawn(stack: contextlib.ExitStack, name: str, args: list[str], log_dir: Path, env: dict,
           user: str | None = None) -> subprocess.Popen:
    log = stack.enter_context(open(log_dir / f"{name}.log", "wb"))
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, user=user)
    stack.callback(stop_group, proc)
    return proc


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process's group (server, workers, backends), SIGKILL what is left after a while."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:           # children may outlive the leader briefly
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT_S)


def _wait(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.3)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def start_postgres(stack: contextlib.ExitStack, log_dir: Path) -> str:
    """initdb into a fresh folder, run the server on 127.0.0.1 only, create database `mlflow`;
    returns its SQLAlchemy URI."""
    import psycopg

    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError(missing())
    user = _database_user()
    # Not under the caller's folder: pytest's tmp folders are private to root, the server's user
    # could not enter them.
    data = Path(tempfile.mkdtemp(prefix="rnn-team-pg-"))
    stack.callback(shutil.rmtree, data, True)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust",
                           "--no-locale", "-E", "UTF8", "--no-sync"],
                          env=env, capture_output=True, text=True, timeout=120, user=user, cwd="/")
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")
    port = free_port()
    proc = _spawn(stack, "postgres", [
        str(bindir / "postgres"), "-D", str(data), "-p", str(port),
        "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=",
        "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
    ], log_dir, env, user=user)
    conninfo = f"host={HOST} port={port} user=mlflow dbname=postgres connect_timeout=5"

    def accepting() -> bool:
        with psycopg.connect(conninfo):
            return True

    _wait("postgres", accepting, proc, log_dir / "postgres.log")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("CREATE DATABASE mlflow")
    return f"postgresql+psycopg://mlflow@{HOST}:{port}/mlflow"


def start_s3(stack: contextlib.ExitStack, log_dir: Path, bucket: str = BUCKET) -> str:
    """moto's S3 server on 127.0.0.1 with one empty bucket; returns the endpoint URL."""
    import boto3

    port = free_port()
    env = {**os.environ, **S3_CREDENTIALS}
    proc = _spawn(stack, "moto", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)], log_dir, env)
    endpoint = f"http://{HOST}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    _wait("moto", lambda: s3.list_buckets() is not None, proc, log_dir / "moto.log")
    s3.create_bucket(Bucket=bucket)
    return endpoint


def start_mlflow(stack: contextlib.ExitStack, log_dir: Path, database_uri: str, s3_endpoint: str,
                 bucket: str = BUCKET) -> str:
    """`mlflow server` on 127.0.0.1: runs in the database, artifacts in s3://<bucket>/mlartifacts,
    served through the server (`mlflow-artifacts:`), so only the server holds S3 settings."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(S3_CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3_endpoint,
               # The server's background job runner is not needed and would add processes.
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = _spawn(stack, "mlflow", [
        sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", database_uri, "--artifacts-destination", f"s3://{bucket}/mlartifacts",
    ], log_dir, env)
    uri = f"http://{HOST}:{port}"

    def healthy() -> bool:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
            return response.status == 200

    _wait("mlflow server", healthy, proc, log_dir / "mlflow.log")
    return uri


@contextlib.contextmanager
def services(log_dir: Path) -> Iterator[Services]:
    """PostgreSQL, S3 and MLflow on loopback for the block's duration; logs in log_dir/<name>.log."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        database_uri = start_postgres(stack, log_dir)
        s3_endpoint = start_s3(stack, log_dir)
        tracking_uri = start_mlflow(stack, log_dir, database_uri, s3_endpoint)
        yield Services(database_uri, s3_endpoint, BUCKET, tracking_uri)


def main() -> None:
    reason = missing()
    if reason:
        sys.exit(f"error: {reason}")
    keep_logs = len(sys.argv) > 1
    log_dir = Path(sys.argv[1] if keep_logs else tempfile.mkdtemp(prefix="rnn-team-"))
    stop = []
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.append(1))
    with services(log_dir) as s:
        print(f"""PostgreSQL  {s.database_uri}
S3 (moto)   {s.s3_endpoint}  bucket {s.bucket}
MLflow      {s.tracking_uri}  (UI and API; artifacts in s3://{s.bucket}/mlartifacts)
logs        {log_dir}

In each project clone:
  dvc remote add -d storage s3://{s.bucket}/dvc
  dvc remote modify storage endpointurl {s.s3_endpoint}
  dvc remote modify --local storage access_key_id testing
  dvc remote modify --local storage secret_access_key testing
  export MLFLOW_TRACKING_URI={s.tracking_uri}

Ctrl-C stops all three (their data goes with them).""", flush=True)
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    if not keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
