"""Memory of corpus texts held as Python strings (what ``retriever.data.Corpus`` holds) against Arrow columns.

Issue 15 asks for an Arrow-backed text store "where that measures better". Each way is measured in a fresh process
(peak RSS, and the anonymous vs file-backed split from /proc/self/status) for N synthetic documents of MS MARCO
length (30-80 words, ~380 characters), every text read once as an encoder would:

* ``python``: ids and bodies as lists of ``str`` (hardneg today);
* ``arrow``: the same as in-memory ``pyarrow`` columns built 100,000 rows at a time;
* ``arrow-mmap``: an Arrow IPC file written once, then memory-mapped and read batch by batch.

    python bench/bench_corpus_store.py --documents 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

BATCH = 100_000
WORDS = [f"w{i:05d}" for i in range(30_000)]


def document(i: int) -> str:
    pick = random.Random(i)
    return " ".join(pick.choice(WORDS) for _ in range(pick.randint(30, 80)))


def memory() -> dict:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("RssAnon", "RssFile")))
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            **{key.lower(): int(value.split()[0]) / 1e6 for key, value in fields.items()}}


def measure(mode: str, documents: int, scratch: Path) -> dict:
    characters = 0
    if mode == "python":
        ids = [str(i) for i in range(documents)]
        bodies = [document(i) for i in range(documents)]
        characters = sum(len(body) for body in bodies)
        assert len(ids) == documents
    else:
        import pyarrow as pa

        path = scratch / "corpus.arrow"
        schema = pa.schema([("id", pa.string()), ("body", pa.large_string())])
        batches = (pa.record_batch([pa.array([str(i) for i in rows]), pa.array([document(i) for i in rows],
                                                                              pa.large_string())], schema=schema)
                   for rows in (range(s, min(documents, s + BATCH)) for s in range(0, documents, BATCH)))
        if mode == "arrow":
            table = pa.Table.from_batches(list(batches), schema=schema)
        else:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for batch in batches:
                    writer.write_batch(batch)
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        for batch in table.to_batches():
            characters += sum(len(body) for body in batch.column(1).to_pylist())
    return {"mode": mode, "documents": documents, "characters": characters, **memory()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.documents, Path(args.scratch))))
        return
    with tempfile.TemporaryDirectory() as scratch:
        for mode in ("python", "arrow", "arrow-mmap"):
            out = subprocess.run([sys.executable, __file__, "--documents", str(args.documents), "--mode", mode,
                                  "--scratch", scratch], check=True, capture_output=True, text=True).stdout
            print(out.strip(), flush=True)


if __name__ == "__main__":
    main()
