"""``evaluate``: retrieve for every query of a split, score the run, write ``metrics.json`` and ``run.trec``."""

from __future__ import annotations

import time
from pathlib import Path

from eval.metrics import DEFAULT_METRICS, mean_metrics, parse_metric
from eval.runs import write_run
from retriever.data import Dataset, Run
from retriever.io import HardnegError, library_versions, write_json
from retriever.protocol import as_retriever, describe

METRICS_FILE = "metrics.json"
RUN_FILE = "run.trec"


def evaluate(dataset: Dataset, retriever: object, *, metrics: tuple[str, ...] = DEFAULT_METRICS,
             depth: int = 1000, output_dir: str | Path | None = None, run: Run | None = None,
             config: dict | None = None) -> dict:
    """Score ``retriever`` (anything ``as_retriever`` accepts) or a given ``run`` on ``dataset``.

    The run keeps the top ``depth`` documents per query (AUC is computed over that list; see
    :mod:`eval.metrics`). Returns the record written to ``metrics.json``.
    """
    for name in metrics:
        try:
            _, cut = parse_metric(name)
        except ValueError as err:
            raise HardnegError(str(err)) from None
        if cut is not None and cut > depth:
            raise HardnegError(f"metric {name} looks deeper than the run depth {depth}; raise --depth")
    started = time.time()
    if run is None:
        source = as_retriever(retriever)
        run = source.search(dataset.corpus, dataset.queries, depth)
        name = describe(source)
    else:
        name = str(retriever)
        unknown = sorted(set(run) - set(dataset.queries))
        if unknown and not set(run) & set(dataset.queries):
            raise HardnegError(f"no query of the run is in split {dataset.split!r} (e.g. {unknown[:3]})")
    scores = mean_metrics(run, dataset.qrels, metrics)
    record = {"dataset": dataset.name, "split": dataset.split, "retriever": name, "metrics": scores,
              "queries": len(dataset.qrels), "depth": depth,
              "auc_definition": "per query: P(relevant document outscores a retrieved non-relevant one); "
                                "unretrieved relevant documents lose, ties count 1/2",
              "skipped_qrels_rows": dataset.skipped_qrels, "library_versions": library_versions(),
              "input_checksums": dataset.checksums(), "config": config or {},
              "seconds": round(time.time() - started, 1)}
    if output_dir is not None:
        output_dir = Path(output_dir)
        write_run(output_dir / RUN_FILE, run, tag=name)
        write_json(output_dir / METRICS_FILE, record)
    return record
