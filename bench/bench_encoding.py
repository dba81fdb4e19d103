"""Corpus encoding throughput against sentence-transformers, and the runtime backends tried (issue 10).

    OMP_NUM_THREADS=2 flock /tmp/hardneg-heavy.lock python bench/bench_encoding.py --docs 1000 --repeats 5

The same ``--docs`` NFCorpus documents (title + text, as every hardneg stage sees them), all-MiniLM-L6-v2 at its
256-token limit, in one process, the methods rotated every repeat so machine noise hits all of them:

- ``st``: sentence-transformers' default ``SentenceTransformer.encode`` (fp32, batch 32, sorted by length) - the peer;
- ``hardneg-fp32`` and ``hardneg-auto``: ``DualEncoder.encode`` (token-budget batches of ``--batch-size`` x 256
  tokens), in float32 and in what ``auto`` picks here (bf16 autocast on a CPU with AVX-512 BF16/AMX);
- ``torch-int8``: int8 dynamic quantisation of the Linear layers (``torch.ao.quantization.quantize_dynamic``);
- ``onnxruntime``: the encoder exported to ONNX (``torch.onnx.export``) and run by ONNX Runtime's CPU provider;
- ``openvino``: the encoder converted by ``openvino.convert_model`` and compiled for the CPU (OpenVINO infers
  in bf16 by default on AMX CPUs).

Each method first makes ``--warmup`` untimed passes (their time is kept as ``first_pass_seconds``), then the
timed passes rotate. The backends run behind hardneg's own batching, so what differs is only the forward pass.
Each method's embeddings are compared with sentence-transformers' float32 ones (mean and lowest cosine). The script also
measures the bf16 and fp32 GEMM limit of the machine (a 2048 x 2048 matmul) and reports the share of it each
method reaches, counting the model's useful FLOPs (no padding): linear layers ``2 x tokens x params`` plus
attention ``4 x layers x hidden x tokens^2`` per document. Results go to ``--output``
(default ``bench/results/encoding.json``). A backend whose package is missing is reported as skipped; the
dropped backends are not dependencies of hardneg: ``pip install onnxruntime onnx openvino`` to rerun their rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from retriever.data import load_beir  # noqa: E402
from retriever.encoder import DualEncoder, resolve_model  # noqa: E402

NFCORPUS = ROOT.parent / "shared" / "data" / "beir" / "nfcorpus"


class _Output:
    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden


class RuntimeModel(torch.nn.Module):
    """A compiled runtime's forward pass behind the ``AutoModel`` interface ``DualEncoder`` calls."""

    def __init__(self, run, config, input_names: list[str]) -> None:
        super().__init__()
        self.run, self.config, self.input_names = run, config, input_names
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the module a device

    def forward(self, **features):
        inputs = {name: features[name].cpu().numpy() for name in self.input_names}
        return _Output(torch.from_numpy(np.asarray(self.run(inputs), dtype=np.float32)))


class _Positional(torch.nn.Module):
    """The encoder with a fixed positional signature and one output, as the ONNX exporter wants it."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def export_onnx(model, folder: Path, input_names: list[str]) -> Path:
    path = folder / "model.onnx"
    example = tuple(torch.ones(2, 16, dtype=torch.long) for _ in input_names)
    axes = {name: {0: "batch", 1: "tokens"} for name in input_names} | {"last_hidden_state": {0: "batch", 1: "tokens"}}
    with torch.no_grad():
        torch.onnx.export(_Positional(model).eval(), example, str(path), input_names=input_names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def onnxruntime_encoder(base: DualEncoder, folder: Path) -> DualEncoder:
    import onnxruntime

    names = ["input_ids", "attention_mask", "token_type_ids"]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(export_onnx(base.model, folder, names)), options,
                                           providers=["CPUExecutionProvider"])
    model = RuntimeModel(lambda inputs: session.run(["last_hidden_state"], inputs)[0], base.model.config, names)
    return _wrapped(base, model)


def openvino_encoder(base: DualEncoder) -> DualEncoder:
    import openvino

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = {name: torch.ones(2, 16, dtype=torch.long) for name in names}
    with torch.no_grad():
        converted = openvino.convert_model(base.model, example_input=example)
    compiled = openvino.Core().compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    model = RuntimeModel(lambda inputs: request.infer(inputs)[compiled.outputs[0]], base.model.config, names)
    return _wrapped(base, model)


def int8_encoder(base: DualEncoder) -> DualEncoder:
    import copy

    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base.model), {torch.nn.Linear}, dtype=torch.qint8)
    return _wrapped(base, quantized)


def _wrapped(base: DualEncoder, model) -> DualEncoder:
    return DualEncoder(model, base.tokenizer, pooling=base.pooling, normalize=base.normalize,
                       max_length=base.max_length, name=base.name, precision="fp32")


def gemm_limit(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0, device: str = "cpu") -> float:
    """GFLOP/s of a square matmul on this machine (the best of repeated runs)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b
    _synchronize(device)
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds:
        tick = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - tick)
    return 2 * size ** 3 / best / 1e9


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def useful_gflop(encoder: DualEncoder, texts: list[str]) -> tuple[float, float]:
    """The model's FLOPs over the unpadded tokens of ``texts`` (GFLOP) and the mean tokens per text."""
    config = encoder.model.config
    hidden, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    tokens = np.array([len(ids) for ids in encoder.tokenizer(texts, truncation=True,
                                                             max_length=encoder.max_length)["input_ids"]])
    linear = 2 * tokens.sum() * layers * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 4 * layers * hidden * (tokens.astype(np.float64) ** 2).sum()
    return float(linear + attention) / 1e9, float(tokens.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(NFCORPUS))
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes over all documents per method first "
                        "(oneDNN builds kernels per new shape on first sight)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (hardneg: x 256 tokens)")
    parser.add_argument("--methods", default="st,hardneg-fp32,hardneg-auto,torch-int8,onnxruntime,openvino")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "encoding.json"))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the runtime backends are CPU-only)")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    dataset = load_beir(args.data, "test")
    texts = dataset.corpus.texts()[:args.docs]
    path = resolve_model("all-MiniLM-L6-v2")
    st_model = SentenceTransformer(path, device=args.device)
    base = DualEncoder.load(path, precision="fp32", device=args.device)
    auto = DualEncoder.load(path, precision="auto", device=args.device)
    gflop, mean_tokens = useful_gflop(base, texts)
    limits = {"bf16": gemm_limit(torch.bfloat16, device=args.device),
              "fp32": gemm_limit(torch.float32, device=args.device)}
    print(f"{len(texts)} documents, {mean_tokens:.1f} tokens each on average, {gflop:.0f} GFLOP of useful work; "
          f"GEMM limit bf16 {limits['bf16']:.0f} GFLOP/s, fp32 {limits['fp32']:.0f} GFLOP/s", flush=True)

    methods: dict[str, object] = {}
    skipped: dict[str, str] = {}
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.device != "cpu":
        skipped |= {name: "a CPU backend" for name in wanted if name in ("torch-int8", "onnxruntime", "openvino")}
        wanted = [name for name in wanted if name not in skipped]
    with tempfile.TemporaryDirectory() as scratch:
        builders = {
            "st": lambda: (lambda: st_model.encode(texts, convert_to_numpy=True)),
            "hardneg-fp32": lambda: (lambda: base.encode(texts, batch_size=args.batch_size)),
            "hardneg-auto": lambda: (lambda: auto.encode(texts, batch_size=args.batch_size)),
            "torch-int8": lambda: _encode_with(int8_encoder(base), texts, args.batch_size),
            "onnxruntime": lambda: _encode_with(onnxruntime_encoder(base, Path(scratch)), texts, args.batch_size),
            "openvino": lambda: _encode_with(openvino_encoder(base), texts, args.batch_size),
        }
        for name in wanted:
            try:
                started = time.perf_counter()
                methods[name] = builders[name]()
                print(f"built {name} in {time.perf_counter() - started:.1f}s", flush=True)
            except ImportError as err:
                skipped[name] = f"not installed: {err.name}"
            except Exception as err:  # a backend that cannot take this model is a result, not a crash
                skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        for name, why in skipped.items():
            print(f"skipped {name}: {why}", flush=True)

        times: dict[str, list[float]] = {name: [] for name in methods}
        outputs: dict[str, np.ndarray] = {}
        names = list(methods)
        cold: dict[str, float] = {}
        for repeat in range(args.warmup + args.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                started = time.perf_counter()
                outputs[name] = np.asarray(methods[name](), dtype=np.float32)
                _synchronize(args.device)
                elapsed = time.perf_counter() - started
                if repeat < args.warmup:
                    cold.setdefault(name, elapsed)
                else:
                    times[name].append(elapsed)
                print(f"  {'warm-up' if repeat < args.warmup else 'repeat'} {repeat + 1} {name}: "
                      f"{len(texts) / elapsed:.1f} docs/s", flush=True)

    # The GEMM limit of this shared VM moves between runs; measured again after the passes, the higher counts.
    after = {"bf16": gemm_limit(torch.bfloat16, device=args.device),
             "fp32": gemm_limit(torch.float32, device=args.device)}
    measured_limits = {"before": limits, "after": after}
    limits = {key: max(limits[key], after[key]) for key in limits}
    reference = outputs.get("st", outputs.get("hardneg-fp32"))
    peer = statistics.median(times["st"]) if "st" in times else None
    rows = {}
    for name in names:
        seconds = statistics.median(times[name])
        cosine = (outputs[name] * reference).sum(axis=1) / (np.linalg.norm(outputs[name], axis=1)
                                                            * np.linalg.norm(reference, axis=1))
        rows[name] = {"seconds": seconds, "docs_per_s": len(texts) / seconds,
                      "speedup_vs_st": peer / seconds if peer else None,
                      "gflop_per_s": gflop / seconds, "share_of_bf16_gemm": gflop / seconds / limits["bf16"],
                      "share_of_fp32_gemm": gflop / seconds / limits["fp32"],
                      "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                      "all_seconds": times[name], "first_pass_seconds": cold.get(name)}
    print(f"\n{'method':<14}{'docs/s':>8}{'vs ST':>7}{'GFLOP/s':>9}{'of bf16':>9}{'of fp32':>9}"
          f"{'cos mean':>10}{'cos min':>9}")
    for name, row in rows.items():
        ratio = f"{row['speedup_vs_st']:.2f}x" if row["speedup_vs_st"] else "-"
        print(f"{name:<14}{row['docs_per_s']:>8.1f}{ratio:>7}{row['gflop_per_s']:>9.0f}"
              f"{row['share_of_bf16_gemm']:>9.0%}{row['share_of_fp32_gemm']:>9.0%}"
              f"{row['cosine_mean']:>10.6f}{row['cosine_min']:>9.6f}")
    result = {"documents": len(texts), "mean_tokens": mean_tokens, "useful_gflop": gflop,
              "gemm_limit_gflop_per_s": limits, "gemm_limit_measurements": measured_limits,
              "batch_size": args.batch_size, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "auto_precision": auto.encode_precision,
              "methods": rows, "skipped": skipped}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


def _encode_with(encoder: DualEncoder, texts: list[str], batch_size: int):
    encoder.encode(texts[:8], batch_size=batch_size)  # warm the runtime (first-call compilation)
    return lambda: encoder.encode(texts, batch_size=batch_size)


if __name__ == "__main__":
    main()
