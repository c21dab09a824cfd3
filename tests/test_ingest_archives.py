"""Archives and compressed files: members read in name order, every codec, bounded memory."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llm.errors import UserError
from tests.ingest_helpers import PROSE, read


def test_zip_and_tar_members_are_read_in_name_order(tmp_path: Path):
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("dir/b.txt", "zb " + PROSE)
        zf.writestr("a.txt", "za " + PROSE)
        zf.writestr("c.jsonl", json.dumps({"text": "zc " + PROSE}) + "\n")
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tf:
        for name, text in (("y.md", "ty " + PROSE), ("x.txt", "tx " + PROSE)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    docs, counts = read(tmp_path, ["a.zip", "b.tar.gz"])
    assert [d.uri for d in docs] == ["a.zip!a.txt", "a.zip!c.jsonl:1", "a.zip!dir/b.txt", "b.tar.gz!x.txt",
                                     "b.tar.gz!y.md"]
    assert [d.text[:3] for d in docs] == ["za ", "zc ", "zb ", "tx ", "ty "]
    assert counts.files == 5


def test_gzip_compressed_file(tmp_path: Path):
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": PROSE}) + "\n")
    docs, _ = read(tmp_path, ["d.jsonl.gz"])
    assert [d.text for d in docs] == [PROSE]


def test_compressed_files_bz2_xz_zst_and_compressed_archives(tmp_path: Path):
    import bz2
    import lzma

    import pyarrow as pa

    (tmp_path / "a.txt.bz2").write_bytes(bz2.compress(("bz " + PROSE).encode()))
    (tmp_path / "b.jsonl.xz").write_bytes(lzma.compress((json.dumps({"text": "xz " + PROSE}) + "\n").encode()))
    with pa.CompressedOutputStream(pa.OSFile(str(tmp_path / "c.txt.zst"), "wb"), "zstd") as out:
        out.write(("zst " + PROSE).encode())
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        info = tarfile.TarInfo("m.txt")
        info.size = len(("tar " + PROSE).encode())
        tf.addfile(info, io.BytesIO(("tar " + PROSE).encode()))
    (tmp_path / "d.tar.bz2").write_bytes(bz2.compress(tar.getvalue()))
    with pa.CompressedOutputStream(pa.OSFile(str(tmp_path / "e.tar.zst"), "wb"), "zstd") as out:
        out.write(tar.getvalue())  # a stream that cannot seek: the archive is spooled to a temporary file
    docs, _ = read(tmp_path, ["."])
    assert [(d.uri, d.text.split()[0]) for d in docs] == [
        ("a.txt.bz2", "bz"), ("b.jsonl.xz:1", "xz"), ("c.txt.zst", "zst"), ("d.tar.bz2!m.txt", "tar"),
        ("e.tar.zst!m.txt", "tar"),
    ]


def test_corrupt_archive_is_a_clear_error(tmp_path: Path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(UserError, match=r"^broken.zip: cannot read: not a readable archive"):
        read(tmp_path, ["broken.zip"], on_bad_record="fail")


def test_a_decompression_bomb_is_read_in_bounded_memory(tmp_path: Path):
    """A 3.5 MB .txt.gz that inflates to 1 GB: parts of at most max_document_bytes, and a peak
    resident set well below what holding the text would take (2 GB: the bytes and the str)."""
    import subprocess
    import sys

    block = (PROSE + "\n").encode() * 130_000  # 10 MB
    member = gzip.compress(block, compresslevel=9, mtime=0)
    (tmp_path / "bomb.txt.gz").write_bytes(member * 100)  # gzip allows concatenated members
    (tmp_path / "small.txt").write_text(PROSE)
    inflated = len(block) * 100

    def peak_rss_mb(source: str) -> tuple[float, dict]:
        code = (
            "import json\n"
            "from pathlib import Path\n"
            "from llm.config import IngestParams, Params\n"
            "from llm.corpus.ingest import ingest\n"
            "from llm.layout import Layout\n"
            f"r = ingest(Params(ingest=IngestParams(sources=[{source!r}])), Layout(Path('.').resolve()))\n"
            # VmHWM: this program's peak. ru_maxrss would carry the forking pytest's peak across exec.
            "hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM'))\n"
            "print(json.dumps({'rss_kb': hwm, 'report': r}))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return out["rss_kb"] / 1024, out["report"]

    baseline, _ = peak_rss_mb("small.txt")
    peak, report = peak_rss_mb("bomb.txt.gz")
    print(f"peak RSS: {peak:.0f} MB ingesting a {inflated / 1e6:.0f} MB bomb, {baseline:.0f} MB ingesting one line")
    assert report["bytes"] == inflated and report["documents"] >= inflated // 1_000_000
    assert max(pq.read_table(tmp_path / "data" / "raw", columns=["n_bytes"]).column(0).to_pylist()) <= 1_000_000
    assert peak < 400, f"peak RSS {peak:.0f} MB for a {inflated / 1e6:.0f} MB bomb"
    assert peak - baseline < 150, f"peak RSS {peak:.0f} MB, {baseline:.0f} MB for one line"
