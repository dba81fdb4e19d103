"""A teacher from precomputed embeddings (``hardneg encode``, ``mine.teacher: FOLDER``) against the teacher model
itself, on the same data in the same process: do the pools agree, and what does the in-batch teacher of a
training step (``distill_scope: batch``) cost with each?

The mining is configs/recipe-distill.yaml's: the student's 100 candidates rescored by the teacher fused with BM25
(``z(teacher) + 0.3 x z(BM25)``), TopK-MarginPos 0 below the mean positive, the top 8 kept. The step is the
recipe's too: 32 queries x (2 positives + 4 negatives + 1 random document), every (query, document) cell scored.

    OMP_NUM_THREADS=2 python bench/bench_teacher_table.py --data ../shared/data/beir/nfcorpus \\
        --teacher "$(bash ../shared/models/fetch_mpnet.sh)" --output bench/results/teacher-table.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mining.filters import TopKMarginPos  # noqa: E402
from mining.mine import mine  # noqa: E402
from mining.sources import build_rescorer, build_source  # noqa: E402
from retriever.data import load_dataset  # noqa: E402
from retriever.embedding_table import encode_embedding_table  # noqa: E402
from retriever.encoding import default_device, encode_options, resolve_precision  # noqa: E402
from retriever.factory import as_retriever  # noqa: E402
from retriever.io import write_json  # noqa: E402
from retriever.train import batch_teacher_scores, epoch_batches  # noqa: E402
from retriever.train_settings import TrainConfig  # noqa: E402


def compare_pools(reference: list, other: list) -> dict:
    """How far ``other``'s pools are from ``reference``'s: queries with the same negatives, largest score gap."""
    same, gap = 0, 0.0
    for a, b in zip(reference, other, strict=True):
        same += [n.doc_id for n in a.negatives] == [n.doc_id for n in b.negatives]
        scores_a = {c.doc_id: c.score for c in [*a.positives, *a.negatives]}
        for c in [*b.positives, *b.negatives]:
            if c.doc_id in scores_a:
                gap = max(gap, abs(c.score - scores_a[c.doc_id]))
    return {"queries": len(reference), "same_negatives": same, "max_score_difference": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="nfcorpus-demo")
    parser.add_argument("--student", default="all-MiniLM-L6-v2")
    parser.add_argument("--teacher", required=True, help="the teacher model's folder or name")
    parser.add_argument("--steps", type=int, default=5, help="training steps whose in-batch teacher is timed")
    parser.add_argument("--output", required=True, help="JSON file of the results")
    args = parser.parse_args()
    train = load_dataset(args.data, "train")
    options = encode_options({"batch_size": 32}, show_progress=False)
    teachers: dict[str, str] = {"model": args.teacher}
    result: dict = {"data": args.data, "teacher": args.teacher, "student": args.student, "seconds": {},
                    "encoding_precision": resolve_precision("auto", default_device())}
    with tempfile.TemporaryDirectory() as scratch:
        started = time.time()
        model = as_retriever(args.teacher, **options)
        queries = dict(train.queries)
        for dtype in ("float32", "float16"):
            teachers[f"table-{dtype}"] = str(encode_embedding_table(model, train.corpus, queries,
                                                                    Path(scratch) / dtype, name=args.teacher,
                                                                    dtype=dtype))
        result["seconds"]["encode both tables"] = round(time.time() - started, 1)
        del model
        # The teacher's corpus embeddings are in the cache now, for the model arm as in any run after the first;
        # warm the student's too, so that each arm's mining time is the teacher's own cost.
        as_retriever(args.student, **options).corpus_embeddings(train.corpus)
        pools: dict[str, list] = {}
        scorers: dict[str, object] = {}
        for name, teacher in teachers.items():
            source = build_source([args.student], **options)
            scorers[name] = build_rescorer(teacher=teacher, fuse_bm25=0.3, source=source, **options)
            started = time.time()
            pools[name] = mine(train, source, rescorer=scorers[name], depth=100, num_negatives=8,
                               filter=TopKMarginPos(0.0), anchor="mean", sampling="top", seed=42,
                               show_progress=False).pools
            result["seconds"][f"mine, teacher {name}"] = round(time.time() - started, 1)
        result["pools"] = {name: compare_pools(pools["model"], pools[name]) for name in teachers if name != "model"}
        result["queries_with_hard_negatives"] = {name: sum(bool(p.negatives) for p in found)
                                                 for name, found in pools.items()}
        config = TrainConfig(batch_size=32, positives_per_query=2, negatives_per_query=4, random_negatives=1,
                             seed=42)
        batches = epoch_batches(pools["model"], config, 0, corpus_ids=train.corpus.ids)[:args.steps]
        result["step"] = {}
        cells = {}
        for name in teachers:
            times = []
            for batch in batches:
                started = time.perf_counter()
                cells.setdefault(name, []).append(batch_teacher_scores(scorers[name], train.corpus, [batch]))
                times.append(time.perf_counter() - started)
            result["step"][name] = {"median_seconds": round(statistics.median(times), 3),
                                    "seconds": [round(t, 3) for t in times]}
        for name in teachers:
            if name != "model":
                result["step"][name]["max_cell_difference"] = max(
                    float((a - b).abs().max()) for a, b in zip(cells["model"], cells[name]))
    write_json(args.output, result)
    print(result)


if __name__ == "__main__":
    main()
