"""The ``hardneg`` command. It only parses arguments and calls the public functions a Python user calls.

Every error a user can fix is a :class:`~retriever.io.HardnegError`, printed as one line
(``hardneg: error: ...``) with exit status 2; nothing is left half-written because every output is
written atomically and only after its inputs were read and checked.
"""

from __future__ import annotations

import argparse
import os
import sys

from retriever.io import HardnegError, file_checksum


def _data_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    group = parser.add_argument_group("data (a BEIR folder or bundled name, or explicit files)")
    group.add_argument("--data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/) or a bundled dataset "
                                      "name such as nfcorpus-demo")
    group.add_argument("--split", default=split, help=f"qrels split (default: {split})")
    group.add_argument("--corpus", help="corpus file: BEIR corpus.jsonl[.gz] or MS MARCO collection.tsv")
    group.add_argument("--queries", help="queries file: BEIR queries.jsonl or MS MARCO queries.*.tsv")
    group.add_argument("--qrels", help="qrels file: BEIR TSV, MS MARCO TSV or TREC 'qid 0 docid rel'")


def _encoder_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("encoder")
    group.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default: 64)")
    group.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: the model's)")


def _dataset(args):
    from retriever.data import load_dataset

    return load_dataset(args.data, args.split, corpus=args.corpus, queries=args.queries, qrels=args.qrels)


def _retriever(spec: str, args):
    from retriever.protocol import as_retriever

    options = {"batch_size": args.batch_size, "show_progress": not args.quiet}
    if args.max_length:
        options["max_length"] = args.max_length
    return as_retriever(spec, **options)


def _recorded(args) -> dict:
    """The command's arguments as recorded in its output's provenance."""
    return {"command": args.command} | {k: v for k, v in vars(args).items() if k not in ("func", "command")}


def cmd_mine(args) -> None:
    from mining.filters import make_filter
    from mining.mine import check_settings, mine

    check_settings(args.depth, args.num_negatives, args.sampling)
    params = {"topk": {}, "topk-percpos": {"perc": args.perc}, "topk-marginpos": {"margin": args.margin},
              "topk-abs": {"max_score": args.max_score, "min_score": args.min_score}}.get(args.filter, {})
    if any(value is None for key, value in params.items() if key != "min_score"):
        raise HardnegError(f"filter {args.filter} needs " + ", ".join(
            f"--{k.replace('_', '-')}" for k, v in params.items() if v is None and k != "min_score"))
    flt = make_filter(args.filter, **params)
    dataset = _dataset(args)
    result = mine(dataset, _retriever(args.retriever, args), depth=args.depth, num_negatives=args.num_negatives,
                  filter=flt, anchor=args.anchor, sampling=args.sampling, seed=args.seed, output_dir=args.output,
                  config=_recorded(args))
    print(f"mined {result.summary()}\nwrote {args.output}/pools.jsonl and pools.meta.json")


def cmd_train(args) -> None:
    from retriever.data import load_corpus_of, read_pools
    from retriever.train import TrainConfig, train

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
    from eval.evaluate import evaluate
    from retriever.data import load_dataset
    from retriever.dense import DenseRetriever

    dev = load_dataset(args.dev_data or args.data, args.dev_split,
                       corpus=None if args.dev_data else args.corpus)
    metric = args.dev_metric

    def score(model) -> float:
        retriever = DenseRetriever(model, batch_size=args.batch_size, show_progress=False)
        return evaluate(dev, retriever, metrics=(metric,), depth=max(100, _cut(metric)))["metrics"][metric]

    return score


def _cut(metric: str) -> int:
    from eval.metrics import parse_metric

    try:
        return parse_metric(metric)[1] or 1000
    except ValueError as err:
        raise HardnegError(str(err)) from None


def cmd_evaluate(args) -> None:
    from eval.evaluate import evaluate
    from eval.pipeline import format_metrics
    from eval.runs import read_run

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    dataset = _dataset(args)
    if args.run_file:
        record = evaluate(dataset, args.run_file, run=read_run(args.run_file), metrics=metrics, depth=args.depth,
                          output_dir=args.output, config=_recorded(args))
    else:
        if not args.retriever:
            raise HardnegError("give --retriever (a model directory or name, or bm25) or --run-file")
        record = evaluate(dataset, _retriever(args.retriever, args), metrics=metrics, depth=args.depth,
                          output_dir=args.output, config=_recorded(args))
    print(f"{record['dataset']}/{record['split']} ({record['queries']} queries), {record['retriever']}:")
    print(format_metrics(record["metrics"]))
    if args.output:
        print(f"wrote {args.output}/metrics.json and {args.output}/run.trec")


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
    parser = argparse.ArgumentParser(prog="hardneg", description="Mine hard negatives, train dense retrievers, "
                                     "evaluate them on BEIR and MS MARCO.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mine", help="mine hard-negative pools for a split")
    _data_arguments(p, "train")
    _encoder_arguments(p)
    p.add_argument("--retriever", default="bm25", help="bm25, bm25:rank-bm25, or a model directory/name "
                                                        "(default: bm25)")
    p.add_argument("--depth", type=int, default=100, help="candidates retrieved per query (default: 100)")
    p.add_argument("--num-negatives", type=int, default=8, help="negatives kept per query (default: 8)")
    p.add_argument("--filter", default="topk-percpos", help="topk, topk-abs, topk-marginpos, topk-percpos "
                                                            "(default: topk-percpos)")
    p.add_argument("--perc", type=float, default=0.95, help="topk-percpos: keep scores <= perc of the anchor")
    p.add_argument("--margin", type=float, help="topk-marginpos: keep scores <= anchor - margin")
    p.add_argument("--max-score", type=float, help="topk-abs: keep scores <= this")
    p.add_argument("--min-score", type=float, help="topk-abs: and >= this")
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
    group.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                       help="autocast precision (fp16: CUDA only, with a loss scaler)")
    group.add_argument("--batch-size", type=int, default=64, help="encoding batch size of dev evaluations")
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a model, BM25 or a run file on a split")
    _data_arguments(p, "test")
    _encoder_arguments(p)
    p.add_argument("--retriever", help="a model directory or name, or bm25 / bm25:rank-bm25")
    p.add_argument("--run-file", help="evaluate this TREC run instead of retrieving")
    p.add_argument("--metrics", default="nDCG@10,Recall@100,MRR@10,AUC")
    p.add_argument("--depth", type=int, default=1000, help="documents retrieved per query (default: 1000)")
    p.add_argument("--output", help="folder for metrics.json and run.trec")
    p.set_defaults(func=cmd_evaluate)

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
        args.func(args)
    except HardnegError as err:
        print(f"hardneg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hardneg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
