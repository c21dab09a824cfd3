from __future__ import annotations

import bz2
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from llm.artifacts import load_final
from llm.device import pick_device
from llm.evaluate import ValDocs, bits_per_byte, compressor_bpb, evaluate, token_nll, unigram_nats
from llm.io import read_json
from llm.layout import Layout
from llm.tracking import register_and_gate, start_run
from llm.train import train
from tests.test_model import tiny
from tests.test_train import project_from


def test_bits_per_byte_by_hand():
    # 1000 tokens at 2.0 nats each over 1500 bytes: 2000 / ln 2 / 1500 bits per byte.
    assert bits_per_byte(2000.0, 1500) == pytest.approx(2000 / math.log(2) / 1500)
    assert bits_per_byte(1500 * math.log(2), 1500) == pytest.approx(1.0)  # one bit per byte


def test_token_nll_is_the_cross_entropy_of_each_window():
    from llm.device import pick_device

    model = tiny()
    stream = np.random.default_rng(0).integers(0, 64, size=70)
    nll = token_nll(model, stream, block_size=32, batch_size=2, device=pick_device("cpu"))
    assert nll.shape == (69,)
    # By hand: windows [0, 32), [32, 64), [64, 69) of predictions.
    expected = []
    for start, width in ((0, 32), (32, 32), (64, 5)):
        x = torch.from_numpy(stream[start : start + width])[None]
        y = torch.from_numpy(stream[start + 1 : start + 1 + width])
        logits = model(x)
        logp = torch.log_softmax(logits[0].double(), -1)
        expected += [-logp[i, y[i]].item() for i in range(width)]
    assert np.allclose(nll, expected, atol=1e-4)


def test_unigram_baseline_by_hand():
    counts = np.array([3, 1, 0])  # add-one: probabilities 4/7, 2/7, 1/7
    val = np.array([0, 2])
    assert unigram_nats(counts, val) == pytest.approx(-math.log(4 / 7) - math.log(1 / 7))


def test_compressors_on_repetitive_and_random_bytes():
    assert all(v < 0.5 for v in compressor_bpb(b"to be or not to be " * 500).values())
    noise = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    assert all(v > 7.9 for v in compressor_bpb(noise).values())
    data = b"a bz2 check " * 100
    assert compressor_bpb(data)["bz2"] == 8 * len(bz2.compress(data, 9)) / len(data)


def test_evaluate_stage(built, tmp_path: Path):
    root, params = project_from(built, tmp_path)
    train(params, Layout(root))
    result = evaluate(params, Layout(root))
    assert read_json(Layout(root).metrics("eval")) == result
    assert set(result["baseline_bpb"]) == {"gzip", "bz2", "xz", "unigram"}
    # bits per byte recomputed from scratch: every val token but the first is predicted once.
    docs = ValDocs(Layout(root).shards, params.evaluate.max_tokens)
    model, _, _ = load_final(Layout(root).final)
    nll = token_nll(model, docs.stream, model.config.block_size, 4, pick_device("cpu"))
    assert len(nll) == result["val_tokens"] - 1
    assert result["val_bpb"] == pytest.approx(nll.sum() / math.log(2) / sum(docs.n_bytes), abs=2e-5)
    assert result["val_loss"] == pytest.approx(nll.mean(), abs=2e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-3)
    assert result["val_bytes"] == sum(docs.n_bytes) and result["val_documents"] == len(docs.spans)
    assert "per_source" not in result  # one source
    # The first evaluated model becomes the registry's champion, tagged with its val_bpb.
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(params.tracking.registered_model, "champion")
    assert champion.run_id == read_json(Layout(root).metrics("train"))["mlflow_run_id"]
    assert float(champion.tags["val_bpb"]) == pytest.approx(result["val_bpb"], abs=1e-5)


def test_champion_alias_moves_only_on_a_better_val_bpb(built, tmp_path: Path):
    root, params = project_from(built, tmp_path)
    decisions = []
    for bpb in (2.0, 2.5, 1.5):
        with start_run(params, root, {"stage": "test", "dvc.shards.md5": "abc"}) as run:
            mlflow.log_text("weights", "model/model.txt")
            decisions.append(register_and_gate(root, "gate-test", run, "model", bpb))
    assert [d["promoted"] for d in decisions] == [True, False, True]
    assert decisions[1]["previous_champion_val_bpb"] == 2.0
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("gate-test", "champion")
    assert int(champion.version) == 3
    assert champion.tags["dvc.shards.md5"] == "abc" and champion.tags["val_bpb"] == "1.500000"
    assert "beats version 1's 2.0000" in champion.description
    assert "not champion: version 1 has val_bpb 2.0000" in client.get_model_version("gate-test", "2").description
    assert "`champion` is version 3" in client.get_registered_model("gate-test").description


def test_per_source_bits_per_byte_split_the_total():
    from llm.evaluate import _per_source

    class Docs:  # three documents in one stream: tokens [0, 4), [4, 10), [10, 12)
        spans = [(0, 4), (4, 10), (10, 12)]
        sources = ["books", "web", "books"]
        n_bytes = [10, 20, 5]

    nll = np.arange(11, dtype=np.float64)  # nll[i] predicts token i + 1
    out = _per_source(nll, Docs())
    books = nll[0:3].sum() + nll[9:11].sum()
    web = nll[3:9].sum()
    assert out["books"] == {"val_bpb": round(bits_per_byte(books, 15), 5), "bytes": 15, "documents": 2}
    assert out["web"] == {"val_bpb": round(bits_per_byte(web, 20), 5), "bytes": 20, "documents": 1}
    assert books + web == nll.sum()
