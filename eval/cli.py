"""The ``hardneg`` command. It only parses arguments and calls the public functions a Python user calls.

Every error a user can fix is a :class:`~retriever.io.HardnegError`, printed as one line
(``hardneg: error: ...``) with exit status 2; nothing is left half-written because every output is
written atomically and only after its inputs were read and checked.
"""

from __future__ import annotations

import argparse
import os
import sys

from retriever.encoding import ENCODE_DEFAULTS, PRECISIONS
from retriever.io import HardnegError, file_checksum


class _Parser(argparse.ArgumentParser):
    """argparse with the house's error format: one line, ``hardneg ...: error: ...``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _data_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    group = parser.add_argument_group("data (a BEIR folder or bundled name, or explicit files)")
    group.add_argument("--data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/), a bundled dataset "
                                      "name such as nfcorpus-demo, or beir:NAME (downloaded once, md5-checked)")
    group.add_argument("--split", default=split, help=f"qrels split (default: {split})")
    group.add_argument("--corpus", help="corpus file: BEIR corpus.jsonl[.gz] or MS MARCO collection.tsv")
    group.add_argument("--queries", help="queries file: BEIR queries.jsonl or MS MARCO queries.*.tsv")
    group.add_argument("--qrels", help="qrels file: BEIR TSV, MS MARCO TSV or TREC 'qid 0 docid rel'")


def _encoder_arguments(parser: argparse.ArgumentParser, *, batching: bool = True) -> None:
    """Encoding flags; ``batching=False`` where the sub-command declares its own batch size and length (train)."""
    group = parser.add_argument_group("encoder")
    if batching:
        group.add_argument("--batch-size", type=int, default=ENCODE_DEFAULTS["batch_size"],
                           help="full-length texts per encoding batch; batches hold this many texts' worth of "
                                f"tokens, so short texts go in larger ones (default: {ENCODE_DEFAULTS['batch_size']})")
        group.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: the model's)")
    group.add_argument("--encode-precision", default=ENCODE_DEFAULTS["precision"], choices=PRECISIONS,
                       help="precision of every encode: auto (bf16 where the CPU or GPU runs it natively, else "
                            "fp32), fp32, bf16, fp16 (CUDA only); embeddings are float32 either way "
                            f"(default: {ENCODE_DEFAULTS['precision']})")


def _encode_options(args) -> dict:
    """The CLI's encoding flags as the options a model loader takes; says which precision will run."""
    from retriever.encoder import default_device
    from retriever.encoding import describe_precision, encode_options

    options = encode_options({"batch_size": getattr(args, "batch_size", None), "max_length": args.max_length,
                              "precision": args.encode_precision}, show_progress=not args.quiet)
    note = describe_precision(options["precision"], default_device())
    if not args.quiet:
        print(f"hardneg: {note}", file=sys.stderr)
    return options


def _dataset(args):
    from retriever.data import load_dataset

    return load_dataset(args.data, args.split, corpus=args.corpus, queries=args.queries, qrels=args.qrels)


def _retriever(spec: str, args):
    from retriever.protocol import as_retriever

    options = _encode_options(args) if not spec.lower().startswith("bm25") else {"show_progress": not args.quiet}
    return as_retriever(spec, **options)


def _recorded(args) -> dict:
    """The command's arguments as recorded in its output's provenance."""
    return {"command": args.command} | {k: v for k, v in vars(args).items() if k not in ("func", "command")}


def _mining_filter(args):
    """``--filter`` names one filter, or several joined by commas (a chain, each removal charged to its stage)."""
    from mining.filters import make_filter

    optional = {"min_score", "max_rank"}
    stages = []
    for name in (part.strip() for part in args.filter.split(",")):
        params = {"topk": {}, "topk-percpos": {"perc": args.perc}, "topk-marginpos": {"margin": args.margin},
                  "topk-abs": {"max_score": args.max_score, "min_score": args.min_score},
                  "topk-shifted": {"shift": args.shift},
                  "rank-window": {"min_rank": args.min_rank, "max_rank": args.max_rank}}.get(name, {})
        missing = [k for k, v in params.items() if v is None and k not in optional]
        if missing:
            raise HardnegError(f"filter {name} needs " + ", ".join(f"--{k.replace('_', '-')}" for k in missing))
        stages.append({"name": name, **{k: v for k, v in params.items() if v is not None or k not in optional}})
    if len(stages) == 1:
        return make_filter(**stages[0])
    return make_filter("chain", stages=stages)


def cmd_mine(args) -> None:
    from mining.mine import check_settings, mine
    from mining.sources import build_rescorer, build_source, check_source_settings
    from retriever.dense import DEFAULT_CACHE_DIR
    from retriever.encoding import check_precision

    check_precision(args.encode_precision)
    check_settings(args.depth, args.num_negatives, args.sampling, args.shard_size)
    flt = _mining_filter(args)
    specs = args.retriever or ["bm25"]
    check_source_settings(specs, bm25_backend=args.bm25_backend, index=args.index, nprobe=args.nprobe,
                          ef_search=args.ef_search, rrf_k=args.rrf_k, cross_encoder=args.cross_encoder,
                          teacher=args.teacher)
    cache_dir = None if args.no_cache else (args.cache_dir or DEFAULT_CACHE_DIR)
    encode = _encode_options(args)
    rescorer = build_rescorer(cross_encoder=args.cross_encoder, teacher=args.teacher, cache_dir=cache_dir,
                              cross_encoder_batch_size=args.cross_encoder_batch_size, **encode)
    source = build_source(specs, bm25_backend=args.bm25_backend, index=args.index, nprobe=args.nprobe,
                          ef_search=args.ef_search, rrf_k=args.rrf_k, cache_dir=cache_dir, **encode)
    dataset = _dataset(args)
    result = mine(dataset, source, depth=args.depth, num_negatives=args.num_negatives, filter=flt,
                  anchor=args.anchor, sampling=args.sampling, seed=args.seed, output_dir=args.output,
                  config=_recorded(args), rescorer=rescorer, shard_size=args.shard_size,
                  show_progress=not args.quiet)
    print(f"mined {result.summary()}\nwrote {args.output}/pools.jsonl, pools.meta.json and pools.scores.png")


def cmd_train(args) -> None:
    from retriever.data import load_corpus_of, read_pools
    from retriever.encoding import check_precision
    from retriever.train import TrainConfig, train

    check_precision(args.encode_precision)
    config = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.train_batch_size,
                         learning_rate=args.lr, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                         loss=args.loss, temperature=args.temperature,
                         learnable_temperature=args.learnable_temperature, symmetric=args.symmetric,
                         mw_pairs=args.mw_pairs, mw_weight=args.mw_weight,
                         positives_per_query=args.positives_per_step, negatives_per_query=args.negatives_per_query,
                         max_length=args.max_length, pooling=args.pooling, query_prefix=args.query_prefix,
                         document_prefix=args.document_prefix, max_grad_norm=args.max_grad_norm,
                         cache_chunk=args.cache_chunk, precision=args.precision, save_steps=args.save_steps,
                         save_total_limit=args.save_total_limit, eval_steps=args.eval_steps, seed=args.seed)
    config.check()
    evaluator = None
    if args.eval_steps:
        evaluator = _dev_evaluator(args)
    corpus = load_corpus_of(args.data, args.corpus)
    pools_path = os.path.join(args.pools, "pools.jsonl") if os.path.isdir(args.pools) else args.pools
    pools = read_pools(pools_path, corpus)
    summary = train(pools, corpus, config, args.output, show_progress=not args.quiet,
                    provenance={pools_path: file_checksum(pools_path)}, resume=args.resume, evaluator=evaluator)
    from retriever import distributed

    if distributed.is_main():
        print(f"trained {summary['steps']} steps in {summary['seconds']}s (loss {summary['first_loss']} -> "
              f"{summary['final_loss']}); model saved to {args.output}")
        if summary["best_step"] is not None:
            print(f"best {args.dev_metric} on {args.dev_split}: {summary['best_dev']:.4f} at step "
                  f"{summary['best_step']}; saved to {os.path.join(args.output, 'best')}")
    distributed.cleanup()


def _dev_evaluator(args):
    """A dev-set scorer for keep-best (loaded now, so a bad split fails before training)."""
    from eval.evaluate import dev_evaluator
    from retriever.data import load_dataset

    dev = load_dataset(args.dev_data or args.data, args.dev_split,
                       corpus=None if args.dev_data else args.corpus)
    options = _encode_options(args)
    return dev_evaluator(dev, args.dev_metric, batch_size=options["batch_size"], precision=options["precision"])


def cmd_evaluate(args) -> None:
    from eval.evaluate import check_metrics, evaluate
    from eval.pipeline import format_metrics
    from eval.runs import read_run
    from retriever.encoding import check_precision

    check_precision(args.encode_precision)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    check_metrics(metrics, args.depth)
    if not args.run_file and not args.retriever:
        raise HardnegError("give --retriever (a model directory or name, or bm25) or --run-file")
    dataset = _dataset(args)
    options = {"metrics": metrics, "depth": args.depth, "output_dir": args.output, "config": _recorded(args),
               "relevance_level": args.relevance_level, "ignore_identical_ids": args.ignore_identical_ids,
               "auc_negatives": args.auc_negatives, "seed": args.seed, "plots": not args.no_plots,
               "show_progress": not args.quiet}
    if args.run_file:
        run = read_run(args.run_file, dataset.queries, extra_queries=args.extra_run_queries)
        record = evaluate(dataset, args.run_file, run=run, **options)
    else:
        record = evaluate(dataset, _retriever(args.retriever, args), **options)
    print(f"{record['dataset']}/{record['split']} ({record['queries']} queries), {record['retriever']}:")
    print(format_metrics(record["metrics"]))
    if args.output:
        print(f"wrote metrics.json, per_query.json, report.md and run.trec to {args.output}")


def cmd_compare(args) -> None:
    from eval.compare import compare, markdown_comparison
    from retriever.io import atomic_write, write_json

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    result = compare(args.evaluations, metrics=metrics, permutations=args.permutations, seed=args.seed)
    table = markdown_comparison(result, alpha=args.alpha)
    print(table, end="")
    if args.output:
        write_json(f"{args.output}.json" if not args.output.endswith(".json") else args.output, result)
        with atomic_write(args.output.removesuffix(".json") + ".md") as handle:
            handle.write(table)


def cmd_reproduce(args) -> int:
    from eval.reproduce import format_checks, reproduce

    outcome = reproduce(args.config, expected=args.expected, output_dir=args.output,
                        show_progress=not args.quiet)
    print(format_checks(outcome))
    return 0 if outcome["ok"] else 1


def cmd_export(args) -> None:
    from mining.export import export_pools
    from retriever.data import load_corpus_of, read_pools

    pools_path = os.path.join(args.pools, "pools.jsonl") if os.path.isdir(args.pools) else args.pools
    needs_corpus = args.format != "pools"
    if needs_corpus and not (args.data or args.corpus):
        raise HardnegError(f"--format {args.format} needs the corpus to resolve texts: give --data or --corpus")
    corpus = load_corpus_of(args.data, args.corpus) if (args.data or args.corpus) else None
    result = export_pools(read_pools(pools_path, corpus), corpus, args.output, args.format,
                          num_negatives=args.num_negatives, max_positives=args.max_positives)
    print(result.summary())


def cmd_run(args) -> None:
    from eval.pipeline import load_config, run_pipeline

    overrides = list(args.set or [])
    for key in ("output_dir", "seed", "model"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    config = load_config(args.config, overrides)
    run_pipeline(config, show_progress=not args.quiet)
    print(f"done: outputs in {config['output_dir']}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hardneg", description="Mine hard negatives, train dense retrievers, "
                                     "evaluate them on BEIR and MS MARCO.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mine", help="mine hard-negative pools for a split")
    _data_arguments(p, "train")
    _encoder_arguments(p)
    source = p.add_argument_group("candidate sources")
    source.add_argument("--retriever", action="append", help="bm25, bm25:rank-bm25, or a model directory/name; "
                        "repeat to fuse several with reciprocal-rank fusion, e.g. --retriever bm25 --retriever "
                        "all-MiniLM-L6-v2 (default: bm25)")
    source.add_argument("--bm25-backend", default="bm25s", choices=("bm25s", "rank-bm25"),
                        help="BM25 implementation; both use the same tokens (default: bm25s)")
    source.add_argument("--rrf-k", type=float, default=60.0, help="RRF constant when fusing (default: 60)")
    source.add_argument("--index", default="Flat", help="faiss index-factory string for dense search: Flat "
                        "(exact, default), IVF4096,Flat, HNSW32, IVF1024,PQ32 ...")
    source.add_argument("--nprobe", type=int, help="IVF: inverted lists visited per query")
    source.add_argument("--ef-search", type=int, help="HNSW: search breadth (efSearch)")
    source.add_argument("--cache-dir", help="corpus embeddings cache, keyed by "
                        "model and corpus checksum (default: $HARDNEG_CACHE_DIR or ~/.cache/hardneg/embeddings)")
    source.add_argument("--no-cache", action="store_true", help="do not read or write cached embeddings")
    source.add_argument("--cross-encoder", help="sentence-transformers CrossEncoder (path or name) that rescores "
                        "candidates and positives; the filters then use its scores")
    source.add_argument("--cross-encoder-batch-size", type=int, default=32)
    source.add_argument("--teacher", help="a bi-encoder (path or name) that scores candidates and positives "
                        "instead of the retriever, e.g. a larger model than the one you will train")
    p.add_argument("--depth", type=int, default=100, help="candidates retrieved per query (default: 100)")
    p.add_argument("--shard-size", type=int, default=10_000, help="queries per pools shard; an interrupted run "
                   "resumes after the last finished shard (default: 10000)")
    p.add_argument("--num-negatives", type=int, default=8, help="negatives kept per query (default: 8)")
    p.add_argument("--filter", default="topk-percpos", help="topk, topk-shifted, rank-window, topk-abs, "
                   "topk-marginpos, topk-percpos, or several joined by commas, e.g. topk-shifted,topk-percpos "
                   "(default: topk-percpos)")
    p.add_argument("--perc", type=float, default=0.95, help="topk-percpos: keep scores <= perc of the anchor")
    p.add_argument("--margin", type=float, help="topk-marginpos: keep scores <= anchor - margin")
    p.add_argument("--max-score", type=float, help="topk-abs: keep scores <= this")
    p.add_argument("--min-score", type=float, help="topk-abs: and >= this")
    p.add_argument("--shift", type=int, help="topk-shifted: skip this many best non-positive candidates")
    p.add_argument("--min-rank", type=int, default=1, help="rank-window: first rank kept (default: 1)")
    p.add_argument("--max-rank", type=int, help="rank-window: last rank kept (default: no limit)")
    p.add_argument("--anchor", default="min", choices=("min", "mean", "max"),
                   help="which positive score the filter compares with (default: the lowest)")
    p.add_argument("--sampling", default="top", choices=("top", "random"), help="take the best survivors or a "
                                                                                "seeded random sample")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", required=True, help="folder for pools.jsonl and pools.meta.json")
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("train", help="train a dual encoder on mined pools (torchrun for several GPUs/processes)")
    p.add_argument("--pools", required=True, help="pools.jsonl, or the folder holding it")
    p.add_argument("--data", help="dataset folder or bundled name whose corpus the pools refer to")
    p.add_argument("--corpus", help="or the corpus file itself")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="HF or sentence-transformers model name/directory")
    p.add_argument("--output", required=True, help="folder for the trained model, checkpoints/, best/ and logs")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-batch-size", type=int, default=32,
                   help="queries per step, all processes together (default: 32)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--positives-per-step", "--positives-per-query", dest="positives_per_step", type=int, default=1,
                   help="positives per query in each step, sampled per epoch (default: 1)")
    p.add_argument("--negatives-per-query", type=int, default=1, help="mined hard negatives per query per step")
    p.add_argument("--max-length", type=int, help="token limit for queries and documents (default: the model's)")
    p.add_argument("--pooling", choices=("mean", "cls"), help="default: the model's, else mean")
    p.add_argument("--query-prefix", help="text put before every query, e.g. 'query: '")
    p.add_argument("--document-prefix", help="text put before every document, e.g. 'passage: '")
    p.add_argument("--seed", type=int, default=42)
    group = p.add_argument_group("loss")
    group.add_argument("--loss", default="infonce", help="infonce, mw (Mann-Whitney/AUC) or decoupled "
                                                         "(decoupled softmax) (default: infonce)")
    group.add_argument("--temperature", type=float, default=0.05, help="(initial) temperature (default: 0.05)")
    group.add_argument("--learnable-temperature", action="store_true", help="train the temperature too")
    group.add_argument("--symmetric", action="store_true", help="infonce: add the document->query term")
    group.add_argument("--mw-pairs", default="query", choices=("query", "global"),
                       help="mw: pair positives with their query's negatives or with every negative of the batch")
    group.add_argument("--mw-weight", type=float, help="mw: train InfoNCE + this weight x MW instead of MW alone")
    group = p.add_argument_group("memory and speed")
    group.add_argument("--cache-chunk", type=int, help="gradient cache: encode this many texts per pass "
                                                       "(same gradients, memory of one chunk)")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="training autocast precision: auto (bf16 where the hardware runs it natively, else "
                            "fp32), fp32, bf16, fp16 (CUDA only, with a loss scaler) (default: auto)")
    group.add_argument("--batch-size", type=int, default=ENCODE_DEFAULTS["batch_size"],
                       help=f"encoding batch size of dev evaluations (default: {ENCODE_DEFAULTS['batch_size']})")
    group = p.add_argument_group("checkpoints and keep-best")
    group.add_argument("--save-steps", type=int, help="write a checkpoint every N steps (and at the end)")
    group.add_argument("--save-total-limit", type=int, help="keep only the last N checkpoints")
    group.add_argument("--resume", nargs="?", const="latest", help="continue from a checkpoint folder, or the "
                                                                    "latest one in --output (bare --resume)")
    group.add_argument("--eval-steps", type=int, help="score the dev split every N steps and at the end; the "
                                                      "best model is kept in OUTPUT/best")
    group.add_argument("--dev-data", help="dataset for --eval-steps (default: --data)")
    group.add_argument("--dev-split", default="dev", help="qrels split for --eval-steps (default: dev)")
    group.add_argument("--dev-metric", default="nDCG@10", help="metric that picks the best model (default: "
                                                               "nDCG@10)")
    _encoder_arguments(p, batching=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a model, BM25 or a run file on a split")
    _data_arguments(p, "test")
    _encoder_arguments(p)
    p.add_argument("--retriever", help="a model directory or name, or bm25 / bm25:rank-bm25")
    p.add_argument("--run-file", help="evaluate this TREC run instead of retrieving")
    p.add_argument("--extra-run-queries", choices=("error", "ignore"), default="error",
                   help="a run line naming a query outside the split: stop (default) or drop it")
    p.add_argument("--metrics", default="nDCG@10,Recall@100,MRR@10,MAP@100,P@10,AUC,AUC-pooled",
                   help="comma-separated: nDCG@k, Recall@k, P@k, MAP[@k], MRR[@k], AUC (retrieved list), "
                        "AUC-corpus (whole corpus, dense or bm25), AUC-pooled (across queries)")
    p.add_argument("--depth", type=int, default=1000, help="documents retrieved per query (default: 1000)")
    p.add_argument("--relevance-level", type=int, default=1,
                   help="lowest grade counted relevant by Recall, P, MAP, MRR, AUC (trec_eval -l; default 1)")
    identical = p.add_mutually_exclusive_group()
    identical.add_argument("--ignore-identical-ids", dest="ignore_identical_ids", action="store_true",
                           default=None, help="drop a hit whose id equals the query id (default: on for "
                                              "ArguAna and Quora only, as BEIR/MTEB)")
    identical.add_argument("--keep-identical-ids", dest="ignore_identical_ids", action="store_false")
    p.add_argument("--auc-negatives", type=int, default=100,
                   help="non-relevant documents sampled per query for AUC-pooled (default: 100)")
    p.add_argument("--seed", type=int, default=42, help="seed of the AUC-pooled sample (default: 42)")
    p.add_argument("--no-plots", action="store_true", help="do not write roc.png and score_histogram.png")
    p.add_argument("--output", help="folder for metrics.json, per_query.json, report.md, run.trec, plots")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write mined pools as a Hugging Face dataset, parquet, or "
                       "sentence-transformers triplets / n-tuples")
    p.add_argument("--pools", required=True, help="pools.jsonl, or the folder holding it")
    p.add_argument("--data", help="dataset folder or bundled name whose corpus the pools refer to")
    p.add_argument("--corpus", help="or the corpus file itself")
    p.add_argument("--format", default="pools", choices=("pools", "triplets", "ntuples"),
                   help="pools: one row per query with ids and scores; triplets: (anchor, positive, negative) "
                        "texts; ntuples: (anchor, positive, negative_1..n) texts (default: pools)")
    p.add_argument("--num-negatives", type=int, help="ntuples: negatives per row; queries with fewer are left "
                   "out (default: the most any pool has)")
    p.add_argument("--max-positives", type=int, help="triplets/ntuples: use at most this many positives per "
                   "query, in pool order (default: all)")
    p.add_argument("--output", required=True, help="a .parquet file, or a folder for datasets.save_to_disk")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="compare evaluations with paired significance tests per metric")
    p.add_argument("evaluations", nargs="+", help="two or more evaluation folders (or their per_query.json); "
                                                 "the first is the baseline")
    p.add_argument("--metrics", help="comma-separated subset (default: every metric they share)")
    p.add_argument("--permutations", type=int, default=10_000, help="sign flips of the randomization test")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--alpha", type=float, default=0.05, help="mark differences with p below this")
    p.add_argument("--output", help="also write OUTPUT.json and OUTPUT.md")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("reproduce", help="run a benchmark config and check it against the expected scores")
    p.add_argument("config", help="an evaluation config, e.g. configs/eval-nfcorpus-minilm.yaml")
    p.add_argument("--expected", help="expected-scores table (default: configs/expected_scores.yaml beside "
                                      "the config)")
    p.add_argument("--output", help="evaluation folder (default: the config's output_dir)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("run", help="evaluate, mine, train and evaluate again from one config file")
    p.add_argument("config", help="a YAML file, e.g. configs/nfcorpus-demo.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. "
                                                                      "train.epochs=2 (repeatable)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--model", help="override model")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except HardnegError as err:
        print(f"hardneg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hardneg: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
