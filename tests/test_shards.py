from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from llm.corpus.tables import iter_batches
from llm.dataset import TokenBlocks
from llm.errors import UserError
from llm.io import file_sha256, read_json
from llm.layout import Layout
from llm.shards import open_split, read_manifest, token_counts, token_dtype, token_stream, write_shards
from llm.split import holdout_of
from llm.tokenizer import Tokenizer
from tests.conftest import deep_merge, load, write_params


def shard_tables(root: Path, split: str) -> list[pa.Table]:
    return open_split(Layout(root).shards, split)


def test_no_document_is_in_both_splits(built):
    root, params = built
    ids = {s: [d for t in shard_tables(root, s) for d in t.column("doc_id").to_pylist()] for s in ("train", "val")}
    assert ids["train"] and ids["val"]
    assert not set(ids["train"]) & set(ids["val"])
    holdout = holdout_of(Layout(root).clean, params.split)
    assert all(holdout.side(d) == s for s, docs in ids.items() for d in docs)
    clean_ids = [d for b in iter_batches(Layout(root).clean, ["doc_id"]) for d in b.column(0).to_pylist()]
    assert sorted(ids["train"] + ids["val"]) == sorted(clean_ids)


def test_ids_fit_the_vocabulary_in_the_smallest_type(built):
    root, _ = built
    tok = Tokenizer.load(Layout(root).tokenizer)
    manifest = read_manifest(Layout(root).shards)
    assert manifest["dtype"] == "uint16" == token_dtype(tok.vocab_size).name
    for split in ("train", "val"):
        for table in shard_tables(root, split):
            assert table.schema.field("tokens").type == pa.list_(pa.uint16())
            for arr in token_stream(table):
                assert arr.dtype == np.uint16 and int(arr.max()) < tok.vocab_size


def test_token_dtype():
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_manifest_totals_equal_the_shard_contents(built):
    root, _ = built
    manifest = read_manifest(Layout(root).shards)
    assert manifest["tokenizer"]["sha256"] == file_sha256(Layout(root).tokenizer / "tokenizer.model")
    for split, info in manifest["splits"].items():
        tables = shard_tables(root, split)
        assert len(tables) == len(info["shards"]) >= 1
        for table, shard in zip(tables, info["shards"]):
            assert table.num_rows == shard["documents"]
            assert sum(len(a) for a in token_stream(table)) == shard["tokens"]
            assert sum(table.column("n_bytes").to_pylist()) == shard["bytes"]
            assert file_sha256(Layout(root).shards / shard["path"]) == shard["sha256"]
        assert info["documents"] == sum(t.num_rows for t in tables)
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
    metrics = read_json(Layout(root).metrics("shards"))
    assert metrics["train_tokens"] == manifest["splits"]["train"]["tokens"]


def test_each_split_counts_its_token_ids_as_its_shards_hold_them(built, tmp_path: Path):
    """counts.npy (what evaluate's unigram baseline reads instead of every train token) equals a
    bincount of the split's stream; changed or missing, it is one line naming it."""
    root, _ = built
    shards = Layout(root).shards
    vocab = read_manifest(shards)["tokenizer"]["vocab_size"]
    for split in ("train", "val"):
        stream = split_stream(shards, split)
        counts = token_counts(shards, split, vocab)
        assert counts.shape == (vocab,) and counts.sum() == read_manifest(shards)["splits"][split]["tokens"]
        assert np.array_equal(counts, np.bincount(stream, minlength=vocab))
    copy = Path(shutil.copytree(shards, tmp_path / "shards"))
    counts = np.load(copy / "val" / "counts.npy")
    counts[int(np.argmax(counts))] -= 1
    np.save(copy / "val" / "counts.npy", counts)
    with pytest.raises(UserError, match=r"val/counts.npy: token counts missing or differ from manifest.json; rerun"):
        token_counts(copy, "val", vocab)
    (copy / "train" / "counts.npy").unlink()
    with pytest.raises(UserError, match=r"train/counts.npy: token counts missing"):
        token_counts(copy, "train", vocab)


def test_small_shard_size_rolls_several_shards(built):
    root, _ = built
    assert len(read_manifest(Layout(root).shards)["splits"]["train"]["shards"]) >= 2


def test_every_document_ends_with_eos_and_decodes_to_its_text(built):
    root, params = built
    tok = Tokenizer.load(Layout(root).tokenizer)
    texts = {d: t for b in iter_batches(Layout(root).clean, ["doc_id", "text"]) for d,
             t in zip(b.column(0).to_pylist(), b.column(1).to_pylist())}
    table = shard_tables(root, "val")[0]
    for doc_id, tokens in zip(table.column("doc_id").to_pylist(), table.column("tokens").to_pylist()):
        assert tokens[-1] == tok.eos_id
        assert tok.decode(tokens[:-1]) == texts[doc_id]


def test_parallel_tokenization_gives_identical_shards(built, tmp_path: Path):
    root, _ = built
    (tmp_path / "data").mkdir()
    for name in ("clean", "tokenizer"):
        (tmp_path / "data" / name).symlink_to(getattr(Layout(root), name))
    write_params(tmp_path, deep_merge(load(root).model_dump(mode="json"), {"shards": {"num_workers": 2}}))
    write_shards(load(tmp_path), Layout(tmp_path))
    a = read_manifest(Layout(root).shards)["splits"]
    b = read_manifest(Layout(tmp_path).shards)["splits"]
    assert a == b  # includes every shard's sha256


# ----------------------------------------------------------------------------- dataset
def split_stream(shards_dir, split: str) -> np.ndarray:
    """The split's whole token stream, read through Arrow (the reference for TokenBlocks's preads)."""
    return np.concatenate([a for t in open_split(shards_dir, split) for a in token_stream(t)])


def test_blocks_are_shifted_pairs_read_without_a_memory_map(built):
    root, _ = built
    mapped = lambda: {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                      if str(Layout(root).shards) in line}
    before = mapped()
    ds = TokenBlocks(Layout(root).shards, "train", block_size=32, seed=1, shuffle=False)
    x, y = next(iter(ds))
    assert x.dtype == torch.int64 and x.shape == (32,)
    assert torch.equal(x[1:], y[:-1])
    for _ in zip(ds, range(50)):
        pass
    # no shard stays mapped: resident memory cannot grow with the corpus or the blocks read
    assert mapped() == before
    stream = split_stream(Layout(root).shards, "train")
    assert torch.equal(x, torch.from_numpy(stream[:32].astype(np.int64)))
    assert ds.n_tokens == len(stream) == read_manifest(Layout(root).shards)["splits"]["train"]["tokens"]


def test_any_token_range_matches_the_stream(built):
    root, _ = built
    for split in ("train", "val"):
        ds = TokenBlocks(Layout(root).shards, split, block_size=64, shuffle=False)
        stream = split_stream(Layout(root).shards, split)
        rng = np.random.default_rng(7)
        ranges = [(int(b) - 5, int(b) + 5) for b in ds.starts[1:-1]]  # across every extent boundary
        for _ in range(200):
            a = int(rng.integers(0, len(stream) - 1))
            ranges.append((a, int(rng.integers(a + 1, min(len(stream), a + 5000) + 1))))
        ranges.append((0, len(stream)))
        for a, b in ranges:
            assert np.array_equal(ds.tokens(a, b), stream[a:b]), (split, a, b)


def damaged_copies(shards: Path, tmp_path: Path, n: int = 6):
    """Copies of the shards folder, each with one shard damaged as a disk or an interrupted copy
    damages it (seeded): cut short, overwritten at some offset, emptied, or removed."""
    manifest = read_manifest(shards)
    paths = [s["path"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    rng = np.random.default_rng(11)
    for i in range(n):
        copy = tmp_path / f"shards{i}"
        shutil.copytree(shards, copy)
        victim = copy / paths[int(rng.integers(len(paths)))]
        data = victim.read_bytes()
        at = int(rng.integers(1, len(data) - 8))
        kind = ["cut", "overwrite", "empty", "remove"][i % 4]
        if kind == "cut":
            victim.write_bytes(data[:at])
        elif kind == "overwrite":
            victim.write_bytes(data[:at] + rng.bytes(8) * 64 + data[at + 512:])
        elif kind == "empty":
            victim.write_bytes(b"")
        else:
            victim.unlink()
        yield copy, victim, kind


def test_a_damaged_shard_is_one_line_that_names_it_and_the_way_back(built, tmp_path: Path):
    """Every reader of a split (Arrow tables for evaluation, TokenBlocks for training) stops on a
    damaged shard of that split with one line naming the file and how to restore it."""
    root, _ = built
    seen = set()
    for copy, victim, kind in damaged_copies(Layout(root).shards, tmp_path):
        split = victim.parent.name
        for read in (open_split, lambda d, s: TokenBlocks(d, s, block_size=32)):
            try:
                read(copy, split)
            except UserError as e:
                line = str(e)
                assert "\n" not in line and str(victim) in line and "dvc checkout data/shards" in line, (kind, line)
                seen.add(kind)
            else:
                # Bytes overwritten inside the token data leave a readable file: verify_shards, which
                # train runs first, catches those by their sha256 (tests/test_faults.py).
                assert kind == "overwrite", (kind, victim)
        with pytest.raises(UserError, match="no split 'test'"):
            open_split(copy, "test")
    assert seen >= {"cut", "empty", "remove"}


def test_shuffling_is_seeded(built):
    root, _ = built
    take = lambda ds: [x for (x, _), _ in zip(ds, range(10))]
    a = take(TokenBlocks(Layout(root).shards, "train", 32, seed=3))
    b = take(TokenBlocks(Layout(root).shards, "train", 32, seed=3))
    c = take(TokenBlocks(Layout(root).shards, "train", 32, seed=4))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_resumes_at_the_same_position(built):
    root, _ = built
    ds = TokenBlocks(Layout(root).shards, "train", 16, seed=5)
    n = len(ds)
    it = iter(ds)
    for _ in range(n + 7):  # into the second epoch
        next(it)
    state = ds.state_dict()
    expected = [next(it) for _ in range(5)]
    resumed = TokenBlocks(Layout(root).shards, "train", 16, seed=5)
    resumed.load_state_dict(state)
    assert state["epoch"] == 1 and state["index"] == 7
    got = [b for b, _ in zip(resumed, range(5))]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))


def test_resume_refuses_a_different_stream(built):
    root, _ = built
    state = TokenBlocks(Layout(root).shards, "train", 16, seed=5).state_dict()
    with pytest.raises(ValueError, match="block_size was 16, is now 32"):
        TokenBlocks(Layout(root).shards, "train", 32, seed=5).load_state_dict(state)


def test_ranks_get_disjoint_blocks(built):
    root, _ = built
    orders = [TokenBlocks(Layout(root).shards, "train", 16, seed=2, rank=r, world_size=2).order(0) for r in (0, 1)]
    assert len(orders[0]) == len(orders[1])
    assert not set(orders[0].tolist()) & set(orders[1].tolist())


def test_finite_pass_and_batches(built):
    root, _ = built
    ds = TokenBlocks(Layout(root).shards, "val", 32, shuffle=False, epochs=1)
    batches = list(ds.batches(8))
    assert sum(len(x) for x, _ in batches) == len(ds)
    assert batches[0][0].shape == (8, 32)


@pytest.mark.parametrize("seed", range(8))
def test_int_view_is_to_numpy_without_pandas_for_any_slice(seed: int):
    from llm.shards import int_view

    rng = np.random.default_rng(seed)
    kind = [pa.uint8(), pa.uint16(), pa.uint32(), pa.int32(), pa.int64()][seed % 5]
    lists = [rng.integers(0, 200, rng.integers(0, 9)).tolist() for _ in range(rng.integers(1, 40))]
    arr = pa.array(lists, type=pa.list_(kind))
    start = int(rng.integers(0, len(arr)))
    part = arr.slice(start, int(rng.integers(0, len(arr) - start + 1)))
    for piece in (part.flatten(), part.value_lengths(), arr.flatten().slice(1)):
        assert int_view(piece).dtype == piece.to_numpy(zero_copy_only=False).dtype
        assert int_view(piece).tolist() == piece.to_pylist()
    with pytest.raises(ValueError, match="1 nulls"):
        int_view(pa.array([1, None, 3], type=kind))


def test_reading_the_val_split_imports_no_pandas(built):
    """evaluate's reading of the shards: pandas' import was 0.3-0.5 s of its start-up."""
    import subprocess
    import sys

    code = ("import sys; from llm.evaluate import cover_val; docs = cover_val(sys.argv[1], 0); "
            "assert len(docs.stream) > 0; print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(Layout(built[0]).shards)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
