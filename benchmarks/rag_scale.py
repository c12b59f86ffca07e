"""RAG at scale: index build rate and retrieval latency per store, at 10k and 100k chunks.

    python benchmarks/rag_scale.py [--sizes 10000,100000] [--stores lancedb,qdrant,faiss,chroma] [--queries 200]

Each size builds one index per store from synthetic documents (one chunk each, ~60 words drawn from a
Zipf-distributed 20,000-word vocabulary, so BM25 sees realistic term statistics) through
``Index.update``: chunking, embedding, the store's insert, the SQLite commit and the BM25 build. The
embedder is ``HashingEmbedder(384)`` (all-MiniLM-L6-v2's width), so the build rate measures the index
and the store, not a model; the MiniLM's own rate on the same machine is measured separately and
printed, since it bounds a real build. Queries are 5 words taken from random documents; latency is
``retrieve()`` alone (query embedding by the hashing embedder included, no generation), dense, BM25
and hybrid, after 10 warm-up queries. Prints one table and writes benchmarks/results/rag_scale.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from slmforge.data.sources import Document
from slmforge.rag import ChunkSettings, HashingEmbedder, Index, retrieve

from _common import machine, save


def corpus(n: int, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(20_000)])
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.07
    p /= p.sum()
    words = rng.choice(vocab, size=(n, 60), p=p)
    return [Document(f"d{i}", " ".join(row) + ".", "bench", "txt", path=f"bench/{i % 100}/{i}.txt")
            for i, row in enumerate(words)]


def minilm_rate(texts: list[str]) -> float | None:
    try:
        from slmforge.rag.embedders import LocalEmbedder, default_embedder_path

        emb = LocalEmbedder(default_embedder_path())
    except Exception:  # the rag extra is missing: the build table still stands
        return None
    emb.embed(texts[:32])
    t0 = time.perf_counter()
    emb.embed(texts)
    return len(texts) / (time.perf_counter() - t0)


def measure(store: str, docs: list[Document], queries: list[str]) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix=f"rag-{store}-"))
    try:
        index = Index.open(folder, HashingEmbedder(384), store)
        t0 = time.perf_counter()
        index.update(docs, ChunkSettings("sentence", 512, 0), progress=False)
        build = time.perf_counter() - t0
        row = {"chunks": index.count(), "build_s": round(build, 1), "chunks_per_s": round(len(docs) / build)}
        for mode in ("dense", "bm25", "hybrid"):
            for q in queries[:10]:
                retrieve(index, q, mode, 10)
            times = []
            for q in queries:
                t = time.perf_counter()
                retrieve(index, q, mode, 10)
                times.append((time.perf_counter() - t) * 1000)
            row[f"{mode}_p50_ms"] = round(float(np.percentile(times, 50)), 1)
            row[f"{mode}_p95_ms"] = round(float(np.percentile(times, 95)), 1)
        index.close()
        return row
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--stores", default="lancedb,qdrant,faiss,chroma")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    docs = corpus(max(sizes))
    rng = np.random.default_rng(1)
    queries = [" ".join(rng.choice(docs[int(rng.integers(len(docs)))].text.rstrip(".").split(), 5, replace=False))
               for _ in range(args.queries)]
    rate = minilm_rate([d.text for d in docs[:512]])
    rows = []
    for n in sizes:
        for store in args.stores.split(","):
            row = {"size": n, "store": store, **measure(store, docs[:n], queries)}
            rows.append(row)
            print(row, flush=True)
    m = machine()
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores; hashing embedder (384-d); {args.queries} queries, k=10; "
          f"all-MiniLM-L6-v2 embeds {rate:.0f} chunks/s here" if rate else "")
    print("\n| chunks | store | build chunks/s | dense P50 / P95 ms | BM25 P50 / P95 ms | hybrid P50 / P95 ms |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']:,} | {r['store']} | {r['chunks_per_s']:,} | {r['dense_p50_ms']} / {r['dense_p95_ms']} | "
              f"{r['bm25_p50_ms']} / {r['bm25_p95_ms']} | {r['hybrid_p50_ms']} / {r['hybrid_p95_ms']} |")
    save("rag_scale", {"machine": m, "minilm_chunks_per_s": rate, "queries": args.queries, "rows": rows})


if __name__ == "__main__":
    main()
