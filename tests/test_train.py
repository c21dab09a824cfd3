from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

import llm.checkpoint as checkpoint_module
import llm.device as device_module
from llm.config import TrainParams
from llm.device import cpu_has_bf16
from llm.errors import UserError
from llm.io import read_json
from llm.layout import Layout
from llm.train import TrainingDiverged, lr_at, train
from tests.conftest import REPO, deep_merge, load, project_env, write_params
from tests.devices import DEVICES, on_device


def project_from(built, tmp_path: Path, **override) -> tuple[Path, object]:
    """A project sharing the built data stages, with its own params, models and MLflow store."""
    root, params = built
    (tmp_path / "data").mkdir(parents=True)
    for name in ("clean", "tokenizer", "shards"):
        (tmp_path / "data" / name).symlink_to(getattr(Layout(root), name))
    write_params(tmp_path, deep_merge(params.model_dump(mode="json"), override))
    return tmp_path, load(tmp_path)


def weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Layout(root).final / "model.safetensors"))


def test_two_seeded_runs_give_identical_weights(built, tmp_path: Path):
    a, pa = project_from(built, tmp_path / "a")
    b, pb = project_from(built, tmp_path / "b")
    assert not torch.are_deterministic_algorithms_enabled()
    train(pa, Layout(a))
    assert not torch.are_deterministic_algorithms_enabled()  # train's switch does not outlive it
    train(pb, Layout(b))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    files = sorted(p.name for p in Layout(a).final.iterdir())
    # the whole artifact
    assert all((Layout(a).final / f).read_bytes() == (Layout(b).final / f).read_bytes() for f in files)
    assert (read_json(Layout(a).metrics("train"))["final_val_loss"]
            == read_json(Layout(b).metrics("train"))["final_val_loss"])


@pytest.mark.slow
def test_compiled_training_on_two_threads_gives_the_same_weights_in_two_processes(built, tmp_path: Path):
    """torch.compile's CPU kernels sum some gradients in thread-timing order unless training asks
    for deterministic algorithms; then two processes train to the same bytes."""
    hashes = []
    for name in ("a", "b"):
        root, _ = project_from(built, tmp_path / name, train={"compile": True, "threads": 2, "max_steps": 8})
        proc = subprocess.run([sys.executable, "-m", "llm.cli", "train"], cwd=root, capture_output=True, text=True,
                              timeout=600,
                              env=project_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        hashes.append((Layout(root).final / "model.safetensors").read_bytes())
    assert hashes[0] == hashes[1]


@pytest.mark.skipif(not cpu_has_bf16(), reason="needs a CPU with bf16 instructions")
def test_bf16_training_on_a_cpu_learns_keeps_fp32_weights_and_is_seeded(built, tmp_path: Path):
    runs = []
    for name in ("a", "b"):
        root, params = project_from(built, tmp_path / name, train={"precision": "bf16", "max_steps": 12})
        train(params, Layout(root))
        runs.append(root)
    a, b = runs
    wa, wb = weights(a), weights(b)
    assert all(w.dtype == torch.float32 for w in wa.values())  # autocast: the weights stay fp32
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    history = read_json(Layout(a).metrics("train"))
    assert history["final_val_loss"] < history["initial_val_loss"] - 0.1  # it learns
    # bf16 is not fp32: the same seed in fp32 ends elsewhere (the option does something).
    c, pc = project_from(built, tmp_path / "c", train={"precision": "fp32", "max_steps": 12})
    train(pc, Layout(c))
    assert not all(torch.equal(wa[k], weights(c)[k]) for k in wa)


def test_bf16_on_a_cpu_without_it_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="train.precision: bf16 needs a CPU with bf16"):
        device_module.pick_device("cpu", 0, "bf16")
    assert device_module.pick_device("cpu", 0, "auto").dtype == torch.float32


CLASSIC = {"model": {"position": "learned", "norm": "layernorm", "qk_norm": False, "mlp": "gelu", "zero_init": False,
                     "bias": True},
           "train": {"optimizer": "adamw", "schedule": "cosine"}}
MODERN = {"model": {"position": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "zero_init": True,
                    "bias": False},
          "train": {"optimizer": "muon", "schedule": "wsd"}}


# On CUDA bf16 autocast and non-deterministic kernels move a resumed run's numbers a little.
RESUME_LOSS_TOL = 0.01  # |val loss, resumed - uninterrupted|, nats
RESUME_WEIGHT_TOL = 0.01  # ||w_resumed - w_uninterrupted|| / ||w_uninterrupted|| over all weights


def relative_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
    return (diff / sum(float(a[k].float().pow(2).sum()) for k in a)) ** 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["classic", "modern"])
def test_resume_matches_an_uninterrupted_run(built, tmp_path: Path, recipe: str, device: str):
    """A run killed after its checkpoint and resumed ends as the uninterrupted run: bit for bit on
    the CPU, within RESUME_LOSS_TOL and RESUME_WEIGHT_TOL on CUDA."""
    override = deep_merge({"model": {"dropout": 0.1}}, MODERN if recipe == "modern" else CLASSIC)
    override = deep_merge(override, on_device(device))
    cut, pc = project_from(built, tmp_path / "cut", **override)
    full_drop, pfd = project_from(built, tmp_path / "full_drop", **override)
    train(pfd, Layout(full_drop))

    # SIGKILL the second run right after its checkpoint at step 3: no cleanup code runs.
    env = project_env(LLM_FAULT_POINT="train.checkpoint.3")
    proc = subprocess.run([sys.executable, "-m", "llm.cli", "train", "--params", str(cut / "params.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not Layout(cut).final.exists()
    assert torch.load(Layout(cut).checkpoints / "last.pt", weights_only=True)["step"] == 3
    summary = train(pc, Layout(cut), resume="always")
    assert summary["steps"] == 6
    wa, wb = weights(full_drop), weights(cut)
    uninterrupted = read_json(Layout(full_drop).metrics("train"))
    if device == "cpu":
        assert all(torch.equal(wa[k], wb[k]) for k in wa)  # dropout RNG, data position and optimizer all restored
        assert Layout(cut).loss_csv.read_text() == Layout(full_drop).loss_csv.read_text()
        assert summary["initial_val_loss"] == uninterrupted["initial_val_loss"]
    else:
        assert wa.keys() == wb.keys() and relative_l2(wa, wb) <= RESUME_WEIGHT_TOL
        assert abs(summary["final_val_loss"] - uninterrupted["final_val_loss"]) <= RESUME_LOSS_TOL
        assert abs(summary["initial_val_loss"] - uninterrupted["initial_val_loss"]) <= RESUME_LOSS_TOL


def test_resume_always_without_a_checkpoint_is_a_clear_error(built, tmp_path: Path):
    root, params = project_from(built, tmp_path)
    with pytest.raises(UserError, match=r"^train --resume: no checkpoint at .*models/checkpoints/last.pt$"):
        train(params, Layout(root), resume="always")


def test_a_checkpoint_of_other_params_is_not_resumed(built, tmp_path: Path, caplog):
    root, params = project_from(built, tmp_path)
    train(params, Layout(root))
    old = weights(root)
    changed = deep_merge(params.model_dump(mode="json"), {"train": {"learning_rate": 0.003}})
    write_params(root, changed)
    # --resume refuses it, naming what differs; without, the run says so and starts over
    with pytest.raises(UserError, match=r"last.pt \(step 6\) is of a run with train.learning_rate 0.002 -> 0.003; "
                                        r"put those back to resume it, or drop --resume to start over$"):
        train(load(root), Layout(root), resume="always")
    with caplog.at_level("WARNING", logger="llm.train"):
        train(load(root), Layout(root))
    assert "is of a run with train.learning_rate 0.002 -> 0.003; starting from scratch" in caplog.text
    # The run started from scratch: its weights are those of a fresh run of the new params, not
    # the old checkpoint's (which is at max_steps and would be returned unchanged if resumed).
    fresh, _ = project_from(built, tmp_path / "fresh", train={"learning_rate": 0.003})
    train(load(fresh), Layout(fresh))
    new = weights(root)
    assert all(torch.equal(new[k], weights(fresh)[k]) for k in new)
    assert not all(torch.equal(new[k], old[k]) for k in new)
    # ... while a change that does not alter the math (the log interval) keeps it:
    write_params(root, deep_merge(changed, {"train": {"log_interval": 3}}))
    assert train(load(root), Layout(root), resume="always")["steps"] == 6


def test_a_checkpoint_written_by_other_code_is_not_resumed(built, tmp_path: Path, monkeypatch):
    root, params = project_from(built, tmp_path)
    train(params, Layout(root))
    assert train(params, Layout(root), resume="always")["steps"] == 6  # same code: resumed
    # An edit to the model or the training step (DVC reruns train for it) must not hand back the
    # model the old code trained:
    monkeypatch.setattr(checkpoint_module, "code_version", lambda stage: "other-code")
    with pytest.raises(UserError, match=r"is of a run with the code of `llm train`; put those back"):
        train(params, Layout(root), resume="always")


def test_what_differs_from_a_checkpoint_is_named_key_by_key():
    from llm.checkpoint import fingerprint_difference

    base = {"seed": 1, "model": {"n_layer": 2, "n_embd": 32}, "train": {"learning_rate": 0.002}, "data": ["a"],
            "tokenizer": "t", "code": "c"}
    dump = lambda **kw: json.dumps({**base, **kw})
    assert fingerprint_difference(dump(), dump(seed=2)) == "seed 1 -> 2"
    assert fingerprint_difference(dump(), dump(data=["b"], code="d")) == "the train shards, the code of `llm train`"
    assert (fingerprint_difference(dump(), dump(model={"n_layer": 4, "n_embd": 64, "mlp": "swiglu"}))
            == "model.mlp (unset) -> swiglu, model.n_embd 32 -> 64, model.n_layer 2 -> 4")
    assert (fingerprint_difference(dump(), dump(model={"n_layer": 4, "n_embd": 64}, train={"learning_rate": 1}),
                                   most=2) == "model.n_embd 32 -> 64, model.n_layer 2 -> 4 and 1 more")
    assert fingerprint_difference("0123abcd0123abcd", dump()) == "other params, data or code"  # an older checkpoint
    assert fingerprint_difference(None, dump()) == "other params, data or code"


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(built, tmp_path: Path, monkeypatch):
    root, params = project_from(built, tmp_path)
    monkeypatch.setenv("LLM_FAULT_NAN", "train.rank0.step4")  # after step 4, rank 0 diverges: NaN at step 5
    with pytest.raises(TrainingDiverged,
                       match=r"train: loss is nan at step 5; the last good checkpoint is .*last.pt \(step 3\)"):
        train(params, Layout(root))
    ckpt = torch.load(Layout(root).checkpoints / "last.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not Layout(root).final.exists()


def test_mlflow_run_has_params_tags_per_step_metrics_and_the_model(built, tmp_path: Path):
    import mlflow

    root, params = project_from(built, tmp_path)
    train(params, Layout(root))
    run_id = read_json(Layout(root).metrics("train"))["mlflow_run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run = mlflow.get_run(run_id)
    assert run.data.params["train.learning_rate"] == str(params.train.learning_rate)
    assert run.data.params["model.n_embd"] == "32"
    assert run.data.tags["stage"] == "train" and run.data.tags["torch"] == torch.__version__
    assert "git.commit" in run.data.tags and run.data.tags["device"].startswith("CPU")
    # A readable name (shape and commit; no git here) in an experiment MLflow opens as model training.
    assert run.info.run_name == "gpt-2x32-nogit"
    tags = mlflow.get_experiment(run.info.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.llm-training-runs"])  # the saved "Training runs" view
    state = json.loads(view["state"])
    assert view["name"] == "Training runs" and state["orderByKey"] == "metrics.`val_bpb`" and state["orderByAsc"]
    assert {"metrics.`val_bpb`", "metrics.`tokens_per_sec`"} <= set(state["selectedColumns"])
    history = mlflow.MlflowClient().get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.model"} <= artifacts


def test_tokens_per_step_must_divide(built, tmp_path: Path):
    root, params = project_from(built, tmp_path, train={"tokens_per_step": 300})
    with pytest.raises(UserError,
                       match=r"train.tokens_per_step \(300\) must be a multiple of batch_size \* block_size \* "
                             r"processes \(4 \* 32 \* 1 = 128\)"):
        train(params, Layout(root))


def test_learning_rate_schedule():
    tp = TrainParams(learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, tp) == pytest.approx(0.1)
    assert lr_at(9, tp) == pytest.approx(1.0)
    assert lr_at(60, tp) == pytest.approx(0.55)
    assert lr_at(110, tp) == pytest.approx(0.1)
    assert all(lr_at(s, tp) >= lr_at(s + 1, tp) for s in range(10, 120))


def test_warmup_stable_decay_schedule():
    tp = TrainParams(learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="wsd",
                     decay_fraction=0.2)
    assert lr_at(0, tp) == pytest.approx(0.1) and lr_at(9, tp) == pytest.approx(1.0)
    assert all(lr_at(s, tp) == 1.0 for s in range(10, 88))  # stable until the last 22 steps
    assert lr_at(99, tp) == pytest.approx(1.0 - 0.9 * 11 / 22)  # linear on the way down
    assert lr_at(110, tp) == pytest.approx(0.1)
    assert all(lr_at(s, tp) >= lr_at(s + 1, tp) for s in range(10, 120))
    sqrt = tp.model_copy(update={"decay_shape": "sqrt"})
    assert [lr_at(s, sqrt) for s in (87, 110)] == [1.0, pytest.approx(0.1)]
    assert lr_at(93, sqrt) == pytest.approx(1.0 - 0.9 * math.sqrt(5 / 22))  # 1 - sqrt: below linear's 1 - 5/22
    assert all(lr_at(s, sqrt) <= lr_at(s, tp) for s in range(88, 110))


def test_train_outputs(built, tmp_path: Path):
    root, params = project_from(built, tmp_path)
    summary = train(params, Layout(root))
    lay = Layout(root)
    assert sorted(p.name for p in lay.final.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert read_json(lay.metrics("train")) == summary
    # Throughput over the steps' own time: not more than the tokens over the time left after evaluating.
    step_seconds = summary["train_seconds"] - summary["eval_seconds"]
    rate = summary["tokens_per_sec"]  # (the bounds allow for the rounding of seconds to 0.1)
    assert (0.9 * summary["tokens_seen"] / summary["train_seconds"] <= rate
            <= 1.25 * summary["tokens_seen"] / step_seconds)
    assert 0 < summary["mfu"] < 1 and summary["tokens_per_sec_per_device"] == summary["tokens_per_sec"]
    assert summary["compile_seconds"] == 0 and summary["graph_breaks"] is None  # nothing compiled
    # The initial val loss is measured on the untrained model: near ln(vocab), not equal to it.
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert (abs(summary["initial_val_loss"] - math.log(512)) < 0.2
            and summary["initial_val_loss"] != round(math.log(512), 5))
    rows = lay.loss_csv.read_text().splitlines()
    assert rows[0] == "step,tokens,train_loss,val_loss,lr" and [r.split(",")[0] for r in rows[1:]] == ["3", "6"]


def test_throughput_leaves_out_the_evaluations_inside_the_steps_time_only(monkeypatch):
    """The last evaluation comes after the last step's time is taken: taking it out of the steps'
    time as well left a short run with no time, and a rate of tokens per 1e-9 s."""
    import llm.train as train_module
    from llm.device import pick_device
    from llm.distributed import Dist
    from llm.train import Meter, StepResult

    clock = [0.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock[0])
    tp = TrainParams(max_steps=4, log_interval=2, eval_interval=2, tokens_per_step=1000, compile=False)
    evaluator, state = SimpleNamespace(seconds=0.0), SimpleNamespace(step=0, elapsed=0.0)
    meter = Meter(tp, state, flops_per_token=1.0, peak=1e6, device=pick_device("cpu"), dist=Dist(), evaluator=evaluator)
    for step in range(1, 5):
        clock[0] += 1.0  # a step: 1 s
        state.step = step
        meter.after_step(state, StepResult(loss=1.0, grad_norm=1.0), lr=0.1, stopping=step == 4)
        if step % 2 == 0:  # a 3 s evaluation: step 2's is inside step 3's time, step 4's after the last step's
            clock[0] += 3.0
            evaluator.seconds += 3.0
    summary = meter.summary(state)
    assert state.elapsed == 7.0 and summary["eval_seconds"] == 3.0
    assert summary["tokens_per_sec"] == 1000  # 4 steps of 1000 tokens in 4 s


def test_graph_breaks_counts_those_torch_compile_took_in_this_process():
    from llm.train import graph_breaks

    def two_graphs(x: torch.Tensor) -> torch.Tensor:
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    before = graph_breaks() or 0
    torch.compile(two_graphs, backend="eager")(torch.ones(2))
    assert graph_breaks() == before + 1


# What a bare GPU node lacks (../shared/gpu/README.md lists what it has): blocked as modules, so
# importing any of them fails as it would there.
NOT_ON_A_BARE_NODE = ["mlflow", "dagster", "dagster_pipes", "ftfy", "rensa", "markdown_it_pyrs", "py3langid", "ray",
                      "pandera", "matplotlib", "fsspec", "boto3", "psutil"]
BARE = f"""
import sys
for name in {NOT_ON_A_BARE_NODE!r}:
    sys.modules[name] = None  # `import name` raises ImportError
from llm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_training_and_evaluation_run_where_only_the_training_path_is_installed(built, tmp_path: Path):
    root, _ = project_from(built, tmp_path, tracking={"enabled": False})
    env = project_env()
    for stage in ("train", "evaluate"):
        proc = subprocess.run([sys.executable, "-c", BARE, stage, "--params", str(root / "params.yaml")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_json(Layout(root).metrics("train"))
    assert summary["steps"] == 6 and "mlflow_run_id" not in summary
    assert not (root / "mlflow.db").exists()
    assert "val_bpb" in read_json(Layout(root).metrics("eval"))
    # The same node with tracking left on: one line that names the knob, before a step is taken.
    write_params(root, deep_merge(yaml.safe_load((root / "params.yaml").read_text()), {"tracking": {"enabled": True}}))
    shutil.rmtree(Layout(root).checkpoints)
    proc = subprocess.run([sys.executable, "-c", BARE, "train", "--params", str(root / "params.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tracking: {enabled: false}" in errors[0] and "pip install mlflow" in errors[0], errors
    assert not Layout(root).checkpoints.exists()


def test_a_plan_the_corpus_cannot_feed_stops_before_the_first_step_naming_what_it_needs(caplog):
    from llm.config import load_params
    from llm.train import plan_fits_data

    default_corpus = {"splits": {"train": {"tokens": 1_609_737, "bytes": 4_381_346}}}  # its measured train split
    gpt2 = load_params(REPO / "presets" / "gpt2-small.yaml")
    with pytest.raises(UserError) as err:
        plan_fits_data(gpt2, 124_000_000, default_corpus)
    assert str(err.value) == ("train: preset 'gpt2-small' plan 2,621,440,000 tokens, 1,628 passes over this corpus's "
                              "1,609,737 train tokens (4.4 MB); they need about 1,784 MB of train text for "
                              "train.max_epochs: 4 (or train.max_steps: 12 here)")
    with caplog.at_level("INFO", logger="llm.train"):
        plan_fits_data(load_params(REPO / "params.yaml"), 1_054_080, default_corpus)  # the CPU default fits
    assert "11,468,800 planned tokens = 7.1 passes over the data; 10.9 tokens per parameter" in caplog.text


def test_a_block_longer_than_a_split_stops_before_training_with_a_size_that_fits():
    """Seeded split sizes, block sizes and process counts: blocks_fit refuses exactly the shapes
    TokenBlocks could not serve (a block of block_size + 1 tokens per process, one for val), and
    the size it names is a power of two that both splits serve."""
    import re

    from llm.train import blocks_fit

    def manifest(train: int, val: int) -> dict:
        return {"splits": {"train": {"tokens": train}, "val": {"tokens": val}}}

    rng = random.Random(5)
    refused = 0
    for i in range(500):
        m = manifest(rng.randint(2, 200_000), rng.randint(2, 50_000)) if i % 50 else manifest(rng.randint(2, 6), 3)
        world, block = rng.randint(1, 4), 1 << rng.randint(2, 17)
        serves = all((m["splits"][s]["tokens"] - 1) // per >= block for s, per in (("train", world), ("val", 1)))
        try:
            blocks_fit(SimpleNamespace(model=SimpleNamespace(block_size=block)), m, world)
        except UserError as e:
            assert not serves, (m, world, block)
            refused += 1
            if min((m["splits"]["train"]["tokens"] - 1) // world, m["splits"]["val"]["tokens"] - 1) < 1:
                assert "no block size fits: add text to the corpus" in str(e)
                continue
            fits = int(re.search(r"use model\.block_size: (\d+) or less", str(e)).group(1))
            assert fits & (fits - 1) == 0 and "\n" not in str(e)
            blocks_fit(SimpleNamespace(model=SimpleNamespace(block_size=fits)), m, world)  # it fits
            with pytest.raises(UserError):  # and is the largest power of two that does
                blocks_fit(SimpleNamespace(model=SimpleNamespace(block_size=2 * fits)), m, world)
        else:
            assert serves, (m, world, block)
    assert 100 < refused < 400
