"""The team server's Postgres: Debian's binaries on a cluster in a data directory of ours.

One cluster, one role (`llm`, by password), one database per store: MLflow's runs and registry,
MLflow's users, Dagster's runs and schedules. It listens on 127.0.0.1 only (the services are its
only clients) and on no Unix socket (a data directory's path may be too long for one). Postgres
refuses to run as root: as root, the cluster belongs to Debian's `postgres` user and the server
runs as that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from llm.errors import UserError

ROLE = "llm"
DATABASES = ("mlflow", "mlflow_auth", "dagster")


def bindir() -> Path:
    """Where initdb, postgres, pg_dump and pg_restore are: pg_config's answer, else Debian's newest."""
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    raise UserError("make serve needs PostgreSQL's server (initdb, postgres): apt-get install postgresql")


def run_as() -> str | None:
    """The user the cluster belongs to: none (this user) unless this is root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise UserError("make serve runs Postgres as the user `postgres` when started as root, and there is none: "
                        "apt-get install postgresql (it creates it), or start make serve as another user") from None
    return "postgres"


@dataclass
class Cluster:
    data: Path            # the cluster's data directory
    port: int
    password: str

    @property
    def env(self) -> dict[str, str]:
        """libpq's settings for a client of the cluster (pg_dump, psycopg2, MLflow, Dagster)."""
        return {"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": ROLE, "PGPASSWORD": self.password}

    def url(self, db: str) -> str:
        """SQLAlchemy's URL of a database; the password comes from PGPASSWORD, not the URL (nor `ps`)."""
        return f"postgresql+psycopg2://{ROLE}@127.0.0.1:{self.port}/{db}"

    def _as_owner(self) -> dict:
        user = run_as()
        return {"user": user, "group": user} if user else {}

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb: the role `llm` with the password, scram-sha-256 for every connection."""
        self.data.mkdir(parents=True, exist_ok=True)
        owner = run_as()
        pwfile = self.data.parent / ".pg-password"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        try:
            if owner:
                for p in (self.data, pwfile):
                    shutil.chown(p, owner, owner)
                self._check_reachable(owner)
            subprocess.run([str(bindir() / "initdb"), "-D", str(self.data), "-U", ROLE, "--pwfile", str(pwfile),
                            "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C.UTF-8"],
                           check=True, capture_output=True, text=True, **self._as_owner())
        except subprocess.CalledProcessError as e:
            raise UserError(f"initdb failed in {self.data}: {e.stderr.strip().splitlines()[-1]}") from None
        finally:
            pwfile.unlink(missing_ok=True)

    def _check_reachable(self, owner: str) -> None:
        r = subprocess.run(["test", "-w", str(self.data)], user=owner, check=False)
        if r.returncode:
            raise UserError(f"Postgres runs as `{owner}`, which cannot reach {self.data} (a parent folder is closed to "
                            "other users): set LLM_SERVE_DIR to a folder it can reach, e.g. /srv/llm-serve")

    def command(self) -> list[str]:
        """The server in the foreground: SIGINT is its fast shutdown."""
        return [str(bindir() / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                "-c", "max_connections=200"]

    def popen_kwargs(self) -> dict:
        return self._as_owner()

    def stop_stale(self) -> None:
        """A server a crashed supervisor left behind on this data directory: fast shutdown."""
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return
        with contextlib.suppress(ValueError, OSError):
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, 0)
            subprocess.run([str(bindir() / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w"],
                           check=False, capture_output=True, **self._as_owner())

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UserError(f"Postgres exited with code {proc.returncode} at start-up: see {self.log_path}")
            r = subprocess.run([str(bindir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                               check=False)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise UserError(f"Postgres did not accept connections within {timeout:.0f} s: see {self.log_path}")

    @property
    def log_path(self) -> Path:
        return self.data.parent / "logs" / "postgres.log"

    def connect(self, db: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=ROLE, password=self.password, dbname=db,
                                connect_timeout=10)

    def create_databases(self) -> None:
        conn = self.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database")
                have = {r[0] for r in cur.fetchall()}
                for db in DATABASES:
                    if db not in have:
                        cur.execute(f'CREATE DATABASE "{db}"')
        finally:
            conn.close()

    def dump(self, db: str, dest: Path) -> None:
        """pg_dump's custom format: consistent while the services write."""
        subprocess.run([str(bindir() / "pg_dump"), "-Fc", "--no-owner", "-f", str(dest), db],
                       check=True, env=os.environ | self.env)

    def restore(self, db: str, src: Path) -> None:
        """The database recreated empty, then the dump loaded into it."""
        conn = self.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
                cur.execute(f'CREATE DATABASE "{db}"')
        finally:
            conn.close()
        subprocess.run([str(bindir() / "pg_restore"), "--no-owner", "--exit-on-error", "-d", db, str(src)],
                       check=True, env=os.environ | self.env)
