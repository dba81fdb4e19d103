"""Beyond one machine (issue 15): time and peak memory of a corpus encode + exact search, 1 and 2 processes.

    OMP_NUM_THREADS=2 flock /tmp/hardneg-heavy.lock python bench/bench_sharded.py --documents 5000000 \\
        --queries 10000 --depth 200

A synthetic corpus of ``--documents`` random unit vectors of ``--dimension`` (384, MiniLM's) and ``--queries``
random unit queries, searched ``--depth`` deep with hardneg's own :class:`~retriever.dense.DenseRetriever`, the
path ``hardneg mine`` and ``hardneg evaluate`` take. The "encoder" draws each block's vectors from a seeded
generator (no model: what is measured is the data path, not a transformer), so every run, whatever its world
size, has the same embeddings and must find the same top lists (checked: the runs' top-k are compared).

Three runs, each in fresh processes, each reporting its peak resident memory (``ru_maxrss``) per process:

- ``in-memory, 1 process``: no cache; the corpus embeddings are held in RAM;
- ``in-memory, 2 processes`` (``torchrun --nproc-per-node 2``, gloo): each rank holds its half;
- ``memory-mapped, 1 process``: the embeddings are written to the cache as they are encoded, one block at a
  time, then searched from the memory-mapped file a chunk at a time, pages released after each chunk.

The corpus texts are not what is measured either: a synthetic :class:`Corpus` of short ids (``d123``) and
empty texts costs about 150 bytes per document in Python objects, and that is part of each peak. Results go to
``--output`` (default ``bench/results/sharded.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RandomBlocks:
    """An Encoder whose embedding of text ``"i"`` is row ``i`` of a fixed random unit matrix, made a block at
    a time (the block's first row seeds its generator, and blocks have fixed boundaries)."""

    name = "random-unit-vectors"

    def __init__(self, dimension: int, seed: int = 0) -> None:
        self.dimension, self.seed = dimension, seed
        self.cache_identity = {"model": self.name, "dimension": dimension, "seed": seed}

    def _vectors(self, texts: list[str], offset: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        rng = np.random.default_rng([self.seed, offset, int(texts[0])])
        vectors = rng.standard_normal((len(texts), self.dimension), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._vectors(texts, 0)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._vectors(texts, 1)


def worker(args) -> None:
    """One process of a run: build the corpus, encode (or map) it, search, report time and peak memory."""
    from retriever import distributed
    from retriever.data import Corpus
    from retriever.dense import DenseRetriever

    distributed.init_from_env()
    started = time.time()
    ids = [f"d{i}" for i in range(args.documents)]
    corpus = Corpus(ids, [""] * args.documents, [str(i) for i in range(args.documents)])
    object.__setattr__(corpus, "_hardneg_fingerprint", f"synthetic-{args.documents}")  # no 5M-text sha256 pass
    queries = {f"q{i}": str(i) for i in range(args.queries)}
    built = time.time()
    retriever = DenseRetriever(RandomBlocks(args.dimension), show_progress=False,
                               cache_dir=args.cache_dir or None)
    retriever.local_rows(corpus)
    encoded = time.time()
    scores, positions = retriever.search_embeddings(corpus, retriever.query_embeddings(queries), args.depth)
    searched = time.time()
    record = {"rank": distributed.rank(), "world_size": distributed.world_size(),
              "documents_held": retriever.shard_documents, "documents_encoded": retriever.documents_encoded,
              "corpus_seconds": round(built - started, 1), "encode_seconds": round(encoded - built, 1),
              "search_seconds": round(searched - encoded, 1),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    records = distributed.all_gather_objects(record)
    if distributed.is_main():
        np.save(args.top, positions[:, :10])
        Path(args.report).write_text(json.dumps(records))
    distributed.cleanup()


def launch(args, processes: int, cache_dir: str, scratch: Path, name: str) -> dict:
    report, top = scratch / f"{name}.json", scratch / f"{name}.npy"
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(processes)]
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))) // processes)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    command = [*launcher, __file__, "--worker", "--documents", str(args.documents), "--queries", str(args.queries),
               "--depth", str(args.depth), "--dimension", str(args.dimension), "--cache-dir", cache_dir,
               "--report", str(report), "--top", str(top)]
    started = time.time()
    subprocess.run(command, check=True, env=env)
    ranks = json.loads(report.read_text())
    return {"name": name, "processes": processes, "threads_per_process": threads,
            "wall_seconds": round(time.time() - started, 1), "ranks": ranks,
            "peak_rss_gb_per_process": max(r["peak_rss_gb"] for r in ranks), "top10": str(top)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=5_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--depth", type=int, default=200)
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "sharded.json"))
    parser.add_argument("--runs", default="memory-1,memory-2,mmap-1", help="which of the three runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--top", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="hardneg-bench-sharded-") as scratch:
        scratch = Path(scratch)
        plan = {"memory-1": (1, ""), "memory-2": (2, ""), "mmap-1": (1, str(scratch / "cache"))}
        for name in args.runs.split(","):
            processes, cache_dir = plan[name]
            result = launch(args, processes, cache_dir, scratch, name)
            print(json.dumps(result), flush=True)
            results.append(result)
        tops = [np.load(result.pop("top10")) for result in results]
        same = all(np.array_equal(tops[0], top) for top in tops[1:])
    record = {"documents": args.documents, "queries": args.queries, "depth": args.depth,
              "dimension": args.dimension, "cpus": os.cpu_count(), "same_top10_in_every_run": same,
              "runs": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"same_top10_in_every_run": same}))


if __name__ == "__main__":
    main()
