"""How good is a hybrid teacher? Dense models, BM25 and their z-score fusion (``mine --fuse-bm25 W``) on a BEIR
folder's dev and test splits, scored with hardneg's own classes and trec_eval-exact metrics.

The fused score of every (query, document) pair of the corpus is what :class:`mining.sources.ScoreFusion` gives
the filters and the distillation: ``z(dense) + W x z(BM25)``, each standardised per query over the whole corpus.
Ranking the whole corpus by it shows what the soft labels of distillation know that the dense model alone does
not. Choose ``W`` on dev; test is printed beside it, not used. Example (about 20 minutes on 2 CPU cores, most of it
encoding NFCorpus with all-mpnet-base-v2)::

    OMP_NUM_THREADS=2 python bench/bench_fusion.py --data ../shared/data/beir/nfcorpus \\
        --model all-MiniLM-L6-v2 --model "$(bash ../shared/models/fetch_mpnet.sh)" --output bench/results/fusion.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from eval.metrics import mean_metrics  # noqa: E402
from mining.sources import ScoreFusion, bm25, dense  # noqa: E402
from retriever.data import Dataset, Run, load_beir  # noqa: E402
from retriever.encoding import DEFAULT_CACHE_DIR  # noqa: E402
from retriever.io import write_json  # noqa: E402

METRICS = ("nDCG@10", "Recall@100")


def every_pair(dataset: Dataset) -> dict[str, list[str]]:
    return {query_id: list(dataset.corpus.ids) for query_id in dataset.queries}


def top(run: Run, depth: int = 1000) -> Run:
    return {query_id: dict(sorted(row.items(), key=lambda item: -item[1])[:depth]) for query_id, row in run.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/beir/nfcorpus")
    parser.add_argument("--model", action="append", help="dense model (repeatable)")
    parser.add_argument("--weights", default="0.1,0.2,0.3,0.5", help="BM25 weights W to fuse with")
    parser.add_argument("--splits", default="dev,test")
    parser.add_argument("--max-length", type=int, help="token limit (default: each model's own, as mining uses it)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="embeddings cache (hardneg's own): a model encodes the corpus once across runs")
    parser.add_argument("--output", default="bench/results/fusion.json")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    splits = {name: load_beir(args.data, name) for name in args.splits.split(",")}
    for data in splits.values():
        data.queries = {q: t for q, t in data.queries.items() if data.relevant(q)}
    corpus = next(iter(splits.values())).corpus
    for data in splits.values():
        data.corpus = corpus  # one corpus object: each model encodes it once
    lexical = bm25(show_progress=False)
    rows: dict[str, dict[str, dict[str, float]]] = {}

    def record(name: str, split: str, run: Run) -> None:
        rows.setdefault(name, {})[split] = mean_metrics(top(run), splits[split].qrels, METRICS)
        print(f"{name:>40} {split:>5} " + " ".join(f"{m} {v:.4f}" for m, v in rows[name][split].items()), flush=True)

    started = time.time()
    for split, data in splits.items():
        record("bm25", split, lexical.score(corpus, data.queries, every_pair(data)))
    for model in args.model or ["all-MiniLM-L6-v2"]:
        semantic = dense(model, show_progress=False, max_length=args.max_length, cache_dir=args.cache_dir)
        name = Path(model).name or model
        for split, data in splits.items():
            record(name, split, semantic.score(corpus, data.queries, every_pair(data)))
            for weight in weights:
                fusion = ScoreFusion([(semantic, 1.0), (lexical, weight)])
                record(f"{name} + {weight:g} x bm25", split, fusion.score(corpus, data.queries, every_pair(data)))
    write_json(Path(args.output), {"data": args.data, "metrics": rows, "seconds": round(time.time() - started)})


if __name__ == "__main__":
    main()
