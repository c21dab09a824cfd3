"""The MLflow tracking server under load: K concurrent clients, each logging training-like metric
batches (M metrics a step, B steps a call, as a training run's Tracker sends them), against the
team server's store (Postgres) and against sqlite, on the same machine in one run. Both servers
are `mlflow server --app-name basic-auth` with the same workers and login cache; only the
database differs.

    python benchmarks/tracking_load.py                      # K = 1, 4, 16
    python benchmarks/tracking_load.py --clients 1,4 --steps 100

Prints one table (points per second, p50 and p99 of a log call, Postgres against sqlite) and
writes benchmarks/out/tracking_load.json.

The client (`python benchmarks/tracking_load.py client ...`) is also what tests/test_serve.py
runs against the real server: every point it sends is a known function of its run, step and
metric, so a test can check that each was stored exactly once. A server that refuses it or goes
away ends it with one line naming the server (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.common import free_port, table  # noqa: E402

ADMIN, PASSWORD = "admin", "load-benchmark-password"
EXPERIMENT = "tracking-load"
T0_MS = 1_700_000_000_000  # the points' timestamps: fixed, so a resent batch is the same points


def point_value(run_name: str, step: int, metric: int) -> float:
    """The value every client logs for (run, step, metric): known to a reader in advance."""
    return float((sum(map(ord, run_name)) * 7919 + step * 31 + metric) % 100_003) / 1000.0


# ----------------------------------------------------------------------------- the client
def client(uri: str, run_name: str, steps: int, metrics: int, batch: int, out: Path | None, go: Path | None) -> int:
    import mlflow
    from mlflow.entities import Metric

    from llm.errors import server_problem

    try:
        c = mlflow.MlflowClient(uri)
        exp = c.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            try:
                exp_id = c.create_experiment(EXPERIMENT)
            except mlflow.exceptions.MlflowException as e:  # another client made it first
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp_id = c.get_experiment_by_name(EXPERIMENT).experiment_id
        else:
            exp_id = exp.experiment_id
        run = c.create_run(exp_id, run_name=run_name, tags={"load.client": run_name})
        if go is not None:  # every client ready (imports, run created) before the clock starts
            Path(f"{go}.{run_name}.ready").touch()
            while not go.exists():
                time.sleep(0.005)
        calls = []
        for first in range(0, steps, batch):
            points = [Metric(f"m{j}", point_value(run_name, step, j), T0_MS + step, step)
                      for step in range(first, min(first + batch, steps)) for j in range(metrics)]
            t = time.time()
            c.log_batch(run.info.run_id, metrics=points)
            calls.append((t, time.time()))
        c.set_terminated(run.info.run_id)
    except Exception as e:
        if line := server_problem(e):
            print(f"error: {line}", file=sys.stderr)
            return 2
        raise
    if out is not None:
        out.write_text(json.dumps({"run_id": run.info.run_id, "calls": calls}))
    print(json.dumps({"run_id": run.info.run_id, "points": steps * metrics}))
    return 0


def client_cmd(uri: str, run_name: str, steps: int, metrics: int = 8, batch: int = 10, out: Path | None = None,
               go: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "client", "--uri", uri, "--run-name", run_name,
           "--steps", str(steps), "--metrics", str(metrics), "--batch", str(batch)]
    return cmd + (["--out", str(out)] if out else []) + (["--go", str(go)] if go else [])


# ----------------------------------------------------------------------------- the servers
def start_server(store: str, work: Path) -> tuple[subprocess.Popen, str, object]:
    """An `mlflow server --app-name basic-auth` on `store` ("postgres" or "sqlite"): its process,
    its URL, and what to stop after it (the Postgres cluster's process, or None)."""
    from pipelines.postgres import Cluster
    from pipelines.serve import Service, wait_http, write_auth_ini

    work.mkdir(parents=True)
    env = dict(os.environ)
    pg = None
    if store == "postgres":
        cluster = Cluster(work / "postgres", free_port(), "bench-" + os.urandom(8).hex())
        cluster.init()
        pg = Service("postgres", cluster.command(), env, signal.SIGINT, cluster.popen_kwargs())
        pg.start(work, work)
        cluster.wait_ready(pg.proc)
        cluster.create_databases()
        env |= cluster.env
        backend, auth_db = cluster.url("mlflow"), cluster.url("mlflow_auth")
    else:
        backend, auth_db = f"sqlite:///{work / 'mlflow.db'}", f"sqlite:///{work / 'auth.db'}"
    ini = write_auth_ini(work / "auth.ini", auth_db, ADMIN)
    port = free_port()
    env |= {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    svc = Service("mlflow", [mlflow_bin, "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "2", "--backend-store-uri", backend,
                             "--artifacts-destination", str(work / "artifacts"), "--serve-artifacts"], env)
    svc.start(work, work)
    wait_http(f"http://127.0.0.1:{port}/health", svc.proc, "MLflow", work / "mlflow.log")
    return svc.proc, f"http://127.0.0.1:{port}", pg


def stop_server(proc: subprocess.Popen, pg) -> None:
    from pipelines.ui import stop

    stop({"mlflow": (proc, signal.SIGTERM)})
    if pg is not None:
        stop({"postgres": (pg.proc, signal.SIGINT)}, grace=30.0)


def load(uri: str, k: int, steps: int, metrics: int, batch: int, work: Path, tag: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    go = work / f"go-{tag}"
    env = os.environ | {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    names = [f"{tag}-c{i}" for i in range(k)]
    procs = [subprocess.Popen(client_cmd(uri, n, steps, metrics, batch, work / f"{n}.json", go), env=env,
                              stdout=subprocess.DEVNULL) for n in names]
    while not all(Path(f"{go}.{n}.ready").exists() for n in names):
        if any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit(f"a load client failed against {uri}")
        time.sleep(0.05)
    go.touch()
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a load client failed against {uri}")
    calls = [c for n in names for c in json.loads((work / f"{n}.json").read_text())["calls"]]
    wall = max(e for _, e in calls) - min(s for s, _ in calls)
    lat = sorted((e - s) * 1000 for s, e in calls)
    return {"clients": k, "calls": len(calls), "points": k * steps * metrics, "seconds": wall,
            "points_per_s": k * steps * metrics / wall, "p50_ms": statistics.median(lat),
            "p99_ms": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")
    c = sub.add_parser("client", help="one client: a run, its steps logged in batches")
    c.add_argument("--uri", required=True)
    c.add_argument("--run-name", required=True)
    c.add_argument("--steps", type=int, default=200)
    c.add_argument("--metrics", type=int, default=8)
    c.add_argument("--batch", type=int, default=10)
    c.add_argument("--out", type=Path)
    c.add_argument("--go", type=Path)
    ap.add_argument("--clients", default="1,4,16", help="K values, comma-separated")
    ap.add_argument("--steps", type=int, default=200, help="steps each client logs")
    ap.add_argument("--metrics", type=int, default=8, help="metrics a step")
    ap.add_argument("--batch", type=int, default=10, help="steps a log call")
    args = ap.parse_args(argv)
    if args.command == "client":
        return client(args.uri, args.run_name, args.steps, args.metrics, args.batch, args.out, args.go)
    ks = [int(k) for k in args.clients.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="tracking-load-") as tmp:
        Path(tmp).chmod(0o711)  # Postgres, run as `postgres` under root, must reach its data directory
        for store in ("postgres", "sqlite"):
            print(f"{store}: starting mlflow server (basic-auth)", flush=True)
            proc, uri, pg = start_server(store, Path(tmp) / store)
            try:
                for k in ks:
                    r = load(uri, k, args.steps, args.metrics, args.batch, Path(tmp) / store / "clients", f"k{k}")
                    results.append({"store": store, **r})
                    print(f"{store} K={k}: {r['points_per_s']:.0f} points/s, p50 {r['p50_ms']:.1f} ms, "
                          f"p99 {r['p99_ms']:.1f} ms", flush=True)
            finally:
                stop_server(proc, pg)
    by = {(r["store"], r["clients"]): r for r in results}
    rows = [[k, f"{by['postgres', k]['points_per_s']:.0f}", f"{by['sqlite', k]['points_per_s']:.0f}",
             f"{by['postgres', k]['points_per_s'] / by['sqlite', k]['points_per_s']:.2f}",
             f"{by['postgres', k]['p50_ms']:.1f}", f"{by['sqlite', k]['p50_ms']:.1f}",
             f"{by['postgres', k]['p99_ms']:.1f}", f"{by['sqlite', k]['p99_ms']:.1f}"] for k in ks]
    print(f"\n{args.steps} steps x {args.metrics} metrics a client, {args.batch} steps a log call "
          f"({args.batch * args.metrics} points); one run, same machine")
    print(table(["K clients", "Postgres points/s", "sqlite points/s", "ratio", "Postgres p50 ms", "sqlite p50 ms",
                 "Postgres p99 ms", "sqlite p99 ms"], rows, align="r" * 8, markdown=True))
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tracking_load.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
