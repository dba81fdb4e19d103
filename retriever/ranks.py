"""Which process of a ``torchrun`` job this is, asked without importing torch.

Mining and evaluation run the same code on every rank; only the corpus encode and search are split
(:mod:`retriever.dense`), and only rank 0 writes. These helpers let that code ask "am I one of several?" at no
cost when torch was never imported (a BM25 run, a numpy encoder): without torch no process group can exist.
The collectives themselves live in :mod:`retriever.distributed`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType

_ALONE = [0]  # depth of `alone()` blocks entered


def process_group() -> ModuleType | None:
    """:mod:`retriever.distributed` when this process is one of several (and not inside :func:`alone`), else None."""
    if _ALONE[0] or "torch.distributed" not in sys.modules:
        return None
    from retriever import distributed

    return distributed if distributed.world_size() > 1 else None


def is_main() -> bool:
    """True on the process that writes the outputs (rank 0, or the only one)."""
    group = process_group()
    return group is None or group.is_main()


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank (``value`` itself for one process)."""
    group = process_group()
    return value if group is None else group.broadcast_object(value)


def work_record(model: str, unit: str, count: int) -> dict | None:
    """Under torchrun, how a part split its work: ``{"model", "world_size", "ranks": [{"rank", unit: count}]}``
    from every rank's ``count`` (a collective: every rank calls it); None for one process, where nothing was split."""
    group = process_group()
    if group is None:
        return None
    counts = group.all_gather_objects(count)
    return {"model": model, "world_size": len(counts), "ranks": [{"rank": r, unit: n} for r, n in enumerate(counts)]}


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Run a block as if this were the only process: what rank 0 alone does in a torchrun training job (the dev
    evaluation, re-mining) must not wait for the other ranks in a sharded search they never enter."""
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1
