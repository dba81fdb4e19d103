"""Turning what a user gives (a model name or folder, ``"bm25"``, an Encoder, a Retriever) into a retriever.

Kept apart from :mod:`retriever.protocol` so the protocols import no implementation: :mod:`retriever.dense` and
:mod:`retriever.bm25` build on the protocols, and this module builds on them (no import cycle).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from retriever.bm25 import BM25Retriever
from retriever.dense import DenseRetriever
from retriever.embedding_table import PrecomputedRetriever, is_embedding_table
from retriever.encoder import DualEncoder, SentenceTransformerEncoder, is_sentence_transformer
from retriever.io import HardnegError
from retriever.protocol import Encoder, Retriever

DENSE_OPTIONS = ("batch_size", "show_progress", "index", "nprobe", "ef_search", "use_gpu", "k_limit", "cache_dir")
"""Options of :class:`retriever.dense.DenseRetriever` (search and cache); the others go to the model loader."""


def as_retriever(spec: object, **options) -> Retriever:
    """A retriever from what the user gave: a Retriever, an Encoder, a loaded ``SentenceTransformer`` (its own
    ``encode_query`` / ``encode_document`` prompts apply), ``"bm25"``, or a model name/path. Mining, evaluation
    and the CLI all build their retrievers here, so each accepts the same things.

    ``"bm25"`` uses bm25s; ``"bm25:rank-bm25"`` the reference rank-bm25 backend. A folder holding
    ``embeddings.json`` is a table of precomputed embeddings (:mod:`retriever.embedding_table`). Any other string is a
    model directory or a Hugging Face / sentence-transformers model name; ``options`` go to
    :meth:`retriever.encoder.DualEncoder.load` and the dense retriever (``DENSE_OPTIONS``: faiss index
    string, nprobe, ef_search, GPU use, embedding cache folder).
    """
    if isinstance(spec, Retriever):
        return spec
    if is_sentence_transformer(spec):
        spec = SentenceTransformerEncoder(spec, precision=options.get("precision", "auto"))
    if isinstance(spec, Encoder):
        return DenseRetriever(spec, **{key: value for key, value in options.items() if key in DENSE_OPTIONS})
    if isinstance(spec, str) and spec.split(":")[0].lower() == "bm25":
        backend = spec.split(":", 1)[1] if ":" in spec else "bm25s"
        return BM25Retriever(backend=backend, show_progress=options.get("show_progress", True))
    if isinstance(spec, str) and is_embedding_table(spec):  # vectors computed elsewhere, looked up by id
        return PrecomputedRetriever(spec, **{key: value for key, value in options.items() if key in DENSE_OPTIONS})
    if isinstance(spec, str):
        _refuse_near_miss(spec)
        search_options = {key: options.pop(key) for key in DENSE_OPTIONS if key in options}
        return DenseRetriever(DualEncoder.load(spec, **options), **search_options)
    raise TypeError(f"cannot make a retriever from {type(spec).__name__}: give a Retriever, an Encoder, "
                    "'bm25', or a model name/path")


BUILT_IN = ("bm25", "bm25:bm25s", "bm25:rank-bm25")


def _refuse_near_miss(spec: str) -> None:
    """``bm-25`` or ``bm25:rank_bm25`` is a typo, not a model to look up on the hub (where it fails offline with
    a message about the network): say what was probably meant."""
    if Path(spec).exists() or "/" in spec:
        return
    close = difflib.get_close_matches(spec.lower(), BUILT_IN, n=1, cutoff=0.75)
    if close:
        raise HardnegError(f"unknown retriever {spec!r}: did you mean {close[0]!r}? (any other name is a model "
                           "folder or a Hugging Face model name)")
