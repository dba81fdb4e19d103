"""Build the bundled ``nfcorpus-demo`` dataset (retriever/bundled/nfcorpus-demo) from the full NFCorpus.

    python bench/make_demo_subset.py ../shared/data/beir/nfcorpus

Selection, seeded so the files are reproducible:
* 80 test queries drawn at random, with all their judged documents;
* the 400 train queries with the largest share of judged documents inside that set (ties by id), each
  kept with all of its train qrels (so every train positive is in the subset);
* random other NFCorpus documents until the corpus has 2,000 documents, as distractors.
Texts and qrels rows are copied unchanged; only the subset is taken.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

from retriever.data import load_corpus, load_qrels, load_queries

TEST_QUERIES, TRAIN_QUERIES, CORPUS_SIZE, SEED = 80, 400, 2000, 0
TARGET = Path(__file__).resolve().parents[1] / "retriever" / "bundled" / "nfcorpus-demo"

LICENSE = """# nfcorpus-demo

A subset of NFCorpus (Boteva et al., ECIR 2016) in BEIR format, made by `bench/make_demo_subset.py`
from the official BEIR nfcorpus.zip (md5 a89dba18a62ef92f7d323ec890a0d38d): {test} test queries, {train}
train queries, {docs} documents (all judged documents of those queries plus random others). Texts and
qrels rows are unchanged.

License: NFCorpus is provided for research use only, per its authors' terms
(https://www.cl.uni-heidelberg.de/statnlpgroup/nfcorpus/). The texts are from NutritionFacts.org and
PubMed abstracts.
"""


def main(source: Path) -> None:
    rng = random.Random(SEED)
    corpus = load_corpus(source / "corpus.jsonl.gz")
    queries = load_queries(source / "queries.jsonl")
    test, train = load_qrels(source / "qrels" / "test.tsv"), load_qrels(source / "qrels" / "train.tsv")
    test_ids = sorted(rng.sample(sorted(test), TEST_QUERIES))
    docs = {d for q in test_ids for d in test[q]}
    share = {q: sum(d in docs for d in judged) / len(judged) for q, judged in train.items()}
    train_ids = sorted(sorted(train, key=lambda q: (-share[q], q))[:TRAIN_QUERIES])
    docs |= {d for q in train_ids for d in train[q]}
    others = sorted(set(corpus.ids) - docs)
    docs |= set(rng.sample(others, max(0, CORPUS_SIZE - len(docs))))

    (TARGET / "qrels").mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(TARGET / "corpus.jsonl.gz", "wb", mtime=0) as raw:
        for i, doc_id in enumerate(corpus.ids):
            if doc_id in docs:
                record = {"_id": doc_id, "title": corpus.titles[i], "text": corpus.bodies[i]}
                raw.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
    with open(TARGET / "queries.jsonl", "w", encoding="utf-8") as handle:
        for query_id in sorted(set(test_ids) | set(train_ids)):
            handle.write(json.dumps({"_id": query_id, "text": queries[query_id]}, ensure_ascii=False) + "\n")
    for name, qrels, ids in (("test", test, test_ids), ("train", train, train_ids)):
        with open(TARGET / "qrels" / f"{name}.tsv", "w", encoding="utf-8") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for query_id in ids:
                for doc_id, grade in sorted(qrels[query_id].items()):
                    handle.write(f"{query_id}\t{doc_id}\t{grade}\n")
    (TARGET / "README.md").write_text(LICENSE.format(test=len(test_ids), train=len(train_ids), docs=len(docs)))
    print(f"wrote {TARGET}: {len(docs)} documents, {len(test_ids)} test and {len(train_ids)} train queries")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/beir/nfcorpus"))
