"""``mine``: candidate pools with positive-aware filtering, written as ``pools.jsonl`` + ``pools.meta.json``.

For every query of the split: retrieve ``depth`` candidates, remove its labelled positives, remove
what the filter rejects (against the query's anchor positive score, from the same scorer), then take
``num_negatives`` of the survivors, either the best ones (``sampling="top"``) or a seeded random
sample. Queries left with fewer survivors than asked are reported, never padded with random documents.
The same inputs, settings and seed give byte-identical pools.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mining.filters import Filter, TopKPercPos, anchor_score, describe_filter
from retriever.data import Candidate, Dataset, Pool, write_pools
from retriever.io import HardnegError, library_versions, write_json
from retriever.protocol import Scorer, as_retriever, describe

SAMPLINGS = ("top", "random")
POOLS_FILE = "pools.jsonl"
META_FILE = "pools.meta.json"


@dataclass
class MiningStats:
    queries: int = 0
    candidates: int = 0
    removed_positives: int = 0
    removed_by_filter: int = 0
    kept_negatives: int = 0
    queries_short: list[str] = field(default_factory=list)
    queries_without_negatives: int = 0
    anchors_not_positive: int = 0

    def to_json(self, num_negatives: int) -> dict:
        return {"queries": self.queries, "candidates": self.candidates,
                "removed_labelled_positives": self.removed_positives,
                "removed_by_filter": self.removed_by_filter, "negatives_written": self.kept_negatives,
                "queries_short_of_negatives": len(self.queries_short),
                "share_short_of_negatives": len(self.queries_short) / max(self.queries, 1),
                "queries_without_negatives": self.queries_without_negatives,
                "queries_with_anchor_score_at_or_below_zero": self.anchors_not_positive,
                "short_query_ids": self.queries_short[:100],
                "negatives_requested_per_query": num_negatives}


@dataclass
class MiningResult:
    pools: list[Pool]
    stats: MiningStats
    meta: dict

    def summary(self) -> str:
        """What a user should read after mining: counts, and a warning when the filter starved the pools."""
        counts = self.meta["counts"]
        text = (f"{counts['queries']} queries: {counts['negatives_written']} negatives written, "
                f"{counts['removed_by_filter']} candidates removed by {self.meta['settings']['filter']['name']}, "
                f"{counts['removed_labelled_positives']} labelled positives excluded, "
                f"{counts['queries_short_of_negatives']} queries short of negatives "
                f"({counts['queries_without_negatives']} with none)")
        if counts["share_short_of_negatives"] > 0.5 and self.meta["settings"]["anchor"] == "min":
            text += ("\nnote: most queries are short of negatives. With many (or loosely judged) positives per "
                     "query, or BM25 where a positive may share no word with the query (score 0), the lowest "
                     "positive is a very strict anchor; consider anchor 'mean' or 'max'")
        return text


def check_settings(depth: int, num_negatives: int, sampling: str) -> None:
    """Refuse impossible settings before any model is loaded or any document is read twice."""
    if num_negatives < 1:
        raise HardnegError(f"num_negatives must be at least 1, got {num_negatives}")
    if depth < num_negatives:
        raise HardnegError(f"depth ({depth}) must be at least num_negatives ({num_negatives})")
    if sampling not in SAMPLINGS:
        raise HardnegError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")


def mine(dataset: Dataset, retriever: object, *, depth: int = 100, num_negatives: int = 8,
         filter: Filter | None = None, anchor: str = "min", sampling: str = "top", seed: int = 42,
         output_dir: str | Path | None = None, config: dict | None = None) -> MiningResult:
    """Mine hard negatives for every query of ``dataset`` that has a relevant document.

    ``retriever`` is anything :func:`retriever.protocol.as_retriever` accepts (``"bm25"``, a model name
    or path, an Encoder, a Retriever). With ``output_dir``, pools and their metadata are written there
    atomically; ``config`` is recorded in the metadata as given.
    """
    check_settings(depth, num_negatives, sampling)
    flt = filter if filter is not None else TopKPercPos(0.95)
    anchor_score([0.0], anchor)  # validates the anchor name up front
    started = time.time()
    source = as_retriever(retriever)
    positives = {query_id: sorted(dataset.relevant(query_id)) for query_id in dataset.queries}
    queries = {query_id: text for query_id, text in dataset.queries.items() if positives[query_id]}
    if not queries:
        raise HardnegError(f"no query of split {dataset.split!r} has a relevant document to mine for")
    if flt.name != "topk" and not isinstance(source, Scorer):
        raise HardnegError(f"filter {flt.name!r} needs the positives' scores, but {describe(source)} has no "
                           "score() method; use --filter topk or a retriever that can score documents")

    run = source.search(dataset.corpus, queries, depth)
    positive_scores = source.score(dataset.corpus, queries, {q: positives[q] for q in queries}) \
        if isinstance(source, Scorer) else {q: dict.fromkeys(positives[q]) for q in queries}

    stats = MiningStats()
    pools = []
    source_name = getattr(source, "kind", None) or type(source).__name__
    for query_id, text in queries.items():
        labelled = positives[query_id]
        labelled_set = set(labelled)
        # Best first; equal scores by corpus position, so the order never depends on the retriever's dict order.
        ranked = sorted(run.get(query_id, {}).items(),
                        key=lambda item: (-item[1], dataset.corpus.position[item[0]]))
        candidates = [(rank, doc_id, score) for rank, (doc_id, score) in enumerate(ranked, start=1)
                      if doc_id not in labelled_set]
        stats.queries += 1
        stats.candidates += len(ranked)
        stats.removed_positives += len(ranked) - len(candidates)
        scores = np.array([score for _, _, score in candidates], dtype=np.float64)
        anchor_value = anchor_score([positive_scores[query_id][d] for d in labelled], anchor) \
            if flt.name != "topk" else 0.0
        stats.anchors_not_positive += flt.name != "topk" and anchor_value <= 0
        kept = [c for c, ok in zip(candidates, flt.keep(scores, anchor_value)) if ok]
        stats.removed_by_filter += len(candidates) - len(kept)
        if sampling == "random" and len(kept) > num_negatives:
            rng = random.Random(_query_seed(seed, query_id))
            kept = sorted(rng.sample(kept, num_negatives))
        kept = kept[:num_negatives]
        stats.kept_negatives += len(kept)
        if len(kept) < num_negatives:
            stats.queries_short.append(query_id)
            stats.queries_without_negatives += not kept
        pools.append(Pool(
            query_id=query_id, query=text,
            positives=[Candidate(d, _round(positive_scores[query_id][d])) for d in labelled],
            negatives=[Candidate(d, _round(s), rank=r, source=source_name) for r, d, s in kept]))

    settings = {"depth": depth, "num_negatives": num_negatives, "filter": describe_filter(flt),
                "anchor": anchor, "sampling": sampling, "seed": seed, "retriever": describe(source)}
    meta = {"dataset": dataset.name, "split": dataset.split, "settings": settings,
            "counts": stats.to_json(num_negatives), "skipped_qrels_rows": dataset.skipped_qrels,
            "library_versions": library_versions(), "input_checksums": dataset.checksums(),
            "config": config or {}, "seconds": round(time.time() - started, 1)}
    if output_dir is not None:
        output_dir = Path(output_dir)
        write_pools(output_dir / POOLS_FILE, pools)
        write_json(output_dir / META_FILE, meta)
    return MiningResult(pools=pools, stats=stats, meta=meta)


def _query_seed(seed: int, query_id: str) -> int:
    """A per-query seed, so one query's sample does not depend on which queries came before it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{query_id}".encode()).digest()[:8], "big")


def _round(score: float | None) -> float | None:
    # Scores are float32 underneath; 6 decimals keeps files small and identical across runs.
    return None if score is None else round(float(score), 6)
