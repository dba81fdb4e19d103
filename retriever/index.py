"""Exact maximum-inner-product search with faiss, in query chunks so memory stays bounded."""

from __future__ import annotations

import faiss
import numpy as np


def exact_search(documents: np.ndarray, queries: np.ndarray, top_k: int,
                 chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions), each ``len(queries) x min(top_k, len(documents))``, best first.

    With normalised embeddings the inner product is the cosine similarity. Only ``chunk_size`` rows of
    results are alive at a time beyond the output itself.
    """
    documents = np.ascontiguousarray(documents, dtype=np.float32)
    index = faiss.IndexFlatIP(documents.shape[1])
    index.add(documents)
    k = min(top_k, len(documents))
    scores = np.empty((len(queries), k), dtype=np.float32)
    positions = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        chunk = np.ascontiguousarray(queries[start:start + chunk_size], dtype=np.float32)
        scores[start:start + len(chunk)], positions[start:start + len(chunk)] = index.search(chunk, k)
    return scores, positions
