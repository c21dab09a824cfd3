"""`make serve`: the team's services on one machine, started and stopped together.

    python -m pipelines.serve start        # Postgres, MLflow with logins, Dagster webserver + daemon, the login proxy
    python -m pipelines.serve user NAME --permission EDIT
    python -m pipelines.serve backup DIR
    python -m pipelines.serve restore DIR  # with the services stopped

The services (docs/team.md has the picture): Postgres on 127.0.0.1 (databases mlflow,
mlflow_auth, dagster in LLM_SERVE_DIR/postgres); MLflow's server with basic auth (runs and the
registry in Postgres, artifacts in MLFLOW_ARTIFACTS); the Dagster webserver (on loopback) and
daemon on Postgres storage; caddy in front of the Dagster UI, asking MLflow whether a login is good.

One supervisor: Ctrl-C, SIGTERM or its parent going away stops every service (Postgres last);
a service that dies is started again (Postgres recovers from its WAL; the others reconnect).
A second `start` on the same LLM_SERVE_DIR says it is already running. After a crash of the
supervisor itself, the next start stops what it left running first.

Secrets: LLM_SERVE_ADMIN_PASSWORD (12 characters or more), from the environment or from the
file LLM_SERVE_SECRETS names (default serve.env in the project, gitignored: KEY=VALUE lines).
The database password and MLflow's session key are made at the first start and kept in
LLM_SERVE_DIR/internal.env, readable by this user only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from llm.common import free_port
from llm.errors import UserError, server_problem
from pipelines.postgres import DATABASES, Cluster
from pipelines.ui import busy_port, stop

PROJECT = Path(__file__).resolve().parents[1]  # the code (workspace.yaml); the default project
MIN_PASSWORD = 12
RESTARTS = 5            # a service that dies this often within RESTART_WINDOW stops them all
RESTART_WINDOW = 60.0
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE")


# ----------------------------------------------------------------------------- settings
@dataclass
class Settings:
    project: Path
    data: Path
    host: str
    pg_port: int
    mlflow_port: int
    dagster_port: int
    artifacts: str
    admin_user: str
    admin_password: str = field(repr=False)
    workers: int = 2

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        project = Path(env.get("LLM_PROJECT") or PROJECT).resolve()
        secrets_file = Path(env.get("LLM_SERVE_SECRETS") or project / "serve.env")
        file_values = read_env_file(secrets_file) if secrets_file.is_file() else {}
        merged = file_values | env  # the environment wins over the file
        data = Path(merged.get("LLM_SERVE_DIR") or project / ".serve").resolve()
        password = merged.get("LLM_SERVE_ADMIN_PASSWORD", "")
        check_password(password, secrets_file)
        return cls(project=project, data=data, host=merged.get("LLM_SERVE_HOST") or "127.0.0.1",
                   pg_port=_port(merged, "LLM_SERVE_PG_PORT", 5433),
                   mlflow_port=_port(merged, "LLM_SERVE_MLFLOW_PORT", 5500),
                   dagster_port=_port(merged, "LLM_SERVE_DAGSTER_PORT", 3300),
                   artifacts=merged.get("MLFLOW_ARTIFACTS") or str(data / "artifacts"),
                   admin_user=merged.get("LLM_SERVE_ADMIN_USER") or "admin", admin_password=password,
                   workers=_port(merged, "LLM_SERVE_MLFLOW_WORKERS", 2, "a number of processes from 1 to 64", 64))

    @property
    def mlflow_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.mlflow_port}"

    @property
    def dagster_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.dagster_port}"


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _port(env: dict[str, str], knob: str, default: int, what: str = "a TCP port", top: int = 65535) -> int:
    value = env.get(knob) or str(default)
    if not value.isdigit() or not 0 < int(value) <= top:
        raise UserError(f"{knob}={value!r} is not {what}: set it to a number such as {default}")
    return int(value)


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UserError(f"{path}:{n}: not a KEY=VALUE line (e.g. LLM_SERVE_ADMIN_PASSWORD=...)")
        out[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return out


def check_password(password: str, secrets_file: Path) -> None:
    where = f"in the environment or in {secrets_file.name} (LLM_SERVE_SECRETS)"
    if not password:
        raise UserError(f"LLM_SERVE_ADMIN_PASSWORD is not set: set it {where}, {MIN_PASSWORD} characters or more")
    if len(password) < MIN_PASSWORD or len(set(password)) < 4:
        raise UserError(f"LLM_SERVE_ADMIN_PASSWORD is too weak ({len(password)} characters, {len(set(password))} "
                        f"different): set it {where} to {MIN_PASSWORD} characters or more, e.g. "
                        f"{secrets.token_urlsafe(12)}")


def internal_secrets(data: Path) -> dict[str, str]:
    """The database password and MLflow's session key: made once, kept beside the data."""
    path = data / "internal.env"
    if path.is_file():
        return read_env_file(path)
    values = {"LLM_SERVE_PG_PASSWORD": secrets.token_urlsafe(24),
              "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32)}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in values.items())
    tmp.replace(path)
    return values


# ----------------------------------------------------------------------------- one instance per data dir
@contextlib.contextmanager
def exclusive(data: Path):
    """The data directory's lock, held while the services run (or a restore works)."""
    data.mkdir(parents=True, exist_ok=True)
    lock = open(data / "serve.lock", "a+")  # noqa: SIM115 - held for the context's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise UserError(f"the team server is already running on {data} (pid {pid}): use it, or stop it "
                             f"(Ctrl-C in its terminal, or kill {pid}) first") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    try:
        yield
    finally:
        lock.close()


def stop_leftovers(data: Path) -> None:
    """Processes a supervisor that was killed left running (it records them in serve.pids)."""
    import psutil

    path = data / "serve.pids"
    if not path.is_file():
        return
    with contextlib.suppress(ValueError):
        recorded = json.loads(path.read_text())
        procs = []
        for name, (pid, created) in recorded.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 1:
                    procs += [p, *p.children(recursive=True)]
                    print(f"serve: stopping {name} (pid {pid}), left running by an earlier start", flush=True)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGINT if "postgres" in p.name() else signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- config files
def write_auth_ini(path: Path, database_uri: str, admin_user: str) -> Path:
    """MLflow's basic-auth settings; the admin's password comes from the environment."""
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"           # a new user reads everything and writes nothing
        f"database_uri = {database_uri}\n"
        f"admin_username = {admin_user}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        "auth_cache_ttl_seconds = 30\n")        # a password check per user per 30 s, not per request
    return path


def write_configs(s: Settings, cluster: Cluster, dagster_internal_port: int) -> dict[str, Path]:
    auth_ini = write_auth_ini(s.data / "mlflow-auth.ini", cluster.url("mlflow_auth"), s.admin_user)
    home = s.data / "dagster"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_db:\n"
        "      username: llm\n      password: {env: LLM_SERVE_PG_PASSWORD}\n      hostname: 127.0.0.1\n"
        f"      db_name: dagster\n      port: {s.pg_port}\n      scheme: postgresql+psycopg2\n"
        "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: QueuedRunCoordinator\n"
        "  config:\n    max_concurrent_runs: 1\n"  # one pipeline run at a time: one DVC workspace
        "telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    caddyfile = s.data / "Caddyfile"
    caddyfile.write_text(
        "{\n\tadmin off\n\tauto_https off\n}\n"
        f"http://:{s.dagster_port} {{\n"
        f"\tbind {s.host}\n"
        # the login is MLflow's: a request passes when MLflow accepts its Authorization header
        f"\tforward_auth 127.0.0.1:{s.mlflow_port} {{\n"
        "\t\turi /api/2.0/mlflow/experiments/search?max_results=1\n"
        f"\t\theader_up Host 127.0.0.1:{s.mlflow_port}\n\t}}\n"
        f"\treverse_proxy 127.0.0.1:{dagster_internal_port}\n}}\n")
    return {"auth_ini": auth_ini, "dagster_home": home, "caddyfile": caddyfile}


# ----------------------------------------------------------------------------- the supervisor
@dataclass
class Service:
    name: str
    cmd: list[str]
    env: dict[str, str]
    stop_signal: int = signal.SIGTERM
    kwargs: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    deaths: list[float] = field(default_factory=list)

    def start(self, logs: Path, cwd: Path) -> None:
        def child_setup() -> None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            with contextlib.suppress(Exception):  # Linux: the service stops if the supervisor is killed
                import ctypes

                ctypes.CDLL(None).prctl(1, self.stop_signal)  # PR_SET_PDEATHSIG

        log = open(logs / f"{self.name}.log", "ab")  # noqa: SIM115 - the child's, closed below
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=child_setup,
                                     **self.kwargs)
        log.close()


def wait_http(url: str, proc: subprocess.Popen, name: str, log: Path, timeout: float = 120.0) -> None:
    """Until `url` answers at all (any HTTP status): the service is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{name} exited with code {proc.returncode} at start-up: see {log}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    raise UserError(f"{name} did not answer at {url} within {timeout:.0f} s: see {log}")


def services(s: Settings, cluster: Cluster, internal: dict[str, str]) -> tuple[list[Service], int]:
    bin_dir = Path(sys.executable).parent
    dagster_internal = free_port()
    files = write_configs(s, cluster, dagster_internal)
    base = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"} | cluster.env | internal
    mlflow_env = base | {
        "MLFLOW_AUTH_CONFIG_PATH": str(files["auth_ini"]),
        "MLFLOW_AUTH_ADMIN_PASSWORD": s.admin_password,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    # Runs that Dagster launches (the schedule, the sensors, the UI) log to this MLflow as the admin.
    dagster_env = base | {
        "DAGSTER_HOME": str(files["dagster_home"]), "LLM_PROJECT": str(s.project),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{s.mlflow_port}",
        "MLFLOW_TRACKING_USERNAME": s.admin_user, "MLFLOW_TRACKING_PASSWORD": s.admin_password,
    }
    for k in ("MLFLOW_AUTH_ADMIN_PASSWORD", "LLM_SERVE_ADMIN_PASSWORD"):
        dagster_env.pop(k, None)
    if "://" not in s.artifacts:
        Path(s.artifacts).mkdir(parents=True, exist_ok=True)
    workspace = str(PROJECT / "workspace.yaml")  # the code; LLM_PROJECT names the project it runs
    return [
        Service("postgres", cluster.command(), base, signal.SIGINT, cluster.popen_kwargs()),
        Service("mlflow", [str(bin_dir / "mlflow"), "server", "--app-name", "basic-auth", "--host", s.host,
                           "--port", str(s.mlflow_port), "--workers", str(s.workers),
                           "--backend-store-uri", cluster.url("mlflow"),
                           "--artifacts-destination", s.artifacts, "--serve-artifacts"], mlflow_env),
        # --db-pool-recycle 1: a pooled connection older than a second is replaced, so none survives
        # a restart of Postgres to fail the UI's next query (a new connection costs milliseconds).
        Service("dagster-webserver", [str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1",
                                      "-p", str(dagster_internal), "--db-pool-recycle", "1"], dagster_env),
        Service("dagster-daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", workspace], dagster_env),
        Service("caddy", ["caddy", "run", "--config", str(files["caddyfile"]), "--adapter", "caddyfile"],
                base | {"XDG_CONFIG_HOME": str(s.data / "caddy"), "XDG_DATA_HOME": str(s.data / "caddy")}),
    ], dagster_internal


def ready_check(svc: Service, s: Settings, cluster: Cluster, dagster_internal: int, logs: Path) -> None:
    if svc.name == "postgres":
        cluster.wait_ready(svc.proc)
        cluster.create_databases()
    elif svc.name == "mlflow":
        wait_http(f"http://127.0.0.1:{s.mlflow_port}/health", svc.proc, "MLflow", logs / "mlflow.log")
    elif svc.name == "dagster-webserver":
        wait_http(f"http://127.0.0.1:{dagster_internal}/server_info", svc.proc, "Dagster's webserver",
                  logs / "dagster-webserver.log", timeout=180)
    elif svc.name == "caddy":
        wait_http(f"http://127.0.0.1:{s.dagster_port}/", svc.proc, "caddy", logs / "caddy.log")


def check_tools() -> None:
    if not shutil.which("caddy"):
        raise UserError("make serve needs caddy (the Dagster UI's login proxy): apt-get install caddy")


def cluster_of(s: Settings) -> tuple[Cluster, dict[str, str]]:
    """The data directory's Postgres cluster, and the internal secrets it was made with."""
    internal = internal_secrets(s.data)
    return Cluster(s.data / "postgres", s.pg_port, internal["LLM_SERVE_PG_PASSWORD"]), internal


def take_over(s: Settings, ports: dict[str, int]) -> tuple[Cluster, dict[str, str]]:
    """With the data directory's lock held: what a killed supervisor left running stopped, the
    ports checked, the cluster made if it is new."""
    stop_leftovers(s.data)
    (s.data / "logs").mkdir(exist_ok=True)
    cluster, internal = cluster_of(s)
    cluster.stop_stale()
    if busy := busy_port(ports):
        raise UserError(busy.replace("make ui", "make serve"))
    if not cluster.initialized():
        print(f"serve: a new Postgres cluster in {cluster.data}", flush=True)
        cluster.init()
    return cluster, internal


def start(s: Settings) -> int:
    check_tools()
    with exclusive(s.data):
        cluster, internal = take_over(s, {"LLM_SERVE_PG_PORT": s.pg_port, "LLM_SERVE_MLFLOW_PORT": s.mlflow_port,
                                          "LLM_SERVE_DAGSTER_PORT": s.dagster_port})
        logs = s.data / "logs"
        svcs, dagster_internal = services(s, cluster, internal)
        stopping = {"why": ""}

        def on_signal(signum, _frame) -> None:
            stopping["why"] = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)
        try:
            for svc in svcs:
                print(f"serve: starting {svc.name}", flush=True)
                svc.start(logs, s.data)
                record_pids(s.data, svcs)
                ready_check(svc, s, cluster, dagster_internal, logs)
                if stopping["why"]:
                    return 130
            print(f"MLflow:    {s.mlflow_url}  (user {s.admin_user}; add users: make serve-user)\n"
                  f"Dagster:   {s.dagster_url}  (the same logins)\n"
                  f"Postgres:  127.0.0.1:{s.pg_port}  (the services only)\n"
                  f"Clients:   MLFLOW_TRACKING_URI={s.mlflow_url} MLFLOW_TRACKING_USERNAME=... "
                  "MLFLOW_TRACKING_PASSWORD=...\nserve: ready; Ctrl-C stops every service.", flush=True)
            supervise(svcs, s, cluster, dagster_internal, logs, stopping)
        finally:
            shutdown(svcs)
            (s.data / "serve.pids").unlink(missing_ok=True)
        print(f"serve: stopped ({stopping['why']})", flush=True)
        return 0 if stopping["why"] in ("SIGINT", "SIGTERM", "SIGHUP", "parent exited") else 1


def record_pids(data: Path, svcs: list[Service]) -> None:
    import psutil

    pids = {}
    for svc in svcs:
        if svc.proc is not None and svc.proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                pids[svc.name] = [svc.proc.pid, psutil.Process(svc.proc.pid).create_time()]
    (data / "serve.pids").write_text(json.dumps(pids))


def supervise(svcs: list[Service], s: Settings, cluster: Cluster, dagster_internal: int, logs: Path,
              stopping: dict) -> None:
    parent = os.getppid()
    while not stopping["why"]:
        if os.getppid() != parent:
            stopping["why"] = "parent exited"
            return
        for svc in svcs:
            if svc.proc.poll() is None:
                continue
            now = time.monotonic()
            svc.deaths = [t for t in svc.deaths if now - t < RESTART_WINDOW] + [now]
            if len(svc.deaths) > RESTARTS:
                stopping["why"] = f"{svc.name} died {RESTARTS + 1} times within {RESTART_WINDOW:.0f} s: see " \
                                  f"{logs / (svc.name + '.log')}"
                print(f"serve: {stopping['why']}", file=sys.stderr, flush=True)
                return
            print(f"serve: {svc.name} exited with code {svc.proc.returncode}; starting it again", flush=True)
            time.sleep(1.0)
            svc.start(logs, s.data)
            record_pids(s.data, svcs)
            with contextlib.suppress(UserError):  # it dies again: the next round counts it
                ready_check(svc, s, cluster, dagster_internal, logs)
        time.sleep(0.5)


def shutdown(svcs: list[Service]) -> None:
    """The proxy and the services first, Postgres last."""
    running = [svc for svc in svcs if svc.proc is not None]
    front = {svc.name: (svc.proc, svc.stop_signal) for svc in running if svc.name != "postgres"}
    stop(front)
    stop({svc.name: (svc.proc, svc.stop_signal) for svc in running if svc.name == "postgres"}, grace=30.0)


# ----------------------------------------------------------------------------- users
def add_user(s: Settings, name: str, permission: str, password: str) -> str:
    """A user of both UIs and of MLflow's API. READ is every new user's right on every experiment
    and model (the server's default); EDIT and MANAGE are granted on the project's experiment and
    registered model (tracking.experiment, tracking.registered_model)."""
    import mlflow
    from mlflow.server import get_app_client

    from llm.config import load_params
    from llm.mlflow_view import experiment_id

    if permission not in PERMISSIONS:
        raise UserError(f"--permission {permission!r} is not one of {', '.join(PERMISSIONS)}: e.g. --permission EDIT")
    check_password(password, Path("LLM_SERVE_USER_PASSWORD"))
    os.environ.update({"MLFLOW_TRACKING_USERNAME": s.admin_user, "MLFLOW_TRACKING_PASSWORD": s.admin_password})
    auth = get_app_client("basic-auth", tracking_uri=s.mlflow_url)
    try:
        auth.create_user(name, password)
        made = f"user {name}"
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        made = f"user {name} (already there; its password is unchanged)"
    if permission == "READ":
        return f"{made}: READ on every experiment and model"
    tracking = load_params(s.project / "params.yaml").tracking
    mlflow.set_tracking_uri(s.mlflow_url)
    exp = experiment_id(mlflow, s.project, tracking.experiment)
    auth.grant_user_permission(name, "experiment", exp, permission)
    client = mlflow.MlflowClient(s.mlflow_url)
    with contextlib.suppress(mlflow.exceptions.RestException):  # created already
        client.create_registered_model(tracking.registered_model)
    auth.grant_user_permission(name, "registered_model", tracking.registered_model, permission)
    return (f"{made}: {permission} on experiment {tracking.experiment!r} and model "
            f"{tracking.registered_model!r}, READ on the rest")


# ----------------------------------------------------------------------------- backup and restore
def backup(s: Settings, dest: Path) -> str:
    """pg_dump of each database (consistent while the services write) and the artifact folder."""
    cluster, _ = cluster_of(s)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise UserError(f"backup folder {dest} is not empty: name a new folder")
    try:
        cluster.connect().close()
    except Exception as e:  # noqa: BLE001 - psycopg2's OperationalError, said in one line
        raise UserError(f"no Postgres answers on 127.0.0.1:{s.pg_port} ({str(e).strip().splitlines()[0]}): "
                        "start the server (make serve) and back up while it runs") from None
    for db in DATABASES:
        cluster.dump(db, dest / f"{db}.dump")
    if "://" not in s.artifacts and Path(s.artifacts).is_dir():
        with tarfile.open(dest / "artifacts.tar", "w") as tar:
            tar.add(s.artifacts, arcname="artifacts")
    (dest / "manifest.json").write_text(json.dumps({
        "databases": list(DATABASES), "artifacts": s.artifacts if "://" in s.artifacts else "artifacts.tar",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
    return f"backup of {', '.join(DATABASES)} and the artifacts in {dest}"


def restore(s: Settings, src: Path) -> str:
    """Each database replaced by its dump and the artifact folder by the backup's, on a stopped
    server (its lock is taken): Postgres alone is started for it."""
    if not (src / "manifest.json").is_file():
        raise UserError(f"{src} is not a backup (no manifest.json): name a folder that make serve-backup wrote")
    with exclusive(s.data):
        cluster, _ = take_over(s, {"LLM_SERVE_PG_PORT": s.pg_port})
        pg = Service("postgres", cluster.command(), os.environ | cluster.env, signal.SIGINT, cluster.popen_kwargs())
        pg.start(s.data / "logs", s.data)
        try:
            cluster.wait_ready(pg.proc)
            for db in DATABASES:
                cluster.restore(db, src / f"{db}.dump")
        finally:
            stop({"postgres": (pg.proc, signal.SIGINT)}, grace=30.0)
        if (src / "artifacts.tar").is_file() and "://" not in s.artifacts:
            target = Path(s.artifacts)
            unpacked = target.parent / ".restore"  # unpacked in full before the old folder goes
            shutil.rmtree(unpacked, ignore_errors=True)
            with tarfile.open(src / "artifacts.tar") as tar:
                tar.extractall(unpacked, filter="data")
            if target.exists():
                shutil.rmtree(target)
            (unpacked / "artifacts").rename(target)
            unpacked.rmdir()
    return f"restored {', '.join(DATABASES)} and the artifacts from {src}; start the server: make serve"


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start every service; Ctrl-C stops them")
    u = sub.add_parser("user", help="add a user (password from LLM_SERVE_USER_PASSWORD, or asked)")
    u.add_argument("name")
    u.add_argument("--permission", default="READ", help="READ (browse), EDIT (log, register) or MANAGE")
    b = sub.add_parser("backup", help="dump the databases and the artifact folder into a new folder")
    b.add_argument("dest", type=Path)
    r = sub.add_parser("restore", help="replace the databases and artifacts with a backup's (server stopped)")
    r.add_argument("src", type=Path)
    args = ap.parse_args(argv)
    try:
        s = Settings.from_env()
        if args.command == "start":
            return start(s)
        if args.command == "user":
            password = os.environ.get("LLM_SERVE_USER_PASSWORD")
            if not password:
                import getpass

                password = getpass.getpass(f"password for {args.name}: ")
            print(add_user(s, args.name, args.permission.upper(), password))
        elif args.command == "backup":
            print(backup(s, args.dest.resolve()))
        elif args.command == "restore":
            print(restore(s, args.src.resolve()))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if line := server_problem(e):
            print(f"error: {line}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
