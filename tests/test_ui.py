"""What a person sees, in a real browser (Debian's headless Chromium, driven by Playwright).

A temporary project is built with `dvc repro` in a terminal, as a user would; then `dagster dev`
and `mlflow ui` serve it on free loopback ports, and the tests look:
- Dagster shows every stage materialized with DVC's data versions (the dvc_lock sensor);
- the train asset page shows the loss curve;
- MLflow opens the experiment on its training-runs view, listing the run by name with val_bpb;
- the registered model shows the `champion` alias;
- the report renders with its images loaded.
Screenshots go to $TEST_ARTIFACTS, or to a temporary directory (printed) when it is unset: the
tests write nothing into the checkout. And `make ui` stops cleanly on a signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from llm.common import free_port
from llm.mlflow_view import ui_url
from pipelines.ui import MLFLOW_UI_ENV
from tests.conftest import REPO, Template, chromium, copy_project, dvc_bin, project_env, run

pytestmark = pytest.mark.slow
STAGES = ["ingest", "clean", "tokenizer", "shards", "train", "evaluate", "report", "export"]


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dagster dev exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"dagster dev did not answer {url} in {seconds} s:\n{log.read_text()[-3000:]}")


def stop(*procs: subprocess.Popen, grace: float = 10.0) -> None:
    """Test servers (dagster dev with its daemon, webserver and code servers; mlflow ui): Ctrl-C
    to every group at once, then kill what is left after `grace` seconds. How `make ui` stops is
    its own test; here only the time counts."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def node_status(page, name: str, seconds: float = 60) -> str:
    """The text of an asset's node in the graph, once its status has loaded."""
    node = page.locator("foreignObject").filter(has=page.locator(f'[data-tooltip="{name}"]')).filter(has_text="Latest "
                                                                                                              "event").first
    node.wait_for(timeout=seconds * 1000)
    deadline = time.monotonic() + seconds
    text = node.text_content() or ""
    while "Loading" in text and time.monotonic() < deadline:
        time.sleep(0.5)
        text = node.text_content() or ""
    return text


def server(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def served(template: Template, tmp_path_factory):
    """A project built by `dvc repro`, served by `dagster dev` and `mlflow ui`; a browser page."""
    from playwright.sync_api import sync_playwright

    browser_bin = chromium()
    tmp = tmp_path_factory.mktemp("ui")
    # Built by `dvc repro` in a terminal, outside Dagster: the suite's reproduced project.
    project = copy_project(template.root, tmp / "project", orchestration={"sensor_interval_seconds": 5})
    assert "up to date" in run([dvc_bin(), "status"], project)
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    bin_dir = Path(sys.executable).parent
    env = project_env(LLM_PROJECT=str(project), DAGSTER_HOME=str(home), **MLFLOW_UI_ENV)
    dagster_port, mlflow_port = free_port(), free_port()
    # Started in the project, not the repo root, where Dagster would read the checkout's .env.
    dagster = server([str(bin_dir / "dagster"), "dev", "-m", "pipelines", "-h", "127.0.0.1", "-p", str(dagster_port)],
                     project, env, tmp / "dagster.log")
    mlflow = server([str(bin_dir / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
                     "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"], project, env,
                    tmp / "mlflow.log")
    try:
        dagster_url, mlflow_url = f"http://127.0.0.1:{dagster_port}", f"http://127.0.0.1:{mlflow_port}"
        wait_for(f"{dagster_url}/server_info", dagster, tmp / "dagster.log")
        wait_for(f"{mlflow_url}/health", mlflow, tmp / "mlflow.log")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_bin, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                yield {"project": project, "dagster": dagster_url, "mlflow": mlflow_url, "page": page}
            finally:
                browser.close()
    finally:
        stop(dagster, mlflow)


def test_dagster_shows_every_stage_that_dvc_built_as_materialized(served, artifacts: Path):
    from assets.dvc_assets import data_version
    from assets.dvc_project import locked_hashes

    page, base, project = served["page"], served["dagster"], served["project"]
    status: dict[str, str] = {}
    deadline = time.monotonic() + 120  # the dvc_lock sensor ticks every 5 s here, once the daemon is up
    while time.monotonic() < deadline:
        page.goto(f"{base}/locations/pipelines/asset-groups/data/lineage")
        status = {name: node_status(page, name) for name in STAGES[:4]}
        if all("Materialized" in t and "Never" not in t for t in status.values()):
            break
        time.sleep(5)
    page.screenshot(path=str(artifacts / "dagster_asset_graph_data.png"))
    page.goto(f"{base}/locations/pipelines/asset-groups/model/lineage")
    status |= {name: node_status(page, name) for name in STAGES[4:]}
    page.screenshot(path=str(artifacts / "dagster_asset_graph_model.png"))
    for name, text in status.items():
        assert "Materialized" in text and "Never materialized" not in text, f"{name}: {text}"
    # The clean asset's event is the one DVC produced: its data version is DVC's, and its page shows
    # the md5 that dvc.lock holds for data/clean.
    md5 = locked_hashes(project, "clean")["data/clean"]
    page.goto(f"{base}/assets/clean?view=events")
    page.get_by_text(md5).first.wait_for(timeout=60_000)
    page.screenshot(path=str(artifacts / "dagster_asset_clean_events.png"), full_page=True)
    assert "built by dvc repro outside Dagster" in page.inner_text("body").replace("`", "")
    assert data_version(project, "clean") is not None
    assert (artifacts / "dagster_asset_graph_data.png").stat().st_size > 10_000


def test_the_train_asset_page_shows_the_loss_curve(served, artifacts: Path):
    page, base = served["page"], served["dagster"]
    page.goto(f"{base}/assets/train?view=events")
    page.get_by_text("loss curve").first.wait_for(timeout=120_000)  # the materialization's metadata
    page.screenshot(path=str(artifacts / "dagster_asset_train.png"), full_page=True)
    body = page.inner_text("body")
    assert "final val loss" in body and "MLflow run" in body


def test_mlflow_lists_the_training_run_by_name_with_val_bpb(served, artifacts: Path):
    import mlflow

    page, project = served["page"], served["project"]
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llm")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run_obj = client.search_runs([experiment.experiment_id])[0]
    # The model's shape and the commit it was trained at (the project's first, before dvc.lock's).
    trained_at = run(["git", "rev-parse", "--short=7", "HEAD~1"], project).strip()
    assert run_obj.info.run_name == f"gpt-2x32-{trained_at}"
    page.set_viewport_size({"width": 2200, "height": 1000})  # the grid renders only the columns in view
    page.goto(ui_url(served["mlflow"], experiment.experiment_id))  # the experiment's link, as `make ui` prints it
    page.get_by_text(run_obj.info.run_name).first.wait_for(timeout=60_000)
    page.get_by_text("Training runs").first.wait_for(timeout=30_000)  # the project's saved view of the runs table
    assert f"/experiments/{experiment.experiment_id}/runs" in page.url  # landed on the runs table, not GenAI's overview
    page.get_by_text("val_bpb").first.wait_for(timeout=30_000)  # a column of the view, with the run's value
    body = page.inner_text("body")
    assert "Model training" in body and str(run_obj.data.metrics["val_bpb"])[:5] in body, body[:2000]
    page.screenshot(path=str(artifacts / "mlflow_training_runs.png"), full_page=True)
    page.goto(ui_url(served["mlflow"], experiment.experiment_id, run_obj.info.run_id))
    page.get_by_text("val_bpb").first.wait_for(timeout=60_000)
    page.screenshot(path=str(artifacts / "mlflow_run.png"), full_page=True)


def test_the_registered_model_shows_its_champion(served, artifacts: Path):
    page = served["page"]
    page.goto(f"{served['mlflow']}/#/models/llm-gpt")
    page.get_by_text("champion").first.wait_for(timeout=60_000)
    page.screenshot(path=str(artifacts / "mlflow_registered_model.png"), full_page=True)
    assert "Version 1" in page.inner_text("body")


def test_the_report_renders_with_its_images_loaded(served, artifacts: Path):
    page, project = served["page"], served["project"]
    page.goto((project / "reports" / "report.html").as_uri())
    images = page.locator("img")
    assert images.count() >= 2
    broken = page.evaluate("() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
                           ".map(i => i.alt)")
    page.screenshot(path=str(artifacts / "report.png"), full_page=True)
    assert broken == []


@pytest.mark.parametrize("knob", ["DAGSTER_PORT", "MLFLOW_PORT"])
def test_make_ui_on_a_port_in_use_stops_with_one_line_naming_a_free_one(tmp_path: Path, knob: str):
    """Before this, the Dagster webserver died on the port while make ui printed its URL and kept
    MLflow running: the link led to whatever held the port."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        ports = {"DAGSTER_PORT": free_port(), "MLFLOW_PORT": free_port(), knob: held.getsockname()[1]}
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        proc = subprocess.run(["make", "-s", "ui", f"DAGSTER_HOME={tmp_path / 'home'}",
                               *(f"{k}={v}" for k, v in ports.items())], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert errors[0].startswith(f"error: make ui: port {ports[knob]} ({knob}) is in use on 127.0.0.1; set {knob}=")
    assert "Dagster UI:" not in proc.stdout and not (tmp_path / "mlflow.db").exists()


def default_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM])  # what a script or a service manager sends; Ctrl-C goes to the group
def test_make_ui_started_from_a_script_stops_every_process_on_a_signal_to_make(tmp_path: Path, sig: signal.Signals):
    """Not a terminal: no process group gets the Ctrl-C, only make gets the signal."""
    import psutil

    home = tmp_path / "dagster_home"
    dagster_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "LLM_PROGRESS": "0"}
    log = tmp_path / "make_ui.log"
    with open(log, "w") as out:
        # As a shell starts it: default signal dispositions, none blocked. An ignored or blocked
        # SIGTERM survives exec, and make then neither dies of it nor passes it on: in 2 of 3 full
        # suite runs no process reacted to it, never when this test ran alone, loaded or not.
        make = subprocess.Popen(["make", "-s", "ui", f"DAGSTER_HOME={home}", f"DAGSTER_PORT={dagster_port}",
                                 f"MLFLOW_PORT={mlflow_port}"],
                                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=default_signals)
    tree: list = []
    try:
        wait_for(f"http://127.0.0.1:{dagster_port}/server_info", make, log)
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", make, log)
        tree = psutil.Process(make.pid).children(recursive=True)
        assert (any("dagster" in " ".join(p.cmdline()) for p in tree)
                and any("mlflow" in " ".join(p.cmdline()) for p in tree))
        os.kill(make.pid, sig)
        gone, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, f"still running 15 s after {sig.name} to make: {[' '.join(p.cmdline())[:120] for p in alive]}"
        assert "stopping the UIs" in log.read_text()
        assert (f"MLflow UI:  http://127.0.0.1:{mlflow_port}/#/experiments?workflowType=machine_learning"
                in log.read_text())
    finally:  # a failed test leaves nothing running either
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        make.kill()
        make.wait(timeout=10)
