"""Mined pools in the formats other trainers read: Hugging Face datasets, parquet, ST triplets and n-tuples.

hardneg's own trainer reads ``pools.jsonl``; users who train with sentence-transformers'
``SentenceTransformerTrainer`` (or anything that reads ``datasets``) get the same negatives here:

- :func:`pools_to_dataset` / :func:`dataset_to_pools`: one row per query with ids and scores, a lossless
  round trip of ``pools.jsonl`` (what ``--format pools`` writes as a dataset folder or parquet file).
- :func:`pools_to_triplets`: ``(anchor, positive, negative)`` texts, one row per positive x negative, the
  layout of sentence-transformers' ``mine_hard_negatives(output_format="triplet")``.
- :func:`pools_to_ntuples`: ``(anchor, positive, negative_1..negative_n)``, one row per positive; queries
  with fewer than ``n`` negatives are left out (a fixed-width layout cannot hold them) and counted.

Triplet and n-tuple datasets carry text columns only, because ``SentenceTransformerTrainer`` treats every
column that is not called ``label``/``score`` as a model input. Texts are the corpus's ``title body`` as
hardneg's encoders see them (:meth:`retriever.data.Corpus.text`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retriever.data import POOLS_FILE, Candidate, Corpus, Pool, pools_file, read_pools, write_pools
from retriever.io import HardnegError, atomic_directory, atomic_write

FORMATS = ("pools", "triplets", "ntuples")


@dataclass
class ExportResult:
    """What was written, for the CLI to print: rows, and queries an n-tuple layout could not hold."""

    path: Path
    format: str
    rows: int
    queries: int
    queries_left_out: int = 0

    def summary(self) -> str:
        text = f"{self.rows} rows ({self.format}) from {self.queries} queries written to {self.path}"
        if self.queries_left_out:
            text += f"; {self.queries_left_out} queries left out (fewer negatives than the n-tuple width)"
        return text


def pools_to_dataset(pools: Sequence[Pool]):
    """One row per query: ``query_id, query, positive_ids, positive_scores, negative_ids, negative_scores,
    negative_ranks, negative_sources`` (scores/ranks may be null where the pools have none)."""
    from datasets import Dataset, Features, Value
    from datasets import Sequence as Seq

    features = Features({
        "query_id": Value("string"), "query": Value("string"),
        "positive_ids": Seq(Value("string")), "positive_scores": Seq(Value("float64")),
        "negative_ids": Seq(Value("string")), "negative_scores": Seq(Value("float64")),
        "negative_ranks": Seq(Value("int64")), "negative_sources": Seq(Value("string"))})
    columns: dict[str, list] = {name: [] for name in features}
    for pool in pools:
        columns["query_id"].append(pool.query_id)
        columns["query"].append(pool.query)
        columns["positive_ids"].append([c.doc_id for c in pool.positives])
        columns["positive_scores"].append([c.score for c in pool.positives])
        columns["negative_ids"].append([c.doc_id for c in pool.negatives])
        columns["negative_scores"].append([c.score for c in pool.negatives])
        columns["negative_ranks"].append([c.rank for c in pool.negatives])
        columns["negative_sources"].append([c.source for c in pool.negatives])
    return Dataset.from_dict(columns, features=features)


def dataset_to_pools(dataset) -> list[Pool]:
    """The inverse of :func:`pools_to_dataset` (e.g. pools edited or filtered with ``datasets``)."""
    missing = {"query_id", "query", "positive_ids", "negative_ids"} - set(dataset.column_names)
    if missing:
        raise HardnegError(f"dataset is not a hardneg pools export: missing column(s) {', '.join(sorted(missing))}")
    pools = []
    for row in dataset:
        n_pos, n_neg = len(row["positive_ids"]), len(row["negative_ids"])
        pos_scores = row.get("positive_scores") or [None] * n_pos
        neg_scores = row.get("negative_scores") or [None] * n_neg
        ranks = row.get("negative_ranks") or [None] * n_neg
        sources = row.get("negative_sources") or [None] * n_neg
        pools.append(Pool(row["query_id"], row["query"],
                          [Candidate(d, s) for d, s in zip(row["positive_ids"], pos_scores)],
                          [Candidate(d, s, r, src) for d, s, r, src in zip(row["negative_ids"], neg_scores, ranks,
                                                                           sources)]))
    return pools


def _text(corpus: Corpus, pool: Pool, doc_id: str) -> str:
    if doc_id not in corpus:
        raise HardnegError(f"query {pool.query_id!r}: document {doc_id!r} is not in the corpus "
                           f"({corpus.path or 'given in memory'}); were the pools mined on this corpus?")
    return corpus.text_of(doc_id)


def _positives(pool: Pool, max_positives: int | None) -> list[Candidate]:
    return pool.positives if max_positives is None else pool.positives[:max_positives]


def _check_positive_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise HardnegError(f"{name} must be a whole number of at least 1, got {value!r}")


def pools_to_triplets(pools: Sequence[Pool], corpus: Corpus, *, max_positives: int | None = None):
    """``anchor, positive, negative`` texts: every positive (the first ``max_positives`` in pool order when
    given) paired with every negative of its query. Queries without negatives give no rows."""
    from datasets import Dataset

    _check_positive_count("max_positives", max_positives)
    anchors, positives, negatives = [], [], []
    for pool in pools:
        negative_texts = [_text(corpus, pool, c.doc_id) for c in pool.negatives]
        for positive in _positives(pool, max_positives):
            positive_text = _text(corpus, pool, positive.doc_id)
            for negative_text in negative_texts:
                anchors.append(pool.query)
                positives.append(positive_text)
                negatives.append(negative_text)
    return Dataset.from_dict({"anchor": anchors, "positive": positives, "negative": negatives})


def pools_to_ntuples(pools: Sequence[Pool], corpus: Corpus, num_negatives: int | None = None, *,
                     max_positives: int | None = None):
    """``anchor, positive, negative_1..negative_n`` texts, one row per positive; ``n`` defaults to the most
    negatives any pool has. Returns ``(dataset, queries_left_out)``: queries with fewer than ``n`` negatives
    are left out rather than padded with random documents."""
    from datasets import Dataset

    _check_positive_count("num_negatives", num_negatives)
    _check_positive_count("max_positives", max_positives)
    width = num_negatives if num_negatives is not None else max((len(p.negatives) for p in pools), default=0)
    if width < 1:
        raise HardnegError("no pool has a negative: an n-tuple dataset would be empty")
    columns: dict[str, list[str]] = {"anchor": [], "positive": [], **{f"negative_{i}": [] for i in range(1, width + 1)}}
    left_out = 0
    for pool in pools:
        if len(pool.negatives) < width:
            left_out += 1
            continue
        negative_texts = [_text(corpus, pool, c.doc_id) for c in pool.negatives[:width]]
        for positive in _positives(pool, max_positives):
            columns["anchor"].append(pool.query)
            columns["positive"].append(_text(corpus, pool, positive.doc_id))
            for i, text in enumerate(negative_texts, start=1):
                columns[f"negative_{i}"].append(text)
    return Dataset.from_dict(columns), left_out


# The file suffix picks the container; no suffix is a ``save_to_disk`` folder. Anything else is refused rather
# than written as a folder with a file's name.
CONTAINERS = {".parquet": "one parquet file", ".jsonl": "JSON lines (for --format pools: pools.jsonl itself)",
              "": "a datasets.save_to_disk folder"}


def container_of(path: str | os.PathLike) -> str:
    """The container suffix of ``path`` (``""`` for a folder), or a one-line error for one hardneg cannot write."""
    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINERS:
        choices = "; ".join(f"{key or 'no suffix'}: {value}" for key, value in CONTAINERS.items())
        raise HardnegError(f"export: cannot write {suffix!r} files ({path}); the output's suffix picks the "
                           f"container: {choices}")
    return suffix


def save_dataset(dataset, path: str | os.PathLike) -> Path:
    """Write a dataset atomically, in the container the suffix names (:data:`CONTAINERS`); a folder is read back
    with ``datasets.load_from_disk``, the files with ``datasets.load_dataset("parquet"/"json", ...)``."""
    path = Path(path)
    suffix = container_of(path)
    if suffix == ".parquet":
        with atomic_write(path, "wb") as handle:
            dataset.to_parquet(handle)
        return path
    if suffix == ".jsonl":
        with atomic_write(path, "wb") as handle:
            dataset.to_json(handle, lines=True, force_ascii=False)
        return path
    if path.exists() and not path.is_dir():
        raise HardnegError(f"output '{path}' exists and is not a folder; give a folder or a .parquet file")
    with atomic_directory(path) as staging:
        dataset.save_to_disk(str(staging))
    return path


def export_pools(pools: Sequence[Pool], corpus: Corpus | None, output: str | os.PathLike, format: str = "pools", *,
                 num_negatives: int | None = None, max_positives: int | None = None) -> ExportResult:
    """The ``hardneg export`` entry point: build the ``format`` dataset and write it to ``output``."""
    if format not in FORMATS:
        raise HardnegError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format != "pools" and corpus is None:
        raise HardnegError(f"export format {format!r} needs the corpus to resolve document texts")
    if format != "ntuples" and num_negatives is not None:
        raise HardnegError("num_negatives applies to the ntuples format only")
    if format == "pools" and max_positives is not None:
        raise HardnegError("max_positives applies to the triplets and ntuples formats only")
    left_out = 0
    if format == "pools" and container_of(output) == ".jsonl":  # hardneg's own file, byte for byte
        write_pools(output, pools)
        return ExportResult(path=Path(output), format=format, rows=len(pools), queries=len(pools))
    if format == "pools":
        dataset = pools_to_dataset(pools)
    elif format == "triplets":
        dataset = pools_to_triplets(pools, corpus, max_positives=max_positives)
    else:
        dataset, left_out = pools_to_ntuples(pools, corpus, num_negatives, max_positives=max_positives)
    path = save_dataset(dataset, output)
    return ExportResult(path=path, format=format, rows=len(dataset), queries=len(pools), queries_left_out=left_out)


def is_exported_pools(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``datasets`` export (a ``save_to_disk`` folder or a parquet file), not pools.jsonl."""
    path = Path(path)
    return path.suffix.lower() == ".parquet" or (path.is_dir() and not (path / POOLS_FILE).exists()
                                                 and (path / "dataset_info.json").is_file())


def load_pools(path: str | os.PathLike, corpus: Corpus | None = None, *,
               allow_corpus_mismatch: bool = False) -> list[Pool]:
    """Pools from ``pools.jsonl`` (or its folder), or from a ``--format pools`` export (folder or parquet): what
    ``hardneg train --pools`` reads, so an export edited with ``datasets`` trains as it is."""
    if not is_exported_pools(path):
        return read_pools(pools_file(path), corpus, allow_corpus_mismatch=allow_corpus_mismatch)
    import datasets

    try:
        dataset = (datasets.Dataset.from_parquet(str(path)) if Path(path).suffix.lower() == ".parquet"
                   else datasets.load_from_disk(str(path)))
    except (OSError, ValueError) as err:
        raise HardnegError(f"{path}: not a readable datasets export ({err})") from None
    if "anchor" in dataset.column_names:
        raise HardnegError(f"{path}: a triplets/ntuples export holds texts, not document ids, and cannot be "
                           "trained on by hardneg; export with --format pools (or give pools.jsonl)")
    try:
        pools = dataset_to_pools(dataset)
    except HardnegError as err:
        raise HardnegError(f"{path}: {err}") from None
    if corpus is not None:
        missing = sorted({c.doc_id for p in pools for c in [*p.positives, *p.negatives] if c.doc_id not in corpus})
        if missing:
            raise HardnegError(f"{path}: {len(missing)} document ids are not in the corpus (e.g. {missing[:3]}); "
                               "were the pools mined on this corpus?")
    return pools
