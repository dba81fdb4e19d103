"""``hardneg run CONFIG.yaml``: evaluate the base model, mine, train, evaluate the trained model.

A config is one YAML file (see ``configs/``); ``--set section.key=value`` overrides any key. Every
key is checked before any work starts, so a typo fails in a second, not after an hour of mining.
The output folder gets ``config.yaml`` (the resolved config) and ``run.json`` (seed, library
versions, input checksums, the metrics before and after).

It lives in the ``hardneg`` app package because it strings all three stages together: imports run
retriever <- mining <- eval <- hardneg.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from eval.compare import compare, load_evaluation, p_value
from eval.evaluate import dev_evaluator, evaluate
from eval.metrics import check_metrics
from eval.settings import EvaluateSettings
from mining.mine import mine
from mining.remine import check_batch_teacher, remining_for_pools
from mining.settings import MineSettings
from mining.sources import build_rescorer, build_source
from retriever.checkpoint import checkpoint_dirs
from retriever.data import (
    POOLS_FILE,
    Dataset,
    held_out_ids,
    hold_out,
    load_dataset,
    mined_negatives,
    pools_dataset,
    read_pools,
)
from retriever.embedding_table import check_tables
from retriever.encoding import EncodeSettings, default_device, describe_precision, encode_options
from retriever.factory import as_retriever
from retriever.index import check_index_fits
from retriever.io import (
    HardnegError,
    atomic_write,
    check_output_folder,
    file_checksum,
    library_versions,
    write_json,
)
from retriever.model_card import write_model_card
from retriever.protocol import describe
from retriever.settings import MAX_SEED, ConfigSource, from_mapping, parse_yaml, resolve_sections, setting
from retriever.train import (
    MODEL_DIR,
    RESUMABLE_CHANGES,
    TRAIN_CONFIG,
    TrainConfig,
    check_memory_before_mining,
    check_resume,
    train,
)


@dataclass
class RunMine(MineSettings):
    """The ``mine:`` section: the mining settings and the split mined (``seed`` is the config's)."""

    split: str = setting("train", "qrels split whose queries are mined and trained on")


@dataclass
class RunTrain(TrainConfig):
    """The ``train:`` section: the training settings (``model`` and ``seed`` are the config's) and selection."""

    resume: str | None = setting(None, "continue from this checkpoint folder, or 'latest'")
    dev_metric: str = setting("nDCG@10", "metric that picks the best model on the dev queries")


@dataclass
class RunEvaluate(EvaluateSettings):
    """The ``evaluate:`` section: the evaluation settings (``seed`` is the config's) and the splits scored."""

    split: list = setting(["test"], "split(s) evaluated before and after training; with keep-best or early "
                                    "stopping on a dev split, list it first, e.g. [dev, test]")
    before: bool = setting(True, "also evaluate the model before training")

    def check(self) -> None:
        if not self.split:
            raise HardnegError("evaluate.split: give a split name or a list of them, e.g. [dev, test]")
        super().check()


@dataclass
class RunData:
    """The ``data:`` section: a BEIR folder or bundled name, or explicit files."""

    path: str | None = setting(None, "BEIR folder, bundled dataset name or beir:NAME")
    corpus: str | None = setting(None, "corpus file (replaces the folder's)")
    queries: str | None = setting(None, "queries file (replaces the folder's)")
    qrels: str | None = setting(None, "qrels file (replaces the folder's)")


@dataclass
class RunConfig:
    """The top level of a ``hardneg run`` config."""

    name: str = setting("run", "name of the run (recorded in run.json)")
    seed: int = setting(42, "seed of mining, training and evaluation", ge=0, le=MAX_SEED)
    output_dir: str = setting("runs/run", "folder for every output of the run")
    model: str = setting("all-MiniLM-L6-v2", "model to evaluate, mine with and train")
    data: dict = setting({}, "see RunData", cli=False)
    encode: dict = setting({}, "see retriever.encoding.EncodeSettings", cli=False)
    mine: dict = setting({}, "see RunMine", cli=False)
    train: dict = setting({}, "see RunTrain", cli=False)
    evaluate: dict = setting({}, "see RunEvaluate", cli=False)


FEW_DEV_QUERIES = 50
"""Below this many held-out queries a note says the epoch kept is partly chance (one query moves a mean by 1/N)."""
SECTIONS = {"data": RunData, "encode": EncodeSettings, "mine": RunMine, "train": RunTrain, "evaluate": RunEvaluate}
SHARED = {"mine": ("seed",), "train": ("model", "seed"), "evaluate": ("seed",)}  # set at the config's top level


def load_config(path: str | Path, overrides: list[str] | None = None, *,
                flags: dict[str, str] | None = None) -> dict:
    """Read a config, apply ``key.sub=value`` overrides, check every key and value against the settings schema
    (unknown keys and wrong types name the file, line and key, or the override's flag: ``flags`` maps a key to
    the flag that set it, default ``--set KEY``), fill defaults; returns the resolved config."""
    source = ConfigSource(path)
    given = source.data
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep:
            raise HardnegError(f"--set {override!r}: expected key=value, e.g. train.epochs=2")
        target = given
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            if not isinstance(target.setdefault(parent, {}), dict):
                raise source.error(parent, "must be a mapping")
            target = target[parent]
        target[leaf] = parse_yaml(value)
        source.override(key.strip(), (flags or {}).get(key.strip()))
    return resolve_sections(from_mapping(RunConfig, given, section="", source=source), SECTIONS, source, SHARED)


def section_settings(cls: type, config: dict, section: str) -> object:
    """The settings object of one section of a resolved run config, with the top-level settings it shares
    (``SHARED``: the config's ``seed``, and ``model`` for training) and without the section's run-only keys
    (``split``, ``before``, ``resume`` ...)."""
    names = {field.name for field in dataclasses.fields(cls)}
    shared = {key: config[key] for key in SHARED.get(section, ())}
    return cls(**shared, **{key: value for key, value in config[section].items() if key in names and key not in shared})


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
    options = section_settings(EvaluateSettings, config, "evaluate").options()
    results = {}
    for dataset in splits:
        results[dataset.split] = evaluate(dataset, retriever, output_dir=output / dataset.split, config=config,
                                          **options)["metrics"]
        echo(format_metrics(results[dataset.split], f"{label} {dataset.split}"))
    return results


def _previous_config(output: Path) -> dict | None:
    """The config an earlier run wrote into ``output`` (its ``config.yaml``), or None when there is none readable."""
    try:
        previous = yaml.safe_load((output / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return previous if isinstance(previous, dict) else None


def _interrupted_training(output: Path, config: dict) -> str | None:
    """``"latest"`` when ``output`` holds the checkpoints of a run of this config (the same command, run again
    after it was killed, up to the settings training lets a resume change, such as the cache chunk), so that it
    continues where it stopped as mining does; None when it holds none.
    Checkpoints of another config are refused here, before any work and before ``config.yaml`` is replaced."""
    if not checkpoint_dirs(output):
        return None
    previous = _previous_config(output)
    changed = ["config.yaml"]
    if previous is not None:
        now, before = _flat(config), _flat(previous)
        # what training itself lets a resume change, and the resume setting itself (how to continue, not what)
        may_change = {f"train.{key}" for key in RESUMABLE_CHANGES} | {"train.resume"}
        changed = sorted(key for key in now.keys() | before.keys()
                         if key not in may_change and now.get(key) != before.get(key))
    if not changed:
        return "latest"
    raise HardnegError(f"output_dir {output} holds the checkpoints of an interrupted run of another config"
                       + f" ({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} differ)"
                       + "; run that config again to continue it, set train.resume to a checkpoint, or choose "
                         "another output_dir")


def _refuse_other_data(output: Path, split: Dataset) -> None:
    """The recipes keep their ``output_dir`` when only ``data.path`` changes: a finished run in that folder whose
    ``run.json`` records other input files than this run's training split is refused, before any work, rather than
    silently replaced. Files, not paths, are compared: the same folder spelt otherwise (relative, with a trailing
    slash, its bundled name) is the same data."""
    try:
        record = json.loads((output / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    before = set((record.get("input_checksums") or {}).values()) if isinstance(record, dict) else set()
    if before and not set(split.checksums().values()) <= before:
        raise HardnegError(f"output_dir {output} holds a finished run on other data (its run.json names other input "
                           f"files than {split.name}/{split.split}'s); choose another output_dir (--output-dir) "
                           "or remove that one")


def _check_training_queries(split: Dataset, dev_fraction: float | None, seed: int) -> int:
    """Refuse, before the evaluation and mining that come first, a split with nothing to train on or too few
    queries to hold some out; returns how many ``dev_fraction`` holds out (the same ones training will)."""
    trainable = [query_id for query_id in split.queries if split.relevant(query_id)]
    if not trainable:
        raise HardnegError(f"{split.name}/{split.split}: no query has a relevant document (grade > 0) in the corpus "
                           f"to mine and train on ({len(split.queries)} judged queries); check the qrels, or set "
                           "mine.split to a split that has them")
    return len(held_out_ids(trainable, dev_fraction, seed)) if dev_fraction else 0


def _flat(mapping: dict, prefix: str = "") -> dict:
    """``{"train.epochs": 3, ...}`` of a nested config."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_pipeline(config: dict, *, show_progress: bool = True, echo=print) -> dict:
    """Run the stages of a loaded config; returns the record written to ``run.json``.

    Outputs: ``pools/``, ``model/``, ``eval-before/<split>/`` and ``eval/<split>/`` (metrics.json and
    run.trec), ``config.yaml`` and ``run.json``.
    """
    seed = int(config["seed"])
    training = config["train"]
    mining = section_settings(MineSettings, config, "mine")
    mining.retriever = ["model" if spec == config["model"] else spec for spec in mining.retriever]
    mining.check()
    flt = mining.build_filter()
    source_options = {"bm25_backend": mining.bm25_backend, "index": mining.index, "nprobe": mining.nprobe,
                      "ef_search": mining.ef_search, "rrf_k": mining.rrf_k}
    train_config = section_settings(TrainConfig, config, "train")
    train_config.check()
    selects = train_config.scores_on_dev
    if selects:
        check_metrics((training["dev_metric"],), depth=config["evaluate"]["depth"])
    if selects and not train_config.dev_fraction and len(_splits(config)) < 2:
        raise HardnegError("config: train.eval_steps / patience / soup select on the first evaluate.split; list a "
                           "dev split before the reported one, e.g. evaluate.split: [dev, test], or set "
                           "train.dev_fraction to hold out training queries")
    if train_config.negatives_per_query > mining.num_negatives:
        raise HardnegError(f"config: train.negatives_per_query {train_config.negatives_per_query} is more than the "
                           f"{mining.num_negatives} negatives per query mine.num_negatives writes, so no step could "
                           "use them; raise mine.num_negatives or lower train.negatives_per_query")
    if train_config.distills and not (mining.teacher or mining.cross_encoder or mining.fuse_bm25):
        raise HardnegError("config: distillation (train.loss kd or train.distill_weight) needs teacher scores in "
                           "the pools: set mine.teacher (a bi-encoder), mine.cross_encoder or mine.fuse_bm25")
    if train_config.distills and train_config.distill_scope == "batch":
        check_batch_teacher(mining, remine_every=train_config.remine_every)
    output = check_output_folder(config["output_dir"], "output_dir")
    resume = training["resume"] or _interrupted_training(output, config)
    if resume:  # a missing checkpoint, or one of other training settings, is refused before any work
        resume = check_resume(output, resume, train_config, flag="train.resume")
    encode = encode_options(config["encode"], show_progress=show_progress)
    precision_note = describe_precision(encode["precision"], default_device())  # fp16 on a CPU fails here
    mine_split, eval_splits = _datasets(config)
    _refuse_other_data(output, mine_split)
    check_index_fits(mining.index, len(mine_split.corpus))  # before the evaluation that comes first writes
    held_out = _check_training_queries(mine_split, train_config.dev_fraction, seed)
    trainable = {query_id: text for query_id, text in mine_split.queries.items() if mine_split.relevant(query_id)}
    for spec in [mining.teacher, *mining.retriever]:  # a table of embeddings lacking a document or query
        check_tables(spec, mine_split.corpus, trainable)
    echo(f"      {precision_note}")
    if 0 < held_out < FEW_DEV_QUERIES:
        echo(f"      note: train.dev_fraction holds out only {held_out} training queries to select on: each moves "
             f"the dev mean by 1/{held_out}, so which epoch is kept is partly chance")
    base = as_retriever(config["model"], **encode)  # loads the model now: a bad model name fails here
    check_memory_before_mining(train_config, mine_split)  # a training step that cannot fit, before the mining
    with atomic_write(output / "config.yaml") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)

    names = ", ".join(f"{d.name}/{d.split}" for d in eval_splits)
    results = {}
    if config["evaluate"]["before"]:
        echo(f"[1/4] evaluating {config['model']} before training on {names}")
        results["before"] = _evaluate_all(eval_splits, base, config, output / "eval-before", echo, "before")
    # The same embeddings cache as `hardneg mine` (a teacher's corpus is encoded once for every run on it); the
    # model being trained never goes through it, its weights change.
    source = build_source(mining.retriever, models={"model": base}, **source_options, **encode)
    rescorer = build_rescorer(cross_encoder=mining.cross_encoder, teacher=mining.teacher,
                              cross_encoder_batch_size=mining.cross_encoder_batch_size, fuse_bm25=mining.fuse_bm25,
                              source=source, bm25_backend=mining.bm25_backend, **encode)
    echo(f"[2/4] mining {mine_split.name}/{mine_split.split} with {describe(source)}, filter {flt.name}"
         + (f", rescored by {describe(rescorer)}" if rescorer is not None else ""))
    mined = mine(mine_split, source, depth=mining.depth, num_negatives=mining.num_negatives, filter=flt,
                 anchor=mining.anchor, anchor_fallback=mining.anchor_fallback, sampling=mining.sampling, seed=seed,
                 output_dir=output / "pools", config=config, rescorer=rescorer, shard_size=mining.shard_size,
                 show_progress=show_progress)
    echo("      " + mined.summary().replace("\n", "\n      "))
    # The mining scorer is the teacher of in-batch distillation; otherwise free it (and the base model) before
    # training loads its own copy.
    teacher = rescorer if train_config.distills and train_config.distill_scope == "batch" else None
    del base, source, rescorer
    echo(f"[3/4] training {config['model']} for {train_config.epochs} epoch(s)"
         + (f", re-mining with it every {train_config.remine_every}" if train_config.remine_every else "")
         + (f", continuing from {resume}" if resume else ""))
    pools_file = output / "pools" / POOLS_FILE
    pools = read_pools(pools_file, mine_split.corpus)
    evaluator, dev_name = None, eval_splits[0].split
    if train_config.dev_fraction:
        pools, held = hold_out(pools, train_config.dev_fraction, seed)
        dev_name = f"{len(held)} held-out {mine_split.split} queries"
        evaluator = dev_evaluator(pools_dataset(held, mine_split.corpus, mine_split), training["dev_metric"],
                                  batch_size=encode["batch_size"], precision=encode["precision"],
                                  corpus_size=train_config.dev_corpus_size, distractors=mined_negatives(held),
                                  seed=seed)
        echo(f"      selecting on {dev_name}, training on {len(pools)}"
             + (f", {evaluator.subset_note}" if evaluator.subset_note else ""))
    elif selects:
        evaluator = dev_evaluator(eval_splits[0], training["dev_metric"], batch_size=encode["batch_size"],
                                  precision=encode["precision"], corpus_size=train_config.dev_corpus_size,
                                  seed=seed)
        if evaluator.subset_note:
            echo(f"      selecting on {eval_splits[0].split}, {evaluator.subset_note}")
    remine = None
    if train_config.remine_every:
        remine = remining_for_pools(pools, mine_split.corpus, mining, output, source=mine_split,
                                    encode=encode, echo=lambda line: echo(f"      {line}"), config=config)
    summary = train(pools, mine_split.corpus, train_config, output,
                    show_progress=show_progress, provenance={str(pools_file): file_checksum(pools_file)},
                    resume=resume, evaluator=evaluator, remine=remine, pools_meta=mined.meta,
                    teacher=teacher).summary
    echo(f"      {summary['steps']} steps, loss {summary['first_loss']} -> {summary['final_loss']}")
    trained = output / MODEL_DIR
    if summary["best_step"] is not None:
        echo(f"      best {training['dev_metric']} on {dev_name}: {summary['best_dev']:.4f} at step "
             f"{summary['best_step']}, the model kept in {MODEL_DIR}/")
    echo(f"[4/4] evaluating the trained model on {names}")
    results["after"] = _evaluate_all(eval_splits, as_retriever(str(trained), **encode), config,
                                     output / "eval", echo, "after")
    labelled = {stage: {f"{eval_splits[0].name}/{split}": metrics for split, metrics in by_split.items()}
                for stage, by_split in results.items()}
    training_record = json.loads((output / TRAIN_CONFIG).read_text(encoding="utf-8"))
    write_model_card(trained, training_record, labelled)  # the card now with its metrics
    significance = {}
    if "before" in results:  # is each change more than the noise of these queries? (paired, per query)
        for split, after in results["after"].items():
            significance[split] = _paired_tests(output / "eval-before" / split, output / "eval" / split, echo)
            echo(f"{eval_splits[0].name}/{split}:\n" + format_comparison(
                results["before"][split], after, significance[split].get("metrics")))
    checksums = {}
    for dataset in [mine_split, *eval_splits]:
        checksums |= dataset.checksums()
    record = {"name": config["name"], "seed": seed, "metrics": results, "significance": significance,
              "training": summary, "mining": mined.meta["counts"],
              "remining": remine.rounds if remine is not None else [],
              "library_versions": library_versions(), "input_checksums": checksums}
    write_json(output / "run.json", record)
    return record


def format_metrics(metrics: dict[str, float], label: str = "") -> str:
    cells = "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    return f"      {label + ': ' if label else ''}{cells}"


def _paired_tests(before: Path, after: Path, echo) -> dict:
    """:func:`eval.compare.compare` of the two evaluations over the metrics both scored on a common query; empty,
    or with a note, where there is nothing to pair (a pooled AUC has no per-query values): the run is written
    anyway."""
    try:
        scored = [load_evaluation(folder).per_query for folder in (before, after)]
        shared = [name for name in scored[0] if set(scored[0][name]) & set(scored[1].get(name, {}))]
        return compare([before, after], metrics=shared, labels=["before", "after"]) if shared else {}
    except HardnegError as err:
        echo(f"      no paired test of the change: {err}")
        return {}


def format_comparison(before: dict[str, float], after: dict[str, float], tests: dict | None = None) -> str:
    """The before/after table; with ``tests`` (:func:`eval.compare.compare`'s metrics) each change's paired
    randomization p-value and per-query wins/losses, so that a change within the noise of a few queries reads so."""
    head = f"      {'metric':<12}{'before':>9}{'after':>9}{'change':>9}"
    lines = [head + (f"{'p':>8}  queries better/worse" if tests else "")]
    queries = max((test["against"][0]["queries"] for test in (tests or {}).values()), default=0)
    for name in after:
        line = f"      {name:<12}{before[name]:>9.4f}{after[name]:>9.4f}{after[name] - before[name]:>+9.4f}"
        if tests and name in tests:
            row = tests[name]["against"][0]
            line += f"{p_value(row['p_randomization']):>8}  {row['wins']}/{row['losses']}"
            if row["queries"] < queries:  # AUC is undefined on some queries: tested on those both runs define
                line += f" (tested on the {row['queries']} queries both define it for)"
        lines.append(line)
    if tests:
        lines.append(f"      p: paired randomization test over the {queries} queries (as `hardneg compare`); p > 0.05: "
                     "a change these queries cannot tell from chance")
    return "\n".join(lines)
