"""Retrieval metrics with trec_eval's semantics, so hardneg's numbers equal pytrec_eval's.

What trec_eval does, and so do we:

* a run is ranked by score, highest first; equal scores are ordered by document id, *descending*
  (trec_eval's ``comp_sim_docno``), so ties never depend on dict order;
* nDCG uses the graded relevance as gain and ``log2(rank + 1)`` as discount, the ideal ranking being
  the query's judged grades sorted (``ndcg_cut.k``);
* the binary metrics count a document as relevant when its grade >= ``relevance_level`` (trec_eval's
  ``-l``, default 1): ``Recall@k`` (``recall.k``), ``P@k`` (``P.k``: relevant in the top k over k, even
  when fewer than k documents were retrieved), ``MAP@k`` (``map_cut.k``: the sum of the precisions at
  the relevant ranks within the top k, over the number of relevant documents), ``MRR@k``
  (``recip_rank`` on the run cut at depth k). ``MAP`` and ``MRR`` without a cut use the whole list.

The mean is over every judged query of the split (its qrels, read against the queries file), as BEIR and
MTEB average pytrec_eval's values: a query with nothing of grade >= ``relevance_level`` scores 0 on the
binary metrics, as trec_eval scores it (nDCG keeps the graded gains, so at level 2 a query judged only
grade 1 still has one; judged only grade 0, it scores 0 on every metric). Unlike pytrec_eval, which
silently evaluates only the queries present in the run, a query the system returned nothing for scores
0 too, as it should.

``ignore_identical_ids`` removes a retrieved document whose id equals the query id before anything
is ranked. ArguAna and Quora need it (their queries are also corpus documents, and BEIR/MTEB drop
that trivial hit); :func:`identical_id_default` decides by name, or by the queries being documents.

AUC, per query (``AUC``): the probability that a relevant document outscores a non-relevant
*retrieved* one. Positives are all documents the qrels judge relevant, retrieved or not; negatives
are the retrieved documents that are not judged relevant (judged non-relevant or unjudged). A
relevant document missing from the run lies below the cut-off, so it loses to every retrieved
negative. Ties count one half. Queries with no retrieved negative are left out of the AUC mean
(AUC is undefined). The whole-corpus and pooled variants live in :mod:`eval.auc`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import repeat

import numpy as np

from retriever.data import Corpus, Qrels, Run
from retriever.io import HardnegError

DEFAULT_METRICS = ("nDCG@10", "Recall@100", "MRR@10", "MAP@100", "P@10", "AUC")
"""What every stage reports unless told otherwise: all read off the run (AUC-corpus and AUC-pooled score the whole
corpus for a dense model, which costs a second search; they are one flag away)."""
CORPUS_AUC = "AUC-corpus"
POOLED_AUC = "AUC-pooled"
_BASES = {"ndcg": "nDCG", "recall": "Recall", "mrr": "MRR", "map": "MAP", "p": "P", "precision": "P",
          "auc": "AUC"}
_NEED_CUT = {"ndcg", "recall", "p"}
IDENTICAL_ID_DATASETS = ("arguana", "quora")
"""Datasets whose queries are also documents: BEIR and MTEB drop a hit equal to the query id."""


def needs_identical_id_filter(dataset_name: str) -> bool:
    """Whether BEIR/MTEB practice ignores a retrieved document whose id equals the query id, by name."""
    name = dataset_name.lower().removeprefix("beir:").replace("_", "-")
    return any(name == known or name.startswith(known + "-") for known in IDENTICAL_ID_DATASETS)


def queries_that_are_documents(queries: dict[str, str], corpus: Corpus, qrels: Qrels) -> int:
    """How many queries are corpus documents themselves, unjudged for themselves: the same id and the same text
    (body, or title and body; case and spacing aside), and no judgement of that document for that query. A copy
    of ArguAna or Quora in a folder of another name is recognised by this, where its name would not be; ids that
    merely collide (SciFact's query "3" and document "3") are not counted, nor a known-item set where a query's
    own document is its answer."""
    def normal(text: str) -> str:
        return " ".join(text.lower().split())

    count = 0
    for query_id, text in queries.items():
        row = corpus.position.get(query_id)
        if row is not None and query_id not in qrels.get(query_id, {}) \
                and normal(text) in (normal(corpus.bodies[row]), normal(corpus.text(row))):
            count += 1
    return count


def identical_id_default(name: str, queries: dict[str, str], corpus: Corpus, qrels: Qrels) -> tuple[bool, str]:
    """Whether to ignore a hit whose id is the query's own when the user did not say, and why: on for ArguAna and
    Quora by name, and for any dataset where most queries are corpus documents themselves (a retriever finds each
    query's own copy at rank 1, which the qrels never judge, so every metric would be silently low)."""
    if needs_identical_id_filter(name):
        return True, f"default for {name} (BEIR/MTEB practice)"
    copies = queries_that_are_documents(queries, corpus, qrels)
    if queries and copies * 2 >= len(queries):
        return True, (f"default: {copies} of the {len(queries)} queries are corpus documents themselves (same id "
                      "and text), as in ArguAna and Quora")
    return False, (f"default: off ({copies} of the {len(queries)} queries are corpus documents themselves)"
                   if copies else "default: off for this dataset")


def ranked(scores: dict[str, float]) -> list[str]:
    """Document ids in trec_eval order: score descending, then document id descending.

    A stable sort on the score alone (linear on an already ranked run, as search results are), then
    each run of equal scores is put in descending id order: the same order as one sort on
    (score, id) pairs, several times faster.
    """
    order = sorted(scores, key=scores.__getitem__, reverse=True)
    values = np.fromiter(map(scores.__getitem__, order), dtype=np.float64, count=len(order))
    tied = np.flatnonzero(values[1:] == values[:-1])
    if tied.size == 0:
        return order
    # runs of equal scores: [start, end) where start follows a change and end precedes one
    starts = tied[np.r_[True, np.diff(tied) > 1]]
    ends = tied[np.r_[np.diff(tied) > 1, True]] + 2
    for start, end in zip(starts.tolist(), ends.tolist()):
        order[start:end] = sorted(order[start:end], reverse=True)
    return order


def without_identical_ids(run: Run) -> Run:
    """The run with every document whose id equals its query's id removed."""
    return {query_id: ({d: s for d, s in scores.items() if d != query_id} if query_id in scores else scores)
            for query_id, scores in run.items()}


def ndcg_at(ranking: list[str], judged: dict[str, int], k: int) -> float:
    gains = sorted((grade for grade in judged.values() if grade > 0), reverse=True)[:k]
    ideal = sum(gain / math.log2(i + 2) for i, gain in enumerate(gains))
    if ideal == 0:
        return 0.0
    dcg = sum(max(judged.get(doc_id, 0), 0) / math.log2(i + 2) for i, doc_id in enumerate(ranking[:k]))
    return dcg / ideal


def recall_at(ranking: list[str], judged: dict[str, int], k: int, level: int = 1) -> float:
    relevant = {doc_id for doc_id, grade in judged.items() if grade >= level}
    if not relevant:
        return 0.0
    return sum(1 for doc_id in ranking[:k] if doc_id in relevant) / len(relevant)


def precision_at(ranking: list[str], judged: dict[str, int], k: int, level: int = 1) -> float:
    return sum(1 for doc_id in ranking[:k] if judged.get(doc_id, 0) >= level) / k


def average_precision_at(ranking: list[str], judged: dict[str, int], k: int | None, level: int = 1) -> float:
    relevant = sum(1 for grade in judged.values() if grade >= level)
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for i, doc_id in enumerate(ranking if k is None else ranking[:k]):
        if judged.get(doc_id, 0) >= level:
            hits += 1
            total += hits / (i + 1)
    return total / relevant


def mrr_at(ranking: list[str], judged: dict[str, int], k: int | None, level: int = 1) -> float:
    for i, doc_id in enumerate(ranking if k is None else ranking[:k]):
        if judged.get(doc_id, 0) >= level:
            return 1.0 / (i + 1)
    return 0.0


def auc(scores: dict[str, float], judged: dict[str, int], level: int = 1) -> float | None:
    """Per-query AUC as defined in the module docstring; ``None`` when there is no retrieved negative."""
    relevant = [doc_id for doc_id, grade in judged.items() if grade >= level]
    negatives = np.sort(np.array([s for d, s in scores.items() if judged.get(d, 0) < level], dtype=np.float64))
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
    """'nDCG@10' -> ('ndcg', 10); 'P@5' -> ('p', 5); 'MAP' -> ('map', None); 'AUC' -> ('auc', None).

    ``AUC-corpus`` and ``AUC-pooled`` parse as ('auc-corpus', None) and ('auc-pooled', None).
    Raises ValueError for unknown names.
    """
    if name.lower() in (CORPUS_AUC.lower(), POOLED_AUC.lower()):
        return name.lower(), None
    base, at, cut = name.partition("@")
    base = base.lower()
    if base not in _BASES:
        raise ValueError(f"unknown metric {name!r}; known: nDCG@k, Recall@k, P@k, MAP[@k], MRR[@k], AUC, "
                         f"{CORPUS_AUC}, {POOLED_AUC}")
    base = "p" if base == "precision" else base
    if base == "auc":
        if at:
            raise ValueError("AUC takes no cut-off: it uses the whole retrieved list")
        return base, None
    if not at and base not in _NEED_CUT:
        return base, None
    if not cut.isdigit() or int(cut) < 1:
        raise ValueError(f"metric {name!r} needs a positive cut-off, like {_BASES[base]}@10")
    return base, int(cut)


def evaluated_queries(qrels: Qrels) -> list[str]:
    """The queries a mean is taken over: every judged one, relevant documents or not (as BEIR averages)."""
    return [query_id for query_id, judged in qrels.items() if judged]


def queries_with_relevant(qrels: Qrels, level: int = 1) -> list[str]:
    """The judged queries with a document of grade >= ``level``: the binary metrics of the others are 0."""
    return [query_id for query_id, judged in qrels.items() if any(grade >= level for grade in judged.values())]


_DISCOUNTS = 1.0 / np.log2(np.arange(2, 1002, dtype=np.float64))


def _discounts(n: int) -> np.ndarray:
    global _DISCOUNTS
    if n > _DISCOUNTS.size:
        _DISCOUNTS = 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))
    return _DISCOUNTS[:n]


def per_query(run: Run, qrels: Qrels, metrics: Iterable[str] = DEFAULT_METRICS, *, relevance_level: int = 1,
              ignore_identical_ids: bool = False) -> dict[str, dict[str, float]]:
    """metric name -> {query id -> value}, over every judged query (AUC: those it is defined for).

    Each query's run is ranked once; every cut-off metric is then read off the grade vector of that
    ranking with numpy (the per-metric functions above are the plain definitions, kept as the
    readable reference and tested equal). ``AUC-corpus`` and ``AUC-pooled`` need document scores
    beyond the run and are skipped here (see :mod:`eval.auc`).
    """
    if relevance_level < 1:
        raise ValueError(f"relevance level must be >= 1, got {relevance_level}")
    parsed = {name: parse_metric(name) for name in metrics}
    parsed = {name: spec for name, spec in parsed.items() if spec[0] in _BASES}
    if ignore_identical_ids:
        run = without_identical_ids(run)
    level = relevance_level
    results: dict[str, dict[str, float]] = {name: {} for name in parsed}
    for query_id in evaluated_queries(qrels):
        judged = qrels[query_id]
        scores = run.get(query_id, {})
        ranking = ranked(scores)
        n = len(ranking)
        grades = np.fromiter(map(judged.get, ranking, repeat(0, n)), dtype=np.float64, count=n)
        relevant = grades >= level
        hits = np.cumsum(relevant)
        n_relevant = sum(1 for grade in judged.values() if grade >= level)
        ideal_gains = np.array(sorted((g for g in judged.values() if g > 0), reverse=True), dtype=np.float64)
        discounts = _discounts(max(n, ideal_gains.size))
        for name, (base, k) in parsed.items():
            depth = n if k is None else min(k, n)
            if base == "ndcg":
                m = min(k, ideal_gains.size)
                ideal = float(ideal_gains[:m] @ discounts[:m])
                dcg = float(np.maximum(grades[:depth], 0) @ discounts[:depth])
                value = dcg / ideal if ideal > 0 else 0.0
            elif base == "recall":
                value = float(hits[depth - 1]) / n_relevant if depth and n_relevant else 0.0
            elif base == "p":
                value = float(hits[depth - 1]) / k if depth else 0.0
            elif base == "map":
                ranks = np.flatnonzero(relevant[:depth])
                value = float(np.sum(np.arange(1, ranks.size + 1) / (ranks + 1))) / n_relevant if n_relevant else 0.0
            elif base == "mrr":
                first = np.flatnonzero(relevant[:depth])
                value = 1.0 / (first[0] + 1) if first.size else 0.0
            else:
                value = auc(scores, judged, level)
                if value is None:
                    continue
            results[name][query_id] = value
    return results


def mean_of(values: dict[str, float]) -> float:
    return float(np.mean(list(values.values()))) if values else 0.0


def mean_metrics(run: Run, qrels: Qrels, metrics: Iterable[str] = DEFAULT_METRICS, *, relevance_level: int = 1,
                 ignore_identical_ids: bool = False) -> dict[str, float]:
    """Mean of each metric over the evaluated queries (see :func:`per_query`)."""
    return {name: mean_of(values) for name, values in per_query(
        run, qrels, metrics, relevance_level=relevance_level, ignore_identical_ids=ignore_identical_ids).items()}


def check_metrics(metrics: tuple[str, ...], depth: int) -> None:
    """Reject unknown metric names and cut-offs deeper than the run, before any work."""
    if not metrics:
        raise HardnegError("no metric given; e.g. --metrics nDCG@10,Recall@100")
    if depth < 1:
        raise HardnegError(f"depth must be >= 1, got {depth}")
    for name in metrics:
        try:
            _, cut = parse_metric(name)
        except ValueError as err:
            raise HardnegError(str(err)) from None
        if cut is not None and cut > depth:
            raise HardnegError(f"metric {name} looks deeper than the run depth {depth}; raise --depth")
