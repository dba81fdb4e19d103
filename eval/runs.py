"""TREC run files: ``qid Q0 docid rank score tag``, one line per retrieved document."""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from pathlib import Path

from eval.metrics import ranked
from retriever.data import Run, id_problem, numbered_lines
from retriever.io import DataError, HardnegError, atomic_write


def write_run(path: str | os.PathLike, run: Run, tag: str = "hardneg") -> None:
    """Write a run in trec_eval's order (score descending, ties by document id descending).

    Scores are written with Python's shortest round-trip repr, not a fixed 6 decimals: rounding would
    turn near-ties into exact ties, which trec_eval then breaks by document id, so the file would score
    differently from the run it came from (seen with close cosine scores of a small model).
    """
    tag = tag.replace(" ", "_") or "hardneg"
    for query_id, scores in run.items():  # the loaders refuse such ids; a custom retriever may still invent one
        for value in (query_id, *scores):
            problem = id_problem(value)
            if problem:
                raise HardnegError(f"{path}: cannot write id {value!r} to a TREC run: it {problem}")
    with atomic_write(path) as handle:
        for query_id in sorted(run):
            scores = run[query_id]
            for rank, doc_id in enumerate(ranked(scores), start=1):
                handle.write(f"{query_id} Q0 {doc_id} {rank} {float(scores[doc_id])!r} {tag}\n")


def read_run(path: str | os.PathLike, queries: Collection[str] | None = None, *,
             extra_queries: str = "error") -> Run:
    """Read a TREC run; a line that is not six whitespace-separated fields with a numeric score is an error,
    and so is a document listed twice for one query (which of its two scores counts would be a guess).

    With ``queries`` (the ids of the split being evaluated), a line naming another query is an error
    that points at it (``extra_queries="error"``, the default: a run from the wrong split or dataset
    otherwise scores quietly low), or is dropped (``"ignore"``, for a run over more queries than the split).
    """
    if extra_queries not in ("error", "ignore"):
        raise ValueError(f"extra_queries must be 'error' or 'ignore', got {extra_queries!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "run file not found")
    run: Run = {}
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise DataError(path, f"expected 6 fields 'qid Q0 docid rank score tag', found {len(parts)}",
                            line=number, field="columns")
        try:
            score = float(parts[4])
        except ValueError:
            raise DataError(path, f"score {parts[4]!r} is not a number", line=number, field="score") from None
        if not math.isfinite(score):
            raise DataError(path, f"score {parts[4]!r} is not finite", line=number, field="score")
        if queries is not None and parts[0] not in queries:
            if extra_queries == "ignore":
                continue
            raise DataError(path, f"query {parts[0]!r} is not in the evaluated split", line=number, field="qid",
                            hint="is the run from another split or dataset? --extra-run-queries ignore drops "
                                 "such lines")
        row = run.setdefault(parts[0], {})
        if parts[2] in row:
            raise DataError(path, f"document {parts[2]!r} is listed a second time for query {parts[0]!r}",
                            line=number, field="docid", hint="a run ranks each document once per query")
        row[parts[2]] = score
    if not run:
        raise DataError(path, "the run file is empty" if queries is None else "no line of the run names a query "
                        "of the evaluated split")
    return run
