"""The ``hardneg`` command. It only parses arguments and calls the public functions a Python user calls.

Every error a user can fix is a :class:`~retriever.io.HardnegError`, printed as one line
(``hardneg: error: ...``) with exit status 2; nothing is left half-written because every output is
written atomically and only after its inputs were read and checked.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import signal
import sys
import threading
from pathlib import Path

from eval.settings import EvaluateSettings
from mining.settings import MineSettings
from retriever.encoding import EncodeSettings
from retriever.io import HardnegError, check_output_folder, file_checksum, last_line
from retriever.settings import HelpFormatter, add_arguments, from_arguments
from retriever.train_settings import TrainConfig


class _Parser(argparse.ArgumentParser):
    """argparse with the house's error format (one line, ``hardneg ...: error: ...``, exit status 2) and every
    default shown in ``--help``; sub-command parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Once(argparse.Action):
    """A flag that takes one value: given twice, it is an error (argparse would keep the last silently)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice; this command takes one"
                         + (" (evaluate takes several --data)" if option_string == "--data" else ""))
        setattr(namespace, self.dest, values)


def _data_arguments(parser: argparse.ArgumentParser, split: str, *, several: bool = False) -> None:
    group = parser.add_argument_group("data (a BEIR folder or bundled name, or explicit files)")
    group.add_argument("--data", action="append" if several else _Once,
                       help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/), a bundled dataset name such as "
                            "nfcorpus-demo, or beir:NAME (downloaded once, md5-checked)"
                            + ("; repeat it to evaluate on several datasets (a folder each and a summary table)"
                               if several else ""))
    group.add_argument("--split", default=split, help=f"qrels split (default: {split})")
    group.add_argument("--corpus", help="corpus file: BEIR corpus.jsonl[.gz] or MS MARCO collection.tsv")
    group.add_argument("--queries", help="queries file: BEIR queries.jsonl or MS MARCO queries.*.tsv")
    group.add_argument("--qrels", help="qrels file: BEIR TSV, MS MARCO TSV or TREC 'qid 0 docid rel'")


def _encoder_arguments(parser: argparse.ArgumentParser, *, aliases: bool = True) -> None:
    """The ``encode:`` settings as ``--encode-*`` flags; ``aliases`` adds the short ``--batch-size`` and
    ``--max-length`` where the command has no training settings of those names (mine, evaluate)."""
    short = {"batch_size": ("--batch-size",), "max_length": ("--max-length",)} if aliases else None
    add_arguments(parser.add_argument_group("encoding (the encode: section of a config)"), EncodeSettings,
                  prefix="encode", aliases=short)


def _encode_options(args) -> dict:
    """The CLI's encoding flags as the options a model loader takes; says which precision will run."""
    from retriever.encoding import default_device, describe_precision, encode_options

    settings = from_arguments(EncodeSettings, args, prefix="encode")
    options = encode_options(dataclasses.asdict(settings), show_progress=not args.quiet)
    note = describe_precision(options["precision"], default_device())
    if not args.quiet:
        print(f"hardneg: {note}", file=sys.stderr)
    return options


def _dataset(args):
    from retriever.data import load_dataset

    return load_dataset(args.data, args.split, corpus=args.corpus, queries=args.queries, qrels=args.qrels)


def _retriever(spec: str, args):
    from retriever.factory import as_retriever

    options = _encode_options(args) if not spec.lower().startswith("bm25") else {"show_progress": not args.quiet}
    return as_retriever(spec, **options)


def _recorded(args) -> dict:
    """The command's arguments as recorded in its output's provenance."""
    return {"command": args.command} | {k: v for k, v in vars(args).items() if k not in ("func", "command")}


def cmd_mine(args) -> None:
    from mining.mine import mine
    from mining.sources import build_rescorer, build_source
    from retriever.encoding import check_precision

    check_precision(args.encode_precision)
    settings = from_arguments(MineSettings, args)
    settings.check()
    check_output_folder(args.output, "--output")
    encode = _encode_options(args)
    source = build_source(settings.retriever, bm25_backend=settings.bm25_backend, index=settings.index,
                          nprobe=settings.nprobe, ef_search=settings.ef_search, rrf_k=settings.rrf_k, **encode)
    rescorer = build_rescorer(cross_encoder=settings.cross_encoder, teacher=settings.teacher,
                              cross_encoder_batch_size=settings.cross_encoder_batch_size,
                              fuse_bm25=settings.fuse_bm25, source=source, bm25_backend=settings.bm25_backend,
                              **encode)
    dataset = _dataset(args)
    result = mine(dataset, source, depth=settings.depth, num_negatives=settings.num_negatives,
                  filter=settings.build_filter(), anchor=settings.anchor, anchor_fallback=settings.anchor_fallback,
                  sampling=settings.sampling, seed=settings.seed, output_dir=args.output, config=_recorded(args),
                  rescorer=rescorer, shard_size=settings.shard_size, show_progress=not args.quiet)
    print(f"mined {result.summary()}\nwrote {args.output}/pools.jsonl, pools.meta.json and pools.scores.png")


def cmd_encode(args) -> None:
    from retriever.data import load_corpus_of, load_dataset, load_queries_of
    from retriever.dense import DenseRetriever
    from retriever.embedding_table import check_table_folder, encode_embedding_table
    from retriever.encoding import check_precision
    from retriever.factory import as_retriever

    check_precision(args.encode_precision)
    if not (args.data or (args.corpus and args.queries)):
        raise HardnegError("give a dataset folder (--data) or both --corpus and --queries")
    check_output_folder(args.output, "--output")
    check_table_folder(args.output)  # it is swapped whole: never over a folder of other files
    if args.split and not args.data:
        raise HardnegError("--split reads the qrels of a dataset folder: give --data")
    if args.split:  # the queries judged in these splits only
        splits = [load_dataset(args.data, split.strip(), corpus=args.corpus, queries=args.queries)
                  for split in args.split.split(",") if split.strip()]
        corpus, queries = splits[0].corpus, {q: t for data in splits for q, t in data.queries.items()}
    else:  # every query of the queries file
        corpus, queries = load_corpus_of(args.data, args.corpus), load_queries_of(args.data, args.queries)
    retriever = as_retriever(args.model, **_encode_options(args))
    if not isinstance(retriever, DenseRetriever):
        raise HardnegError(f"--model {args.model}: not a dense model (BM25 has no embeddings to write)")
    folder = encode_embedding_table(retriever, corpus, queries, args.output, name=args.model, dtype=args.dtype)
    print(f"wrote the embeddings of {len(corpus):,} documents and {len(queries):,} queries to {folder}: use it "
          f"as --teacher {folder} (mine.teacher) or --retriever {folder}")


def cmd_train(args) -> None:
    from mining.export import is_exported_pools, load_pools
    from retriever.data import load_corpus_of, pools_file, pools_scorer, read_pools_meta
    from retriever.encoding import check_precision
    from retriever.mixture import mix
    from retriever.train import MODEL_DIR, TrainConfig, check_resume, train

    check_precision(args.encode_precision)
    config = from_arguments(TrainConfig, args)
    config.check()
    if args.resume:  # before the corpus and pools are read; training checks the pools and the model too
        check_resume(args.output, args.resume, config)
    if config.dev_fraction and (args.dev_split or args.dev_data):
        raise HardnegError("--dev-fraction selects on held-out training queries, --dev-split/--dev-data on another "
                           "dev set: give one or the other")
    args.dev_split = args.dev_split or DEFAULT_DEV_SPLIT
    check_output_folder(args.output, "--output")
    several = len(args.pools) > 1
    if several:
        if args.corpus or not args.data or len(args.data) != len(args.pools):
            raise HardnegError("training on several datasets takes one --data per --pools, in the same order "
                               f"(got {len(args.pools)} --pools and {len(args.data or [])} --data; no --corpus)")
        if config.remine_every:
            raise HardnegError("--remine-every re-mines one dataset; train on several without it")
        if config.scores_on_dev and not config.dev_fraction:
            raise HardnegError("on several datasets, select with --dev-fraction (held-out training queries of "
                               "each dataset); --dev-split/--dev-data name one dataset")
    elif args.data is not None and len(args.data) > 1:
        raise HardnegError("give one --pools per --data (several datasets train from their own pools)")
    paths = []
    for pools_arg in args.pools:
        exported = is_exported_pools(pools_arg)  # a --format pools export (datasets folder or parquet)
        path = Path(pools_arg) if exported else pools_file(pools_arg)
        if config.distills and not exported and pools_scorer(path) is None:
            raise HardnegError(f"{path}: distillation needs pools mined with a teacher or cross-encoder (their "
                               "scores are the soft labels); these carry the retriever's own scores. Mine with "
                               "--teacher MODEL, --cross-encoder MODEL or --fuse-bm25 W")
        mined = None if exported else ((read_pools_meta(path) or {}).get("settings") or {}).get("num_negatives")
        if isinstance(mined, int) and mined < config.negatives_per_query:
            raise HardnegError(f"{path}: mined with num_negatives {mined}, fewer than --negatives-per-query "
                               f"{config.negatives_per_query}, so no step could use that many; lower "
                               "--negatives-per-query or mine more")
        if config.distills and exported and not args.quiet:
            print(f"hardneg: note: {path} is an export, which does not record what scored its pools; its scores "
                  "are distilled as the teacher's (export pools mined with --teacher, --cross-encoder or "
                  "--fuse-bm25)", file=sys.stderr)
        paths.append((path, exported))
    mine_settings = teacher_settings = None
    batch_teacher = config.distills and config.distill_scope == "batch"
    if config.remine_every or batch_teacher:
        from mining.remine import check_batch_teacher, recorded_mine_settings

        if several and batch_teacher:
            raise HardnegError("--distill-scope batch rebuilds one dataset's teacher; on several datasets use the "
                               "pools' scores (--distill-scope pools)")
        # refused here, before the corpus is read
        if config.remine_every:
            mine_settings = recorded_mine_settings(paths[0][0], config.model)
        if batch_teacher:
            teacher_settings = recorded_mine_settings(paths[0][0], config.model, as_mined=True)
            check_batch_teacher(teacher_settings, remine_every=config.remine_every)
    parts, metas, evaluators, provenance = {}, [], [], {}
    for (path, exported), data in zip(paths, args.data or [None]):
        corpus = load_corpus_of(data, args.corpus)
        pools = load_pools(path, corpus, allow_corpus_mismatch=args.allow_corpus_mismatch)
        meta = None if exported else read_pools_meta(path)
        name = _dataset_name(meta, data, path, taken=parts)
        if config.dev_fraction:
            pools, evaluator = _held_out_evaluator(pools, corpus, config, args, name)
            evaluators.append(evaluator)
        parts[name] = (pools, corpus)
        metas.append(meta or {"dataset": name})
        provenance |= {str(f): file_checksum(f) for f in ([path] if path.is_file() else sorted(path.glob("*.arrow")))}
    pools, corpus, groups = mix(parts)
    evaluator = _mean_evaluator(evaluators, args.dev_metric) if evaluators else None
    if evaluator is None and config.scores_on_dev:
        evaluator = _dev_evaluator(args, config)
    remine = teacher = None
    if config.remine_every:
        from mining.remine import remining_for_pools

        remine = remining_for_pools(pools, corpus, mine_settings, args.output, encode=_encode_options(args),
                                    echo=lambda line: print(f"hardneg: {line}", file=sys.stderr),
                                    config=_recorded(args))
    if batch_teacher:
        from mining.remine import recorded_teacher

        teacher = recorded_teacher(teacher_settings, **_encode_options(args))
    if several and not args.quiet:
        print("hardneg: training on " + ", ".join(f"{n} ({len(p)} queries)" for n, (p, _) in parts.items())
              + "; each batch from one dataset", file=sys.stderr)
    summary = train(pools, corpus, config, args.output, show_progress=not args.quiet, provenance=provenance,
                    resume=args.resume, evaluator=evaluator, remine=remine, teacher=teacher,
                    pools_meta=metas if several else metas[0], groups=groups if several else None).summary
    from retriever import distributed

    if distributed.is_main():
        model_dir = os.path.join(args.output, MODEL_DIR)
        print(f"trained {summary['steps']} steps in {summary['seconds']}s (loss {summary['first_loss']} -> "
              f"{summary['final_loss']}); model (with its README.md card) in {model_dir}, logs in "
              f"{os.path.join(args.output, 'logs')}")
        if summary["best_step"] is not None:
            where = "held-out training queries" if config.dev_fraction else args.dev_split
            print(f"best {args.dev_metric} on {where}: {summary['best_dev']:.4f} at step "
                  f"{summary['best_step']}: the model in {model_dir}")
    distributed.cleanup()


def _dev_evaluator(args, config):
    """A dev-set scorer for keep-best (loaded now, so a bad split fails before training)."""
    from eval.evaluate import dev_evaluator
    from retriever.data import load_dataset

    try:
        dev = load_dataset(args.dev_data or (args.data[0] if args.data else None), args.dev_split,
                           corpus=None if args.dev_data else args.corpus)
    except HardnegError as err:
        raise HardnegError(f"{err}; or hold out training queries to select on with --dev-fraction 0.1") from None
    options = _encode_options(args)
    evaluator = dev_evaluator(dev, args.dev_metric, batch_size=options["batch_size"], precision=options["precision"],
                              corpus_size=config.dev_corpus_size, seed=config.seed)
    if evaluator.subset_note and not args.quiet:
        print(f"hardneg: selecting on {dev.name}/{dev.split}, {evaluator.subset_note}", file=sys.stderr)
    return evaluator


def _held_out_evaluator(pools, corpus, config, args, name: str):
    """``--dev-fraction``: the training pools without the held-out queries, and a scorer on those queries."""
    from eval.evaluate import dev_evaluator
    from retriever.data import hold_out, mined_negatives, pools_dataset

    kept, held = hold_out(pools, config.dev_fraction, config.seed)
    options = _encode_options(args)
    evaluator = dev_evaluator(pools_dataset(held, corpus), args.dev_metric, batch_size=options["batch_size"],
                              precision=options["precision"], corpus_size=config.dev_corpus_size,
                              distractors=mined_negatives(held), seed=config.seed)
    if not args.quiet:
        subset = f", {evaluator.subset_note}" if evaluator.subset_note else ""
        print(f"hardneg: selecting on {len(held)} held-out training queries of {name} ({len(kept)} train){subset}",
              file=sys.stderr)
    return kept, evaluator


def _mean_evaluator(evaluators: list, metric: str):
    """One dev score for several datasets: the mean of each dataset's held-out score (as the mean row of a
    BEIR table), so selection does not favour the dataset with the most queries."""
    if len(evaluators) == 1:
        return evaluators[0]

    def score(model) -> float:
        return sum(evaluator(model) for evaluator in evaluators) / len(evaluators)

    score.metric = f"mean {metric}"
    return score


def _dataset_name(meta: dict | None, data: str | None, path: Path, *, taken) -> str:
    """A dataset's name in a mixture: the one its mining recorded, else its folder's; numbered when repeated."""
    name = (meta or {}).get("dataset") or (Path(data).name if data else path.stem)
    unique, number = name, 2
    while unique in taken:
        unique, number = f"{name}-{number}", number + 1
    return unique


def cmd_evaluate(args) -> None:
    from eval.evaluate import evaluate
    from eval.runs import read_run
    from hardneg.pipeline import format_metrics
    from retriever.data import load_dataset
    from retriever.embedding_table import check_tables
    from retriever.encoding import check_precision

    check_precision(args.encode_precision)
    settings = from_arguments(EvaluateSettings, args)
    settings.check()
    if not args.run_file and not args.retriever:
        raise HardnegError("give --retriever (a model directory or name, or bm25) or --run-file")
    several = args.data is not None and len(args.data) > 1
    if several and args.run_file:
        raise HardnegError("--run-file scores one dataset; give one --data with it")
    if several and (args.corpus or args.queries or args.qrels):
        raise HardnegError("--corpus/--queries/--qrels replace the files of one dataset; give one --data with them")
    datasets = [load_dataset(data, args.split, corpus=args.corpus, queries=args.queries, qrels=args.qrels)
                for data in (args.data or [None])]  # every dataset read before any is scored
    for dataset in datasets if args.retriever else ():  # a table of embeddings must cover every one of them
        check_tables(args.retriever, dataset.corpus, dataset.queries)
    output = args.output or default_evaluation_folder(args.run_file or args.retriever, datasets)
    check_output_folder(output, "--output")
    options = settings.options() | {"output_dir": output, "config": _recorded(args), "plots": not args.no_plots,
                                    "show_progress": not args.quiet}
    if several:
        from eval.suite import SUMMARY_MD, evaluate_datasets

        suite = evaluate_datasets(datasets, _retriever(args.retriever, args), **options)
        print(f"{suite.retriever} on {len(datasets)} datasets ({args.split}):")
        print(suite.table(), end="")
        print(f"wrote a folder per dataset, {SUMMARY_MD} and summary.json to {output}")
        return
    dataset = datasets[0]
    if args.run_file:
        run = read_run(args.run_file, dataset.queries, extra_queries=args.extra_run_queries)
        record = evaluate(dataset, args.run_file, run=run, **options)
    else:
        record = evaluate(dataset, _retriever(args.retriever, args), **options)
    print(f"{record['dataset']}/{record['split']} ({record['queries']} queries), {record['retriever']}:")
    print(format_metrics(record["metrics"]))
    print(f"wrote metrics.json, per_query.json, report.md and run.trec to {output}")


DEFAULT_EVALUATION_ROOT = "runs/evaluate"
DEFAULT_DEV_SPLIT = "dev"  # hardneg train --dev-split


def default_evaluation_folder(what: str, datasets: list) -> str:
    """Where ``evaluate`` writes without ``--output``: ``runs/evaluate/<retriever>/<dataset>-<split>``, or
    ``runs/evaluate/<retriever>/<split>`` for several datasets (a folder each inside)."""
    name = Path(what).name if Path(what).exists() else what
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).stem if Path(what).is_file() else name).strip("-.") or "run"
    leaf = datasets[0].split if len(datasets) > 1 else f"{datasets[0].name}-{datasets[0].split}"
    return str(Path(DEFAULT_EVALUATION_ROOT) / name / leaf)


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
    from hardneg.reproduce import format_checks, reproduce

    outcome = reproduce(args.config, expected=args.expected, output_dir=args.output,
                        show_progress=not args.quiet)
    print(format_checks(outcome))
    return 0 if outcome["ok"] else 1


def cmd_export(args) -> None:
    from mining.export import container_of, export_pools
    from retriever.data import load_corpus_of, pools_file, read_pools

    container_of(args.output)  # a suffix hardneg cannot write fails before the corpus is read
    pools_path = pools_file(args.pools)
    needs_corpus = args.format != "pools"
    if needs_corpus and not (args.data or args.corpus):
        raise HardnegError(f"--format {args.format} needs the corpus to resolve texts: give --data or --corpus")
    corpus = load_corpus_of(args.data, args.corpus) if (args.data or args.corpus) else None
    pools = read_pools(pools_path, corpus, allow_corpus_mismatch=args.allow_corpus_mismatch)
    result = export_pools(pools, corpus, args.output, args.format,
                          num_negatives=args.num_negatives, max_positives=args.max_positives)
    print(result.summary())


def cmd_run(args) -> None:
    from hardneg.pipeline import load_config, run_pipeline

    overrides, flags = list(args.set or []), {}
    for key in ("output_dir", "seed", "model"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
            flags[key] = "--" + key.replace("_", "-")
    config = load_config(args.config, overrides, flags=flags)
    run_pipeline(config, show_progress=not args.quiet)
    print(f"done: outputs in {config['output_dir']}")


def _allow_corpus_mismatch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-corpus-mismatch", action="store_true",
                        help="use the pools although pools.meta.json says they were mined on another corpus (other "
                             "ids or texts)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hardneg", description="Mine hard negatives, train dense retrievers, "
                                     "evaluate them on BEIR and MS MARCO.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mine", help="mine hard-negative pools for a split")
    _data_arguments(p, "train")
    _encoder_arguments(p)
    add_arguments(p.add_argument_group("mining (the mine: section of a config)"), MineSettings)
    p.add_argument("--output", required=True, help="folder for pools.jsonl and pools.meta.json")
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("encode", help="write a model's embeddings of a corpus and its queries, to use as a teacher "
                       "(--teacher FOLDER) or retriever where the model cannot run")
    p.add_argument("--model", required=True, help="the model to encode with (a folder or a hub name)")
    group = p.add_argument_group("data (a BEIR folder or bundled name, or explicit files)")
    group.add_argument("--data", action=_Once, help="BEIR folder, bundled dataset name, or beir:NAME")
    group.add_argument("--split", help="only the queries judged in these qrels splits, comma-separated (default: "
                                       "every query of the queries file)")
    group.add_argument("--corpus", help="corpus file: BEIR corpus.jsonl[.gz] or MS MARCO collection.tsv")
    group.add_argument("--queries", help="queries file: BEIR queries.jsonl or MS MARCO queries.*.tsv")
    _encoder_arguments(p)
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="how the vectors are stored: float16 halves the folder, scores then agree with the model's "
                        "to about 1e-3 (default: float32)")
    p.add_argument("--output", required=True, help="folder for embeddings.json, corpus.npy, queries.npy and their "
                                                  "ids")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("train", help="train a dual encoder on mined pools (torchrun for several GPUs/processes)")
    p.add_argument("--pools", required=True, action="append",
                   help="pools.jsonl, the folder holding it, or a --format pools export; repeat it with one --data "
                        "each to train on several datasets (each batch from one dataset)")
    p.add_argument("--data", action="append", help="dataset folder or bundled name whose corpus the pools refer to")
    p.add_argument("--corpus", help="or the corpus file itself")
    _allow_corpus_mismatch(p)
    p.add_argument("--output", required=True, help="run folder: the trained model (with its model card) in "
                                                  "OUTPUT/model; logs/, checkpoints/, training_config.json beside it")
    add_arguments(p.add_argument_group("training (the train: section of a config)"), TrainConfig)
    group = p.add_argument_group("checkpoints and model selection")
    group.add_argument("--resume", nargs="?", const="latest", help="continue from a checkpoint folder, or the "
                                                                    "latest one in --output (bare --resume)")
    group.add_argument("--dev-data", help="dataset to select on (default: --data); a dev split, or --dev-fraction "
                                          "to hold out training queries instead")
    group.add_argument("--dev-split", help=f"qrels split that --eval-steps / --patience score (default: "
                                           f"{DEFAULT_DEV_SPLIT})")
    group.add_argument("--dev-metric", default="nDCG@10", help="metric that picks the best model (default: "
                                                               "nDCG@10)")
    _encoder_arguments(p, aliases=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a model, BM25 or a run file on a split")
    _data_arguments(p, "test", several=True)
    _encoder_arguments(p)
    p.add_argument("--retriever", help="a model directory or name, or bm25 / bm25:rank-bm25")
    p.add_argument("--run-file", help="evaluate this TREC run instead of retrieving")
    p.add_argument("--extra-run-queries", choices=("error", "ignore"), default="error",
                   help="a run line naming a query outside the split: stop (default) or drop it")
    add_arguments(p, EvaluateSettings)
    p.add_argument("--keep-identical-ids", dest="ignore_identical_ids", action="store_false", default=None,
                   help="the same as --no-ignore-identical-ids")
    p.add_argument("--no-plots", action="store_true", help="do not write roc.png and score_histogram.png")
    p.add_argument("--output", help="folder for metrics.json, per_query.json, report.md, run.trec, plots; with "
                                    "several --data, a folder per dataset and summary.md/summary.json "
                                    f"(default: {DEFAULT_EVALUATION_ROOT}/RETRIEVER/..., printed)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write mined pools as a Hugging Face dataset, parquet, or "
                       "sentence-transformers triplets / n-tuples")
    p.add_argument("--pools", required=True, action=_Once, help="pools.jsonl, or the folder holding it")
    p.add_argument("--data", action=_Once, help="dataset folder or bundled name whose corpus the pools refer to")
    p.add_argument("--corpus", help="or the corpus file itself")
    p.add_argument("--format", default="pools", choices=("pools", "triplets", "ntuples"),
                   help="pools: one row per query with ids and scores; triplets: (anchor, positive, negative) "
                        "texts; ntuples: (anchor, positive, negative_1..n) texts (default: pools)")
    p.add_argument("--num-negatives", type=int, help="ntuples: negatives per row; queries with fewer are left "
                   "out (default: the most any pool has)")
    p.add_argument("--max-positives", type=int, help="triplets/ntuples: use at most this many positives per "
                   "query, in pool order (default: all)")
    _allow_corpus_mismatch(p)
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
    for command in sub.choices.values():  # `hardneg mine --quiet ...` as well as `hardneg --quiet mine ...`
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars (also accepted before the command)")
    return parser


SHARDED_COMMANDS = ("mine", "evaluate", "encode")  # split their corpus encode and search over torchrun's processes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ranked = _join_process_group(args)
    if args.quiet:
        _silence_progress_bars()
    previous = _stop_on_sigterm()
    who = f"rank {ranked.rank()}: " if ranked else ""
    try:
        with contextlib.redirect_stdout(io.StringIO()) if ranked and not ranked.is_main() else \
                contextlib.nullcontext():
            code = args.func(args)
    except HardnegError as err:
        print(f"hardneg: {who}error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if not (ranked and _lost_rank(err)):
            raise
        print(f"hardneg: {who}error: another process of the job stopped ({last_line(err)}); its own message says "
              "why. Run the same command again: the corpus rows already encoded are reused from the cache, and "
              "finished mining shards are kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hardneg: interrupted; outputs are whole or absent, and --resume (train) or the same command "
              "(mine, run) continues from the last checkpoint or shard", file=sys.stderr)
        return 130
    except OSError as err:  # the machine, not the input: disk full, a folder removed under the run, ...
        where = f": {err.filename}" if err.filename else ""
        print(f"hardneg: error: {err.strerror or err}{where} (rerun once it is fixed: finished mining shards and "
              "checkpoints are reused)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if ranked:
            ranked.cleanup()
    return code or 0


def _join_process_group(args):
    """Under torchrun (``WORLD_SIZE`` > 1), join the job's process group for a command that shards its corpus
    work, and return :mod:`retriever.distributed`; otherwise None. Ranks other than 0 show no progress and print
    nothing to stdout: rank 0 reports and writes for the job."""
    if args.command not in SHARDED_COMMANDS or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from retriever import distributed

    distributed.init_from_env()
    if not distributed.is_main():
        args.quiet = True
    return distributed


def _lost_rank(err: RuntimeError) -> bool:
    """Whether a collective failed because another rank is gone (gloo: its connection closed; gloo or nccl: the
    wait timed out), rather than a bug of this rank, which keeps its traceback."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out"))


def _silence_progress_bars() -> None:
    """``--quiet`` covers the libraries' bars too (transformers' weight loading, the hub's downloads)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub / transformers are imported
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()


def _stop_on_sigterm():
    """SIGTERM (a scheduler's or torchrun's stop) ends the command as Ctrl-C does: temporary files removed,
    finished checkpoints kept, exit status 130. Returns the handler it replaced (None off the main thread)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
