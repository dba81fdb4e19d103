"""Training that wins (issue 11): hardneg's recipes against the sentence-transformers peer pipeline, same data,
same process, several seeds, selected on held-out training queries, reported on test.

The peer is what a sentence-transformers user writes today: ``mine_hard_negatives`` on (query, positive) pairs
with the student (``relative_margin=0.05``, one negative per pair, faiss), then ``SentenceTransformerTrainer``
with ``MultipleNegativesRankingLoss``, batch 32, the no-duplicates batch sampler, its default learning rate and
warm-up, for each of ``--peer-epochs`` (1, 3 and 5), so the comparison is not won by budget alone.

hardneg's side is each ``--recipe`` YAML (``configs/recipe-*.yaml``) run through ``hardneg run`` with the data
path, seed and output folder replaced, plus ``--ablation NAME:key=value,...`` variants of the first recipe
(one lever switched each).

Model selection never sees test. The data's train queries are split once per seed (``--dev-fraction``, by query
id, the split ``train.dev_fraction`` makes): both sides train on the rest and are scored on the held-out part
("dev"). The recipes keep their best epoch on it; the peer's epoch budget is chosen as the one with the best
mean dev nDCG@10 over the seeds. Test is evaluated for every run, and read only in the table.

Every finished run leaves ``<output>/<method>/seed-<s>/result.json`` with the settings it ran with, and is
skipped when the script runs again with the same settings (a recipe edited since is run again), and a run
killed midway continues from its last checkpoint (hardneg's safety net, at each epoch end and every half hour;
the peer trainer's ``checkpoint-N`` at each epoch end), so a sweep can be split over sessions (or machines, when
the folders are copied together); ``--work`` keeps the models and run outputs elsewhere, ``--only`` runs some
of the methods (several processes can share one output: ``bench/gpu_recipes.sh`` fans a sweep out on one GPU).
``--table`` only prints the table of what is there. The peer needs the ``bench`` extra (``pip install -e
'.[bench]'``: accelerate for its trainer).
Examples::

    # the demo subset, ~2.5 h on 2 CPU cores for 3 seeds with the peer at 1 epoch
    OMP_NUM_THREADS=2 flock /tmp/hardneg-heavy.lock python bench/bench_recipes.py --data nfcorpus-demo \\
        --peer-epochs 1 --output runs/bench-recipes-demo
    # NFCorpus with the full peer sweep and the ablation table (LEVERS; a GPU: see bench/gpu_checks.sh)
    python bench/bench_recipes.py --data ../shared/data/beir/nfcorpus --peer-epochs 1,3,5 \\
        --recipe configs/recipe-distill.yaml --recipe configs/recipe-minilm.yaml --ablation all \\
        --output runs/bench-recipes-nfcorpus
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from eval.evaluate import evaluate  # noqa: E402
from hardneg.pipeline import load_config, run_pipeline  # noqa: E402
from retriever.data import Dataset, held_out_ids, load_dataset  # noqa: E402
from retriever.encoder import resolve_model  # noqa: E402
from retriever.encoding import default_device, resolve_precision, resolve_training_precision  # noqa: E402
from retriever.factory import as_retriever  # noqa: E402
from retriever.io import write_json  # noqa: E402

METRICS = ("nDCG@10", "Recall@100", "MRR@10", "AUC")
PEER = {"mine_hard_negatives": {"range_max": 100, "relative_margin": 0.05, "num_negatives": 1,
                                "sampling_strategy": "top"},
        "loss": "MultipleNegativesRankingLoss", "batch_size": 32, "batch_sampler": "no_duplicates"}
SELECT = "nDCG@10"
# Issue 11's ablation table: each lever of the teacher recipe (configs/recipe-distill.yaml) switched alone;
# ``--ablation NAME`` runs one, ``--ablation all`` every one, ``--ablation NAME:key=value,...`` any other.
LEVERS = {
    "no-teacher": "mine.teacher=null,mine.fuse_bm25=null,train.distill_weight=0,train.distill_scope=pools,"
                  "train.teacher_temperature=null",  # the student scores its own pools; nothing to distil
    "no-fuse": "mine.fuse_bm25=null,train.teacher_temperature=null",  # all-mpnet-base-v2 alone as the teacher
    # teacher-mined pools, no distillation (and no teacher temperature: nothing it would scale)
    "no-kd": "train.distill_weight=0,train.distill_scope=pools,train.teacher_temperature=null",
    "pools-kd": "train.distill_scope=pools",  # distil over each query's own pool, not every cell of the step
    "remine": "train.remine_every=1",  # re-mine with the student after every epoch (ANCE)
    "no-random": "train.random_negatives=0",  # no random negative (STAR)
    "min-anchor": "mine.anchor=min",  # NV-Retriever's lowest-positive anchor, queries left short stay short
    "min-anchor-fallback": "mine.anchor=min,mine.anchor_fallback=mean",  # ... and the fallback fills them
    "one-epoch": "train.epochs=1",  # no epoch selection: one epoch
    "five-epochs": "train.epochs=5",  # a longer budget (the schedule stretched), still kept best on dev
    # the model's own 256 tokens instead of the CPU's 128 (twice the step; the gradient cache keeps its memory)
    "full-length": "train.max_length=256,train.cache_chunk=8",
}
REPO = Path(__file__).resolve().parents[1]


def split_train(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train queries kept, held-out dev queries): the split ``train.dev_fraction`` makes for the same seed."""
    held = held_out_ids([q for q in train.queries if train.relevant(q)], fraction, seed)
    keep = {q: t for q, t in train.queries.items() if q not in held and train.relevant(q)}
    kept = Dataset(train.name, train.split, train.corpus, keep, {q: train.qrels[q] for q in keep}, train.files)
    dev = Dataset(train.name, "held-out", train.corpus, {q: train.queries[q] for q in sorted(held)},
                  {q: train.qrels[q] for q in sorted(held)}, train.files)
    return kept, dev


def scores(model: str, splits: dict[str, Dataset], output: Path, precision: str) -> dict[str, dict[str, float]]:
    """hardneg's (trec_eval-exact) metrics of ``model`` on each split; the corpus is encoded once."""
    retriever = as_retriever(model, precision=precision, show_progress=False)
    return {name: evaluate(data, retriever, metrics=METRICS, depth=1000, output_dir=output / name)["metrics"]
            for name, data in splits.items()}


# --------------------------------------------------------------------------------------------- the peer

def run_peer(train: Dataset, model: str, epochs: int, seed: int, output: Path, device: str, bf16: bool) -> Path:
    """``mine_hard_negatives`` (relative_margin 0.05) + ``MultipleNegativesRankingLoss``: the ST pipeline."""
    from datasets import Dataset as HFDataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import mine_hard_negatives

    try:
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.training_args import BatchSamplers

    anchors, positives = [], []
    for query_id, text in train.queries.items():
        for doc_id in sorted(train.relevant(query_id)):
            anchors.append(text)
            positives.append(train.corpus.text_of(doc_id))
    st_model = SentenceTransformer(resolve_model(model), device=device)
    mined = mine_hard_negatives(HFDataset.from_dict({"query": anchors, "positive": positives}), st_model,
                                corpus=train.corpus.texts(), **PEER["mine_hard_negatives"], use_faiss=True,
                                batch_size=32, verbose=False)
    # A checkpoint per epoch (the last one kept) so that a sweep killed mid-run continues with the trainer's own
    # resume when the script runs again, as hardneg's side does; removed once the model is saved.
    arguments = Arguments(output_dir=str(output / "trainer"), num_train_epochs=epochs,
                          per_device_train_batch_size=PEER["batch_size"],
                          batch_sampler=BatchSamplers.NO_DUPLICATES, seed=seed, save_strategy="epoch",
                          save_total_limit=1, report_to=[], bf16=bf16, use_cpu=device == "cpu", logging_steps=10,
                          disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=st_model, args=arguments, train_dataset=mined,
                                         loss=MultipleNegativesRankingLoss(st_model))
    checkpoints = sorted((output / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    st_model.save(str(output / "model"))
    shutil.rmtree(output / "trainer", ignore_errors=True)
    (output / "mined_rows.txt").write_text(f"{len(mined)} of {len(anchors)} pairs kept a negative\n")
    return output / "model"


# --------------------------------------------------------------------------------------------- hardneg

def recipe_config(recipe: Path, args: argparse.Namespace, seed: int, output: Path, overrides: list[str]) -> dict:
    """The resolved ``hardneg run`` config of one recipe run: the bench's data, model (the one the peer trains)
    and held-out fraction, this seed and output folder."""
    return load_config(recipe, [f"data.path={args.data}", f"model={args.model}", f"seed={seed}",
                                f"output_dir={output / 'run'}", f"train.dev_fraction={args.dev_fraction}",
                                f"encode.precision={args.precision}", f"train.precision={args.precision}",
                                "evaluate.before=false", *(args.set or []), *overrides])


def method_settings(what: object, args: argparse.Namespace, seed: int) -> dict:
    """What a method's result depends on, stored in its result.json: a result of other settings (a recipe edited
    since) is run again instead of being reported. The precisions are left out here: what they resolve to on the
    machine is stored beside (:func:`resolved_precision`), since ``auto`` is fp32 on one CPU and bf16 on another."""
    if what is None:
        return {"model": args.model}
    if isinstance(what, int):
        return {"model": args.model, "epochs": what, "peer": PEER}
    recipe, overrides = what
    config = recipe_config(recipe, args, seed, Path("."), overrides)
    for section in ("encode", "train"):
        config[section] = {key: value for key, value in config[section].items() if key != "precision"}
    return {key: value for key, value in config.items() if key != "output_dir"}


def resolved_precision(what: object, args: argparse.Namespace, device: str) -> dict[str, str]:
    """The precisions a method runs in on this machine (``auto`` decided: bf16 on a CPU with AVX-512 BF16 or AMX,
    fp32 on one with AVX2 only), stored beside the settings: the same settings on another CPU are another run."""
    resolved = {"encode": resolve_precision(args.precision, device)}
    if what is not None:
        resolved["train"] = resolve_training_precision(args.precision, device)
    return resolved


def run_recipe(config: dict, output: Path) -> Path:
    """``hardneg run`` of a recipe's resolved config; returns the selected model folder."""
    record = run_pipeline(config, show_progress=False, echo=lambda line: None)
    write_json(output / "run-summary.json", {"training": record["training"], "mining": record["mining"],
                                             "remining": record.get("remining", [])})
    return output / "run" / "model"  # the best epoch on dev (train keeps it there)


# --------------------------------------------------------------------------------------------- table

def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def table(output: Path) -> str:
    results: dict[str, list[dict]] = {}
    for path in sorted(output.glob("*/seed-*/result.json")):
        results.setdefault(path.parent.parent.name, []).append(json.loads(path.read_text()))
    peers = {m: r for m, r in results.items() if m.startswith("peer-")}
    lines = [f"| method | seeds | dev {SELECT} | " + " | ".join(f"test {m}" for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]

    def row(name: str, runs: list[dict]) -> str:
        dev = [r["metrics"]["dev"][SELECT] for r in runs]
        cells = [mean_sd([r["metrics"]["test"][m] for r in runs]) for m in METRICS]
        return f"| {name} | {len(runs)} | {mean_sd(dev)} | " + " | ".join(cells) + " |"

    for method, runs in results.items():
        lines.append(row(method, runs))
    # The budget is chosen on the seeds every budget has run, so a budget is not picked for its luckier seeds.
    shared = set.intersection(*({r["seed"] for r in runs} for runs in peers.values())) if peers else set()
    if shared:
        best = max(peers, key=lambda m: statistics.mean(r["metrics"]["dev"][SELECT] for r in peers[m]
                                                        if r["seed"] in shared))
        lines.append(row(f"**peer, budget chosen on dev over seeds {', '.join(map(str, sorted(shared)))} "
                         f"({best})**", peers[best]))
        lines.append(_verdict(results, peers[best], best))
    ablations = ablation_table(results)
    return "\n".join(lines) + (f"\n\n{ablations}" if ablations else "")


def ablation_table(results: dict[str, list[dict]]) -> str:
    """Each ablation (``<recipe>-<lever>``) against its recipe, seed by seed: what the lever changed (read from
    the two runs' settings, so a custom ``NAME:key=value`` ablation describes itself) and the paired difference
    on dev and test, mean ± sd over the seeds both have run. Paired, because the seeds' dev splits differ
    (seed 44's held-out queries are harder for every method), which an unpaired mean would mix into the lever."""
    recipes = [m for m in results if not m.startswith("peer-") and m != "untrained"]
    lines = []
    for method in sorted(results):
        bases = [b for b in recipes if method.startswith(f"{b}-")]
        if not bases:
            continue
        base = max(bases, key=len)
        ours = {r["seed"]: r for r in results[method]}
        theirs = {r["seed"]: r for r in results[base]}
        seeds = sorted(ours.keys() & theirs.keys())
        if not seeds:
            continue
        changed = _changed(theirs[seeds[0]]["settings"], ours[seeds[0]]["settings"])
        changed += _changed({"precision": theirs[seeds[0]].get("resolved_precision")},
                            {"precision": ours[seeds[0]].get("resolved_precision")})
        cells = []
        for split, metric in [("dev", SELECT)] + [("test", m) for m in METRICS]:
            mine = statistics.mean(ours[s]["metrics"][split][metric] for s in seeds)
            delta = [ours[s]["metrics"][split][metric] - theirs[s]["metrics"][split][metric] for s in seeds]
            sd = f" ± {statistics.stdev(delta):.4f}" if len(delta) > 1 else ""
            cells.append(f"{mine:.4f} ({statistics.mean(delta):+.4f}{sd})")
        lines.append(f"| {method} | {base} | {', '.join(changed)} | {', '.join(map(str, seeds))} | "
                     + " | ".join(cells) + " |")
    if not lines:
        return ""
    header = (f"| ablation | against | what changes | seeds | dev {SELECT} (Δ) | "
              + " | ".join(f"test {m} (Δ)" for m in METRICS) + " |")
    return "\n".join([header, "|---|---|---|---|---|" + "---|" * len(METRICS), *lines])


def _changed(base: dict, other: dict, prefix: str = "") -> list[str]:
    """The settings ``other`` has that ``base`` does not, as ``key: old → new`` (nested keys dotted)."""
    changes = []
    for key in sorted(base.keys() | other.keys()):
        old, new = base.get(key), other.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _changed(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old} → {new}")
    return changes


def _verdict(results: dict[str, list[dict]], peer: list[dict], peer_name: str) -> str:
    """hardneg's method chosen on dev (among those with the most seeds) against the peer's chosen budget, on test."""
    ours = {m: runs for m, runs in results.items() if not m.startswith("peer-") and m != "untrained"}
    if not ours:
        return ""
    most = max(len(runs) for runs in ours.values())

    def mean_of(runs: list[dict], split: str) -> float:
        return statistics.mean(r["metrics"][split][SELECT] for r in runs)

    candidates = [m for m in ours if len(ours[m]) == most]
    shared = set.intersection(*({r["seed"] for r in ours[m]} for m in candidates))  # dev splits differ by seed
    pick = max(candidates, key=lambda m: mean_of([r for r in ours[m] if not shared or r["seed"] in shared], "dev"))
    ahead = mean_of(ours[pick], "test") - mean_of(peer, "test")
    def seeds(runs: list[dict]) -> str:
        return ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))

    return (f"\nChosen on dev among hardneg's methods with {most} seed(s): {pick}, test {SELECT} "
            f"{mean_of(ours[pick], 'test'):.4f} (seeds {seeds(ours[pick])}) against the peer's {peer_name} "
            f"{mean_of(peer, 'test'):.4f} (seeds {seeds(peer)}): {ahead:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="nfcorpus-demo", help="BEIR folder or bundled dataset name")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--peer-epochs", default="1,3,5", help="epoch budgets of the peer; empty: no peer")
    parser.add_argument("--recipe", action="append", help="recipe YAML (repeatable; default: both recipes)")
    parser.add_argument("--no-recipes", action="store_true", help="only the untrained model and the peer")
    parser.add_argument("--ablation", action="append", default=[],
                        help=f"a lever switched in the first recipe: one of {', '.join(LEVERS)}, 'all' of them, or "
                        "NAME:key=value,key=value (repeatable)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a key of every recipe (and ablation), e.g. mine.teacher=FOLDER: a table of "
                        "the teacher's embeddings (hardneg encode) where the teacher model cannot go (repeatable)")
    parser.add_argument("--dev-fraction", type=float, default=0.2)
    parser.add_argument("--precision", default="auto", help="encoding and training precision of both sides: auto "
                        "(bf16 where the CPU or GPU runs it natively, else fp32), fp32 or bf16; each result records "
                        "what it resolved to, and one of another resolved precision is run again")
    parser.add_argument("--output", required=True, help="folder of the result.json files (small; commit them)")
    parser.add_argument("--work", help="folder for the models and run outputs (default: --output)")
    parser.add_argument("--only", help="comma-separated method names to run (e.g. peer-3ep,recipe-minilm): "
                        "several processes can share one --output, each running its own methods")
    parser.add_argument("--table", action="store_true", help="only print the table of the finished runs")
    args = parser.parse_args()
    output = Path(args.output)
    if args.table:
        print(table(output))
        return
    default_recipes = [REPO / "configs/recipe-minilm.yaml", REPO / "configs/recipe-distill.yaml"]
    recipes = [] if args.no_recipes else [Path(r) for r in (args.recipe or default_recipes)]
    train = load_dataset(args.data, "train")
    test = load_dataset(args.data, "test")
    test.corpus = train.corpus
    device = str(default_device())
    bf16 = resolve_training_precision(args.precision, device) == "bf16"  # the peer trains as hardneg does
    methods: list[tuple[str, object]] = [("untrained", None)]
    methods += [(f"peer-{e}ep", int(e)) for e in args.peer_epochs.split(",") if e]
    methods += [(recipe.stem, (recipe, [])) for recipe in recipes]
    specs = [spec for given in args.ablation for spec in (list(LEVERS) if given == "all" else [given])]
    for spec in specs if recipes else ():
        name, named, changes = spec.partition(":")
        if not named and name not in LEVERS:
            parser.error(f"--ablation {spec}: not a lever ({', '.join(LEVERS)}) nor NAME:key=value,...")
        changes = changes if named else LEVERS[name]
        methods.append((f"{recipes[0].stem}-{name}", (recipes[0], [c for c in changes.split(",") if c])))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {method for method, _ in methods}
        if unknown:
            parser.error(f"--only: no method {', '.join(sorted(unknown))} among {', '.join(m for m, _ in methods)}")
        methods = [(method, what) for method, what in methods if method in wanted]
    seeds = [int(s) for s in args.seeds.split(",")]
    for _, what in methods:  # every recipe and ablation loads and checks here, before hours of runs
        method_settings(what, args, seeds[0])
    for seed in seeds:
        kept, dev = split_train(train, args.dev_fraction, seed)
        for method, what in methods:
            result = output / method / f"seed-{seed}" / "result.json"
            folder = Path(args.work or output) / method / f"seed-{seed}"
            settings, precision = method_settings(what, args, seed), resolved_precision(what, args, device)
            if result.is_file() and {key: json.loads(result.read_text()).get(key) for key in
                                     ("settings", "resolved_precision")} == {"settings": settings,
                                                                             "resolved_precision": precision}:
                continue
            started = time.time()
            if what is None:
                model = args.model
            elif isinstance(what, int):
                model = run_peer(kept, args.model, what, seed, folder, device, bf16)
            else:
                recipe, overrides = what
                model = run_recipe(recipe_config(recipe, args, seed, folder, overrides), folder)
            metrics = scores(str(model), {"dev": dev, "test": test}, folder / "eval", args.precision)
            write_json(result, {"method": method, "seed": seed, "settings": settings, "resolved_precision": precision,
                                "metrics": metrics, "seconds": round(time.time() - started, 1), "model": str(model)})
            print(f"{method} seed {seed}: dev {metrics['dev'][SELECT]:.4f} test "
                  + " ".join(f"{m} {metrics['test'][m]:.4f}" for m in METRICS), flush=True)
    print(table(output))


if __name__ == "__main__":
    main()
