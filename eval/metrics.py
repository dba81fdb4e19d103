"""Retrieval metrics with trec_eval's semantics, so hardneg's numbers equal pytrec_eval's.

What trec_eval does, and so do we:

* a run is ranked by score, highest first; equal scores are ordered by document id, *descending*
  (trec_eval's ``comp_sim_docno``), so ties never depend on dict order;
* nDCG uses the graded relevance as gain and ``log2(rank + 1)`` as discount, the ideal ranking being
  the query's judged grades sorted; Recall and MRR count a document as relevant when its grade >= 1;
* ``MRR@k`` is trec_eval's ``recip_rank`` on the run cut at depth k.

Unlike pytrec_eval, which silently evaluates only the queries present in the run, the mean here is
over every query with at least one relevant document in the qrels: a query the system returned
nothing for scores 0, as it should.

AUC, per query: the probability that a relevant document outscores a non-relevant *retrieved* one.
Positives are all documents the qrels judge relevant (grade >= 1), retrieved or not; negatives are the
retrieved documents that are not judged relevant (judged non-relevant or unjudged). A relevant
document missing from the run lies below the cut-off, so it loses to every retrieved negative. Ties
count one half. Queries with no retrieved negative are left out of the AUC mean (AUC is undefined).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from retriever.data import Qrels, Run

DEFAULT_METRICS = ("nDCG@10", "Recall@100", "MRR@10", "AUC")


def ranked(scores: dict[str, float]) -> list[str]:
    """Document ids in trec_eval order: score descending, then document id descending."""
    return [doc_id for doc_id, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def ndcg_at(ranking: list[str], judged: dict[str, int], k: int) -> float:
    gains = sorted((grade for grade in judged.values() if grade > 0), reverse=True)[:k]
    ideal = sum(gain / math.log2(i + 2) for i, gain in enumerate(gains))
    if ideal == 0:
        return 0.0
    dcg = sum(max(judged.get(doc_id, 0), 0) / math.log2(i + 2) for i, doc_id in enumerate(ranking[:k]))
    return dcg / ideal


def recall_at(ranking: list[str], judged: dict[str, int], k: int) -> float:
    relevant = {doc_id for doc_id, grade in judged.items() if grade >= 1}
    if not relevant:
        return 0.0
    return sum(1 for doc_id in ranking[:k] if doc_id in relevant) / len(relevant)


def mrr_at(ranking: list[str], judged: dict[str, int], k: int) -> float:
    for i, doc_id in enumerate(ranking[:k]):
        if judged.get(doc_id, 0) >= 1:
            return 1.0 / (i + 1)
    return 0.0


def auc(scores: dict[str, float], judged: dict[str, int]) -> float | None:
    """Per-query AUC as defined in the module docstring; ``None`` when there is no retrieved negative."""
    relevant = [doc_id for doc_id, grade in judged.items() if grade >= 1]
    negatives = np.sort(np.array([s for d, s in scores.items() if judged.get(d, 0) < 1], dtype=np.float64))
    if not relevant or negatives.size == 0:
        return None
    wins = 0.0
    for doc_id in relevant:
        if doc_id not in scores:
            continue  # below the cut-off: beats no retrieved negative
        score = scores[doc_id]
        below = np.searchsorted(negatives, score, side="left")
        tied = np.searchsorted(negatives, score, side="right") - below
        wins += below + 0.5 * tied
    return float(wins / (len(relevant) * negatives.size))


def parse_metric(name: str) -> tuple[str, int | None]:
    """'nDCG@10' -> ('ndcg', 10); 'AUC' -> ('auc', None). Raises ValueError for unknown names."""
    base, _, cut = name.partition("@")
    base = base.lower()
    if base not in {"ndcg", "recall", "mrr", "auc"}:
        raise ValueError(f"unknown metric {name!r}; known: nDCG@k, Recall@k, MRR@k, AUC")
    if base == "auc":
        if cut:
            raise ValueError("AUC takes no cut-off: it uses the whole retrieved list")
        return base, None
    if not cut.isdigit() or int(cut) < 1:
        raise ValueError(f"metric {name!r} needs a positive cut-off, like {base}@10")
    return base, int(cut)


def per_query(run: Run, qrels: Qrels, metrics: Iterable[str] = DEFAULT_METRICS) -> dict[str, dict[str, float]]:
    """metric name -> {query id -> value}, over the queries with at least one relevant document."""
    parsed = {name: parse_metric(name) for name in metrics}
    results: dict[str, dict[str, float]] = {name: {} for name in parsed}
    for query_id, judged in qrels.items():
        if not any(grade >= 1 for grade in judged.values()):
            continue
        scores = run.get(query_id, {})
        ranking = ranked(scores)
        for name, (base, k) in parsed.items():
            if base == "ndcg":
                results[name][query_id] = ndcg_at(ranking, judged, k)
            elif base == "recall":
                results[name][query_id] = recall_at(ranking, judged, k)
            elif base == "mrr":
                results[name][query_id] = mrr_at(ranking, judged, k)
            else:
                value = auc(scores, judged)
                if value is not None:
                    results[name][query_id] = value
    return results


def mean_metrics(run: Run, qrels: Qrels, metrics: Iterable[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Mean of each metric over the evaluated queries (see :func:`per_query`)."""
    return {name: (float(np.mean(list(values.values()))) if values else 0.0)
            for name, values in per_query(run, qrels, metrics).items()}
