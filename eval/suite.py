"""Several datasets at once: one evaluation folder per dataset and the summary table retrievers are reported by.

Why: BEIR and MTEB report a retriever as one row per dataset and the mean over them; doing that by hand means
one ``evaluate`` per dataset and a spreadsheet. Here the retriever is built once (a model loads once; each
corpus is encoded once), every dataset gets the folder ``evaluate`` writes, and ``summary.md`` /
``summary.json`` hold the table with its mean row (the plain mean over datasets, as BEIR's papers print it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eval.evaluate import evaluate
from retriever.data import Dataset
from retriever.factory import as_retriever
from retriever.io import HardnegError, atomic_write, check_output_folder, write_json
from retriever.protocol import describe

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


@dataclass
class SuiteResult:
    """Each dataset's ``evaluate`` record (by label, in the order given) and the mean of every metric."""

    retriever: str
    records: dict[str, dict]
    mean: dict[str, float]

    def table(self) -> str:
        """The Markdown table: a row per dataset, then the mean row."""
        metrics = list(self.mean)
        lines = ["| dataset | queries | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
        for label, record in self.records.items():
            lines.append(f"| {label} | {record['queries']:,} | "
                         + " | ".join(_cell(record["metrics"][m]) for m in metrics) + " |")
        lines.append(f"| **mean** ({len(self.records)} datasets) | | "
                     + " | ".join(f"**{_cell(self.mean[m])}**" for m in metrics) + " |")
        return "\n".join(lines) + "\n"

    def summary(self) -> dict:
        """What ``summary.json`` holds (no per-query values: those are in each dataset's folder)."""
        return {"retriever": self.retriever, "mean": self.mean, "datasets": {
            label: {key: record[key] for key in ("dataset", "split", "queries", "metrics", "depth", "options",
                                                  "input_checksums")}
            for label, record in self.records.items()}}

    def __repr__(self) -> str:
        shown = ", ".join(f"{m} {v:.4f}" for m, v in list(self.mean.items())[:3])
        return f"SuiteResult({self.retriever}: {len(self.records)} datasets, mean {shown})"


def dataset_labels(datasets: Sequence[Dataset]) -> list[str]:
    """Each dataset's folder name in the suite: its name, with the split when the same name comes twice."""
    labels = [d.name for d in datasets]
    if len(set(labels)) < len(labels):
        labels = [f"{d.name}-{d.split}" for d in datasets]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise HardnegError(f"the same dataset is given twice ({', '.join(repeated)}); give each dataset once")
    return labels


def evaluate_datasets(datasets: Sequence[Dataset], retriever: object, *, output_dir: str | os.PathLike | None = None,
                      show_progress: bool = False, **options) -> SuiteResult:
    """Evaluate ``retriever`` (anything :func:`eval.evaluate.evaluate` takes, except a run file: a run belongs
    to one dataset) on every dataset; with ``output_dir``, ``output_dir/<dataset>/`` is each dataset's
    evaluation folder and ``summary.md`` / ``summary.json`` the table. ``options`` are ``evaluate``'s."""
    if not datasets:
        raise HardnegError("evaluate: no dataset given")
    if "run" in options:
        raise HardnegError("evaluate: a run file scores one dataset; evaluate it with evaluate(), not a suite")
    labels = dataset_labels(datasets)
    if output_dir is not None:
        check_output_folder(output_dir, "output_dir")
        output_dir = Path(output_dir)
    source = as_retriever(retriever, show_progress=show_progress)  # one model for every dataset
    records = {}
    for label, dataset in zip(labels, datasets):
        folder = output_dir / label if output_dir is not None else None
        records[label] = evaluate(dataset, source, output_dir=folder, show_progress=show_progress, **options)
    metrics = list(next(iter(records.values()))["metrics"])
    mean = {m: _mean([r["metrics"][m] for r in records.values()]) for m in metrics}
    result = SuiteResult(describe(source), records, mean)
    if output_dir is not None:
        write_json(output_dir / SUMMARY_JSON, result.summary())
        with atomic_write(output_dir / SUMMARY_MD) as handle:
            handle.write(f"# {result.retriever}\n\n{result.table()}")
    return result


def _mean(values: list[float]) -> float:
    """The mean over datasets; NaN when a dataset has no value (say AUC-pooled without relevant pairs)."""
    return float("nan") if any(math.isnan(v) for v in values) else sum(values) / len(values)


def _cell(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.4f}"
