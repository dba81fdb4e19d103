"""Corpus embeddings on disk, stored by row range, so that any number of processes can write and reuse them.

Encoding the corpus is the expensive step of dense mining and evaluation; under ``torchrun`` each rank encodes
its own contiguous rows. An entry of the cache is therefore a *row range* of one key (model identity + corpus +
encoding options, see :mod:`retriever.dense`):

- ``<key>.npy`` holds every row (what one process writes);
- ``<key>.rows-<start>-<end>.npy`` holds rows ``[start, end)`` (what one rank of several writes).

Each has a sidecar ``.json`` written after it (checksum, shape, dtype, corpus fingerprint, range): an entry
without one, or that disagrees with it, is never read. A later run asks for its own rows and gets them from
whatever entries cover them, whichever world size wrote them; only the rows no valid entry covers are encoded
again, which is how a run resumes after a rank died.

Entries are written while they are encoded, a chunk of rows at a time, and read back memory-mapped: neither
the encode nor the search (:func:`exact_top_k`) needs the whole matrix in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retriever.data import Corpus, corpus_fingerprint
from retriever.io import atomic_write, file_checksum, write_json

CHUNK_ROWS = 131_072  # rows searched at once, and the largest encoding block: 200 MB of 384-d float32
BLOCK_MIN = 1024  # the smallest encoding block: enough texts to sort by length into well-filled batches
_RANGE = re.compile(r"\.rows-(?P<start>\d+)-(?P<end>\d+)$")


@dataclass(frozen=True)
class Rows:
    """The embeddings of corpus rows ``[start, start + len(array))`` (an array, or a memory-mapped entry)."""

    start: int
    array: np.ndarray

    @property
    def end(self) -> int:
        return self.start + len(self.array)


def release(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped entry from this process (they stay in the page cache), so that a search
    over a corpus larger than memory does not keep every page it has read resident."""
    handle = getattr(array, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(handle, "madvise"):
        with contextlib.suppress(OSError, ValueError):  # a closed map: only memory is at stake
            handle.madvise(mmap.MADV_DONTNEED)


class EmbeddingCache:
    """The entries of one cache key (``whole`` is the ``<key>.npy`` path) for ``corpus``."""

    def __init__(self, whole: Path, corpus: Corpus, identity: dict) -> None:
        self.whole, self.corpus, self.identity = Path(whole), corpus, identity
        self.key = self.whole.stem

    def range_path(self, start: int, end: int) -> Path:
        if start == 0 and end == len(self.corpus):
            return self.whole
        return self.whole.with_name(f"{self.key}.rows-{start}-{end}.npy")

    def _entries(self) -> list[tuple[int, int, Path]]:
        found = []
        for path in self.whole.parent.glob(f"{self.key}*.npy"):
            if path == self.whole:
                found.append((0, len(self.corpus), path))
            elif (match := _RANGE.search(path.stem)) and path.stem[:match.start()] == self.key:
                found.append((int(match["start"]), int(match["end"]), path))
        return sorted(found)

    def rows(self, start: int, end: int) -> tuple[list[Rows], list[tuple[int, int]]]:
        """What the valid entries hold of rows ``[start, end)`` (memory-mapped slices, in order) and the gaps
        no entry covers. At each row the entry reaching furthest is used; damaged entries are skipped (warned)."""
        entries = [entry for entry in self._entries() if entry[1] > start and entry[0] < end]
        pieces: list[Rows] = []
        gaps: list[tuple[int, int]] = []
        opened: dict[Path, np.ndarray | None] = {}
        at = start
        while at < end:
            usable = []
            for first, last, path in entries:
                if first <= at < last:
                    if path not in opened:
                        opened[path] = _read_entry(path, self.corpus, first, last)
                    if opened[path] is not None:
                        usable.append((last, first, path))
            if usable:
                last, first, path = max(usable)
                stop = min(last, end)
                pieces.append(Rows(at, opened[path][at - first:stop - first]))
                at = stop
            else:
                later = [first for first, _, path in entries if first > at and opened.get(path, 0) is not None]
                stop = min([end, *later])
                if gaps and gaps[-1][1] == at:  # next to a gap left by an entry found damaged: one gap
                    gaps[-1] = (gaps[-1][0], stop)
                else:
                    gaps.append((at, stop))
                at = stop
        return pieces, gaps

    def write(self, start: int, end: int, chunks: Iterable[np.ndarray]) -> Rows:
        """Write rows ``[start, end)`` from ``chunks`` (float32 arrays, in order) as one entry, streaming: only
        one chunk is in memory at a time. Returns the entry memory-mapped."""
        path = self.range_path(start, end)
        digest = hashlib.sha256()
        written, dimension = 0, None
        with atomic_write(path, "wb") as handle:
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype="<f4")
                if dimension is None:
                    dimension = int(chunk.shape[1])
                    header = io.BytesIO()
                    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                                  "shape": (end - start, dimension)})
                    handle.write(header.getvalue())
                    digest.update(header.getvalue())
                data = chunk.tobytes()
                handle.write(data)
                digest.update(data)
                written += len(chunk)
            if written != end - start or dimension is None:
                raise RuntimeError(f"embedding cache: {written} rows encoded for range {start}-{end}")
        # The sidecar is written last: an entry without it (a crash in between) is never trusted.
        write_json(path.with_suffix(".json"), {"encoder": self.identity,
                                               "corpus_sha256": corpus_fingerprint(self.corpus),
                                               "documents": len(self.corpus), "start": start, "end": end,
                                               "dimension": dimension, "dtype": "float32",
                                               "sha256": "sha256:" + digest.hexdigest()})
        return Rows(start, np.load(path, mmap_mode="r"))


def collect(start: int, end: int, chunks: Iterable[np.ndarray]) -> Rows:
    """Rows ``[start, end)`` from ``chunks`` into one array allocated once (no list of blocks beside the result:
    peak memory is the rows themselves, not twice them)."""
    rows = None
    at = 0
    for chunk in chunks:
        if rows is None:
            rows = np.empty((end - start, chunk.shape[1]), dtype=np.float32)
        rows[at:at + len(chunk)] = chunk
        at += len(chunk)
    if rows is None or at != end - start:
        raise RuntimeError(f"embedding: {at} rows encoded for range {start}-{end}")
    return Rows(start, rows)


def block_size(total: int) -> int:
    """Rows per encoding block for a list of ``total`` texts: about 1/256 of it, within [BLOCK_MIN, CHUNK_ROWS].

    A block is the unit of encoding: its texts are sorted by length and batched together, so its embeddings
    depend on the block alone. Block boundaries depend only on ``total``, never on the number of processes,
    and a rank's shard is a run of whole blocks: whichever rank encodes a block, and whether one process or
    eight do, every row comes out with the same bytes (a transformer's output changes in the last bit with
    the padded length of its batch)."""
    return max(BLOCK_MIN, min(CHUNK_ROWS, -(-total // 256)))


def shard_rows(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous rows ``[start, end)`` of ``total``: whole blocks, the first ranks one more."""
    size = block_size(total)
    base, extra = divmod(-(-total // size), world)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return min(first * size, total), min(last * size, total)


def encode_in_blocks(encode: Callable[[list[str]], np.ndarray], text: Callable[[int], str], total: int,
                     start: int, end: int) -> Iterator[np.ndarray]:
    """The embeddings of rows ``[start, end)`` of ``total`` texts (``text(i)`` builds one), a block at a time:
    the texts of one block are built, encoded and released before the next."""
    size = block_size(total)
    if (start % size and start != total) or (end % size and end != total):
        raise ValueError(f"rows {start}-{end} are not whole encoding blocks of {size}")
    for first in range(start, end, size):
        yield encode([text(i) for i in range(first, min(first + size, end))])


def _read_entry(path: Path, corpus: Corpus, start: int, end: int) -> np.ndarray | None:
    """An entry memory-mapped, or None (with a warning) when it cannot be trusted: the ``.npy`` must match its
    sidecar in checksum, shape, dtype and range, and the sidecar must name this corpus."""
    sidecar = path.with_suffix(".json")
    problem = None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        if record.get("corpus_sha256") != corpus_fingerprint(corpus):
            problem = "it was written for another corpus"
        elif (record.get("start", 0), record.get("end", len(corpus))) != (start, end):
            problem = f"its record names rows {record.get('start')}-{record.get('end')}"
        elif record.get("sha256") != file_checksum(path):
            problem = "its checksum does not match (truncated or changed on disk)"
        else:
            embeddings = np.load(path, mmap_mode="r")
            if embeddings.shape != (end - start, record.get("dimension")) or str(embeddings.dtype) != record.get(
                    "dtype", "float32"):
                problem = f"its shape {embeddings.shape} / {embeddings.dtype} is not what its record says"
            else:
                return embeddings
    except FileNotFoundError:
        problem = f"its record {sidecar.name} is missing (an interrupted write)"
    except (OSError, ValueError) as err:
        problem = f"it cannot be read ({type(err).__name__}: {err})"
    warnings.warn(f"embedding cache entry {path} is not usable: {problem}; encoding those rows again", stacklevel=4)
    return None


def exact_top_k(pieces: list[Rows], queries: np.ndarray, k: int,
                chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top ``k`` of ``queries`` over the rows in ``pieces``: ``(scores, positions)`` with
    corpus positions, best first, equal scores by position, -1 padding a short list.

    The rows are read ``chunk_rows`` at a time and merged into a running top k, and the pages of a memory-mapped
    piece are released after each chunk, so memory stays at one chunk plus ``len(queries) x k`` results
    whatever the corpus size.
    """
    from retriever.index import merge_top_k

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    positions = np.full((len(queries), 0), -1, dtype=np.int64)
    for piece in pieces:
        for first in range(0, len(piece.array), chunk_rows):
            block = np.ascontiguousarray(piece.array[first:first + chunk_rows], dtype=np.float32)
            s, p = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            del block
            release(piece.array)
            p = np.where(p >= 0, p + piece.start + first, -1)
            scores, positions = merge_top_k(np.hstack([scores, s]), np.hstack([positions, p]), k)
    width = min(k, sum(len(piece.array) for piece in pieces))
    return scores[:, :width], positions[:, :width]
