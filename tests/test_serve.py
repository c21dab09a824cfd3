"""The team server (`make serve`, pipelines/serve.py) against the real services on loopback:
Debian's Postgres, MLflow's server with basic auth, the Dagster webserver and daemon, caddy's
login in front of the Dagster UI.

One server for the module, serving a copy of the suite's reproduced project. The tests that
break something (a killed MLflow, a killed Postgres, a killed supervisor) check that the
supervisor brings it back and that nothing logged is lost or stored twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from benchmarks.tracking_load import client_cmd, point_value
from llm.common import free_port
from tests.conftest import (
    DATA_STAGES,
    REPO,
    TEMPLATE_SLICE,
    Template,
    chromium,
    copy_project,
    plays_dir,
    project_env,
    run,
)

pytestmark = pytest.mark.slow
PASSWORD = "team-admin-password-1"
READER, EDITOR = ("ana", "ana-reads-everything"), ("bo", "bo-edits-the-project")


def need(tool: str) -> None:
    if shutil.which(tool) is None and not (tool == "initdb" and Path("/usr/lib/postgresql").is_dir()):
        pytest.fail(f"{tool} is not installed: `make test` installs it (make system-deps), or apt-get install "
                    f"{'postgresql' if tool == 'initdb' else tool}")


class Server:
    """`make serve` in a subprocess, with its settings in the environment."""

    def __init__(self, project: Path, data: Path, log: Path):
        self.project, self.data, self.log = project, data, log
        self.ports = {"LLM_SERVE_PG_PORT": free_port(), "LLM_SERVE_MLFLOW_PORT": free_port(),
                      "LLM_SERVE_DAGSTER_PORT": free_port()}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.cleanup: list[Path] = []

    @property
    def env(self) -> dict[str, str]:
        return project_env(LLM_PROJECT=str(self.project), LLM_SERVE_DIR=str(self.data),
                           LLM_SERVE_ADMIN_PASSWORD=PASSWORD, LLM_SERVE_SECRETS=str(self.data.parent / "none.env"),
                           **{k: str(v) for k, v in self.ports.items()})

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.ports['LLM_SERVE_MLFLOW_PORT']}"

    @property
    def dagster(self) -> str:
        return f"http://127.0.0.1:{self.ports['LLM_SERVE_DAGSTER_PORT']}"

    def start(self, timeout: float = 240) -> None:
        self.lines = []
        self.proc = subprocess.Popen(["make", "-s", "serve"], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not any("serve: ready" in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("make serve did not get ready:\n" + "".join(self.lines)[-3000:] + self.logs())
            time.sleep(0.2)

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)
            with open(self.log, "a") as f:
                f.write(line)

    def logs(self) -> str:
        out = ""
        for p in sorted((self.data / "logs").glob("*.log")) if (self.data / "logs").is_dir() else []:
            out += f"\n--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
        return out

    def pid(self, service: str) -> int:
        return json.loads((self.data / "serve.pids").read_text())[service][0]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        code = self.proc.wait(timeout=90)
        self.proc = None
        return code

    def admin(self) -> tuple[str, str]:
        return ("admin", PASSWORD)

    def client_env(self, user: tuple[str, str] | None = None, **extra: str) -> dict[str, str]:
        name, password = user or self.admin()
        return project_env(MLFLOW_TRACKING_URI=self.mlflow, MLFLOW_TRACKING_USERNAME=name,
                           MLFLOW_TRACKING_PASSWORD=password, **extra)

    def mlflow_client(self):
        """The admin's client (the module's environment holds the admin's login)."""
        import mlflow

        return mlflow.MlflowClient(self.mlflow)

    def api(self, user: tuple[str, str], path: str, body: dict) -> requests.Response:
        """One call of MLflow's REST API as `user`."""
        return requests.post(f"{self.mlflow}/api/2.0/mlflow/{path}", json=body, auth=user, timeout=30)

    def gql(self, query: str, variables: dict | None = None) -> dict:
        r = requests.post(f"{self.dagster}/graphql", json={"query": query, "variables": variables or {}},
                          auth=self.admin(), timeout=60)
        r.raise_for_status()
        return r.json()["data"]

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if (requests.get(f"{self.mlflow}/api/2.0/mlflow/experiments/search?max_results=1", auth=self.admin(),
                                 timeout=5).status_code == 200
                        and requests.get(f"{self.dagster}/server_info", auth=self.admin(), timeout=5).status_code
                        == 200):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail("the services did not come back:" + self.logs())


def reachable_dir() -> Path:
    """A new folder that Postgres, run as Debian's `postgres` user when the suite runs as root,
    can reach (pytest's temporary folders are closed to other users)."""
    path = Path(tempfile.mkdtemp(prefix="llm-serve-"))
    path.chmod(0o711)
    return path


@pytest.fixture(scope="module")
def team(template: Template, tmp_path_factory):
    for tool in ("initdb", "caddy"):
        need(tool)
    tmp = tmp_path_factory.mktemp("team")
    project = copy_project(template.root, tmp / "project", orchestration={"sensor_interval_seconds": 5})
    run(["git", "commit", "-qam", "sensor every 5 s"], project)
    data = reachable_dir()
    server = Server(project, data / "serve", tmp / "serve.out")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD})
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for path in [data, *server.cleanup]:
            shutil.rmtree(path, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- start-up
@pytest.mark.parametrize("password", ["", "short-pw", "aaaaaaaaaaaaaaaa"])
def test_start_without_a_strong_admin_password_stops_with_one_line(tmp_path: Path, password: str):
    env = project_env(LLM_SERVE_DIR=str(tmp_path / "serve"), LLM_SERVE_ADMIN_PASSWORD=password,
                      LLM_SERVE_SECRETS=str(tmp_path / "none.env"))
    proc = subprocess.run([sys.executable, "-m", "pipelines.serve", "start"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LLM_SERVE_ADMIN_PASSWORD" in lines[0] and "12 characters" in lines[0], proc.stderr
    assert not (tmp_path / "serve").exists()  # nothing started, nothing written


def test_the_password_may_come_from_the_secrets_file(tmp_path: Path):
    from pipelines.serve import Settings

    (tmp_path / "team.env").write_text(f"# the team's secrets\nLLM_SERVE_ADMIN_PASSWORD='{PASSWORD}'\n")
    s = Settings.from_env({"LLM_SERVE_SECRETS": str(tmp_path / "team.env"), "LLM_SERVE_DIR": str(tmp_path)})
    assert s.admin_password == PASSWORD
    s = Settings.from_env({"LLM_SERVE_SECRETS": str(tmp_path / "team.env"), "LLM_SERVE_DIR": str(tmp_path),
                           "LLM_SERVE_ADMIN_PASSWORD": "the-environment-wins"})
    assert s.admin_password == "the-environment-wins"


@pytest.mark.parametrize(("knob", "value"), [("LLM_SERVE_MLFLOW_PORT", "http"), ("LLM_SERVE_PG_PORT", "70000"),
                                             ("LLM_SERVE_MLFLOW_WORKERS", "0")])
def test_a_bad_setting_stops_with_one_line_naming_it(tmp_path: Path, knob: str, value: str):
    env = project_env(LLM_SERVE_DIR=str(tmp_path / "serve"), LLM_SERVE_ADMIN_PASSWORD=PASSWORD,
                      LLM_SERVE_SECRETS=str(tmp_path / "none.env"), **{knob: value})
    proc = subprocess.run([sys.executable, "-m", "pipelines.serve", "start"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {knob}={value!r} is not") and "such as" in line, line
    assert not (tmp_path / "serve").exists()


def test_a_second_start_on_the_same_data_says_it_is_running(team: Server):
    proc = subprocess.run(["make", "-s", "serve"], cwd=REPO, env=team.env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "already running" in proc.stderr and str(team.data) in proc.stderr, proc.stderr
    assert requests.get(f"{team.mlflow}/health", timeout=5).ok  # the first one still serves


# ----------------------------------------------------------------------------- logins
def urls(team: Server) -> dict[str, tuple[str, str]]:
    return {"MLflow API": ("GET", f"{team.mlflow}/api/2.0/mlflow/experiments/search?max_results=5"),
            "MLflow UI": ("GET", f"{team.mlflow}/"),
            "MLflow artifacts": ("GET", f"{team.mlflow}/api/2.0/mlflow-artifacts/artifacts"),
            "Dagster UI": ("GET", f"{team.dagster}/"),
            "Dagster GraphQL": ("POST", f"{team.dagster}/graphql")}


def test_nobody_without_the_right_password_reads_or_writes_anything(team: Server):
    body = {"query": "{ version }"}
    for what, (method, url) in urls(team).items():
        for auth in (None, ("admin", "not-the-password"), ("nobody", PASSWORD)):
            r = requests.request(method, url, json=body, auth=auth, timeout=30)
            assert r.status_code == 401, (what, auth, r.status_code)
        r = requests.request(method, url, json=body, auth=team.admin(), timeout=30)
        assert r.status_code == 200, (what, r.status_code, r.text[:300])
    r = requests.get(f"{team.dagster}/", timeout=30)
    assert r.headers.get("WWW-Authenticate", "").startswith("Basic"), r.headers  # a browser asks for the login
    r = requests.post(f"{team.mlflow}/api/2.0/mlflow/experiments/create", json={"name": "anonymous"}, timeout=30)
    assert r.status_code == 401


def add_user(team: Server, user: tuple[str, str], permission: str) -> str:
    proc = subprocess.run(["make", "-s", "serve-user", f"NAME={user[0]}", f"PERMISSION={permission}"], cwd=REPO,
                          env=team.env | {"LLM_SERVE_USER_PASSWORD": user[1]}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_reader_browses_but_cannot_log_register_or_move_champion(team: Server):
    import mlflow

    assert "READ" in add_user(team, READER, "READ")
    assert "EDIT" in add_user(team, EDITOR, "EDIT")
    admin = team.mlflow_client()
    exp = admin.get_experiment_by_name("llm") or admin.get_experiment(admin.create_experiment("llm"))
    run_ = admin.create_run(exp.experiment_id, run_name="admin-run")
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # registered already
        admin.create_registered_model("llm-gpt")
    version = admin.create_model_version("llm-gpt", f"{run_.info.artifact_uri}/model", run_id=run_.info.run_id)
    admin.set_registered_model_alias("llm-gpt", "champion", version.version)
    run_id = run_.info.run_id

    r = requests.get(f"{team.mlflow}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, auth=READER, timeout=30)
    assert r.status_code == 200 and r.json()["run"]["info"]["run_name"] == "admin-run"  # browses
    r = requests.get(f"{team.mlflow}/api/2.0/mlflow/registered-models/search", auth=READER, timeout=30)
    assert [m["name"] for m in r.json()["registered_models"]] == ["llm-gpt"]
    writes = {
        "log": ("runs/log-batch", {"run_id": run_id, "metrics": [{"key": "loss", "value": 1.0, "timestamp": 0,
                                                                   "step": 0}]}),
        "new run": ("runs/create", {"experiment_id": exp.experiment_id}),
        "register": ("model-versions/create", {"name": "llm-gpt", "source": f"{run_.info.artifact_uri}/model",
                                               "run_id": run_id}),
        "move champion": ("registered-models/alias", {"name": "llm-gpt", "alias": "champion", "version": "1"}),
        "delete": ("runs/delete", {"run_id": run_id}),
    }
    for what, (path, body) in writes.items():
        r = team.api(READER, path, body)
        assert r.status_code == 403, (what, r.status_code, r.text[:200])
    for what, (path, body) in writes.items():  # the same calls pass for an editor of the project
        if what != "delete":
            r = team.api(EDITOR, path, body)
            assert r.status_code == 200, (what, r.status_code, r.text[:200])
    assert admin.get_model_version_by_alias("llm-gpt", "champion").version == "1"
    assert len(admin.search_model_versions("name = 'llm-gpt'")) == 2
    admin.set_terminated(run_id)


@pytest.mark.parametrize("who", ["wrong password", "no login", "reader"])
def test_a_stage_refused_by_the_server_stops_with_one_line_naming_the_variable(team: Server, tmp_path: Path, who: str):
    project = copy_project(team.project, tmp_path / "p")
    env = {"wrong password": team.client_env(("admin", "not-the-password")),
           "no login": {k: v for k, v in project_env(MLFLOW_TRACKING_URI=team.mlflow).items()
                        if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")},
           "reader": team.client_env(READER)}[who]
    if who == "reader":
        add_reader = subprocess.run([sys.executable, "-m", "pipelines.serve", "user", READER[0]], cwd=REPO,
                                    env=team.env | {"LLM_SERVE_USER_PASSWORD": READER[1]}, capture_output=True,
                                    text=True)
        assert add_reader.returncode == 0 or "already exists" in add_reader.stderr + add_reader.stdout
    proc = subprocess.run(["llm", "train", "--restart"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the MLflow server at " + team.mlflow), last
    expected = {"wrong password": "MLFLOW_TRACKING_PASSWORD", "no login": "MLFLOW_TRACKING_USERNAME",
                "reader": "--permission EDIT"}[who]
    assert expected in last, last
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


RACE = """
import sys, time
from pathlib import Path
import mlflow
from llm.mlflow_view import experiment_id
mlflow.set_tracking_uri(sys.argv[1])
Path(sys.argv[2] + "." + sys.argv[3]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
print(experiment_id(mlflow, Path("."), "made-at-once"))
"""


def test_runs_started_at_once_share_one_new_experiment(team: Server, tmp_path: Path):
    """`dvc queue start -j 4` on a new server: every stage asks for the experiment at once, and
    all but one find that another made it in between."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, team.mlflow, str(go), str(i)], cwd=REPO,
                              env=team.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    while len(list(tmp_path.glob("go.*"))) < 8:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll()]
        time.sleep(0.05)
    go.touch()
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        ids.append(out.strip().splitlines()[-1])
    assert len(set(ids)) == 1 and ids[0] == team.mlflow_client().get_experiment_by_name("made-at-once").experiment_id


# ----------------------------------------------------------------------------- load and failures
RUNS = """query Runs($tag: String!) { runsOrError(filter: {tags: [{key: "llm/trigger", value: $tag}]}) {
  ... on Runs { results { runId status tags { key value } } } } }"""
STEPS = """query Steps($runId: ID!) { runOrError(runId: $runId) { ... on Run { stepStats { stepKey status } } } }"""
TICKS = """{ sensorOrError(sensorSelector: {repositoryLocationName: "pipelines", repositoryName: "__repository__",
  sensorName: "new_raw_files"}) { ... on Sensor { sensorState { status ticks(limit: 5) { status } } } } }"""


def start_clients(team: Server, names: list[str], steps: int, **env: str) -> list[subprocess.Popen]:
    return [subprocess.Popen(client_cmd(team.mlflow, name, steps), cwd=REPO, env=team.client_env(**env),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]


def points_of(team: Server, run_name: str) -> dict[str, list[tuple[int, float]]]:
    """Every stored point of each run so named, per run id: (metric, step, value) sorted."""
    c = team.mlflow_client()
    exp = c.get_experiment_by_name("tracking-load")
    out = {}
    for r in c.search_runs([exp.experiment_id], filter_string=f"tags.`load.client` = '{run_name}'"):
        out[r.info.run_id] = sorted((m.key, m.step, m.value) for key in r.data.metrics
                                    for m in c.get_metric_history(r.info.run_id, key))
    return out


def expected_points(run_name: str, steps: int, metrics: int = 8) -> list[tuple[str, int, float]]:
    return sorted((f"m{j}", s, point_value(run_name, s, j)) for s in range(steps) for j in range(metrics))


def test_eight_clients_logging_at_once_store_every_point_once(team: Server):
    names = [f"eight-{i}" for i in range(8)]
    procs = start_clients(team, names, steps=120)
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    for name in names:
        (points,) = points_of(team, name).values()
        assert points == expected_points(name, 120), name


def test_mlflow_killed_under_load_stops_each_client_with_one_line_then_a_rerun_completes(team: Server):
    names = [f"killed-{i}" for i in range(4)]
    # Few retries: the clients must notice that the server is gone, not wait out its restart.
    procs = start_clients(team, names, steps=4000, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    c = team.mlflow_client()
    deadline = time.monotonic() + 120
    while True:  # every client has logged some points
        exp = c.get_experiment_by_name("tracking-load")
        runs = c.search_runs([exp.experiment_id], filter_string="attributes.run_name LIKE 'killed-%'") if exp else []
        if len(runs) == 4 and all(r.data.metrics for r in runs):
            break
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "clients did not start logging"
        time.sleep(0.2)
    os.killpg(team.pid("mlflow"), signal.SIGKILL)
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (p.returncode, err[-2000:])
        lines = err.strip().splitlines()
        assert lines[-1].startswith(f"error: the MLflow server at {team.mlflow} does not answer"), err[-2000:]
        assert "Traceback" not in err, err[-3000:]
    team.wait_healthy()  # the supervisor started it again
    assert any("mlflow exited" in line and "starting it again" in line for line in team.lines), team.lines[-10:]
    procs = start_clients(team, names, steps=200)
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    for name in names:
        runs = points_of(team, name)
        assert len(runs) == 2, name  # the cut run and the rerun
        complete = [pts for pts in runs.values() if len(pts) == 200 * 8]
        assert complete == [expected_points(name, 200)], name
        (cut,) = [pts for pts in runs.values() if len(pts) != 200 * 8]
        assert len(cut) == len(set(cut)) and set(cut) <= set(expected_points(name, 4000)), name  # none twice


def test_postgres_killed_under_load_comes_back_and_no_point_is_lost_or_doubled(team: Server):
    names = [f"pg-{i}" for i in range(4)]
    procs = start_clients(team, names, steps=1500, MLFLOW_HTTP_REQUEST_MAX_RETRIES="8",
                          MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    c = team.mlflow_client()
    deadline = time.monotonic() + 120
    while True:
        exp = c.get_experiment_by_name("tracking-load")
        runs = c.search_runs([exp.experiment_id], filter_string="attributes.run_name LIKE 'pg-%'") if exp else []
        if len(runs) == 4 and all(r.data.metrics for r in runs):
            break
        assert time.monotonic() < deadline, "clients did not start logging"
        time.sleep(0.2)
    pg = team.pid("postgres")
    os.killpg(pg, signal.SIGKILL)  # the server and every backend: a crash
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert team.pid("postgres") != pg
    for name in names:
        (points,) = points_of(team, name).values()
        assert points == expected_points(name, 1500), name
    team.wait_healthy()
    # Dagster reconnected too: its first queries of each store (schedules, runs) pass.
    assert team.gql(TICKS)["sensorOrError"]["sensorState"]["status"] == "RUNNING"
    assert isinstance(sensor_runs(team), list)


# ----------------------------------------------------------------------------- unattended runs
def sensor_runs(team: Server) -> list[dict]:
    return team.gql(RUNS, {"tag": "new_raw_files"})["runsOrError"]["results"]


@pytest.fixture(scope="module")
def unattended_run(team: Server) -> dict:
    """A file dropped into the inbox, with nobody at a terminal: the daemon's sensor launches
    build_all, which runs the stages through DVC and logs to the MLflow server."""
    deadline = time.monotonic() + 180
    while True:  # the sensor's first tick records the files it watches
        state = team.gql(TICKS)["sensorOrError"]["sensorState"]
        if any(t["status"] == "SKIPPED" for t in state["ticks"]):
            break
        assert time.monotonic() < deadline, f"the sensor never ticked: {state}" + team.logs()
        time.sleep(1)
    lock_before = (team.project / "dvc.lock").read_text()
    play = sorted(plays_dir().rglob("*.md"))[TEMPLATE_SLICE["n_plays"]]  # a play the project has not seen
    (team.project / "data" / "inbox" / play.name).write_text(play.read_text(encoding="utf-8")[:10_000])
    deadline = time.monotonic() + 600
    while True:
        runs = sensor_runs(team)
        if runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        assert time.monotonic() < deadline, f"no finished run: {runs}" + team.logs()
        time.sleep(2)
    steps = team.gql(STEPS, {"runId": runs[0]["runId"]})["runOrError"]["stepStats"]
    status = {s["stepKey"]: s["status"] for s in steps}
    # The suite's project trains 6 steps of a tiny model, which cannot beat bz2: the blocking
    # check stops report and export, as it would anyone's. Every stage before it ran and passed.
    assert runs[0]["status"] == "FAILURE" and [k for k, v in status.items() if v == "FAILURE"] == [
        "evaluate_beats_bz2"], status
    assert all(status.get(stage) == "SUCCESS" for stage in DATA_STAGES + ("train", "evaluate")), status
    return {"run": runs[0], "lock_before": lock_before}


def test_the_sensor_fires_under_the_daemon_and_its_run_logs_to_the_server(team: Server, unattended_run: dict):
    run_id = unattended_run["run"]["runId"]
    before = yaml.safe_load(unattended_run["lock_before"])["stages"]
    after = yaml.safe_load((team.project / "dvc.lock").read_text())["stages"]
    for stage in DATA_STAGES + ("train", "evaluate"):  # DVC built them: dvc.lock says so
        assert after[stage] != before[stage], stage
    c = team.mlflow_client()
    exp = c.get_experiment_by_name("llm")
    (mlflow_run,) = c.search_runs([exp.experiment_id], filter_string=f"tags.`dagster.run_id` = '{run_id}'")
    assert "val_bpb" in mlflow_run.data.metrics and "train_loss" in mlflow_run.data.metrics


def test_a_browser_gets_both_uis_with_the_login_and_neither_without(team: Server, unattended_run: dict,
                                                                     artifacts: Path):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    run_id = unattended_run["run"]["runId"]
    c = team.mlflow_client()
    exp = c.get_experiment_by_name("llm")
    (mlflow_run,) = c.search_runs([exp.experiment_id], filter_string=f"tags.`dagster.run_id` = '{run_id}'")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            for url in (f"{team.dagster}/runs/{run_id}", f"{team.mlflow}/#/experiments/{exp.experiment_id}"):
                # a 401 asking for Basic auth: a person's browser asks for the login, a headless one stops
                with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                    page.goto(url)
            context = browser.new_context(http_credentials={"username": "admin", "password": PASSWORD},
                                          viewport={"width": 1600, "height": 1000})
            page = context.new_page()
            page.goto(f"{team.dagster}/runs/{run_id}")
            page.get_by_text("build_all").first.wait_for(timeout=120_000)  # the daemon's run, from Postgres
            page.get_by_text("new_raw_files").first.wait_for(timeout=30_000)
            page.screenshot(path=str(artifacts / "team_dagster_run.png"), full_page=True)
            page.goto(f"{team.mlflow}/#/experiments/{exp.experiment_id}/runs/{mlflow_run.info.run_id}")
            page.get_by_text("val_bpb").first.wait_for(timeout=120_000)
            page.screenshot(path=str(artifacts / "team_mlflow_run.png"), full_page=True)
            assert mlflow_run.info.run_name in page.inner_text("body")
        finally:
            browser.close()


def test_run_history_survives_a_crash_of_the_supervisor_and_a_restart(team: Server, unattended_run: dict):
    run_id = unattended_run["run"]["runId"]
    old = {name: team.pid(name) for name in ("postgres", "mlflow", "dagster-daemon")}
    team.stop(signal.SIGKILL)  # the supervisor dies; its services are told to stop (or left behind)
    team.start()
    assert all(team.pid(name) != pid for name, pid in old.items())
    assert [r["runId"] for r in sensor_runs(team)] == [run_id]
    assert sensor_runs(team)[0]["status"] == unattended_run["run"]["status"]
    c = team.mlflow_client()
    assert c.search_runs([c.get_experiment_by_name("llm").experiment_id],
                         filter_string=f"tags.`dagster.run_id` = '{run_id}'")


def state_of(team: Server) -> dict:
    c = team.mlflow_client()
    exps = c.search_experiments()
    runs = c.search_runs([e.experiment_id for e in exps], max_results=1000)
    champion = c.get_model_version_by_alias("llm-gpt", "champion")
    return {"runs": sorted((r.info.run_id, r.info.status, len(r.data.metrics)) for r in runs),
            "versions": sorted(v.version for v in c.search_model_versions("name = 'llm-gpt'")),
            "champion": champion.version,
            "dagster": sorted(r["runId"] for r in team.gql("{ runsOrError { ... on Runs { results { runId } } } }")
                              ["runsOrError"]["results"]),
            "artifact": c.list_artifacts(champion.run_id, "model") != []}


def test_backup_and_restore_on_a_new_data_directory_give_the_same_server(team: Server, unattended_run: dict,
                                                                          tmp_path: Path):
    before = state_of(team)
    assert before["dagster"] and before["runs"] and before["versions"] and before["artifact"]
    proc = subprocess.run(["make", "-s", "serve-backup", f"BACKUP={tmp_path / 'backup'}"], cwd=REPO, env=team.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    team.stop()
    elsewhere = reachable_dir()
    team.cleanup.append(elsewhere)
    team.data = elsewhere / "new-machine"  # the module's server lives on there (the last test)
    proc = subprocess.run(["make", "-s", "serve-restore", f"BACKUP={tmp_path / 'backup'}"], cwd=REPO,
                          env=team.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    team.start()
    assert state_of(team) == before
