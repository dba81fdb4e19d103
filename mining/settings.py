"""The mining settings (:class:`MineSettings`), declared once for ``hardneg mine``, a config's ``mine:`` section and
Python, and turned into the objects :func:`mining.mine.mine` takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mining.filters import ANCHORS, FILTERS, check_anchor_fallback, make_filter
from retriever.io import HardnegError
from retriever.settings import MAX_SEED, check_fields, setting

SAMPLINGS = ("top", "random")
DEFAULT_SHARD_SIZE = 10_000
RRF_K = 60.0  # Cormack et al. (2009); the constant every hybrid-search library defaults to
FILTER_PARAMETERS = {"topk": (), "topk-percpos": ("perc",), "topk-marginpos": ("margin",),
                     "topk-abs": ("max_score", "min_score"), "topk-shifted": ("shift",),
                     "rank-window": ("min_rank", "max_rank")}
OPTIONAL_PARAMETERS = ("min_score", "max_rank", "min_rank")
FUSE_NEEDS_DENSE = ("--fuse-bm25 needs one dense model to fuse BM25 with: a --teacher, or exactly one model among the "
                    "--retriever sources")


@dataclass
class MineSettings:
    """Every mining setting: candidate sources, rescoring, the positive-aware filter and the sampling."""

    retriever: list = setting(["bm25"], "candidate sources: bm25, bm25:rank-bm25, or a model directory/name; "
                                        "several are fused with reciprocal-rank fusion")
    bm25_backend: str = setting("bm25s", "BM25 implementation, bm25s or rank-bm25 (the reference); both use the "
                                         "same tokens")
    rrf_k: float = setting(RRF_K, "RRF constant when fusing", gt=0)
    index: str = setting("Flat", "faiss index-factory string for dense search: Flat (exact), IVF4096,Flat, "
                                 "HNSW32, IVF1024,PQ32 ...")
    nprobe: int | None = setting(None, "IVF: inverted lists visited per query", ge=1)
    ef_search: int | None = setting(None, "HNSW: search breadth (efSearch)", ge=1)
    cross_encoder: str | None = setting(None, "sentence-transformers CrossEncoder (path or name) that rescores "
                                              "candidates and positives; the filters and distillation then use "
                                              "its scores")
    cross_encoder_batch_size: int = setting(32, "pairs per cross-encoder batch", ge=1)
    teacher: str | None = setting(None, "a bi-encoder (path or name) that scores candidates and positives instead "
                                        "of the retriever, e.g. a larger model than the one you will train, or a "
                                        "folder of its precomputed embeddings (hardneg encode); its scores are the "
                                        "soft labels of distillation")
    fuse_bm25: float | None = setting(None, "a hybrid teacher: the scores the filters and distillation use become "
                                            "z(teacher, else the dense retriever) + this weight x z(BM25), each "
                                            "standardised per query over the whole corpus (0.3 is a good start; distil "
                                            "its z-scores with a teacher temperature of about 1)",
                                      gt=0)
    depth: int = setting(100, "candidates retrieved per query", ge=1)
    shard_size: int = setting(DEFAULT_SHARD_SIZE, "queries per pools shard; an interrupted run resumes after the "
                                                  "last finished shard", ge=1)
    num_negatives: int = setting(8, "negatives kept per query", ge=1)
    filter: str = setting("topk-percpos", "topk, topk-shifted, rank-window, topk-abs, topk-marginpos, "
                                          "topk-percpos, or several joined by commas, e.g. "
                                          "topk-shifted,topk-percpos")
    perc: float | None = setting(0.95, "topk-percpos: keep scores <= perc of the anchor")
    margin: float | None = setting(None, "topk-marginpos: keep scores <= anchor - margin")
    max_score: float | None = setting(None, "topk-abs: keep scores <= this")
    min_score: float | None = setting(None, "topk-abs: and >= this")
    shift: int | None = setting(None, "topk-shifted: skip this many best non-positive candidates")
    min_rank: int | None = setting(1, "rank-window: first rank kept")
    max_rank: int | None = setting(None, "rank-window: last rank kept (default: no limit)")
    filter_params: dict | None = setting(None, "config form of the filter's parameters, e.g. {perc: 0.95}, or "
                                               "{stages: [...]} for filter: chain (replaces the flat keys)",
                                         cli=False)
    anchor: str = setting("min", "which positive score the filter compares with", choices=ANCHORS)
    anchor_fallback: str | None = setting(None, "a looser anchor (mean, max) that fills up a query the anchor "
                                                "leaves short of negatives, in rank order; counted in the report",
                                          choices=ANCHORS)
    sampling: str = setting("top", "take the best survivors or a seeded random sample", choices=SAMPLINGS)
    seed: int = setting(42, "seed of the random sampling", ge=0, le=MAX_SEED)

    def check(self) -> None:
        """Types, ranges and the combinations that cannot work, before any model or document is read."""
        check_fields(self, "mine")
        if self.depth < self.num_negatives:
            raise HardnegError(f"depth ({self.depth}) must be at least num_negatives ({self.num_negatives})")
        check_source_settings(self.retriever, bm25_backend=self.bm25_backend, index=self.index, nprobe=self.nprobe,
                              ef_search=self.ef_search, rrf_k=self.rrf_k, cross_encoder=self.cross_encoder,
                              teacher=self.teacher, fuse_bm25=self.fuse_bm25)
        check_anchor_fallback(self.anchor, self.anchor_fallback, self.build_filter())

    def build_filter(self):
        """The filter (or chain) these settings describe."""
        if self.filter_params is not None:
            return make_filter(self.filter, **self.filter_params)
        stages = []
        for name in (part.strip() for part in self.filter.split(",")):
            if name not in FILTERS:
                return make_filter(name)  # refused there, with the choices
            params = {key: getattr(self, key) for key in FILTER_PARAMETERS.get(name, ())}
            missing = [key for key, value in params.items() if value is None and key not in OPTIONAL_PARAMETERS]
            if missing:
                raise HardnegError(f"filter {name} needs " + ", ".join(f"--{k.replace('_', '-')}" for k in missing))
            stages.append({"name": name, **{k: v for k, v in params.items() if v is not None}})
        if len(stages) == 1:
            return make_filter(**stages[0])
        return make_filter("chain", stages=stages)


def check_source_settings(specs: Sequence[str], *, bm25_backend: str = "bm25s", index: str = "Flat",
                          nprobe: int | None = None, ef_search: int | None = None, rrf_k: float = RRF_K,
                          cross_encoder: str | None = None, teacher: str | None = None,
                          fuse_bm25: float | None = None) -> None:
    """Refuse bad source settings in a second, before a model is loaded or a document is read.

    Options that would be silently ignored are refused too (an index string with BM25 only, a cross-encoder
    together with a teacher), because a miner that quietly drops a setting is what users complain about.
    """
    from retriever.bm25 import BACKENDS
    from retriever.embedding_table import EmbeddingTable, is_embedding_table
    from retriever.encoder import resolve_model
    from retriever.index import check_index_spec

    if not specs:
        raise HardnegError("give at least one source (--retriever bm25, a model name/path, or several to fuse)")
    if bm25_backend not in BACKENDS:
        raise HardnegError(f"unknown BM25 backend {bm25_backend!r}; choose one of {', '.join(BACKENDS)}")
    check_index_spec(index)
    dense_specs = [spec for spec in specs if spec.split(":")[0].lower() != "bm25"]
    if not dense_specs and (index != "Flat" or nprobe is not None or ef_search is not None):
        raise HardnegError("--index/--nprobe/--ef-search apply to dense retrieval; the only source is BM25")
    if nprobe is not None and (nprobe < 1 or "IVF" not in index):
        raise HardnegError(f"--nprobe {nprobe}: needs an IVF index (e.g. --index IVF1024,Flat) and a value >= 1")
    if ef_search is not None and (ef_search < 1 or "HNSW" not in index):
        raise HardnegError(f"--ef-search {ef_search}: needs an HNSW index (e.g. --index HNSW32) and a value >= 1")
    if rrf_k <= 0:
        raise HardnegError(f"--rrf-k must be positive, got {rrf_k}")
    if cross_encoder and teacher:
        raise HardnegError("give either a cross-encoder or a teacher to rescore with, not both")
    if fuse_bm25 is not None and cross_encoder:
        raise HardnegError("--fuse-bm25 fuses a bi-encoder's scores with BM25's over the whole corpus; a "
                           "cross-encoder cannot score every document: use a --teacher bi-encoder instead")
    if fuse_bm25 is not None and not teacher and len(dense_specs) != 1:
        raise HardnegError(f"{FUSE_NEEDS_DENSE} (got {len(dense_specs)})")
    roles = [("retriever", spec) for spec in dense_specs if spec != "model"]
    roles += [(role, spec) for role, spec in (("cross-encoder", cross_encoder), ("teacher", teacher)) if spec]
    for role, spec in roles:
        try:
            if role != "cross-encoder" and is_embedding_table(spec):
                EmbeddingTable(spec)  # vectors computed elsewhere: a bad table is refused here
                continue
            resolve_model(spec)  # a path that does not exist is refused here
        except HardnegError as err:
            raise HardnegError(f"{role}: {err}") from None
