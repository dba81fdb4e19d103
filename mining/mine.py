"""``mine``: candidate pools with positive-aware filtering, written as ``pools.jsonl`` + ``pools.meta.json``.

For every query of the split: retrieve ``depth`` candidates from a source (BM25, dense, hybrid, see
:mod:`mining.sources`), optionally rescore them and the positives with a cross-encoder or a teacher,
remove its labelled positives, remove what the filters reject (against the query's anchor positive score,
from the same scorer), then take ``num_negatives`` of the survivors, either the best ones
(``sampling="top"``) or a seeded random sample. Queries left with fewer survivors than asked are
reported, never padded with random documents. The same inputs, settings and seed give byte-identical pools.

At scale, queries are mined in shards of ``shard_size``: each finished shard is written atomically to
``<output>/.pools-shards/`` with the bookkeeping the report needs, so an interrupted run started again
with the same settings skips the finished shards (settings, inputs and query ids are fingerprinted; a
mismatch starts over). When all shards exist they are concatenated into ``pools.jsonl`` atomically, the
report (:class:`mining.report.MiningReport`) is built from them, and the shard folder is removed. A fresh
and a resumed run therefore go through the same assembly and give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mining.filters import (
    Filter,
    TopKPercPos,
    anchor_score,
    as_chain,
    check_anchor_fallback,
    describe_filter,
    make_filter,
)
from mining.report import HISTOGRAM_FILE, MiningReport
from mining.settings import DEFAULT_SHARD_SIZE, SAMPLINGS
from mining.sources import Rescored, ranked
from retriever.data import POOLS_FILE, POOLS_META, Candidate, Dataset, Pool, corpus_fingerprint, read_pools
from retriever.dense import DenseRetriever, encoder_identity, encoding_record
from retriever.embedding_table import check_tables
from retriever.factory import as_retriever
from retriever.index import check_index_fits
from retriever.io import (
    HardnegError,
    atomic_write,
    check_output_folder,
    library_versions,
    remove_stale_staging,
    write_json,
)
from retriever.protocol import EncoderBacked, Scorer, components, describe, sharding_record
from retriever.ranks import broadcast_object, is_main

META_FILE = POOLS_META  # the names live with the pools format (retriever.data)
SHARDS_DIR = ".pools-shards"


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
    queries_with_fallback: int = 0
    queries_without_positive: int = 0  # judged in the split, but no relevant document in the corpus: not mined
    short_with_one_positive: int = 0  # short queries whose anchor, whichever, is their only positive

    def to_json(self, num_negatives: int) -> dict:
        return {"queries": self.queries, "candidates": self.candidates,
                "removed_labelled_positives": self.removed_positives,
                "removed_by_filter": self.removed_by_filter, "negatives_written": self.kept_negatives,
                "queries_short_of_negatives": len(self.queries_short),
                "share_short_of_negatives": len(self.queries_short) / max(self.queries, 1),
                "queries_without_negatives": self.queries_without_negatives,
                "queries_with_hard_negatives": self.queries - self.queries_without_negatives,
                "queries_filled_by_anchor_fallback": self.queries_with_fallback,
                "queries_with_anchor_score_at_or_below_zero": self.anchors_not_positive,
                "queries_without_relevant_document": self.queries_without_positive,
                "short_queries_with_one_positive": self.short_with_one_positive,
                "short_query_ids": self.queries_short[:100],
                "negatives_requested_per_query": num_negatives}


@dataclass
class MiningResult:
    pools: list[Pool]
    stats: MiningStats
    meta: dict

    def __repr__(self) -> str:  # the dataclass repr would print every pool
        counts = self.meta.get("counts", {})
        return (f"MiningResult({len(self.pools):,} pools, {counts.get('negatives_written', '?')} negatives, "
                f"{counts.get('queries_with_hard_negatives', '?')} queries with hard negatives)")

    def summary(self) -> str:
        """What a user should read after mining: counts, and a warning when the filter starved the pools."""
        counts = self.meta["counts"]
        text = (f"{counts['queries']} queries: {counts['negatives_written']} negatives written, "
                f"{counts['removed_by_filter']} candidates removed by {self.meta['settings']['filter']['name']}, "
                f"{counts['removed_labelled_positives']} labelled positives excluded, "
                f"{counts['queries_short_of_negatives']} queries short of negatives "
                f"({counts['queries_without_negatives']} with none); "
                f"{counts.get('queries_with_hard_negatives', '?')} of {counts['queries']} queries train with hard "
                "negatives")
        if self.meta["settings"].get("anchor_fallback"):
            text += (f" ({counts.get('queries_filled_by_anchor_fallback', 0)} filled up by the "
                     f"{self.meta['settings']['anchor_fallback']} anchor fallback)")
        if counts.get("queries_without_relevant_document"):
            text += (f"; {counts['queries_without_relevant_document']} more queries of the split have no relevant "
                     "document in the corpus and were not mined")
        try:
            compares_with_positives = as_chain(make_filter(**self.meta["settings"]["filter"])).needs_anchor
        except HardnegError:  # a filter of the user's own, which make_filter does not know: it may compare
            compares_with_positives = True
        single = counts.get("short_queries_with_one_positive", 0) * 2 > counts["queries_short_of_negatives"]
        if counts["share_short_of_negatives"] > 0.5 and compares_with_positives and single:
            text += ("\nnote: most queries are short of negatives, and most of those have a single positive (so "
                     "every anchor is that positive): their candidates score near or above it, likely false "
                     "negatives or a positive the retriever ranks low; a deeper candidate list (depth) reaches "
                     "below it")
        elif counts["share_short_of_negatives"] > 0.5 and self.meta["settings"]["anchor"] == "min" \
                and compares_with_positives:
            text += ("\nnote: most queries are short of negatives. With many (or loosely judged) positives per "
                     "query, or BM25 where a positive may share no word with the query (score 0), the lowest "
                     "positive is a very strict anchor; consider anchor 'mean' or 'max'")
        return text


def check_settings(depth: int, num_negatives: int, sampling: str, shard_size: int = DEFAULT_SHARD_SIZE) -> None:
    """Refuse impossible settings before any model is loaded or any document is read twice."""
    if num_negatives < 1:
        raise HardnegError(f"num_negatives must be at least 1, got {num_negatives}")
    if depth < num_negatives:
        raise HardnegError(f"depth ({depth}) must be at least num_negatives ({num_negatives})")
    if sampling not in SAMPLINGS:
        raise HardnegError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    if shard_size < 1:
        raise HardnegError(f"shard_size must be at least 1, got {shard_size}")


@dataclass
class _QueryRecord:
    """One query's bookkeeping: everything the report and the counts are built from."""

    query_id: str
    anchor: float | None
    positive_scores: np.ndarray      # float64, NaN where the scorer gave none
    candidate_scores: np.ndarray     # float64, every retrieved candidate best first
    is_positive: np.ndarray          # bool
    removed_by: np.ndarray           # int64: 0 kept, s = filter stage s (1-based)
    sampled: np.ndarray              # bool
    fallback: bool = False           # the anchor fallback admitted some of its negatives


def mine(dataset: Dataset, retriever: object, *, depth: int = 100, num_negatives: int = 8,
         filter: Filter | None = None, anchor: str = "min", sampling: str = "top", seed: int = 42,
         output_dir: str | Path | None = None, config: dict | None = None, rescorer: object | None = None,
         shard_size: int = DEFAULT_SHARD_SIZE, show_progress: bool = True,
         anchor_fallback: str | None = None) -> MiningResult:
    """Mine hard negatives for every query of ``dataset`` that has a relevant document.

    ``retriever`` is a source: anything :func:`retriever.protocol.as_retriever` accepts (``"bm25"``, a
    model name or path, an Encoder, a Retriever) or a :mod:`mining.sources` object (``Hybrid``,
    ``Rescored``). ``rescorer`` (a ``CrossEncoderScorer``, a teacher ``Scorer`` or a teacher model name)
    rescores candidates and positives; the filters then run on its scores. With ``output_dir``, pools
    (``pools.jsonl``), metadata (``pools.meta.json``) and the score histogram are written there
    atomically, shard by shard with resume (see the module docstring); ``config`` is recorded as given.

    ``anchor_fallback`` (an anchor name, e.g. ``"mean"`` or ``"max"``): a query that the filter against
    ``anchor`` leaves with fewer than ``num_negatives`` is filled up, in rank order, with the candidates that
    the same filter keeps against that looser anchor. Most NFCorpus queries (about 43 loosely judged positives
    each) have no candidate below 95 % of their *lowest* positive; the fallback gives them hard negatives that
    still sit below most of their positives. The counts say how many queries it filled.
    """
    check_settings(depth, num_negatives, sampling, shard_size)
    if output_dir is not None:
        check_output_folder(output_dir, "output_dir")
    flt = filter if filter is not None else TopKPercPos(0.95)
    chain = as_chain(flt)
    check_anchor_fallback(anchor, anchor_fallback, flt)  # the anchor names too, up front
    started = time.time()
    source = as_retriever(retriever, show_progress=show_progress)
    if rescorer is not None:
        source = Rescored(source, rescorer)
    for part in components(source):
        if isinstance(part, DenseRetriever):
            check_index_fits(part.index_spec, len(dataset.corpus))
    positives = {query_id: sorted(dataset.relevant(query_id)) for query_id in dataset.queries}
    queries = {query_id: text for query_id, text in dataset.queries.items() if positives[query_id]}
    if not queries:
        raise HardnegError(f"no query of split {dataset.split!r} has a relevant document to mine for")
    check_tables(source, dataset.corpus, queries)  # precomputed embeddings lacking a document or query
    if chain.needs_anchor and not isinstance(source, Scorer):
        raise HardnegError(f"filter {flt.name!r} needs the positives' scores, but {describe(source)} has no "
                           "score() method (hybrid RRF scores are ranks); add a teacher or a cross-encoder to "
                           "rescore, or use --filter topk")

    settings = {"depth": depth, "num_negatives": num_negatives, "filter": describe_filter(flt),
                "anchor": anchor, "anchor_fallback": anchor_fallback, "sampling": sampling, "seed": seed,
                "retriever": describe(source),
                "rescorer": describe(source.scorer) if isinstance(source, Rescored) else None,
                "shard_size": shard_size}
    checksums = dataset.checksums()
    query_ids = list(queries)
    shards = [query_ids[start:start + shard_size] for start in range(0, len(query_ids), shard_size)]
    fingerprint = _fingerprint(settings, checksums, query_ids, _model_identities(source))
    if output_dir is not None and not is_main():
        output_dir = None  # under torchrun rank 0 writes; the others only take part in the sharded search
    if output_dir is not None:
        remove_stale_staging(output_dir)  # what a killed run left half-written; its finished shards stay
    store = _ShardStore(Path(output_dir) / SHARDS_DIR, fingerprint) if output_dir is not None else None
    source_name = getattr(source, "kind", None) or type(source).__name__
    in_memory: list[tuple[list[Pool], list[_QueryRecord]]] = []
    # Every rank must search the same shards (each search is a collective): rank 0's store decides.
    todo = broadcast_object([number for number in range(len(shards)) if store is None or not store.done(number)])
    for number in tqdm(todo, desc="mine shards", unit="shard", disable=not show_progress or len(shards) < 2):
        shard_queries = {query_id: queries[query_id] for query_id in shards[number]}
        pools, records = _mine_shard(dataset, source, source_name, shard_queries, positives, chain, depth,
                                     num_negatives, anchor, sampling, seed, anchor_fallback)
        if store is not None:
            store.write(number, pools, records)
        else:
            in_memory.append((pools, records))

    pools, records = [], []
    if store is not None:
        output_dir = Path(output_dir)
        (output_dir / META_FILE).unlink(missing_ok=True)  # an old one must never describe the new pools
        with atomic_write(output_dir / POOLS_FILE, "wb") as handle:
            for number in range(len(shards)):
                handle.write(store.pools_path(number).read_bytes())
        pools = read_pools(output_dir / POOLS_FILE)
        for number in range(len(shards)):
            records.extend(store.read_records(number))
    else:
        for shard_pools, shard_records in in_memory:
            pools.extend(shard_pools)
            records.extend(shard_records)

    stats = MiningStats(queries_without_positive=len(dataset.queries) - len(queries))
    report = MiningReport(filter_stages=chain.stage_names, num_negatives=num_negatives, seed=seed)
    for record in records:
        _count(stats, record, num_negatives, chain.needs_anchor)
        report.add_query(record.query_id, anchor=record.anchor,
                         positive_scores=[None if np.isnan(s) else s for s in record.positive_scores],
                         candidate_scores=record.candidate_scores, is_positive=record.is_positive,
                         removed_by=record.removed_by, sampled=record.sampled)
    meta = {"dataset": dataset.name, "split": dataset.split, "settings": settings,
            "corpus": {"fingerprint": corpus_fingerprint(dataset.corpus), "documents": len(dataset.corpus)},
            "counts": stats.to_json(num_negatives), "report": report.to_json(),
            "encoding": encoding_record(source), "sharding": sharding_record(source),
            **dataset.qrels_counts(), "library_versions": library_versions(),
            "input_checksums": checksums, "config": config or {}, "seconds": round(time.time() - started, 1)}
    if store is not None:
        report.write_histogram(Path(output_dir) / HISTOGRAM_FILE)
        write_json(Path(output_dir) / META_FILE, meta)
        store.remove()
    return MiningResult(pools=pools, stats=stats, meta=meta)


def _mine_shard(dataset: Dataset, source, source_name: str, queries: dict[str, str],
                positives: dict[str, list[str]], chain, depth: int, num_negatives: int, anchor: str,
                sampling: str, seed: int, anchor_fallback: str | None = None) -> tuple[list[Pool], list[_QueryRecord]]:
    corpus = dataset.corpus
    wanted = {query_id: positives[query_id] for query_id in queries}
    if hasattr(source, "search_and_score"):  # one pass for candidates and positives (BM25, dense)
        run, positive_scores = source.search_and_score(corpus, queries, depth, wanted)
    else:
        run = source.search(corpus, queries, depth)
        positive_scores = source.score(corpus, queries, wanted) if isinstance(source, Scorer) \
            else {query_id: dict.fromkeys(wanted[query_id]) for query_id in queries}
    pools, records = [], []
    for query_id, text in queries.items():
        labelled = positives[query_id]
        labelled_set = set(labelled)
        row = run.get(query_id, {})
        order = ranked(row, corpus)
        is_positive = np.array([doc_id in labelled_set for doc_id in order], dtype=bool)
        all_scores = np.array([row[doc_id] for doc_id in order], dtype=np.float64)
        candidates = [(rank, doc_id, row[doc_id]) for rank, doc_id in enumerate(order, start=1)
                      if doc_id not in labelled_set]
        pos_scores = [positive_scores[query_id][d] for d in labelled]
        anchor_value = anchor_score(pos_scores, anchor) if chain.needs_anchor else None
        removed = chain.removed_by(all_scores[~is_positive], 0.0 if anchor_value is None else anchor_value)
        kept = [c for c, stage in zip(candidates, removed) if stage == 0]
        used_fallback = False
        if anchor_fallback is not None and chain.needs_anchor and len(kept) < num_negatives:
            looser = chain.removed_by(all_scores[~is_positive], anchor_score(pos_scores, anchor_fallback))
            admitted = [c for c, first, second in zip(candidates, removed, looser) if first != 0 and second == 0]
            if admitted:
                used_fallback = True
                kept = sorted(kept + admitted[:num_negatives - len(kept)])  # by rank
                chosen_ranks = {rank for rank, _, _ in kept}
                removed = np.array([0 if rank in chosen_ranks else stage
                                    for (rank, _, _), stage in zip(candidates, removed)], dtype=np.int64)
        if sampling == "random" and len(kept) > num_negatives:
            rng = random.Random(_query_seed(seed, query_id))
            kept = sorted(rng.sample(kept, num_negatives))
        kept = kept[:num_negatives]
        chosen = {doc_id for _, doc_id, _ in kept}
        removed_all = np.zeros(len(order), dtype=np.int64)
        removed_all[~is_positive] = removed
        records.append(_QueryRecord(
            query_id=query_id, anchor=anchor_value,
            positive_scores=np.array([np.nan if s is None else s for s in pos_scores], dtype=np.float64),
            candidate_scores=all_scores, is_positive=is_positive, removed_by=removed_all,
            sampled=np.array([doc_id in chosen for doc_id in order], dtype=bool), fallback=used_fallback))
        pools.append(Pool(
            query_id=query_id, query=text,
            positives=[Candidate(d, _round(positive_scores[query_id][d])) for d in labelled],
            negatives=[Candidate(d, _round(s), rank=r, source=source_name) for r, d, s in kept]))
    return pools, records


def _count(stats: MiningStats, record: _QueryRecord, num_negatives: int, needs_anchor: bool) -> None:
    stats.queries += 1
    stats.candidates += len(record.candidate_scores)
    stats.removed_positives += int(record.is_positive.sum())
    stats.removed_by_filter += int((record.removed_by > 0).sum())
    written = int(record.sampled.sum())
    stats.kept_negatives += written
    stats.anchors_not_positive += bool(needs_anchor and record.anchor is not None and record.anchor <= 0)
    stats.queries_with_fallback += bool(record.fallback)
    if written < num_negatives:
        stats.queries_short.append(record.query_id)
        stats.queries_without_negatives += written == 0
        stats.short_with_one_positive += len(record.positive_scores) == 1


class _ShardStore:
    """Finished shards of one mining run: ``shard-NNNNN.jsonl`` (pool lines) + ``.npz`` (bookkeeping).

    The ``.npz`` is written first and the ``.jsonl`` last, each atomically, so a shard counts as done
    only when both are complete. ``fingerprint.json`` ties the folder to the settings and inputs.
    """

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = folder, fingerprint
        self.marker = folder / "fingerprint.json"
        if folder.is_dir():
            try:
                same = json.loads(self.marker.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                same = False
            if not same:  # other settings or inputs: their shards are not ours to reuse
                shutil.rmtree(folder)

    def pools_path(self, number: int) -> Path:
        return self.folder / f"shard-{number:05d}.jsonl"

    def records_path(self, number: int) -> Path:
        return self.folder / f"shard-{number:05d}.npz"

    def done(self, number: int) -> bool:
        return self.pools_path(number).is_file() and self.records_path(number).is_file()

    def write(self, number: int, pools: list[Pool], records: list[_QueryRecord]) -> None:
        lengths = np.array([len(r.candidate_scores) for r in records], dtype=np.int64)
        positive_counts = np.array([len(r.positive_scores) for r in records], dtype=np.int64)
        arrays = {
            "query_ids": np.array([r.query_id for r in records], dtype=str),
            "anchors": np.array([np.nan if r.anchor is None else r.anchor for r in records], dtype=np.float64),
            "lengths": lengths, "positive_counts": positive_counts,
            "positive_scores": _concat([r.positive_scores for r in records], np.float64),
            "candidate_scores": _concat([r.candidate_scores for r in records], np.float64),
            "is_positive": _concat([r.is_positive for r in records], bool),
            "removed_by": _concat([r.removed_by for r in records], np.int64),
            "sampled": _concat([r.sampled for r in records], bool),
            "fallback": np.array([r.fallback for r in records], dtype=bool),
        }
        if not self.marker.is_file():  # written with the first shard: a run that fails before leaves nothing
            write_json(self.marker, {"fingerprint": self.fingerprint})
        with atomic_write(self.records_path(number), "wb") as handle:
            np.savez(handle, **arrays)
        with atomic_write(self.pools_path(number)) as handle:
            handle.writelines(pool.to_line() for pool in pools)

    def read_records(self, number: int) -> list[_QueryRecord]:
        with np.load(self.records_path(number), allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        records, at, pos_at = [], 0, 0
        for i, query_id in enumerate(arrays["query_ids"]):
            n, p = int(arrays["lengths"][i]), int(arrays["positive_counts"][i])
            anchor = float(arrays["anchors"][i])
            records.append(_QueryRecord(
                query_id=str(query_id), anchor=None if np.isnan(anchor) else anchor,
                positive_scores=arrays["positive_scores"][pos_at:pos_at + p],
                candidate_scores=arrays["candidate_scores"][at:at + n],
                is_positive=arrays["is_positive"][at:at + n], removed_by=arrays["removed_by"][at:at + n],
                sampled=arrays["sampled"][at:at + n], fallback=bool(arrays["fallback"][i])))
            at, pos_at = at + n, pos_at + p
        return records

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


def _model_identities(source: object) -> list:
    """The weights behind a source (checksums of model files) and the precision they encode in, so a model
    retrained in place, or encoding in another precision, is not mistaken for the one that wrote the shards."""
    return [encoder_identity(part.encoder) for part in components(source) if isinstance(part, EncoderBacked)]


def _fingerprint(settings: dict, checksums: dict, query_ids: list[str], models: list) -> str:
    payload = json.dumps({"settings": settings, "inputs": checksums, "queries": query_ids, "models": models},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _query_seed(seed: int, query_id: str) -> int:
    """A per-query seed, so one query's sample does not depend on which queries came before it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{query_id}".encode()).digest()[:8], "big")


def _round(score: float | None) -> float | None:
    # Scores are float32 underneath; 6 decimals keeps files small and identical across runs.
    return None if score is None else round(float(score), 6)
