"""Shared storage, tested offline: a DVC remote on S3 and an MLflow tracking server whose
artifacts live in S3, both against moto's S3 server on loopback (the session's `moto_s3`).

The DVC test is a team's day: one clone runs the pipeline and pushes, another clone pulls and
has the same bytes and the same model. The MLflow test runs `make mlflow-server` (the command a
user runs), trains and evaluates against it with nothing but MLFLOW_TRACKING_URI, and finds the
run, the model files in the bucket and the `champion` alias through the server.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llm.common import free_port
from tests.conftest import FAKE_AWS_ENV, REPO, Template, copy_project, dvc_bin, project_env, run, s3_client
from tests.test_train import project_from

pytestmark = pytest.mark.slow

SERVER_START_TIMEOUT_S = 120


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def sample(project: Path) -> str:
    """What `llm sample` prints for a fixed prompt and seed (stdout only: logs name paths)."""
    cmd = ["llm", "sample", "--prompt", "ROMEO:", "--seed", "1", "--max-new-tokens", "20", "--params",
           str(project / "params.yaml")]
    proc = subprocess.run(cmd, cwd=project, env=project_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_clone_pulls_the_same_data_and_model_from_an_s3_remote(template: Template, moto_s3: str, tmp_path: Path,
                                                                  monkeypatch):
    for key, value in FAKE_AWS_ENV.items():  # credentials reach DVC (s3fs) as a user's would: env vars
        monkeypatch.setenv(key, value)
    s3_client(moto_s3).create_bucket(Bucket="llm-dvc")
    dvc = dvc_bin()

    origin = copy_project(template.root, tmp_path / "origin")  # every stage built and dvc.lock committed
    run([dvc, "remote", "add", "-d", "storage", "s3://llm-dvc/dvc"], origin)
    run([dvc, "remote", "modify", "storage", "endpointurl", moto_s3], origin)  # moto, not AWS
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "pipeline, dvc.lock and the S3 remote"], origin)
    run([dvc, "push"], origin)
    keys = bucket_keys(moto_s3, "llm-dvc")
    assert keys and all(k.startswith("dvc/files/md5/") for k in keys), keys[:5]

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "models").exists() and not (clone / "data" / "shards").exists()
    assert "s3://llm-dvc/dvc" in run([dvc, "remote", "list"], clone)  # the remote came with git (.dvc/config)
    run([dvc, "pull", "--with-deps", "train"], clone)

    for out in ("data/shards", "models/final"):
        assert digests(clone / out) and digests(clone / out) == digests(origin / out), out
    assert run([dvc, "status", "train"], clone).strip().endswith("Data and pipelines are up to date.")
    text = sample(origin)
    assert text.strip() and sample(clone) == text


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def mlflow_server(moto_s3: str, tmp_path: Path):
    """`make mlflow-server` on a free port: a sqlite store in tmp_path, artifacts in a moto bucket.
    Yields (tracking URI, bucket); stops the whole process group (make, mlflow, uvicorn) at the end."""
    bucket = "llm-mlflow"
    s3_client(moto_s3).create_bucket(Bucket=bucket)
    port = free_port()
    # Only the server holds bucket credentials. Its job runner (GenAI jobs) is off: two cores here.
    env = {**os.environ, **FAKE_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": moto_s3,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = ["make", "-C", str(REPO), "--no-print-directory",
           "-o", "setup",  # the environment is set up already: do not re-check (or re-install) it
           "mlflow-server", f"MLFLOW_SERVER_PORT={port}",
           f"MLFLOW_SERVER_STORE=sqlite:///{tmp_path / 'mlflow-server.db'}",
           f"MLFLOW_ARTIFACTS=s3://{bucket}/mlartifacts"]
    log = tmp_path / "mlflow-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, bucket
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_training_tracks_into_an_mlflow_server_with_artifacts_in_s3(mlflow_server, moto_s3: str, built, tmp_path: Path,
                                                                    monkeypatch):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from llm.io import read_json
    from llm.layout import Layout

    url, bucket = mlflow_server
    root, _ = project_from(built, tmp_path / "project")
    # The client has the server's address and nothing else: no bucket, no credentials. A client
    # that tried to write to S3 itself would fail here.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for key in [*FAKE_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    params = str(root / "params.yaml")
    run(["llm", "train", "--params", params], root)
    run(["llm", "evaluate", "--params", params], root)
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()  # nothing tracked locally

    run_id = read_json(Layout(root).metrics("train"))["mlflow_run_id"]
    client = MlflowClient(tracking_uri=url)
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED"
    assert "val_bpb" in tracked.data.metrics and "final_val_loss" in tracked.data.metrics  # evaluate's and train's

    model_keys = [k for k in bucket_keys(moto_s3, bucket) if k.startswith("mlartifacts/") and run_id in k]
    assert any(k.endswith("/model/model.safetensors") for k in model_keys), model_keys
    pulled = download_artifacts(run_id=run_id, artifact_path="model/model.safetensors",
                                dst_path=str(tmp_path / "pulled"), tracking_uri=url)
    # back through the server
    assert Path(pulled).read_bytes() == (Layout(root).final / "model.safetensors").read_bytes()

    champion = client.get_model_version_by_alias("llm-gpt", "champion")
    assert champion.run_id == run_id and str(champion.version) == "1"
    # The gate reads the champion's val_bpb through the server: an equal model is registered, not promoted.
    run(["llm", "evaluate", "--params", params], root)
    assert str(client.get_model_version_by_alias("llm-gpt", "champion").version) == "1"
    assert {str(v.version) for v in client.search_model_versions("name='llm-gpt'")} == {"1", "2"}
