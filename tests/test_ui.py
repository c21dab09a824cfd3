"""The Dagster UI in a real browser: `dagster asset materialize` (the README's command) builds the
data stages of a temporary project, `dagster dev` serves it on a free loopback port, and headless
Chromium (Debian's, driven by Playwright) must show those assets materialized in the asset graph
and the model's as not yet. A screenshot goes to test-artifacts/ (or $TEST_ARTIFACTS)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, make_dvc_project

pytestmark = pytest.mark.slow
DATA = ["ingest", "clean", "tokenizer", "shards"]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS") or REPO / "test-artifacts")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: apt-get install chromium (.ci/run does)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def stop(proc: subprocess.Popen) -> None:
    """dagster dev and its daemon, webserver and code servers: Ctrl-C to the group, then kill."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def node_status(page, name: str, seconds: float = 60) -> str:
    """The text of an asset's node in the graph, once its status has loaded."""
    node = page.locator("foreignObject").filter(has=page.locator(f'[data-tooltip="{name}"]')).filter(has_text="Latest event").first
    node.wait_for(timeout=seconds * 1000)
    deadline = time.monotonic() + seconds
    text = node.text_content() or ""
    while "Loading" in text and time.monotonic() < deadline:
        time.sleep(0.5)
        text = node.text_content() or ""
    return text


def test_the_asset_graph_shows_the_materialized_assets(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    browser_bin = chromium()
    project = make_dvc_project(tmp_path / "project", n_plays=6, max_chars=15_000)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "LLM_PROJECT": str(project), "DAGSTER_HOME": str(home), "LLM_PROGRESS": "0",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    dagster = str(bin_dir / "dagster")
    # Started in the project, not the repo root, where Dagster would read the checkout's .env.
    built = subprocess.run([dagster, "asset", "materialize", "-m", "pipelines", "--select", "*shards"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert (project / "data" / "shards" / "manifest.json").is_file()

    port = free_port()
    log = tmp_path / "dagster_dev.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([dagster, "dev", "-m", "pipelines", "-h", "127.0.0.1", "-p", str(port)], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/server_info", proc, log)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_bin, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(f"{base}/locations/pipelines/asset-groups/data/lineage")
                data = {name: node_status(page, name) for name in DATA}
                page.screenshot(path=str(ARTIFACTS / "dagster_asset_graph_data.png"))
                page.goto(f"{base}/locations/pipelines/asset-groups/model/lineage")
                model = {name: node_status(page, name) for name in ("train", "evaluate", "report")}
                page.screenshot(path=str(ARTIFACTS / "dagster_asset_graph_model.png"))
                page.goto(f"{base}/assets/clean")  # the asset page: its materialization metadata
                rows = page.locator("tr")
                rows.filter(has_text="filter report").first.wait_for(timeout=60_000)
                clean_page = page.inner_text("body")
                page.screenshot(path=str(ARTIFACTS / "dagster_asset_clean.png"), full_page=True)
            finally:
                browser.close()
    finally:
        stop(proc)
    for name, text in data.items():
        assert "Materialized" in text and "Never materialized" not in text, f"{name}: {text}"
        assert "1 / 1 Passed" in text, f"{name}: its check should show as passed: {text}"
    for name, text in model.items():
        assert "Never materialized" in text, f"{name}: {text}"
    for key in ("documents in", "documents removed", "filter report", "preview (corpus/"):
        assert key in clean_page, key
    assert (ARTIFACTS / "dagster_asset_graph_data.png").stat().st_size > 10_000


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_make_ui_started_from_a_script_stops_every_process_on_a_signal_to_make(tmp_path: Path, sig: signal.Signals):
    """Not a terminal: no process group gets the Ctrl-C, only make gets the signal."""
    import psutil

    home = tmp_path / "dagster_home"
    dagster_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "LLM_PROGRESS": "0"}
    log = tmp_path / "make_ui.log"
    with open(log, "w") as out:
        make = subprocess.Popen(["make", "-s", "ui", f"DAGSTER_HOME={home}", f"DAGSTER_PORT={dagster_port}", f"MLFLOW_PORT={mlflow_port}"],
                                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    tree: list = []
    try:
        wait_for(f"http://127.0.0.1:{dagster_port}/server_info", make, log)
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", make, log)
        tree = psutil.Process(make.pid).children(recursive=True)
        assert any("dagster" in " ".join(p.cmdline()) for p in tree) and any("mlflow" in " ".join(p.cmdline()) for p in tree)
        os.kill(make.pid, sig)
        gone, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, f"still running 15 s after {sig.name} to make: {[' '.join(p.cmdline())[:120] for p in alive]}"
        assert "stopping the UIs" in log.read_text()
    finally:  # a failed test leaves nothing running either
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        make.kill()
        make.wait(timeout=10)
