"""Contrastive losses over one (queries x candidates) score matrix with a false-negative mask.

Row ``i`` of the matrix is query ``i``; column ``labels[i]`` is its positive; every other column is a
negative *unless* the mask says it is one of the query's labelled positives (another copy of the same
document, or another of its relevant documents that is in the batch as someone else's positive or
hard negative). Masked cells are set to -inf before the softmax, so they are neither pulled nor pushed.
"""

from __future__ import annotations

import torch


def false_negative_mask(positive_ids: list[set[str]], column_ids: list[str], labels: list[int]) -> torch.Tensor:
    """``mask[i, j]`` is True when column ``j`` is a labelled positive of query ``i`` other than its target."""
    mask = torch.zeros(len(positive_ids), len(column_ids), dtype=torch.bool)
    for i, positives in enumerate(positive_ids):
        for j, doc_id in enumerate(column_ids):
            if j != labels[i] and doc_id in positives:
                mask[i, j] = True
    return mask


def info_nce(queries: torch.Tensor, documents: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             temperature: float = 0.05) -> torch.Tensor:
    """Mean cross-entropy of each query's positive against all unmasked columns (in-batch + hard negatives)."""
    scores = queries @ documents.T / temperature
    scores = scores.masked_fill(mask.to(scores.device), float("-inf"))
    return torch.nn.functional.cross_entropy(scores, labels.to(scores.device))
