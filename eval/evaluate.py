"""``evaluate``: retrieve for every query of a split, score the run, write the evaluation folder.

The folder holds ``metrics.json`` (means, split, options, model, library versions, input checksums),
``per_query.json`` (every metric for every query: what ``hardneg compare`` tests on), ``run.trec``,
``report.md`` (a Markdown table) and, when the pooled AUC was computed, ``roc.png`` and
``score_histogram.png``. Everything is computed first and written last, each file atomically, so a
bad input or a crash leaves no half-written folder.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from eval.auc import AUCResult, can_score_corpus, corpus_auc, plot_auc, run_pooled_sample
from eval.metrics import (
    CORPUS_AUC,
    DEFAULT_METRICS,
    POOLED_AUC,
    check_metrics,
    evaluated_queries,
    identical_id_default,
    mean_of,
    parse_metric,
    per_query,
    queries_with_relevant,
    without_identical_ids,
)
from eval.report import markdown_report
from eval.runs import write_run
from retriever.data import Dataset, Run, dev_subset
from retriever.dense import encoding_record
from retriever.factory import as_retriever
from retriever.io import HardnegError, atomic_write, check_output_folder, library_versions, write_json
from retriever.protocol import EmbeddingSource, describe, sharding_record
from retriever.ranks import is_main

METRICS_FILE = "metrics.json"
PER_QUERY_FILE = "per_query.json"
RUN_FILE = "run.trec"
REPORT_FILE = "report.md"


def dense_search(source: object, dataset: Dataset, depth: int) -> tuple[Run, np.ndarray]:
    """Exact search of a dense retriever that also returns the query vectors, reused by the corpus AUC.

    hardneg's own :class:`~retriever.dense.DenseRetriever` searches its rows in chunks (and under torchrun its
    shard, the lists merged across ranks); any other ``EmbeddingSource`` is searched over its whole matrix."""
    from retriever.dense import DenseRetriever
    from retriever.index import exact_search

    vectors = np.asarray(source.query_embeddings(dataset.queries), dtype=np.float32)
    if isinstance(source, DenseRetriever):
        scores, positions = source.search_embeddings(dataset.corpus, vectors, depth, exact=True)
    else:
        scores, positions = exact_search(source.corpus_embeddings(dataset.corpus), vectors, depth)
    ids = dataset.corpus.ids
    run = {query_id: {ids[p]: s for s, p in zip(row_scores, row_positions) if p >= 0}
           for query_id, row_scores, row_positions in zip(dataset.queries, scores.tolist(), positions.tolist())}
    return run, vectors


def evaluate(dataset: Dataset, retriever: object, *, metrics: tuple[str, ...] = DEFAULT_METRICS,
             depth: int = 1000, output_dir: str | Path | None = None, run: Run | None = None,
             config: dict | None = None, relevance_level: int = 1, ignore_identical_ids: bool | None = None,
             auc_negatives: int = 100, seed: int = 42, plots: bool = True, show_progress: bool = False) -> dict:
    """Score ``retriever`` (anything ``as_retriever`` accepts) or a given ``run`` on ``dataset``.

    ``ignore_identical_ids=None`` decides by dataset (on for ArguAna and Quora, as BEIR and MTEB do, and where
    most queries are unjudged copies of corpus documents);
    the choice and its reason are recorded. ``relevance_level`` is trec_eval's ``-l`` for the binary
    metrics. ``AUC-corpus`` needs a retriever that can score every document (dense or BM25);
    ``AUC-pooled`` uses corpus scores when it can and the run otherwise. Returns the record written
    to ``metrics.json``; ``record["per_query"]`` holds the per-query values (not in metrics.json).
    """
    metrics = tuple(metrics)
    check_metrics(metrics, depth)
    if output_dir is not None:
        check_output_folder(output_dir, "output_dir")
    if relevance_level < 1:
        raise HardnegError(f"relevance level must be >= 1, got {relevance_level}")
    if auc_negatives < 1:
        raise HardnegError(f"auc negatives per query must be >= 1, got {auc_negatives}")
    bases = {parse_metric(name)[0]: name for name in metrics}
    identical_reason = "given"
    judged_ids, with_relevant = evaluated_queries(dataset.qrels), queries_with_relevant(dataset.qrels,
                                                                                        relevance_level)
    if ignore_identical_ids is None:
        judged = {query_id: dataset.queries[query_id] for query_id in judged_ids if query_id in dataset.queries}
        ignore_identical_ids, identical_reason = identical_id_default(dataset.name, judged, dataset.corpus,
                                                                      dataset.qrels)
    if not with_relevant:
        raise HardnegError(f"no query of {dataset.name}/{dataset.split} has a document of grade >= "
                           f"{relevance_level}; lower the relevance level")

    started = time.time()
    source = None
    query_vectors = None
    if run is None:
        source = as_retriever(retriever, show_progress=show_progress)
        if CORPUS_AUC.lower() in bases and not can_score_corpus(source):
            raise HardnegError(f"{CORPUS_AUC} needs a retriever that scores every document (a dense model or "
                               f"bm25); {describe(source)} only searches")
        fetch = depth + 1 if ignore_identical_ids else depth  # one extra in case the query itself comes back
        if isinstance(source, EmbeddingSource):
            run, query_vectors = dense_search(source, dataset, fetch)
        else:
            run = source.search(dataset.corpus, dataset.queries, fetch)
        name = describe(source)
    else:
        if CORPUS_AUC.lower() in bases:
            raise HardnegError(f"{CORPUS_AUC} needs document scores beyond a run file; give --retriever instead")
        unknown = sorted(set(run) - set(dataset.queries))
        if unknown:
            raise HardnegError(f"{len(unknown)} query id(s) of the run are not in {dataset.name}/{dataset.split} "
                               f"(e.g. {unknown[:3]}); is the run from another split or dataset?")
        name = str(retriever)
    if ignore_identical_ids:
        run = without_identical_ids(run)
    run = _cut(run, depth)
    search_seconds = time.time() - started

    values = per_query(run, dataset.qrels, metrics, relevance_level=relevance_level)
    auc_result: AUCResult | None = None
    if CORPUS_AUC.lower() in bases or POOLED_AUC.lower() in bases:
        if source is not None and can_score_corpus(source):
            auc_result = corpus_auc(source, dataset.corpus, dataset.queries, dataset.qrels,
                                    relevance_level=relevance_level, ignore_identical_ids=ignore_identical_ids,
                                    negatives_per_query=auc_negatives, seed=seed, query_vectors=query_vectors,
                                    show_progress=show_progress)
        else:
            auc_result = run_pooled_sample(run, dataset.qrels, relevance_level=relevance_level,
                                           negatives_per_query=auc_negatives, seed=seed)
        if CORPUS_AUC.lower() in bases:
            values[bases[CORPUS_AUC.lower()]] = auc_result.per_query
    means = {}
    for metric in metrics:
        if metric.lower() == POOLED_AUC.lower():
            pooled = auc_result.pooled
            means[metric] = float("nan") if pooled is None else pooled
        else:
            means[metric] = mean_of(values[metric])
    record = {
        "dataset": dataset.name, "split": dataset.split, "retriever": name,
        "model": retriever if isinstance(retriever, str) else name, "metrics": means,
        "queries": len(judged_ids),
        # judged, but nothing of grade >= relevance_level: in the mean, 0 on the binary metrics (trec_eval/BEIR)
        "queries_without_relevant": len(judged_ids) - len(with_relevant),
        "queries_per_metric": {metric: len(v) for metric, v in values.items()},
        "depth": depth,
        "options": {"relevance_level": relevance_level, "ignore_identical_ids": ignore_identical_ids,
                    "ignore_identical_ids_reason": identical_reason, "auc_negatives_per_query": auc_negatives,
                    "seed": seed},
        "auc_definition": "AUC: per query, P(relevant document outscores a retrieved non-relevant one), "
                          "unretrieved relevant documents lose, ties count 1/2; AUC-corpus: the same against "
                          "every non-relevant corpus document; AUC-pooled: Mann-Whitney U/(n_pos*n_neg) over "
                          "all relevant pairs vs sampled non-relevant pairs of all queries",
        "encoding": encoding_record(source) if source is not None else [],
        "sharding": sharding_record(source) if source is not None else [],
        **dataset.qrels_counts(), "library_versions": library_versions(),
        "input_checksums": dataset.checksums(), "config": config or {},
        "seconds": round(time.time() - started, 1), "search_seconds": round(search_seconds, 1),
    }
    if auc_result is not None:
        record["auc_pooled"] = {"source": auc_result.source, "positives": int(auc_result.pooled_positives.size),
                                "negatives": int(auc_result.pooled_negatives.size), "value": auc_result.pooled}
    if output_dir is not None and is_main():  # under torchrun every rank has the record; rank 0 writes it
        output_dir = Path(output_dir)
        write_run(output_dir / RUN_FILE, run, tag=name)
        write_json(output_dir / PER_QUERY_FILE, {"dataset": dataset.name, "split": dataset.split,
                                                  "retriever": name, "per_query": values})
        if auc_result is not None and plots and auc_result.pooled is not None:
            plot_auc(auc_result, output_dir, title=f"{name} on {dataset.name}/{dataset.split}")
        write_json(output_dir / METRICS_FILE, record)
        with atomic_write(output_dir / REPORT_FILE) as handle:
            handle.write(markdown_report(record))
    record["per_query"] = values
    return record


def dev_evaluator(dev: Dataset, metric: str, *, batch_size: int = 64, precision: str = "auto",
                  corpus_size: int | None = None, distractors: Iterable[str] = (), seed: int = 0):
    """The keep-best scorer of training: ``score(model)`` is ``metric`` of the model on ``dev``, higher better.

    The metric is checked now, so a bad name fails before training. The dev corpus is encoded in the
    encoding ``precision`` (training's own autocast is separate) and searched deep enough for the metric.
    With ``corpus_size`` the search runs over :func:`~retriever.data.dev_subset` of that many documents (the dev
    queries' judged documents, then ``distractors``, then random ones drawn with ``seed``), chosen once here, so
    that every evaluation of a run ranks the same documents; ``score.subset_note`` says what it holds. Whether a
    query's own id is ignored as a hit is decided on the whole corpus (the subset would drop most of the copies
    that decide it).
    """
    from retriever.dense import DenseRetriever

    try:
        cut = parse_metric(metric)[1]
    except ValueError as err:
        raise HardnegError(f"dev metric: {err}") from None
    depth = max(cut or 1000, 100)
    judged = {query_id: dev.queries[query_id] for query_id in evaluated_queries(dev.qrels) if query_id in dev.queries}
    ignore_identical_ids = identical_id_default(dev.name, judged, dev.corpus, dev.qrels)[0]
    whole = len(dev.corpus)
    kinds = {}
    if corpus_size is not None:
        dev, kinds = dev_subset(dev, corpus_size, seed, distractors)

    def score(model) -> float:
        trained_precision = getattr(model, "precision", None)
        if trained_precision is not None:
            model.precision = precision
        try:
            retriever = DenseRetriever(model, batch_size=batch_size, show_progress=False)
            return evaluate(dev, retriever, metrics=(metric,), depth=depth,
                            ignore_identical_ids=ignore_identical_ids)["metrics"][metric]
        finally:
            if trained_precision is not None:
                model.precision = trained_precision

    score.metric = metric  # the name training logs and plots the dev score under
    score.documents = len(dev.corpus)
    score.subset_note = _subset_note(kinds, len(dev.corpus), whole, corpus_size)
    return score


def _subset_note(kinds: dict[str, int], documents: int, whole: int, size: int | None) -> str:
    """What a progress line says of a dev set scored over a subset of its corpus; empty for the whole corpus."""
    if not kinds:
        return ""
    note = (f"over {documents:,} of the {whole:,} documents (" + ", ".join(f"{count:,} {kind}"
                                                                         for kind, count in kinds.items()) + ")")
    if kinds["judged"] >= size:
        note += (f"; the judged documents alone fill dev_corpus_size {size:,}, so no query meets a hard or random "
                 "distractor: raise it, or hold out fewer queries")
    elif not kinds["mined negatives"]:
        note += "; no mined negatives (they come with held-out training queries, dev_fraction), so an easier ranking"
    return note


def _cut(run: Run, depth: int) -> Run:
    """Keep the top ``depth`` documents per query, in trec_eval order."""
    from eval.metrics import ranked

    return {query_id: (scores if len(scores) <= depth else {d: scores[d] for d in ranked(scores)[:depth]})
            for query_id, scores in run.items()}
