"""Dense retrieval: encode the corpus once, then exact inner-product search (see ``retriever.index``)."""

from __future__ import annotations

import inspect

import numpy as np

from retriever.data import Corpus, Queries, Run
from retriever.index import exact_search
from retriever.protocol import Encoder


class DenseRetriever:
    """Wraps any :class:`~retriever.protocol.Encoder`; caches the corpus embeddings of the last corpus."""

    kind = "dense"

    def __init__(self, encoder: Encoder, *, batch_size: int = 64, show_progress: bool = True) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.show_progress = show_progress
        self._cached: tuple[Corpus, np.ndarray] | None = None
        self.description = f"dense:{getattr(encoder, 'name', '') or type(encoder).__name__}"

    def _encode(self, texts: list[str], *, is_query: bool) -> np.ndarray:
        method = self.encoder.encode_queries if is_query else self.encoder.encode_documents
        parameters = inspect.signature(method).parameters
        takes_options = "batch_size" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        options = {"batch_size": self.batch_size, "show_progress": self.show_progress} if takes_options else {}
        return np.asarray(method(texts, **options), dtype=np.float32)  # a custom Encoder may take only texts

    def corpus_embeddings(self, corpus: Corpus) -> np.ndarray:
        if self._cached is None or self._cached[0] is not corpus:
            self._cached = (corpus, self._encode(corpus.texts(), is_query=False))
        return self._cached[1]

    def query_embeddings(self, queries: Queries) -> np.ndarray:
        return self._encode(list(queries.values()), is_query=True)

    def search(self, corpus: Corpus, queries: Queries, top_k: int) -> Run:
        documents = self.corpus_embeddings(corpus)
        scores, positions = exact_search(documents, self.query_embeddings(queries), top_k)
        return {query_id: {corpus.ids[p]: float(s) for s, p in zip(row_scores, row_positions) if p >= 0}
                for query_id, row_scores, row_positions in zip(queries, scores, positions)}

    def score(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run:
        documents = self.corpus_embeddings(corpus)
        wanted = {query_id: queries[query_id] for query_id in pairs}
        query_vectors = self.query_embeddings(wanted)
        return {query_id: {doc_id: float(documents[corpus.position[doc_id]] @ vector) for doc_id in pairs[query_id]}
                for query_id, vector in zip(wanted, query_vectors)}
