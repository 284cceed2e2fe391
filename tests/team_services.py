"""The team set-up's services on loopback: PostgreSQL, an S3 endpoint (moto) and an MLflow server.

    python tests/team_services.py [DIR] [--user NAME ...]
        # start all three on 127.0.0.1 with an MLflow account per NAME (default: none), print
        # the settings to use, stop them all on Ctrl-C (`make team-services`); their logs go to
        # DIR, kept (default: a temporary folder)

tests/test_team.py runs the whole team flow against them. Real components, throw-away state:
PostgreSQL from the system's package, `initdb` into a temporary folder and listening on 127.0.0.1
only (no Unix socket); `moto[server]` as the S3 endpoint, holding its objects in memory; `mlflow
server` with the database as its backend store and a bucket as its artifact store, serving the
artifacts itself, so its clients need no S3 credentials. Every process runs in its own process
group and is stopped, group and all, when the `services()` block is left, also on failure; every
wait is bounded. Durability is traded for speed (fsync off): nothing here is meant to be kept.

Nothing answers without a password (docs/team-security.md):
- PostgreSQL: scram-sha-256 for every connection. Its superuser's password is generated for
  set-up and then forgotten; MLflow connects as `mlflow`, a role that is no superuser (a superuser
  can run shell commands), may create neither roles nor databases, and owns exactly two databases:
  `mlflow` (runs) and `mlflow_auth` (MLflow's accounts and permissions: one database server to
  secure and back up, not a second store in a file). Its password is in a 0600 pgpass file
  (PGPASSFILE), so no URI or command line holds it. The sweep workers' Optuna studies
  (docs/sweeps.md) are in a database `optuna` of their own, owned by a role `sweeps` as
  unprivileged as MLflow's, whose password is in a pgpass file of its own: a machine that runs
  trials can read and write studies, not MLflow's tables.
- MLflow: the basic-auth app. An `admin` account with a generated password, one account per person
  or machine (`add_user`), credentials given to clients as MLFLOW_TRACKING_USERNAME/PASSWORD or in
  a credentials file. default_permission READ: whoever creates an experiment manages it (MLflow
  grants its creator MANAGE), everyone else may read it; writing to it takes a grant
  (`share_experiments`).
Every secret is generated here, lives in memory or in 0600 files in a 0700 temporary folder, and
goes with the services; none is ever on a command line (where `ps` shows it), in params.yaml or git.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
BUCKET = "rnn-team"
# moto accepts any credentials; real ones are never wanted here.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}
START_TIMEOUT_S = 180.0     # ~15 s idle for all three; far more on a loaded 2-core machine
STOP_TIMEOUT_S = 15.0
PYTHON_MODULES = {"psycopg": "psycopg[binary]", "boto3": "boto3", "moto": "moto[server]", "dvc_s3": "dvc-s3",
                  "flask_wtf": "mlflow[auth]"}
DB_ROLE = "mlflow"                              # PostgreSQL's role for MLflow, no superuser
DATABASES = ("mlflow", "mlflow_auth")           # runs; MLflow's accounts and permissions
SWEEP_ROLE, SWEEP_DATABASE = "sweeps", "optuna"  # the sweep workers' role and their studies' database
ADMIN = "admin"                                 # MLflow's admin account
# Seconds a checked password is trusted (per server worker): each check costs ~0.1 s of CPU
# (scrypt), and the pipeline sends hundreds of requests. With one worker a password changed or a
# user deleted through the API takes effect at once (the worker drops its cache entry).
AUTH_CACHE_TTL_S = 300
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Credentials:
    """An MLflow account: what a client sends in each request's Authorization header."""
    username: str
    password: str = field(repr=False)

    def env(self) -> dict[str, str]:
        """The variables MLflow's clients read (they win over ~/.mlflow/credentials)."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}

    def header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def write(self, path: Path) -> Path:
        """MLflow's credentials file format (~/.mlflow/credentials), mode 0600."""
        return write_secret(path, f"[mlflow]\nmlflow_tracking_username = {self.username}\n"
                                  f"mlflow_tracking_password = {self.password}\n")


@dataclass(frozen=True)
class Services:
    database_uri: str       # postgresql+psycopg://mlflow@127.0.0.1:<port>/mlflow (password: pgpass)
    sweep_storage: str      # postgresql+psycopg://sweeps@127.0.0.1:<port>/optuna (password: sweeps.pgpass)
    s3_endpoint: str        # http://127.0.0.1:<port>
    bucket: str
    tracking_uri: str       # http://127.0.0.1:<port>, the MLflow server
    admin: Credentials      # MLflow's admin account
    secrets: Path           # 0700 folder: pgpass (role mlflow), sweeps.pgpass (role sweeps),
                            # basic_auth.ini (0600 each)


def new_password() -> str:
    """32 random URL-safe characters (192 bits): no ':' or '\\' to escape in a pgpass line."""
    return secrets.token_urlsafe(24)


def write_secret(path: Path, text: str) -> Path:
    """Write a new file that only its owner may read (0600 from the start, no window)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


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
           user: str | None = None, stop_signal: int = signal.SIGTERM) -> subprocess.Popen:
    log = stack.enter_context(open(log_dir / f"{name}.log", "wb"))
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, user=user)
    stack.callback(stop_group, proc, stop_signal)
    return proc


def stop_group(proc: subprocess.Popen, stop_signal: int = signal.SIGTERM) -> None:
    """Signal the process's group (server, workers, backends) to stop, SIGKILL what is left after a while."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, stop_signal)
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


def start_postgres(stack: contextlib.ExitStack, log_dir: Path, secret_dir: Path) -> tuple[str, str]:
    """initdb into a fresh folder with password authentication (scram-sha-256), run the server on
    127.0.0.1 only, create the role `mlflow` and its databases (DATABASES), and the role `sweeps`
    and its database `optuna` (the sweep workers' Optuna studies, docs/sweeps.md); their passwords
    go to <secret_dir>/pgpass and <secret_dir>/sweeps.pgpass, a file each, so the machines get the
    studies' password and not MLflow's. Returns the SQLAlchemy URIs of databases `mlflow` and
    `optuna`, without passwords: libpq finds them through PGPASSFILE."""
    import psycopg
    from psycopg import sql

    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError(missing())
    user = _database_user()
    # Not under the caller's folder: pytest's tmp folders are private to root, the server's user
    # could not enter them.
    base = Path(tempfile.mkdtemp(prefix="rnn-team-pg-"))
    stack.callback(shutil.rmtree, base, True)
    data, pwfile = base / "data", base / "superuser-password"
    superuser_password = new_password()      # for the set-up below only, then forgotten
    write_secret(pwfile, superuser_password + "\n")
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (base, pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                           "--auth=scram-sha-256", f"--pwfile={pwfile}",
                           "--no-locale", "-E", "UTF8", "--no-sync"],
                          env=env, capture_output=True, text=True, timeout=120, user=user, cwd="/")
    pwfile.unlink()
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")
    port = free_port()
    # Stopped by SIGINT, PostgreSQL's fast shutdown: after SIGTERM it would wait for every client to
    # disconnect (a connection pool left open in a test never does) until stop_group's SIGKILL.
    proc = _spawn(stack, "postgres", [
        str(bindir / "postgres"), "-D", str(data), "-p", str(port),
        "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=",
        "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
    ], log_dir, env, user=user, stop_signal=signal.SIGINT)
    superuser = {"host": HOST, "port": port, "user": "postgres", "password": superuser_password,
                 "dbname": "postgres", "connect_timeout": 5}

    def accepting() -> bool:
        with psycopg.connect(**superuser):
            return True

    _wait("postgres", accepting, proc, log_dir / "postgres.log")
    passwords = {DB_ROLE: new_password(), SWEEP_ROLE: new_password()}
    with psycopg.connect(**superuser, autocommit=True) as conn:
        for role, databases in ((DB_ROLE, DATABASES), (SWEEP_ROLE, (SWEEP_DATABASE,))):
            # The server stores only this SCRAM verifier; the password itself never reaches it (nor
            # its logs).
            verifier = conn.pgconn.encrypt_password(passwords[role].encode(), role.encode(), b"scram-sha-256")
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                                 "PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier.decode())))
            for name in databases:
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(role)))
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
    write_secret(secret_dir / "pgpass", f"{HOST}:{port}:*:{DB_ROLE}:{passwords[DB_ROLE]}\n")
    write_secret(secret_dir / "sweeps.pgpass", f"{HOST}:{port}:{SWEEP_DATABASE}:{SWEEP_ROLE}:{passwords[SWEEP_ROLE]}\n")
    return (f"postgresql+psycopg://{DB_ROLE}@{HOST}:{port}/{DATABASES[0]}",
            f"postgresql+psycopg://{SWEEP_ROLE}@{HOST}:{port}/{SWEEP_DATABASE}")


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
                 secret_dir: Path, bucket: str = BUCKET) -> tuple[str, Credentials]:
    """`mlflow server` with its basic-auth app on 127.0.0.1: runs in the database, artifacts in
    s3://<bucket>/mlartifacts, served through the server (`mlflow-artifacts:`), so only the server
    holds S3 settings. Accounts and permissions in database `mlflow_auth`, an admin account with a
    generated password. Returns the server's URL and the admin's credentials."""
    admin = Credentials(ADMIN, new_password())
    auth_database_uri = database_uri.rsplit("/", 1)[0] + "/" + DATABASES[1]
    config = write_secret(secret_dir / "basic_auth.ini", f"""[mlflow]
default_permission = READ
database_uri = {auth_database_uri}
admin_username = {admin.username}
admin_password = {admin.password}
auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}
""")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    env.update(S3_CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3_endpoint,
               PGPASSFILE=str(secret_dir / "pgpass"), MLFLOW_AUTH_CONFIG_PATH=str(config),
               # Signs the UI's forms (CSRF); a variable, MLflow reads it from nowhere else.
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(32),
               # The server's background job runner is not needed and would add processes.
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = _spawn(stack, "mlflow", [
        sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
        "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", database_uri, "--artifacts-destination", f"s3://{bucket}/mlartifacts",
    ], log_dir, env)
    uri = f"http://{HOST}:{port}"

    def healthy() -> bool:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
            return response.status == 200

    _wait("mlflow server", healthy, proc, log_dir / "mlflow.log")
    return uri, admin


@contextlib.contextmanager
def services(log_dir: Path) -> Iterator[Services]:
    """PostgreSQL, S3 and MLflow on loopback for the block's duration; logs in log_dir/<name>.log."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        secret_dir = Path(tempfile.mkdtemp(prefix="rnn-team-secrets-"))      # 0700
        stack.callback(shutil.rmtree, secret_dir, True)
        database_uri, sweep_storage = start_postgres(stack, log_dir, secret_dir)
        s3_endpoint = start_s3(stack, log_dir)
        tracking_uri, admin = start_mlflow(stack, log_dir, database_uri, s3_endpoint, secret_dir)
        yield Services(database_uri, sweep_storage, s3_endpoint, BUCKET, tracking_uri, admin, secret_dir)


def call(tracking_uri: str, path: str, method: str = "GET", who: Credentials | None = None,
         body: dict | None = None) -> tuple[int, dict]:
    """One request to the MLflow server's REST API as `who` (None: anonymous): (HTTP status, JSON
    answer, {} when it is none). A GET sends body as its query string."""
    url = tracking_uri + path
    data = None
    if body is not None and method == "GET":
        url += "?" + urllib.parse.urlencode(body)
    elif body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if who is not None:
        request.add_header("Authorization", who.header())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    try:
        return status, json.loads(text or b"{}")
    except ValueError:
        return status, {"text": text.decode(errors="replace")[:500]}


def _expect_ok(what: str, answer: tuple[int, dict]) -> dict:
    status, body = answer
    if status != 200:
        raise RuntimeError(f"{what}: HTTP {status} {body}")
    return body


def add_user(tracking_uri: str, admin: Credentials, username: str) -> Credentials:
    """A new MLflow account with a generated password (the admin's call)."""
    user = Credentials(username, new_password())
    _expect_ok(f"creating MLflow user {username!r}", call(
        tracking_uri, "/api/2.0/mlflow/users/create", "POST", admin,
        {"username": user.username, "password": user.password}))
    return user


def share_experiments(tracking_uri: str, owner: Credentials, names: Iterable[str], usernames: Iterable[str],
                      permission: str = "EDIT") -> dict[str, str]:
    """Give each user `permission` on the experiments named (READ, EDIT: log runs to them; MANAGE:
    also delete, and share). The owner is whoever manages them: their creator, or the admin, who
    creates the ones missing (then owned by no one else). Returns {name: experiment id}."""
    usernames = list(usernames)
    ids = {}
    for name in names:
        status, body = call(tracking_uri, "/api/2.0/mlflow/experiments/get-by-name", "GET", owner,
                            {"experiment_name": name})
        if status == 404:
            body = _expect_ok(f"creating experiment {name!r}", call(
                tracking_uri, "/api/2.0/mlflow/experiments/create", "POST", owner, {"name": name}))
            ids[name] = body["experiment_id"]
        else:
            ids[name] = _expect_ok(f"finding experiment {name!r}", (status, body))["experiment"]["experiment_id"]
        for username in usernames:
            _expect_ok(f"granting {username!r} {permission} on experiment {name!r}", call(
                tracking_uri, "/api/3.0/mlflow/users/permissions/grant", "POST", owner,
                {"username": username, "resource_type": "experiment", "resource_id": ids[name],
                 "permission": permission}))
    return ids


def team_experiments(params_file: Path = REPO / "params.yaml") -> list[str]:
    """The MLflow experiments the pipeline logs to (params.yaml's mlflow section)."""
    import yaml

    section = yaml.safe_load(Path(params_file).read_text())["mlflow"]
    return [section[key] for key in ("experiment", "pretrain_experiment", "probe_experiment")]


def main() -> None:
    parser = argparse.ArgumentParser(description="PostgreSQL, S3 (moto) and an MLflow server with logins, "
                                                 "on 127.0.0.1 until Ctrl-C")
    parser.add_argument("dir", nargs="?", help="folder for the logs, kept (default: a temporary one)")
    parser.add_argument("--user", action="append", default=[], metavar="NAME",
                        help="an MLflow account for a person or machine, with EDIT on the pipeline's "
                             "experiments (repeat for each)")
    args = parser.parse_args()
    reason = missing()
    if reason:
        sys.exit(f"error: {reason}")
    log_dir = Path(args.dir or tempfile.mkdtemp(prefix="rnn-team-"))
    stop = []
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.append(1))
    with services(log_dir) as s:
        s.admin.write(s.secrets / f"{s.admin.username}.credentials")
        users = [add_user(s.tracking_uri, s.admin, name) for name in args.user]
        for user in users:
            user.write(s.secrets / f"{user.username}.credentials")
        experiments = share_experiments(s.tracking_uri, s.admin, team_experiments(), args.user) if users else {}
        accounts = "\n".join(f"  {u.username:<12}{s.secrets / (u.username + '.credentials')}" for u in [s.admin, *users])
        print(f"""PostgreSQL  {s.database_uri}  (password: PGPASSFILE={s.secrets / 'pgpass'})
Studies     {s.sweep_storage}  (password: PGPASSFILE={s.secrets / 'sweeps.pgpass'})
S3 (moto)   {s.s3_endpoint}  bucket {s.bucket}
MLflow      {s.tracking_uri}  (UI and API; artifacts in s3://{s.bucket}/mlartifacts)
logs        {log_dir}

MLflow accounts (credentials files, 0600; in the folder {s.secrets}, deleted on exit):
{accounts}
{"Experiments " + ", ".join(experiments) + ": EDIT for " + ", ".join(args.user) if users
 else "No user accounts: add some with --user NAME (make team-services TEAM_USERS='alice bob')."}

In each project clone, as one of the users:
  dvc remote add -d storage s3://{s.bucket}/dvc
  dvc remote modify storage endpointurl {s.s3_endpoint}
  dvc remote modify --local storage access_key_id testing
  dvc remote modify --local storage secret_access_key testing
  export MLFLOW_TRACKING_URI={s.tracking_uri}
  install -m 600 -D {s.secrets}/NAME.credentials ~/.mlflow/credentials
  export RNN_SWEEP_STORAGE={s.sweep_storage} PGPASSFILE={s.secrets / 'sweeps.pgpass'}   # sweeps

Ctrl-C stops all three (their data and the accounts go with them).""", flush=True)
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    if not args.dir:
        shutil.rmtree(log_dir, ignore_errors=True)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
