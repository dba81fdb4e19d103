"""Several datasets in one training run: their pools and corpora under one namespace, batches kept per dataset.

Why batches from one dataset at a time: in-batch negatives are only informative against documents of the same
collection; a NFCorpus query scored against MS MARCO passages is an easy negative that teaches nothing and makes
the batch look easier than it is. Multi-dataset retriever training (E5, BGE, Tevatron's mixtures) samples a
dataset per batch for that reason; :func:`retriever.train.epoch_batches` does so when given the pools' groups.

Why a namespace: two BEIR datasets may both have a document ``"1"``; the trainer's masks compare ids, so a
positive of one dataset would mask an unrelated document of the other. Here every query and document id becomes
``<dataset>::<id>``; the texts are unchanged, so the model never sees the prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

from retriever.data import Candidate, Corpus, Pool
from retriever.io import HardnegError

SEPARATOR = "::"


def mix(parts: Mapping[str, tuple[list[Pool], Corpus]]) -> tuple[list[Pool], Corpus, list[str]]:
    """``{dataset name: (pools, corpus)}`` as one pool list, one corpus and each pool's dataset name (the
    ``groups`` that :func:`retriever.train.train` batches by). One dataset comes back unchanged."""
    if not parts:
        raise HardnegError("train: no dataset to train on")
    if len(parts) == 1:
        ((name, (pools, corpus)),) = parts.items()
        return pools, corpus, [name] * len(pools)
    for name in parts:
        if not name or SEPARATOR in name:
            raise HardnegError(f"train: dataset name {name!r} must be non-empty and free of {SEPARATOR!r}")
    ids, titles, bodies, pools, groups = [], [], [], [], []
    for name, (dataset_pools, corpus) in parts.items():
        ids += [f"{name}{SEPARATOR}{doc_id}" for doc_id in corpus.ids]
        titles += list(corpus.titles)
        bodies += list(corpus.bodies)
        for pool in dataset_pools:
            pools.append(Pool(f"{name}{SEPARATOR}{pool.query_id}", pool.query,
                              [_renamed(name, c) for c in pool.positives], [_renamed(name, c) for c in pool.negatives]))
            groups.append(name)
    return pools, Corpus(ids, titles, bodies), groups


def _renamed(name: str, candidate: Candidate) -> Candidate:
    return Candidate(f"{name}{SEPARATOR}{candidate.doc_id}", candidate.score, candidate.rank, candidate.source)


def group_document_ids(corpus: Corpus, groups: list[str]) -> dict[str, list[str]]:
    """The document ids of each dataset of a mixed corpus (where a dataset's random negatives are drawn from);
    for one dataset, its whole corpus."""
    names = list(dict.fromkeys(groups))
    if len(names) == 1:
        return {names[0]: list(corpus.ids)}
    by_group: dict[str, list[str]] = {name: [] for name in names}
    for doc_id in corpus.ids:
        name = doc_id.split(SEPARATOR, 1)[0]
        if name in by_group:
            by_group[name].append(doc_id)
    return by_group
