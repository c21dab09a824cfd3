"""`make gpu-check` (benchmarks/gpu.py): one line and exit 0 without CUDA, and the machinery that
runs its parts on a GPU machine: a failing or hanging part is recorded and the others still run,
the params it writes, the numbers it reads from a training run's log and metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
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
                  "tracking: {enabled: false}", "resume", "export", "ddp"):
        assert words in proc.stdout, words


def test_deep_merge_merges_mappings_and_a_none_deletes():
    base = {"train": {"max_steps": 5000, "batch_size": 32}, "tracking": {}, "model": {"n_layer": 12}}
    out = gpu.deep_merge(base, {"train": {"max_steps": 30, "max_epochs": 1000.0}, "tracking": {"enabled": False},
                                "model": None})
    assert out == {"train": {"max_steps": 30, "batch_size": 32, "max_epochs": 1000.0}, "tracking": {"enabled": False}}
    assert base["train"]["max_steps"] == 5000 and "model" in base


def test_a_run_folder_is_the_preset_with_the_overlays_tracking_off_and_the_prepped_data(tmp_path: Path, monkeypatch):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"preset": "tiny", "model": {"n_layer": 2}, "train": {"max_steps": 5000}}))
    prepped = tmp_path / "prepped"
    for sub in ("tokenizer", "shards"):
        (prepped / "tiny" / sub).mkdir(parents=True)
    (prepped / "tiny" / "shards" / "manifest.json").write_text("{}")
    monkeypatch.setattr(gpu, "PREPPED", prepped)
    check = gpu.Check(work=tmp_path / "work", presets=[str(preset)], deadline=time.monotonic() + 60)
    run_dir = check.new_run("train-tiny", str(preset), gpu.RUN_OVERLAY, {"train": {"max_steps": 30}})
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert params["tracking"] == {"enabled": False}
    assert params["train"]["max_steps"] == 30 and params["train"]["device"] == "cuda"
    assert params["model"] == {"n_layer": 2} and params["preset"] == "tiny"
    assert (run_dir / "data" / "shards" / "manifest.json").is_file() and (run_dir / "data" / "tokenizer").is_dir()

    # accum: tokens_per_step is that many micro-batches (batch_size x block_size) of one process
    run_dir = check.new_run("ddp", str(preset), {"train": {"batch_size": 4}, "model": {"block_size": 64}}, accum=4)
    assert yaml.safe_load((run_dir / "params.yaml").read_text())["train"]["tokens_per_step"] == 4 * 4 * 64

    monkeypatch.setattr(gpu, "PREPPED", tmp_path / "nothing")
    with pytest.raises(gpu.PartFailed, match="make gpu-prep"):
        check.new_run("again", str(preset))


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path: Path, capsys):
    check = gpu.Check(work=tmp_path, presets=["gpu-small"], deadline=time.monotonic() + 120)

    def fails(check, timeout):
        raise gpu.PartFailed("error: params.yaml: train.max_epochs: unknown key", {"run": "somewhere"})

    def crashes(check, timeout):
        raise RuntimeError("a bug in the part")

    check.run_part("first", 60, fails)
    check.run_part("second", 60, crashes)
    check.run_part("third", 60, lambda check, timeout: {"tokens_per_sec": 1.0})
    parts = check.parts
    assert parts["first"]["status"] == "failed" and "unknown key" in parts["first"]["error"]
    assert parts["first"]["run"] == "somewhere"
    assert parts["second"]["status"] == "failed" and "RuntimeError: a bug" in parts["second"]["error"]
    assert parts["third"]["status"] == "ok" and parts["third"]["tokens_per_sec"] == 1.0

    doc = gpu.write_doc({"parts": check.parts}, tmp_path / "out" / "gpu_check.json", time.monotonic())
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert saved["ok"] is False and doc["headline"]["failed_parts"] == ["first", "second"]
    text = gpu.render(doc)
    assert "first" in text and "failed" in text and "third" in text
    assert "== first: failed" in capsys.readouterr().out


def test_a_part_is_skipped_once_the_budget_is_spent(tmp_path: Path):
    check = gpu.Check(work=tmp_path, presets=["gpu-small"], deadline=time.monotonic() + 5)
    record = check.run_part("late", 60, lambda check, timeout: pytest.fail("ran past the budget"))
    assert record["status"] == "skipped" and "budget" in record["error"]


def test_a_command_past_its_timeout_is_killed_with_its_children(tmp_path: Path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(120)")
    proc = gpu.run([sys.executable, "-c", code], env=dict(os.environ), timeout=3, log=tmp_path / "log.txt")
    assert proc.timed_out and not proc.ok and proc.seconds < 20
    assert [line for _, line in proc.lines] == ["started"]
    assert "timed out" in proc.error_line()
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is asynchronous
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's child outlived the timeout")


def test_error_line_and_worker_result_are_read_from_the_output():
    proc = gpu.Proc(2, 1.0, False, [(0.1, "12:00:00 INFO llm.train: starting"),
                                    (0.2, "error: params.yaml: train.max_epochs: unknown key")])
    assert proc.error_line() == "error: params.yaml: train.max_epochs: unknown key"
    proc = gpu.Proc(1, 1.0, False, [(0.1, "Traceback (most recent call last):"), (0.2, '  File "x.py"'),
                                    (0.3, "RuntimeError: No backend type associated with device type cpu")])
    assert proc.error_line().startswith("RuntimeError: No backend type")
    proc = gpu.Proc(0, 1.0, False, [(0.1, "noise"), (0.2, gpu.RESULT_MARK + json.dumps({"ok": True, "x": 1}))])
    assert proc.result() == {"ok": True, "x": 1}


LOG = """\
12:00:00 INFO llm.train: train: 124.48 M params, 12 layers x 768 wide, block 1024, vocab 50304
12:00:50 INFO llm.train: step 5/30 loss 9.1 lr 1e-4 grad 1.0 52,000 tok/s (52,000 per device) mfu 5.0% eta 60s
12:00:57 INFO llm.train: step 10/30 loss 8.1 lr 2e-4 grad 1.0 400000 tok/s (400000 per device) mfu 40.0% eta 10s
12:01:04 INFO llm.train: step 15/30 loss 7.6 lr 3e-4 grad 1.0 390000 tok/s mfu 39.0% eta 5s
12:01:11 INFO llm.train: step 20/30 loss 7.2 lr 3e-4 grad 1.0 410000 tok/s mfu 41.0% eta 0s
V1201 [__graph_breaks] Graph break in user code at /x/llm/model.py:10
V1201 [__graph_breaks] Graph Break Reason: something
V1201 [__recompiles] Recompiling function forward in /x/llm/model.py:20
"""


def timed(text: str) -> list[tuple[float, str]]:
    """Lines with the second of their HH:MM:SS stamp (the runner stamps them as they arrive)."""
    out = []
    for line in text.splitlines():
        stamp = line.split()[0]
        t = int(stamp[3:5]) * 60 + int(stamp[6:8]) if stamp.count(":") == 2 else 90.0
        out.append((float(t), line))
    return out


def test_a_training_run_is_summarised_from_its_metrics_and_its_log():
    metrics = {"steps": 20, "tokens_per_sec": 300000, "flops_per_token": 1e9, "peak_flops": 989e12, "mfu": 0.3033,
               "processes": 1, "peak_source": "H200 bf16 datasheet peak", "final_val_loss": 7.0}
    proc = gpu.Proc(0, 80.0, False, timed(LOG), max_gpu_mib=30000.0)
    s = gpu.summarize_train(metrics, proc, measured_peak=800e12)
    assert s["tokens_per_sec_steady"] == 400000 and s["steady_windows"] == 3  # the first window compiles
    assert s["tokens_per_sec_per_device"] == 300000
    assert s["mfu_steady"] == pytest.approx(400000 * 1e9 / 989e12, abs=1e-4)
    assert s["mfu_steady_vs_measured_peak"] == pytest.approx(0.5, abs=1e-4)
    assert s["compile_seconds_estimate"] == pytest.approx(50 - 5 * 1.4, abs=0.1)
    assert s["graph_breaks_logged"] == 1 and s["recompiles_logged"] == 1
    assert s["nvidia_smi_max_memory_mib"] == 30000.0 and s["compile_seconds"] is None  # read with .get()


def test_junit_counts(tmp_path: Path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_gpu" name="test_a" time="1"/>
      <testcase classname="tests.test_gpu" name="test_b" time="1"><failure message="assert 1 == 2"/></testcase>
      <testcase classname="tests.test_gpu" name="test_c" time="0"><skipped message="needs two GPUs"/></testcase>
    </testsuite></testsuites>""")
    counts = gpu.junit_counts(xml)
    assert {k: counts[k] for k in ("tests", "passed", "failed", "errors", "skipped")} == \
        {"tests": 3, "passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert counts["not_passed"][0]["test"] == "tests.test_gpu::test_b"


def test_the_cuda_tests_include_test_gpu_and_files_marked_for_cuda():
    files = gpu.cuda_test_files()
    assert "tests/test_gpu.py" in files and "tests/test_gpu_check.py" not in files


def test_the_result_goes_to_out_when_it_is_set(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.output_path("NVIDIA H200", tmp_path / "work", False) == tmp_path / "gpu_check.json"
    monkeypatch.delenv("OUT")
    assert gpu.output_path("NVIDIA H200", tmp_path / "work", False).name == "gpu_check-nvidia-h200.json"
