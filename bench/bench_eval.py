"""Evaluation time: hardneg's ``evaluate`` vs BEIR's ``EvaluateRetrieval`` on the same embeddings.

Both get the very same all-MiniLM-L6-v2 vectors of NFCorpus (test split) through a custom model
object that looks them up instead of encoding, so what is timed is exactly the evaluation:
exact search of the top 1,000 per query plus the metrics (BEIR: ``DenseRetrievalExactSearch`` with
torch top-k and Python heaps, then ``pytrec_eval``; hardneg: chunked faiss exact search, then its
own trec_eval-equal metrics). Same metric set on both sides: nDCG, MAP, Recall, P at
k in {1, 3, 5, 10, 100, 1000} and MRR@10. The script also checks that the two agree.

    OMP_NUM_THREADS=2 flock /tmp/hardneg-heavy.lock python bench/bench_eval.py

The embeddings are computed once (about 4 minutes on 2 cores) and cached in
``runs/cache/nfcorpus-minilm-test.npz``.

``--end-to-end`` times the whole evaluation of all-MiniLM-L6-v2 instead, model load to metrics, encoding
included (issue 10): sentence-transformers ``encode`` behind BEIR's ``models.SentenceBERT`` +
``EvaluateRetrieval`` (the peer, fp32 as both libraries default to) against ``hardneg evaluate``'s
``evaluate()`` with ``--encode-precision auto`` and ``fp32``, rotated, the same metrics. It also reports the
quality guard: nDCG@10 of auto against fp32 (within 0.002), and fp32 against the peer.

    OMP_NUM_THREADS=2 flock /tmp/hardneg-heavy.lock python bench/bench_eval.py --end-to-end --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval.evaluate import evaluate  # noqa: E402
from retriever.data import load_beir  # noqa: E402

K_VALUES = [1, 3, 5, 10, 100, 1000]


class LookupEncoder:
    """An Encoder (hardneg) and a BEIR model at once, returning precomputed vectors."""

    def __init__(self, doc_ids, documents, query_texts, queries, corpus_text_of) -> None:
        self.doc_row = {doc_id: i for i, doc_id in enumerate(doc_ids)}
        self.corpus_texts = [corpus_text_of(doc_id) for doc_id in doc_ids]
        self.text_row = {text: i for i, text in enumerate(self.corpus_texts)}
        self.query_row = {text: i for i, text in enumerate(query_texts)}
        self.documents, self.queries = documents, queries

    # hardneg's Encoder protocol
    def encode_queries(self, texts, **_):
        return self.queries[[self.query_row[t] for t in texts]]

    def encode_documents(self, texts):
        if len(texts) == len(self.documents) and texts == self.corpus_texts:
            return self.documents  # the whole corpus in order (duplicate texts keep their own vectors)
        return self.documents[[self.text_row[t] for t in texts]]

    # BEIR's model interface (DenseRetrievalExactSearch)
    def encode_corpus(self, corpus, **_):
        import torch

        return torch.from_numpy(self.documents[[self.doc_row[d["_id"]] for d in corpus]])


def embeddings(dataset, cache: Path):
    if cache.is_file():
        stored = np.load(cache)
        if list(stored["doc_ids"]) == dataset.corpus.ids and list(stored["query_ids"]) == list(dataset.queries):
            return stored["documents"], stored["queries"]
    from retriever.encoder import DualEncoder

    encoder = DualEncoder.load("all-MiniLM-L6-v2")
    queries = encoder.encode_queries(list(dataset.queries.values()), batch_size=32)
    documents = encoder.encode_documents(dataset.corpus.texts(), batch_size=32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, doc_ids=np.array(dataset.corpus.ids), query_ids=np.array(list(dataset.queries)),
             documents=documents, queries=queries)
    return documents, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "beir" / "nfcorpus"))
    parser.add_argument("--cache", default=str(REPO / "runs" / "cache" / "nfcorpus-minilm-test.npz"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--end-to-end", action="store_true", help="time model load + encoding + search + metrics")
    parser.add_argument("--batch-size", type=int, default=32, help="--end-to-end: encoding batch size, both sides")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "eval-end-to-end.json"))
    args = parser.parse_args()
    if args.end_to_end:
        end_to_end(args)
        return

    import torch
    from beir.retrieval.evaluation import EvaluateRetrieval
    from beir.retrieval.search.dense import DenseRetrievalExactSearch

    torch.set_num_threads(2)
    dataset = load_beir(args.data, "test")
    documents, queries = embeddings(dataset, Path(args.cache))
    model = LookupEncoder(dataset.corpus.ids, documents, list(dataset.queries.values()), queries,
                          dataset.corpus.text_of)
    beir_corpus = {doc_id: {"_id": doc_id, "title": dataset.corpus.titles[i], "text": dataset.corpus.bodies[i]}
                   for i, doc_id in enumerate(dataset.corpus.ids)}
    metrics = tuple(f"{m}@{k}" for m in ("nDCG", "MAP", "Recall", "P") for k in K_VALUES) + ("MRR@10",)

    def run_beir():
        retriever = EvaluateRetrieval(DenseRetrievalExactSearch(model, batch_size=128), score_function="dot",
                                      k_values=K_VALUES)
        results = retriever.retrieve(beir_corpus, dataset.queries)
        ndcg, _map, recall, precision = retriever.evaluate(dataset.qrels, results, K_VALUES)
        mrr = retriever.evaluate_custom(dataset.qrels, results, [10], metric="mrr")
        return ndcg | _map | recall | precision | mrr | {"run": results}

    def run_hardneg(names=metrics):
        return evaluate(dataset, model, metrics=names, depth=1000)["metrics"]

    timings: dict[str, list[float]] = {"beir": [], "hardneg": [], "hardneg+auc": []}
    outputs = {}
    with_auc = metrics + ("AUC", "AUC-corpus", "AUC-pooled")
    run_beir(), run_hardneg(with_auc)  # warm-up: imports, faiss and torch thread pools, not timed
    for _ in range(args.repeats):
        for name, fn in (("beir", run_beir), ("hardneg", run_hardneg), ("hardneg+auc", lambda: run_hardneg(with_auc))):
            started = time.perf_counter()
            outputs[name] = fn()
            timings[name].append(time.perf_counter() - started)

    beir, ours = outputs["beir"], outputs["hardneg"]
    worst = 0.0
    for k in K_VALUES:
        for theirs_name, our_name in ((f"NDCG@{k}", f"nDCG@{k}"), (f"MAP@{k}", f"MAP@{k}"),
                                      (f"Recall@{k}", f"Recall@{k}"), (f"P@{k}", f"P@{k}")):
            worst = max(worst, abs(beir[theirs_name] - ours[our_name]))
    # BEIR's MRR is its own code (not pytrec_eval) and orders tied scores differently from trec_eval;
    # hardneg's MRR@10 is checked against pytrec_eval's recip_rank on BEIR's own run cut at 10 instead.
    import pytrec_eval

    cut = {q: {d: s for d, s in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]}
           for q, docs in beir["run"].items()}
    reference = pytrec_eval.RelevanceEvaluator(dataset.qrels, {"recip_rank"}).evaluate(cut)
    trec_mrr = float(np.mean([reference.get(q, {}).get("recip_rank", 0.0) for q in dataset.qrels]))
    worst = max(worst, abs(trec_mrr - ours["MRR@10"]))
    median = {name: statistics.median(values) for name, values in timings.items()}
    report = {
        "data": f"{dataset.name}/{dataset.split}", "queries": len(dataset.queries), "documents": len(dataset.corpus),
        "depth": 1000, "metrics": len(metrics), "repeats": args.repeats,
        "median_seconds": {name: round(value, 3) for name, value in median.items()},
        "speedup_vs_beir": round(median["beir"] / median["hardneg"], 2),
        "speedup_vs_beir_with_auc": round(median["beir"] / median["hardneg+auc"], 2),
        "max_abs_metric_difference": worst, "nDCG@10": {"beir": beir["NDCG@10"], "hardneg": ours["nDCG@10"]},
        "MRR@10": {"beir_own_code": beir["MRR@10"], "pytrec_eval_on_beir_run": trec_mrr, "hardneg": ours["MRR@10"]},
        "auc": {k: outputs["hardneg+auc"][k] for k in ("AUC", "AUC-corpus", "AUC-pooled")},
    }
    print(json.dumps(report, indent=2))
    if worst > 1e-4:  # BEIR rounds to 5 decimals
        raise SystemExit(f"hardneg and BEIR disagree by {worst}")


def end_to_end(args) -> None:
    import torch
    from beir.retrieval import models
    from beir.retrieval.evaluation import EvaluateRetrieval
    from beir.retrieval.search.dense import DenseRetrievalExactSearch

    from retriever.encoder import resolve_model
    from retriever.factory import as_retriever

    torch.set_num_threads(2)
    dataset = load_beir(args.data, "test")
    path = resolve_model("all-MiniLM-L6-v2")
    beir_corpus = {doc_id: {"_id": doc_id, "title": dataset.corpus.titles[i], "text": dataset.corpus.bodies[i]}
                   for i, doc_id in enumerate(dataset.corpus.ids)}
    metrics = tuple(f"{m}@{k}" for m in ("nDCG", "MAP", "Recall", "P") for k in K_VALUES) + ("MRR@10",)

    def run_peer() -> dict:
        model = models.SentenceBERT(path, device="cpu")
        retriever = EvaluateRetrieval(DenseRetrievalExactSearch(model, batch_size=args.batch_size),
                                      score_function="cos_sim", k_values=K_VALUES)
        results = retriever.retrieve(beir_corpus, dataset.queries)
        ndcg, _map, recall, precision = retriever.evaluate(dataset.qrels, results, K_VALUES)
        mrr = retriever.evaluate_custom(dataset.qrels, results, [10], metric="mrr")
        return ndcg | _map | recall | precision | mrr

    def run_hardneg(precision: str) -> dict:
        retriever = as_retriever(path, batch_size=args.batch_size, precision=precision, show_progress=False)
        return evaluate(dataset, retriever, metrics=metrics, depth=1000)["metrics"]

    runs = {"st+beir": run_peer, "hardneg-auto": lambda: run_hardneg("auto"),
            "hardneg-fp32": lambda: run_hardneg("fp32")}
    names = list(runs)
    timings: dict[str, list[float]] = {name: [] for name in names}
    outputs = {}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            started = time.perf_counter()
            outputs[name] = runs[name]()
            timings[name].append(time.perf_counter() - started)
            print(f"repeat {repeat + 1} {name}: {timings[name][-1]:.1f}s", flush=True)
    median = {name: statistics.median(values) for name, values in timings.items()}
    ndcg = {"st+beir": outputs["st+beir"]["NDCG@10"], "hardneg-auto": outputs["hardneg-auto"]["nDCG@10"],
            "hardneg-fp32": outputs["hardneg-fp32"]["nDCG@10"]}
    report = {
        "data": f"{dataset.name}/{dataset.split}", "queries": len(dataset.queries), "documents": len(dataset.corpus),
        "batch_size": args.batch_size, "repeats": args.repeats, "timings": timings,
        "median_seconds": {name: round(value, 1) for name, value in median.items()},
        "speedup_vs_peer": {name: round(median["st+beir"] / median[name], 2) for name in names[1:]},
        "nDCG@10": ndcg, "auto_minus_fp32_nDCG@10": ndcg["hardneg-auto"] - ndcg["hardneg-fp32"],
        "fp32_minus_peer_nDCG@10": ndcg["hardneg-fp32"] - ndcg["st+beir"],
        "metrics": {name: {k: v for k, v in outputs[name].items()} for name in names},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "metrics"}, indent=2))


if __name__ == "__main__":
    main()
