"""`make ui`: the Dagster UI and the MLflow UI on loopback, stopped together.

A supervisor of two process trees. Each server runs in a session of its own, with SIGINT
restored (a process started in the background of a non-interactive shell inherits SIGINT as
ignored, and `dagster dev` would then outlive its parent). Ctrl-C in a terminal, SIGTERM from a
script or a service manager, its parent (make) going away, or either server dying stops both trees: \
SIGINT to dagster dev
(it shuts its webserver, daemon and code servers down), SIGTERM to MLflow, and after a grace
period SIGKILL to whatever is left.

    python -m pipelines.ui --dagster-port 3000 --mlflow-port 5000 --mlflow-store sqlite:///mlflow.db
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from llm.common import free_port
from llm.config import load_params
from llm.errors import UserError
from llm.mlflow_view import ui_url

GRACE_SECONDS = 10.0


# One person's MLflow UI: one web worker, not MLflow's 4, and no GenAI job runner (a dozen huey
# consumers); each of those processes imports MLflow, and nothing here runs MLflow jobs.
MLFLOW_UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    def child_setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=child_setup, **kw)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return


def stop(servers: dict[str, tuple[subprocess.Popen, int]], grace: float = GRACE_SECONDS) -> None:
    """Each tree its polite signal, then SIGKILL to every process of the trees still running: their
    groups, and the descendants that left them (dagster dev's code servers start sessions of their
    own, and outlive a dagster dev that the grace ran out on)."""
    import psutil

    tree = []
    for proc, _ in servers.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            tree += psutil.Process(proc.pid).children(recursive=True)
    for proc, sig in servers.values():
        _signal_group(proc, sig)
    deadline = time.monotonic() + grace
    for proc, _ in servers.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc, _ in servers.values():
        _signal_group(proc, signal.SIGKILL)  # children that outlived their parent too
        proc.wait()
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(tree, timeout=5)


def busy_port(ports: dict[str, int]) -> str:
    """One line for the first of the ports (by the make variable that sets it) that a server on
    127.0.0.1 already holds, naming a port that is free now; "" when all are free."""
    for knob, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is free
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return (f"make ui: port {port} ({knob}) is in use on 127.0.0.1; "
                        f"set {knob}={free_port()} (free now), or stop what holds it")
    return ""


def experiment_of(store: str, name: str) -> str | None:
    """The id of the project's MLflow experiment in `store`, None before the first run."""
    import mlflow

    if not name:
        with contextlib.suppress(UserError):
            name = load_params(Path("params.yaml")).tracking.experiment
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).exists():
        return None  # no run yet (and MLflow would create the database)
    try:
        experiment = mlflow.MlflowClient(tracking_uri=store).get_experiment_by_name(name or "llm")
    except mlflow.exceptions.MlflowException:  # a store MLflow cannot open: the UI says why
        return None
    return experiment.experiment_id if experiment else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.ui", description=__doc__.splitlines()[0])
    ap.add_argument("--dagster-port", type=int, default=3000)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    ap.add_argument("--mlflow-store", required=True, help="MLflow backend store URI")
    ap.add_argument("--workspace", default="workspace.yaml")
    ap.add_argument("--experiment", default="",
                    help="MLflow experiment to link to (default: tracking.experiment of params.yaml)")
    args = ap.parse_args(argv)
    if busy := busy_port({"DAGSTER_PORT": args.dagster_port, "MLFLOW_PORT": args.mlflow_port}):
        print(f"error: {busy}", file=sys.stderr)
        return 2
    bin_dir = Path(sys.executable).parent
    mlflow_url = ui_url(f"http://127.0.0.1:{args.mlflow_port}", experiment_of(args.mlflow_store, args.experiment))
    servers = {
        "mlflow": (_start([str(bin_dir / "mlflow"), "ui", "--backend-store-uri", args.mlflow_store,
                           "--host", "127.0.0.1", "--port", str(args.mlflow_port), "--workers", "1"],
                          env=MLFLOW_UI_ENV | os.environ), signal.SIGTERM),
        "dagster": (_start([str(bin_dir / "dagster"), "dev", "-w", args.workspace, "-h", "127.0.0.1",
                            "-p", str(args.dagster_port)]), signal.SIGINT),
    }
    print(f"Dagster UI: http://127.0.0.1:{args.dagster_port}\nMLflow UI:  {mlflow_url}\n"
          "Ctrl-C stops both.", flush=True)
    stopping = {"why": ""}

    def on_signal(signum, _frame) -> None:
        stopping["why"] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    parent = os.getppid()
    try:
        while not stopping["why"]:
            if os.getppid() != parent:  # make was killed without passing the signal on
                stopping["why"] = "parent exited"
                break
            dead = [name for name, (proc, _) in servers.items() if proc.poll() is not None]
            if dead:
                stopping["why"] = f"{dead[0]} exited with code {servers[dead[0]][0].returncode}"
                break
            time.sleep(0.5)
    finally:
        print(f"stopping the UIs ({stopping['why'] or 'exit'})", file=sys.stderr, flush=True)
        stop(servers)
    return 0 if stopping["why"] in ("SIGINT", "SIGTERM", "SIGHUP", "parent exited") else 1


if __name__ == "__main__":
    sys.exit(main())
