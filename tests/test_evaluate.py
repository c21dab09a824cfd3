from __future__ import annotations

import bz2
import gzip
import lzma
import math
import random
import tracemalloc
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from llm.artifacts import load_final
from llm.device import pick_device
from llm.evaluate import bits_per_byte, compressed_sizes, compressor_bpb, cover_val, evaluate, token_nll, unigram_nats
from llm.io import read_json, write_json
from llm.layout import Layout
from llm.registry import register_and_gate
from llm.shards import MANIFEST, _Split, open_split, read_manifest, shard_schema
from llm.tracking import start_run
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
    assert all(v < 0.5 for v in compressor_bpb([b"to be or not to be " * 500]).values())
    noise = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    assert all(v > 7.9 for v in compressor_bpb([noise]).values())
    data = b"a bz2 check " * 100
    assert compressor_bpb([data])["bz2"] == 8 * len(bz2.compress(data, 9)) / len(data)


def one_shot_sizes(data: bytes) -> dict[str, int]:
    """The baselines' definition: each compressor at its strongest setting on the whole text at once."""
    return {"gzip": len(gzip.compress(data, compresslevel=9, mtime=0)), "bz2": len(bz2.compress(data, compresslevel=9)),
            "xz": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))}


def seeded_text(seed: int) -> bytes:
    """Text of a seeded kind and size: words from a small vocabulary, UTF-8 beyond ASCII, or noise."""
    rng = random.Random(seed)
    n = rng.choice([1, 10, 1000, 30_000, 200_000])
    kind = seed % 3
    if kind == 0:
        words = ["to", "be", "or", "not", "ROMEO:", "the", "question", "\n", "whether", "'tis"]
        return " ".join(rng.choice(words) for _ in range(n // 4 + 1)).encode("utf-8")
    if kind == 1:
        return "".join(rng.choice("aé中🙂 \n") for _ in range(n // 3 + 1)).encode("utf-8")
    return rng.randbytes(n)


def chunked(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 40))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]  # empty chunks included


@pytest.mark.parametrize("seed", range(24))
def test_streamed_compressors_give_the_one_shot_sizes(seed: int):
    data = seeded_text(seed)
    n, sizes = compressed_sizes(chunked(data, random.Random(seed)))
    assert n == len(data) and sizes == one_shot_sizes(data)


def test_streamed_compressors_give_the_one_shot_sizes_across_bz2_blocks():
    rng = random.Random(1)  # 1.2 MB: two of bz2 -9's 900 kB blocks, chunks of a document's size
    data = "\n".join(" ".join(rng.choice(["to", "be", "or", "not", "that", "is"]) for _ in range(rng.randint(1, 20)))
                     for _ in range(100_000)).encode()[:1_200_000]
    chunks = [data[i : i + 7_000] for i in range(0, len(data), 7_000)]
    assert compressed_sizes(chunks) == (len(data), one_shot_sizes(data))


Doc = tuple[str, str, int, np.ndarray]  # doc_id, source, n_bytes, tokens


def write_split(directory: Path, docs: list[Doc], shard_tokens: int, dtype=np.uint16) -> dict:
    """A split of these documents in the shards' format, written by llm.shards' own writer."""
    directory.mkdir(parents=True)
    writer = _Split(directory, shard_schema(np.dtype(dtype)), shard_tokens)
    for doc_id, source, n_bytes, tokens in docs:
        writer.add([doc_id], [source], [n_bytes], [tokens.astype(dtype)])
    return writer.finish()


def split_docs(shards_dir: Path, split: str) -> list[Doc]:
    out = []
    for table in open_split(shards_dir, split):
        for batch in table.to_batches():
            columns = [batch.column(name).to_pylist() for name in ("doc_id", "source", "n_bytes")]
            tokens = batch.column("tokens")
            out += [(*row, tokens[i].values.to_numpy()) for i, row in enumerate(zip(*columns))]
    return out


def random_docs(seed: int, n: int) -> list[Doc]:
    rng = np.random.default_rng(seed)
    return [(f"d{i}", f"s{i % 3}", int(rng.integers(1, 1000)), rng.integers(0, 500, int(rng.integers(1, 300))))
            for i in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_the_cap_covers_whole_documents_in_val_order(tmp_path: Path, seed: int):
    docs = random_docs(seed, 150)
    shards = tmp_path / "shards"
    val = write_split(shards / "val", docs, shard_tokens=3000)  # several shards of several record batches
    write_json(shards / MANIFEST, {"splits": {"val": val}})
    assert len(val["shards"]) > 2
    ends = np.cumsum([len(d[3]) for d in docs])
    rng = np.random.default_rng(seed)
    for cap in [0, 1, int(ends[0]) - 1, int(ends[0]), int(ends[-1]), int(ends[-1]) + 7, *rng.integers(1, ends[-1], 10)]:
        # The rule: whole documents in order while the total stays within the cap; at least the first.
        k = len(docs) if cap == 0 else max(1, int((ends <= cap).sum()))
        covered = cover_val(shards, int(cap))
        assert isinstance(covered.stream, np.ndarray) and covered.stream.dtype == np.int64
        assert np.array_equal(covered.stream, np.concatenate([d[3] for d in docs[:k]]))
        assert covered.spans == list(zip([0, *ends[: k - 1].tolist()], ends[:k].tolist()))
        assert covered.sources == [d[1] for d in docs[:k]] and covered.n_bytes == [d[2] for d in docs[:k]]
        assert covered.capped == (k < len(docs))
        assert covered.split == {"documents": len(docs), "tokens": int(ends[-1]), "bytes": sum(d[2] for d in docs)}


@pytest.fixture(scope="module")
def trained(built, tmp_path_factory) -> Path:
    """The final model of one short training on the built project's data."""
    root, params = project_from(built, tmp_path_factory.mktemp("trained"))
    train(params, Layout(root))
    return Layout(root).final


def project_with_val(built, trained: Path, root: Path, docs: list[Doc], **override) -> tuple[Path, object]:
    """A project with the built train shards and the trained model, whose val split is these documents
    in one shard; MLflow off."""
    root, params = project_from(built, root, tracking={"enabled": False}, **override)
    shards = Layout(root).shards
    manifest = read_manifest(shards)
    built_shards = shards.resolve()
    shards.unlink()
    manifest["splits"]["val"] = write_split(shards / "val", docs, shard_tokens=10**9, dtype=np.dtype(manifest["dtype"]))
    (shards / "train").symlink_to(built_shards / "train")
    write_json(shards / MANIFEST, manifest)
    Layout(root).final.parent.mkdir(parents=True)
    Layout(root).final.symlink_to(trained)
    return root, params


def copies(docs: list[Doc], n: int) -> list[Doc]:
    return [(f"{doc_id}-copy{i}", source, nb, tokens) for i in range(n) for doc_id, source, nb, tokens in docs]


def test_a_capped_split_gives_the_bpb_of_its_covered_documents_alone(built, trained, tmp_path: Path):
    val = split_docs(Layout(built[0]).shards, "val")
    n_tokens = sum(len(d[3]) for d in val)
    # The built val documents, then two more copies of them; capped at exactly the first copy.
    big, p_big = project_with_val(built, trained, tmp_path / "big", copies(val, 3), evaluate={"max_tokens": n_tokens})
    alone, p_alone = project_with_val(built, trained, tmp_path / "alone", copies(val, 1), evaluate={"max_tokens": 0})
    capped, whole = evaluate(p_big, Layout(big)), evaluate(p_alone, Layout(alone))
    assert read_json(Layout(big).metrics("eval")) == capped
    covered = {"tokens": n_tokens, "bytes": sum(d[2] for d in val), "documents": len(val)}
    assert capped["covered"] == {**covered, "capped": True, "max_tokens": n_tokens}
    assert capped["val_split"] == {"tokens": 3 * n_tokens, "bytes": 3 * covered["bytes"], "documents": 3 * len(val)}
    assert whole["covered"] == {**covered, "capped": False, "max_tokens": 0} and whole["val_split"] == covered
    same = ("val_loss", "val_ppl", "val_bpb", "val_tokens", "val_bytes", "val_documents", "baseline_bpb", "beats")
    assert {k: capped[k] for k in same} == {k: whole[k] for k in same}


def test_evaluate_stage(built, tmp_path: Path):
    root, params = project_from(built, tmp_path)
    train(params, Layout(root))
    result = evaluate(params, Layout(root))
    assert read_json(Layout(root).metrics("eval")) == result
    assert set(result["baseline_bpb"]) == {"gzip", "bz2", "xz", "unigram"}
    # bits per byte recomputed from scratch: every covered val token but the first is predicted once.
    docs = cover_val(Layout(root).shards, params.evaluate.max_tokens)
    model, _, _ = load_final(Layout(root).final)
    nll = token_nll(model, docs.stream, model.config.block_size, 4, pick_device("cpu"))
    assert len(nll) == result["val_tokens"] - 1
    assert result["val_bpb"] == pytest.approx(nll.sum() / math.log(2) / sum(docs.n_bytes), abs=2e-5)
    assert result["val_loss"] == pytest.approx(nll.mean(), abs=2e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-3)
    assert result["val_bytes"] == sum(docs.n_bytes) and result["val_documents"] == len(docs.spans)
    split = read_manifest(Layout(root).shards)["splits"]["val"]
    assert result["val_split"] == {k: split[k] for k in ("documents", "tokens", "bytes")}
    capped = result["val_documents"] < split["documents"]
    covered = {"tokens": result["val_tokens"], "bytes": result["val_bytes"], "documents": result["val_documents"]}
    assert result["covered"] == {**covered, "capped": capped, "max_tokens": params.evaluate.max_tokens}
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


def test_evaluation_memory_follows_the_cap_not_the_split(built, trained, tmp_path: Path):
    val = split_docs(Layout(built[0]).shards, "val")
    cap = 50_000
    n = 1 + 2_000_000 // sum(len(d[3]) for d in val)
    root, params = project_with_val(built, trained, tmp_path, copies(val, n), evaluate={"max_tokens": cap})
    _, tok, _ = load_final(trained)
    tracemalloc.start()
    try:
        docs = cover_val(Layout(root).shards, cap)  # what evaluate reads: the covered tokens and their text
        n_text = sum(len(text.encode("utf-8")) for text in docs.texts(tok, tok.eos_id))
        _, reading = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        compressed_sizes([b"x"])  # the compressors' own state (xz -9e asks for 674 MiB), whatever the text
        _, compressors = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = evaluate(params, Layout(root))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    covered = len(docs.stream)
    assert isinstance(docs.stream, np.ndarray) and n_text == sum(docs.n_bytes)
    assert docs.capped and docs.split["tokens"] > 2_000_000 and covered <= cap
    assert result["covered"] == {"tokens": covered, "bytes": n_text, "documents": len(docs.spans), "capped": True,
                                 "max_tokens": cap}
    # A token held as a Python int in a list costs 8-36 bytes: the whole split would be 16-72 MB.
    assert reading < 2**20 + 64 * covered, f"reading the covered documents: traced peak {reading:,} bytes"
    bound = compressors + 4 * 2**20 + 100 * covered
    assert peak < bound, f"evaluate: traced peak {peak:,} bytes, the compressors' state {compressors:,}"
