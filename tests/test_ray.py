"""`data.engine: ray`: deduplication sharded over a local Ray cluster of 2 workers keeps exactly the documents
the single-process path keeps."""

from __future__ import annotations

import json
import random

import pytest

from slmforge.config import DedupConfig


def _corpus(n: int = 160, seed: int = 0) -> list[tuple[str, str]]:
    """Documents with planted exact duplicates (case and spacing changed), near duplicates (a few words
    changed) and chains of near duplicates (a near b, b near c, a not near c: only the order decides)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(400)]
    docs: list[str] = []
    for _ in range(n):
        r = rng.random()
        if docs and r < 0.15:
            docs.append("  " + rng.choice(docs).upper() + " ")
        elif docs and r < 0.45:
            base = rng.choice(docs).split()
            for _ in range(rng.randint(1, 4)):
                base[rng.randrange(len(base))] = rng.choice(words)
            docs.append(" ".join(base))
        else:
            docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(40, 90))))
    return [(f"doc-{i:04d}", t) for i, t in enumerate(docs)]


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    from slmforge.data.ray_dedup import start_ray

    ray = start_ray(2)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("cfg", [DedupConfig(), DedupConfig(near_threshold=0.7, shingle_size=3, num_perm=64),
                                 DedupConfig(exact=False), DedupConfig(near=False)], ids=["default", "loose",
                                                                                           "near-only", "exact-only"])
def test_sharded_dedup_keeps_what_the_single_process_path_keeps(ray_cluster, cfg):
    from slmforge.data.dedup import Deduplicator
    from slmforge.data.ray_dedup import dedup_on_ray

    items = _corpus()
    local = Deduplicator(cfg)
    expected = {k: (r, local.duplicate_of[k]) for k, t in items if (r := local.check(k, t))}
    got = dedup_on_ray(items, cfg, workers=2)
    assert got == expected
    assert len(expected) > 20  # the corpus plants enough duplicates to mean something
    if cfg.near:
        assert any(r == "near_duplicate" for r, _ in expected.values())


def test_the_data_stage_on_ray_writes_the_same_dataset(ray_cluster, tmp_path):
    from slmforge.config import ProjectConfig
    from slmforge.data import run_data_stage

    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": "This is a sentence about " + t}) + "\n" for _, t in _corpus(80)))
    results = {}
    for engine in ("local", "ray"):
        cfg = ProjectConfig().rooted_at(tmp_path)
        cfg.data.sources = [str(src)]
        cfg.data.filters.languages = None
        cfg.data.filters.max_repeated_ngram_ratio = None
        cfg.data.formats = ["text"]
        cfg.data.engine = engine
        results[engine] = run_data_stage(cfg, out=tmp_path / engine, progress=False)
    local, ray = results["local"], results["ray"]
    assert ray.stats["dropped"] == local.stats["dropped"] and local.stats["dropped"].get("near_duplicate")
    for split in ("train", "val", "test"):
        assert ray.split_file("text", split).read_text() == local.split_file("text", split).read_text()
    # the same dataset: where the work ran is not part of the fingerprint
    m_local, m_ray = (json.loads((r.path / "manifest.json").read_text()) for r in (local, ray))
    assert m_local["config"] == m_ray["config"]


def test_without_ray_the_engine_says_what_to_install(monkeypatch):
    import sys

    from slmforge.data.ray_dedup import dedup_on_ray
    from slmforge.errors import DataError

    monkeypatch.setitem(sys.modules, "ray", None)  # an import of ray now fails as if it were not installed
    with pytest.raises(DataError, match=r"pip install slmforge\[scale\]"):
        dedup_on_ray([("a", "some text")], DedupConfig())


# --------------------------------------------------------------------------- corpus shards, read incrementally


def test_jsonl_and_parquet_shards_stream_record_by_record(tmp_path):
    """A shard larger than clean.max_file_mb is read, not skipped, and reading it holds a few records at a
    time: peak Python memory while streaming 8 MB of records stays under 2 MB (a quarter of them)."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from slmforge.config import DataConfig
    from slmforge.data.sources import Document, Skipped, read_file

    n, body = 4000, "a sentence about shards " * 80  # ~2 kB a record
    jsonl = tmp_path / "part-0000.jsonl"
    with open(jsonl, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{i} {body}", "label": i % 3}) + "\n")
        f.write("{not json\n")
    parquet = tmp_path / "part-0001.parquet"
    pq.write_table(pa.table({"text": [f"{i} {body}" for i in range(n)], "label": [i % 3 for i in range(n)]}),
                   parquet, row_group_size=500)
    cfg = DataConfig()
    cfg.clean.max_file_mb = 0.1
    for shard, extra in ((jsonl, 1), (parquet, 0)):
        assert shard.stat().st_size > 2 * cfg.clean.max_file_mb * 1e6
        tracemalloc.start()
        count, skipped, first = 0, 0, None
        for record in read_file(shard, str(tmp_path), cfg):
            if isinstance(record, Skipped):
                skipped += 1
                continue
            assert isinstance(record, Document)
            first = first or record
            count += 1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (count, skipped) == (n, extra), shard
        assert first is not None and first.text.startswith("0 ") and first.label == "0"
        assert first.kind == shard.suffix.lstrip(".") and first.id == f"{shard}:1"
        assert peak < 2e6, f"{shard.name}: peak {peak / 1e6:.1f} MB while streaming"
