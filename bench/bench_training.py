"""Training step time and memory: hardneg's losses and gradient cache vs sentence-transformers, same process.

On NFCorpus train triples (query, a relevant document, the top BM25 non-relevant document), with
all-MiniLM-L6-v2 on the CPU, it measures one training step = tokenise + forward + loss + backward (the
optimizer step, identical for all, is left out so the ratios are not diluted):

- hardneg InfoNCE (one pass) vs sentence-transformers ``MultipleNegativesRankingLoss``, same batch;
- hardneg gradient-cached InfoNCE vs ``CachedMultipleNegativesRankingLoss``, same batch and chunk
  (``mini_batch_size``); and hardneg cached / hardneg uncached (target <= 1.35);
- the peak resident memory of one cached step as the batch grows (each in a fresh subprocess, since
  the CPU allocator does not return memory and tracemalloc does not see torch tensors), with the
  uncached step beside it for contrast.

The methods run interleaved, step by step on the same batches, the order rotated every step (the method
that runs first pays for memory the previous step's graph released), and medians are reported, so load
from other processes on the machine hits all of them alike. ``--device cuda`` times the steps on a GPU
(synchronised; memory is then the CUDA allocator's peak, in process). Example (~8 minutes on 2 cores)::

    OMP_NUM_THREADS=2 flock /tmp/hardneg-heavy.lock python bench/bench_training.py \\
        --data ../shared/data/beir/nfcorpus --output bench/results/training.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from retriever.bm25 import BM25Retriever  # noqa: E402
from retriever.data import load_beir  # noqa: E402
from retriever.encoder import DualEncoder, resolve_model  # noqa: E402
from retriever.encoding import resolve_training_precision  # noqa: E402
from retriever.gradcache import encode_and_backward  # noqa: E402
from retriever.io import write_json  # noqa: E402
from retriever.losses import make_loss  # noqa: E402
from retriever.memory import estimate_step  # noqa: E402


def build_triples(data: str, count: int) -> list[tuple[str, str, str]]:
    """(query, relevant document, top BM25 non-relevant document) for the first ``count`` train queries."""
    dataset = load_beir(data, "train")
    query_ids = [q for q in dataset.queries if dataset.relevant(q)][:count]
    run = BM25Retriever().search(dataset.corpus, {q: dataset.queries[q] for q in query_ids}, top_k=50)
    triples = []
    for query_id in query_ids:
        relevant = dataset.relevant(query_id)
        positive = max(sorted(relevant), key=lambda d: relevant[d])
        negative = next((d for d in run.get(query_id, {}) if d not in relevant), None)
        if negative is not None:
            triples.append((dataset.queries[query_id], dataset.corpus.text_of(positive),
                            dataset.corpus.text_of(negative)))
    return triples


def hardneg_step(model: DualEncoder, loss_module, batch, chunk_size: int | None, autocast=None) -> float:
    queries = [q for q, _, _ in batch]
    documents = [p for _, p, _ in batch] + [n for _, _, n in batch]
    size = len(batch)
    targets = torch.zeros(size, 2 * size, dtype=torch.bool)
    targets[torch.arange(size), torch.arange(size)] = True
    negatives = ~targets    # distinct queries with one positive each: every other column is a negative

    def loss_fn(q, d):
        return loss_module(q @ d.T, targets.to(q.device), negatives.to(q.device))

    return float(encode_and_backward(model, queries, documents, loss_fn, chunk_size=chunk_size, autocast=autocast))


def st_step(model, loss, batch) -> float:
    features = [{key: value.to(model.device) if isinstance(value, torch.Tensor) else value
                 for key, value in model.preprocess([row[k] for row in batch]).items()} for k in range(3)]
    value = loss(features, None)
    value.backward()
    return float(value)


def rotated_steps(methods: dict, triples, args) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds and losses per step of each ``name: (model, run(batch))``, on the same batches, the order rotated
    every step (the method that runs first pays for memory the previous step's graph released); step 0 warms
    up every method and is not counted."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    losses: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for step in range(args.steps + 1):
        batch = triples[step * args.batch_size:(step + 1) * args.batch_size]
        for name in names[step % len(names):] + names[:step % len(names)]:
            model, run = methods[name]
            model.zero_grad(set_to_none=True)
            torch.manual_seed(step)
            _synchronize(args.device)
            tick = time.perf_counter()
            value = run(batch)
            _synchronize(args.device)
            elapsed = time.perf_counter() - tick
            if step:
                times[name].append(elapsed)
                losses[name].append(value)
            print(f"step {step} {name}: {elapsed:.2f}s loss {value:.4f}", file=sys.stderr, flush=True)
    return times, losses


def time_steps(args, triples) -> dict:
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
            MultipleNegativesRankingLoss,
        )
    except ImportError:   # sentence-transformers before the 6.x package layout
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

    path = str(resolve_model(args.model))
    hardneg = DualEncoder.load(path, device=args.device, max_length=args.max_length)
    hardneg.train()
    st_model = SentenceTransformer(path, device=args.device)
    st_model.max_seq_length = args.max_length
    st_model.train()
    infonce = make_loss("infonce", temperature=0.05)      # = ST's scale 20 with cosine similarity
    methods = {
        "hardneg_infonce": (hardneg, lambda b: hardneg_step(hardneg, infonce, b, None)),
        "st_mnrl": (st_model, lambda b: st_step(st_model, MultipleNegativesRankingLoss(st_model), b)),
        "hardneg_cached": (hardneg, lambda b: hardneg_step(hardneg, infonce, b, args.chunk_size)),
        "st_cached_mnrl": (st_model, lambda b: st_step(
            st_model, CachedMultipleNegativesRankingLoss(st_model, mini_batch_size=args.chunk_size), b)),
    }
    times, losses = rotated_steps(methods, triples, args)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "seconds_per_step": {k: round(v, 3) for k, v in medians.items()},
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "losses": {k: [round(x, 4) for x in v] for k, v in losses.items()},
        "ratios": {
            "hardneg_infonce / st_mnrl": round(medians["hardneg_infonce"] / medians["st_mnrl"], 3),
            "hardneg_cached / hardneg_infonce": round(medians["hardneg_cached"] / medians["hardneg_infonce"], 3),
            "hardneg_cached / st_cached_mnrl": round(medians["hardneg_cached"] / medians["st_cached_mnrl"], 3),
        },
    }


def time_precisions(args, triples) -> dict:
    """``--precisions``: hardneg's InfoNCE step (plain and gradient-cached) in fp32 and under bf16 autocast,
    rotated step by step on the same batches, as ``train --precision`` runs it (issue 10)."""
    model = DualEncoder.load(str(resolve_model(args.model)), device=args.device, max_length=args.max_length)
    model.train()
    infonce = make_loss("infonce", temperature=0.05)
    methods = {f"{kind}_{name}": (model, lambda b, c=chunk, d=dtype: hardneg_step(model, infonce, b, c, autocast=d))
               for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))
               for kind, chunk in (("plain", None), ("cached", args.chunk_size))}
    times, losses = rotated_steps(methods, triples, args)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"seconds_per_step": {k: round(v, 3) for k, v in medians.items()},
            "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "losses": {k: [round(x, 4) for x in v] for k, v in losses.items()},
            "ratios": {f"{kind} fp32 / bf16": round(medians[f"{kind}_fp32"] / medians[f"{kind}_bf16"], 3)
                       for kind in ("plain", "cached")}}


def time_dropout(args, triples) -> dict:
    """``--dropout``: hardneg's InfoNCE step with the model's own dropout (0.1) and with ``train.dropout: 0``,
    against sentence-transformers' ``MultipleNegativesRankingLoss`` step (its dropout, as its trainer runs it),
    all under the autocast ``train --precision auto`` picks, rotated step by step on the same batches."""
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:   # sentence-transformers before the 6.x package layout
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    path = str(resolve_model(args.model))
    dtype = torch.bfloat16 if resolve_training_precision("auto", args.device) == "bf16" else None
    own, undropped = (DualEncoder.load(path, device=args.device, max_length=args.max_length) for _ in range(2))
    undropped.set_dropout(0.0)
    st_model = SentenceTransformer(path, device=args.device)
    st_model.max_seq_length = args.max_length
    for model in (own, undropped, st_model):
        model.train()
    infonce = make_loss("infonce", temperature=0.05)
    mnrl = MultipleNegativesRankingLoss(st_model)

    def st_autocast(batch):
        with torch.autocast(args.device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            return st_step(st_model, mnrl, batch)

    methods = {"hardneg_dropout_0.1": (own, lambda b: hardneg_step(own, infonce, b, None, autocast=dtype)),
               "hardneg_dropout_0": (undropped, lambda b: hardneg_step(undropped, infonce, b, None, autocast=dtype)),
               "st_mnrl": (st_model, st_autocast)}
    times, losses = rotated_steps(methods, triples, args)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"precision": "bf16" if dtype else "fp32",
            "seconds_per_step": {k: round(v, 3) for k, v in medians.items()},
            "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "losses": {k: [round(x, 4) for x in v] for k, v in losses.items()},
            "ratios": {"st_mnrl / hardneg_dropout_0": round(medians["st_mnrl"] / medians["hardneg_dropout_0"], 3),
                       "hardneg_dropout_0.1 / hardneg_dropout_0": round(
                           medians["hardneg_dropout_0.1"] / medians["hardneg_dropout_0"], 3)}}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS, so loading is not counted."""
    Path("/proc/self/clear_refs").write_text("5")


def memory_child(args) -> None:
    """One fresh process: load, one cached (or uncached) step, print the step's peak RSS and its growth."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    triples = [tuple(t) for t in json.loads(Path(args.triples).read_text())][:args.child_batch]
    model = DualEncoder.load(resolve_model(args.model), device="cpu", max_length=args.max_length)
    if args.memory_dropout is not None:
        model.set_dropout(args.memory_dropout)
    model.train()
    loss_module = make_loss("infonce", temperature=0.05)
    # retriever.memory's estimate of the same step (activations + gradients: this step has no optimizer)
    estimate = estimate_step(model, [q for q, _, _ in triples], [t[k] for k in (1, 2) for t in triples],
                             chunk_size=args.child_chunk or None, precision="fp32", device=torch.device("cpu"))
    baseline = _status_mb("VmRSS")
    _reset_peak_rss()
    tick = time.perf_counter()
    hardneg_step(model, loss_module, triples, args.child_chunk or None)
    seconds = time.perf_counter() - tick
    peak = _status_mb("VmHWM")
    print(json.dumps({"batch": len(triples), "chunk": args.child_chunk or None, "rss_after_load_mb": round(baseline),
                      "peak_rss_mb": round(peak), "step_growth_mb": round(peak - baseline),
                      "estimate_mb": round((estimate.activations + estimate.fixed / 3) / 2**20),
                      "dropout": args.memory_dropout,
                      "seconds": round(seconds, 1)}))


def cuda_memory(args, triples) -> list[dict]:
    """Peak CUDA memory of one step over the loaded model: the allocator's own counter, so in process."""
    model = DualEncoder.load(resolve_model(args.model), device=args.device, max_length=args.max_length)
    model.train()
    loss_module = make_loss("infonce", temperature=0.05)
    rows = []
    for batch, chunk in _memory_plan(args):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        tick = time.perf_counter()
        hardneg_step(model, loss_module, triples[:batch], chunk or None)
        torch.cuda.synchronize()
        rows.append({"batch": batch, "chunk": chunk or None, "cuda_allocated_after_load_mb": round(baseline / 2**20),
                     "step_growth_mb": round((torch.cuda.max_memory_allocated() - baseline) / 2**20),
                     "seconds": round(time.perf_counter() - tick, 3)})
        print(f"memory: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _memory_plan(args) -> list[tuple[int, int]]:
    plan = [(b, c) for c in args.memory_chunks for b in args.memory_batches]
    return plan + [(b, 0) for b in args.uncached_batches]


def measure_memory(args, triples_file: Path) -> list[dict]:
    rows = []
    for batch, chunk in _memory_plan(args):
        command = [sys.executable, __file__, "--memory-child", "--triples", str(triples_file), "--model", args.model,
                   "--max-length", str(args.max_length), "--child-batch", str(batch), "--child-chunk", str(chunk)]
        command += ["--memory-dropout", str(args.memory_dropout)] if args.memory_dropout is not None else []
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"memory: {row}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/beir/nfcorpus")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up)")
    parser.add_argument("--memory-batches", type=int, nargs="*", default=[32, 64, 128, 256])
    parser.add_argument("--memory-chunks", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--uncached-batches", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to time the steps on a GPU")
    parser.add_argument("--output", default="bench/results/training.json")
    parser.add_argument("--precisions", action="store_true", help="only time fp32 against bf16 autocast steps")
    parser.add_argument("--dropout", action="store_true",
                        help="only time steps with the model's dropout, with train.dropout 0, and ST's MNRL")
    parser.add_argument("--memory-dropout", type=float, help="dropout of the memory steps (default: the model's)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the memory rows (each beside retriever.memory's estimate of its step)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--triples", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    needed = max([(args.steps + 1) * args.batch_size, *args.memory_batches, *args.uncached_batches])
    triples = build_triples(args.data, needed + 64)
    if len(triples) < needed:
        raise SystemExit(f"only {len(triples)} triples; need {needed}")
    output = Path(args.output)
    triples_file = output.with_suffix(".triples.json")
    write_json(triples_file, [list(t) for t in triples[:needed]])
    report = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("child") and k != "triples"},
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    for flag, measure in (("precisions", time_precisions), ("dropout", time_dropout)):
        if getattr(args, flag):
            report[flag] = measure(args, triples)
            triples_file.unlink()
            write_json(output, report)
            print(json.dumps({k: report[flag][k] for k in ("seconds_per_step", "ratios")}, indent=1))
            return
    if not args.memory_only:
        report["timing"] = time_steps(args, triples)
    report["memory"] = (cuda_memory(args, triples) if args.device.startswith("cuda")
                        else measure_memory(args, triples_file))
    triples_file.unlink()
    write_json(output, report)
    timing = report.get("timing", {})
    print(json.dumps({"timing": timing.get("seconds_per_step"), "ratios": timing.get("ratios"),
                      "memory": report["memory"]}, indent=1))


if __name__ == "__main__":
    main()
