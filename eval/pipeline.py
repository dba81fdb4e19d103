"""``hardneg run CONFIG.yaml``: evaluate the base model, mine, train, evaluate the trained model.

A config is one YAML file (see ``configs/``); ``--set section.key=value`` overrides any key. Every
key is checked before any work starts, so a typo fails in a second, not after an hour of mining.
The output folder gets ``config.yaml`` (the resolved config) and ``run.json`` (seed, library
versions, input checksums, the metrics before and after).

This module lives in ``eval`` because it is the one place that sees all three stages: imports run
retriever <- mining <- eval.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import yaml

from eval.evaluate import check_metrics, dev_evaluator, evaluate
from eval.metrics import DEFAULT_METRICS
from mining.filters import make_filter
from mining.mine import POOLS_FILE, check_settings, mine
from mining.sources import build_rescorer, build_source, check_source_settings
from retriever.data import Dataset, load_dataset, read_pools
from retriever.encoder import default_device
from retriever.encoding import ENCODE_DEFAULTS, describe_precision, encode_options
from retriever.io import HardnegError, atomic_write, file_checksum, library_versions, write_json
from retriever.protocol import as_retriever, describe
from retriever.train import BEST_DIR, TrainConfig, train

DEFAULTS: dict = {
    "name": "run",
    "seed": 42,
    "output_dir": "runs/run",
    "model": "all-MiniLM-L6-v2",
    "data": {"path": None, "corpus": None, "queries": None, "qrels": None},
    "encode": dict(ENCODE_DEFAULTS),
    "mine": {"split": "train", "retriever": "bm25", "depth": 100, "num_negatives": 8,
             "filter": "topk-percpos", "filter_params": {"perc": 0.95}, "anchor": "min", "sampling": "top",
             "bm25_backend": "bm25s", "index": "Flat", "nprobe": None, "ef_search": None, "rrf_k": 60,
             "cross_encoder": None, "teacher": None, "cache_dir": None, "shard_size": 10_000},
    "train": {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in ("model", "seed")}
    | {"resume": None, "dev_metric": "nDCG@10"},
    "evaluate": {"split": "test", "metrics": list(DEFAULT_METRICS), "depth": 1000, "before": True,
                 "relevance_level": 1, "ignore_identical_ids": None, "auc_negatives": 100},
}


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a config, apply ``key.sub=value`` overrides, fill defaults, and reject unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise HardnegError(f"config file '{path}' not found")
    try:
        given = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise HardnegError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(given, dict):
        raise HardnegError(f"{path}: expected a mapping of settings at the top level")
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep:
            raise HardnegError(f"--set {override!r}: expected key=value, e.g. train.epochs=2")
        target = given
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(value)
    return _merge(DEFAULTS, given, str(path), "")


def _merge(defaults: dict, given: dict, source: str, prefix: str) -> dict:
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise HardnegError(f"{source}: unknown setting '{prefix}{key}'; known: {', '.join(defaults)}")
        if isinstance(defaults[key], dict) and key != "filter_params":
            if not isinstance(value, dict):
                raise HardnegError(f"{source}: '{prefix}{key}' must be a mapping")
            merged[key] = _merge(defaults[key], value, source, f"{prefix}{key}.")
        else:
            merged[key] = value
    return merged


def _splits(config: dict) -> list[str]:
    splits = config["evaluate"]["split"]
    splits = [splits] if isinstance(splits, str) else list(splits)
    if not splits or not all(isinstance(split, str) for split in splits):
        raise HardnegError("config: evaluate.split must be a split name or a list of them, e.g. [dev, test]")
    return splits


def _datasets(config: dict) -> tuple[Dataset, list[Dataset]]:
    data = config["data"]
    if not (data["path"] or (data["corpus"] and data["queries"])):
        raise HardnegError("config: set data.path (a BEIR folder or bundled name) or data.corpus/queries/qrels")
    files = {"corpus": data["corpus"], "queries": data["queries"], "qrels": data["qrels"]}
    mine_split = load_dataset(data["path"], config["mine"]["split"], **files)
    eval_splits = [load_dataset(data["path"], split, **files) for split in _splits(config)]
    for dataset in eval_splits:
        dataset.corpus = mine_split.corpus  # one corpus object, so dense embeddings are computed once per model
    return mine_split, eval_splits


def _evaluate_all(splits: list[Dataset], retriever, config: dict, output: Path, echo, label: str) -> dict:
    """Evaluate on every split (``output/<split>/``); the corpus is encoded once for all of them."""
    evaluation = config["evaluate"]
    results = {}
    for dataset in splits:
        results[dataset.split] = evaluate(dataset, retriever, metrics=tuple(evaluation["metrics"]),
                                          depth=evaluation["depth"], output_dir=output / dataset.split,
                                          config=config, relevance_level=evaluation["relevance_level"],
                                          ignore_identical_ids=evaluation["ignore_identical_ids"],
                                          auc_negatives=evaluation["auc_negatives"],
                                          seed=int(config["seed"]))["metrics"]
        echo(format_metrics(results[dataset.split], f"{label} {dataset.split}"))
    return results


def run_pipeline(config: dict, *, show_progress: bool = True, echo=print) -> dict:
    """Run the stages of a loaded config; returns the record written to ``run.json``.

    Outputs: ``pools/``, ``model/``, ``eval-before/<split>/`` and ``eval/<split>/`` (metrics.json and
    run.trec), ``config.yaml`` and ``run.json``.
    """
    seed = int(config["seed"])
    mining, training = config["mine"], config["train"]
    check_settings(mining["depth"], mining["num_negatives"], mining["sampling"], mining["shard_size"])
    flt = make_filter(mining["filter"], **(mining["filter_params"] or {}))
    specs = mining["retriever"] if isinstance(mining["retriever"], list) else [mining["retriever"]]
    specs = ["model" if spec == config["model"] else spec for spec in specs]
    source_options = {key: mining[key] for key in ("bm25_backend", "index", "nprobe", "ef_search", "rrf_k")}
    check_source_settings(specs, cross_encoder=mining["cross_encoder"], teacher=mining["teacher"], **source_options)
    train_options = {key: value for key, value in training.items() if key not in ("resume", "dev_metric")}
    train_config = TrainConfig(model=config["model"], seed=seed, **train_options)
    train_config.check()
    if train_config.eval_steps:
        check_metrics((training["dev_metric"],), depth=config["evaluate"]["depth"])
    if train_config.eval_steps and len(_splits(config)) < 2:
        raise HardnegError("config: train.eval_steps keeps the best model on the first evaluate.split; list a dev "
                           "split before the reported one, e.g. evaluate.split: [dev, test]")
    encode = encode_options(config["encode"], show_progress=show_progress)
    precision_note = describe_precision(encode["precision"], default_device())  # fp16 on a CPU fails here
    mine_split, eval_splits = _datasets(config)
    output = Path(config["output_dir"])
    echo(f"      {precision_note}")
    base = as_retriever(config["model"], **encode)  # loads the model now: a bad model name fails here
    with atomic_write(output / "config.yaml") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)

    names = ", ".join(f"{d.name}/{d.split}" for d in eval_splits)
    results = {}
    if config["evaluate"]["before"]:
        echo(f"[1/4] evaluating {config['model']} before training on {names}")
        results["before"] = _evaluate_all(eval_splits, base, config, output / "eval-before", echo, "before")
    cache = {"cache_dir": mining["cache_dir"]}
    source = build_source(specs, models={"model": base}, **source_options, **cache, **encode)
    rescorer = build_rescorer(cross_encoder=mining["cross_encoder"], teacher=mining["teacher"], **cache, **encode)
    echo(f"[2/4] mining {mine_split.name}/{mine_split.split} with {describe(source)}, filter {flt.name}"
         + (f", rescored by {describe(rescorer)}" if rescorer is not None else ""))
    mined = mine(mine_split, source, depth=mining["depth"], num_negatives=mining["num_negatives"], filter=flt,
                 anchor=mining["anchor"], sampling=mining["sampling"], seed=seed, output_dir=output / "pools",
                 config=config, rescorer=rescorer, shard_size=mining["shard_size"], show_progress=show_progress)
    echo("      " + mined.summary().replace("\n", "\n      "))
    del base, source, rescorer  # free the base model before training loads its own copy
    echo(f"[3/4] training {config['model']} for {train_config.epochs} epoch(s)")
    pools_file = output / "pools" / POOLS_FILE
    evaluator = dev_evaluator(eval_splits[0], training["dev_metric"], batch_size=encode["batch_size"],
                              precision=encode["precision"]) if train_config.eval_steps else None
    summary = train(read_pools(pools_file, mine_split.corpus), mine_split.corpus, train_config, output / "model",
                    show_progress=show_progress, provenance={str(pools_file): file_checksum(pools_file)},
                    resume=training["resume"], evaluator=evaluator)
    echo(f"      {summary['steps']} steps, loss {summary['first_loss']} -> {summary['final_loss']}")
    trained = output / "model"
    if summary["best_step"] is not None:
        trained = output / "model" / BEST_DIR
        echo(f"      best {training['dev_metric']} on {eval_splits[0].split}: {summary['best_dev']:.4f} at step "
             f"{summary['best_step']} (model/{BEST_DIR})")
    echo(f"[4/4] evaluating the trained model on {names}")
    results["after"] = _evaluate_all(eval_splits, as_retriever(str(trained), **encode), config,
                                     output / "eval", echo, "after")
    for split, after in results["after"].items():
        if "before" in results:
            echo(f"{eval_splits[0].name}/{split}:\n" + format_comparison(results["before"][split], after))
    checksums = {}
    for dataset in [mine_split, *eval_splits]:
        checksums |= dataset.checksums()
    record = {"name": config["name"], "seed": seed, "metrics": results, "training": summary,
              "mining": mined.meta["counts"], "library_versions": library_versions(), "input_checksums": checksums}
    write_json(output / "run.json", record)
    return record


def format_metrics(metrics: dict[str, float], label: str = "") -> str:
    cells = "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    return f"      {label + ': ' if label else ''}{cells}"


def format_comparison(before: dict[str, float], after: dict[str, float]) -> str:
    lines = [f"      {'metric':<12}{'before':>9}{'after':>9}{'change':>9}"]
    for name in after:
        lines.append(f"      {name:<12}{before[name]:>9.4f}{after[name]:>9.4f}{after[name] - before[name]:>+9.4f}")
    return "\n".join(lines)
