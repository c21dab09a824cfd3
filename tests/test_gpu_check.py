"""`make gpu-check` (benchmarks/gpu.py): one line and exit 0 without CUDA, and the machinery that
runs its parts on a GPU machine: a failing or hanging part is recorded and the others still run,
the params it writes, the wheels it unpacks, the pytest run without what a GPU machine lacks, the
numbers it reads from a training run's metrics/train.json."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu = load_script()


def no_cuda_env(tmp_path: Path) -> dict[str, str]:
    """No GPU visible, and a `torch` that fails to import: the no-CUDA path must not need it."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('gpu.py imported torch on its no-CUDA path')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT",)}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(tmp_path / "fake"))
    return env


def test_without_cuda_it_prints_one_line_and_exits_0(tmp_path: Path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=no_cuda_env(tmp_path), capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "no CUDA device" in proc.stdout, proc.stdout
    assert proc.stderr == ""
    assert time.monotonic() - t0 < 30


def test_make_gpu_check_without_cuda_is_the_same_one_line(tmp_path: Path):
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"], env=no_cuda_env(tmp_path),
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "no CUDA device" in proc.stdout, proc.stdout


def test_help_documents_the_modes():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for words in ("prep", "check", "no CUDA device", "--rehearse-on-cpu", "--budget", "gpu_check.json",
                  "tracking: {enabled: false}", "pytest -m cuda", "resume", "export", "ddp", "metrics/train.json"):
        assert words in proc.stdout, words


def test_a_run_folder_is_the_preset_with_the_overlays_tracking_off_and_the_prepped_data(tmp_path: Path, monkeypatch):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"preset": "tiny", "model": {"n_layer": 2}, "train": {"max_steps": 5000},
                                      "tracking": {"enabled": True}}))
    prepped = tmp_path / "prepped"
    for sub in ("tokenizer", "shards"):
        (prepped / "tiny" / sub).mkdir(parents=True)
    (prepped / "tiny" / "shards" / "manifest.json").write_text("{}")
    monkeypatch.setattr(gpu, "PREPPED", prepped)
    check = gpu.Check(work=tmp_path / "work", deadline=time.monotonic() + 60)
    run_dir = check.new_run("train-tiny", str(preset), {"train": {"max_steps": 30}})
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert params["tracking"] == {"enabled": False}
    assert params["train"]["max_steps"] == 30 and params["train"]["device"] == "cuda"
    assert params["model"] == {"n_layer": 2} and params["preset"] == "tiny"
    assert (run_dir / "data" / "shards" / "manifest.json").is_file() and (run_dir / "data" / "tokenizer").is_dir()

    # a rehearsal trains the same preset on this CPU, with a tiny model
    check.rehearsal = True
    params = yaml.safe_load((check.new_run("again", str(preset)) / "params.yaml").read_text())
    assert params["train"]["device"] == "cpu" and params["model"]["n_layer"] == gpu.REHEARSAL["model"]["n_layer"]

    monkeypatch.setattr(gpu, "PREPPED", tmp_path / "nothing")
    with pytest.raises(gpu.PartFailed, match="make gpu-prep"):
        check.new_run("again", str(preset))


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path: Path, capsys):
    check = gpu.Check(work=tmp_path, deadline=time.monotonic() + 120)

    def fails(check, timeout):
        raise gpu.PartFailed("error: params.yaml: train.max_epochs: unknown key", {"run": "somewhere"})

    def crashes(check, timeout):
        raise RuntimeError("a bug in the part")

    check.run_part("first", 60, fails)
    check.run_part("second", 60, crashes)
    check.run_part("third", 60, lambda check, timeout: {"tokens_per_sec": 1234, "detail": "10 steps"})
    parts = check.parts
    assert parts["first"]["status"] == "failed" and "unknown key" in parts["first"]["error"]
    assert parts["first"]["run"] == "somewhere"
    assert parts["second"]["status"] == "failed" and "RuntimeError: a bug" in parts["second"]["error"]
    assert parts["third"]["status"] == "ok" and parts["third"]["tokens_per_sec"] == 1234

    doc = {"parts": check.parts, "rehearsal_on_cpu": True, "work": str(tmp_path / "out")}
    path = gpu.write_doc(doc, time.monotonic())
    saved = json.loads(path.read_text())
    assert path == tmp_path / "out" / "gpu_check.json"
    assert saved["ok"] is False and [n for n, p in saved["parts"].items() if p["status"] != "ok"] == ["first", "second"]
    table = gpu.render(doc).splitlines()
    assert table[0].split()[:3] == ["part", "status", "s"]
    rows = {line.split()[0]: line for line in table[2:5]}
    assert "unknown key" in rows["first"] and "1234" in rows["third"] and "10 steps" in rows["third"]
    assert "== first: failed" in capsys.readouterr().out


def test_a_part_is_skipped_once_the_budget_is_spent(tmp_path: Path):
    check = gpu.Check(work=tmp_path, deadline=time.monotonic() + 5)
    record = check.run_part("late", 60, lambda check, timeout: pytest.fail("ran past the budget"))
    assert record["status"] == "skipped" and "budget" in record["error"]


def test_a_command_past_its_timeout_is_killed_with_its_children(tmp_path: Path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(120)")
    proc = gpu.run([sys.executable, "-c", code], timeout=3, log=tmp_path / "log.txt")
    assert proc.timed_out and not proc.ok and proc.seconds < 20
    assert proc.output == "started\n" and (tmp_path / "log.txt").read_text() == "started\n"
    assert "timed out" in proc.error_line()
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is asynchronous
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's child outlived the timeout")


def test_the_error_line_is_the_stages_own_else_the_exception_else_how_it_ended():
    proc = gpu.Proc(2, 1.0, False, "INFO llm.train: starting\nerror: params.yaml: train.max_epochs: unknown key\n")
    assert proc.error_line() == "error: params.yaml: train.max_epochs: unknown key"
    proc = gpu.Proc(1, 1.0, False, "Traceback (most recent call last):\n  File \"x.py\"\n"
                                   "RuntimeError: No backend type associated with device type cpu\n")
    assert proc.error_line().startswith("RuntimeError: No backend type")
    assert gpu.Proc(None, 9.0, True, "step 3\n").error_line() == "timed out after 9 s; last line: step 3"


def test_a_training_run_is_summarised_from_its_metrics_json():
    # 200 steps of 16 k tokens in 60 s of steps (evaluation left out), 20 s of them compiling the first
    metrics = {"steps": 200, "tokens_seen": 200 * 16384, "train_seconds": 62.0, "eval_seconds": 2.0,
               "compile_seconds": 20.0, "tokens_per_sec": 54613, "flops_per_token": 1e9, "peak_flops": 989e12,
               "mfu": 0.0552, "processes": 1, "peak_memory_bytes": 3 * 2**30, "graph_breaks": 0}
    s = gpu.summarize_train(metrics, measured_peak=800e12)
    assert {k: s[k] for k in metrics} == metrics  # train.json as it is
    assert s["tokens_per_sec_after_compile"] == pytest.approx(81920, abs=2)  # 3,276,800 tokens in 40 s
    assert s["mfu_after_compile"] == pytest.approx(81920 * 1e9 / 989e12, abs=1e-4)
    assert s["mfu_after_compile_vs_measured_peak"] == pytest.approx(81920 * 1e9 / 800e12, abs=1e-4)
    # two processes: MFU is per device, against one device's peak
    two = gpu.summarize_train({**metrics, "processes": 2}, measured_peak=800e12)
    assert two["tokens_per_sec_after_compile"] == s["tokens_per_sec_after_compile"]
    assert two["mfu_after_compile"] == pytest.approx(s["mfu_after_compile"] / 2, abs=1e-4)
    # nothing compiled: the same rate as train.json's
    assert gpu.summarize_train({**metrics, "compile_seconds": 0.0}, None)["tokens_per_sec_after_compile"] == 54613


PYTEST_OUTPUT = """\
..F.s
=========================== short test summary info ============================
FAILED tests/test_train.py::test_resume_matches_an_uninterrupted_run[classic-cuda] - assert 0.2 <= 0.01
SKIPPED [1] tests/test_gpu.py:20: needs a CUDA GPU
1 failed, 3 passed, 1 skipped, 2 errors, 30 deselected in 12.34s
"""


def test_the_tests_part_reads_pytests_summary():
    counts = gpu.pytest_counts(PYTEST_OUTPUT)
    assert {k: counts[k] for k in ("passed", "failed", "skipped", "error")} == \
        {"passed": 3, "failed": 1, "skipped": 1, "error": 2}
    assert counts["summary"].startswith("1 failed, 3 passed") and len(counts["not_passed"]) == 1
    assert gpu.pytest_counts("no tests ran in 0.01s\n")["passed"] == 0


def test_the_tests_part_runs_test_gpu_and_every_file_with_device_tests():
    files = gpu.device_test_files()
    assert {"tests/test_gpu.py", "tests/test_train.py", "tests/test_export.py", "tests/test_ddp.py"} <= set(files)
    assert "tests/test_gpu_check.py" not in files and "tests/test_model.py" not in files


def test_the_check_runs_pytest_without_what_a_gpu_machine_lacks(tmp_path: Path):
    (tmp_path / "test_bare.py").write_text("def test_mlflow():\n    import mlflow  # noqa: F401\n\n"
                                           "def test_torch():\n    import torch  # noqa: F401\n")
    proc = subprocess.run([sys.executable, "-c", gpu.PYTEST, "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout[-3000:]
    assert "ModuleNotFoundError: import of mlflow halted" in proc.stdout


def test_only_the_wheels_of_missing_modules_are_unpacked(tmp_path: Path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for dist, module in (("no_such_module", "no_such_module"), ("json_wheel", "json_wheel")):
        with zipfile.ZipFile(wheels / f"{dist}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{module}/__init__.py", "")
    monkeypatch.setattr(gpu, "WHEELS", wheels)
    monkeypatch.setattr(gpu, "CARRIED", {"no_such_module": ("no-such-module",), "json": ("json-wheel",)})
    info = gpu.install_wheels(tmp_path / "site")
    assert info["installed"] == ["no_such_module-1.0-py3-none-any.whl"] and len(info["carried"]) == 2
    assert (tmp_path / "site" / "no_such_module" / "__init__.py").is_file()
    assert not (tmp_path / "site" / "json_wheel").exists()  # json imports here


def test_the_result_goes_to_out_when_it_is_set(tmp_path: Path, monkeypatch):
    doc = {"parts": {"env": {"gpu_name": "NVIDIA H200"}}, "rehearsal_on_cpu": False, "work": str(tmp_path)}
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.output_path(doc) == tmp_path / "gpu_check.json"
    monkeypatch.delenv("OUT")
    assert gpu.output_path(doc).name == "gpu_check-nvidia-h200.json"
    assert gpu.output_path({**doc, "rehearsal_on_cpu": True}) == tmp_path / "gpu_check.json"
