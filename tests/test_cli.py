"""The CLI end to end on the bundled demo data, and its answers to bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytrec_eval
import torch

from eval.runs import read_run
from hardneg.cli import main
from retriever.data import BUNDLED_DIR, load_dataset
from retriever.io import HardnegError

REPO = Path(__file__).resolve().parents[1]
DEMO = BUNDLED_DIR / "nfcorpus-demo"


@pytest.mark.slow
def test_mine_train_evaluate_through_the_console_script(tiny_model, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    hardneg = [sys.executable, "-m", "hardneg", "--quiet"]

    def run(*args):
        done = subprocess.run(hardneg + list(args), capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = run("mine", "--data", "nfcorpus-demo", "--retriever", "bm25", "--depth", "50", "--num-negatives", "4",
              "--output", str(tmp_path / "pools"))
    assert "mined 400 queries" in out
    meta = json.loads((tmp_path / "pools" / "pools.meta.json").read_text())
    assert meta["counts"]["queries"] == 400 and meta["settings"]["filter"]["perc"] == 0.95
    run("train", "--pools", str(tmp_path / "pools"), "--data", "nfcorpus-demo", "--model", str(tiny_model),
        "--output", str(tmp_path / "model"), "--train-batch-size", "32", "--max-length", "48")
    assert (tmp_path / "model" / "model" / "modules.json").is_file()
    out = run("evaluate", "--data", "nfcorpus-demo", "--split", "test", "--retriever",
              str(tmp_path / "model" / "model"), "--output", str(tmp_path / "eval"), "--max-length", "48")
    assert "nDCG@10" in out
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["split"] == "test" and record["queries"] == 80
    # The numbers must be trec_eval's: recompute nDCG@10 and Recall@100 from run.trec with pytrec_eval.
    qrels = {}
    for line in (DEMO / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, grade = line.split("\t")
        qrels.setdefault(query_id, {})[doc_id] = int(grade)
    run_file = read_run(tmp_path / "eval" / "run.trec")
    assert set(run_file) == set(qrels)
    measured = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run_file)
    for ours, theirs in (("nDCG@10", "ndcg_cut_10"), ("Recall@100", "recall_100")):
        expected = sum(m[theirs] for m in measured.values()) / len(measured)
        assert record["metrics"][ours] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_run_config_whole_pipeline(tiny_model, tmp_path, capsys):
    code = main(["--quiet", "run", str(REPO / "configs" / "nfcorpus-demo.yaml"), "--model", str(tiny_model),
                 "--output-dir", str(tmp_path / "out"), "--set", "train.batch_size=32",
                 "--set", "encode.max_length=32", "--set", "train.max_length=32",
                 "--set", "train.positives_per_query=1", "--set", "evaluate.depth=100",
                 "--set", "train.epochs=2", "--set", "train.remine_every=1", "--set", "train.dev_corpus_size=600"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert set(record["metrics"]) == {"before", "after"}
    assert set(record["metrics"]["after"]) == {"test"}
    assert record["metrics"]["before"]["test"] != record["metrics"]["after"]["test"]
    from eval.compare import compare, p_value

    paired = compare([tmp_path / "out" / "eval-before" / "test", tmp_path / "out" / "eval" / "test"],
                     labels=["before", "after"])
    assert record["significance"]["test"] == json.loads(json.dumps(paired))  # the change of each metric, tested
    for metric, test in paired["metrics"].items():  # and printed on the metric's own row
        change = test["against"][0]
        row = next(line for line in printed.splitlines() if line.split()[:1] == [metric])
        assert row.split()[4:6] == [p_value(change["p_randomization"]), f"{change['wins']}/{change['losses']}"], row
    assert "over 600 of the 2,000 documents (" in printed  # train.dev_corpus_size, said as it starts
    config = (tmp_path / "out" / "config.yaml").read_text()
    assert "max_length: 32" in config and str(tiny_model) in config
    # the 320 training queries are re-mined; the 80 held out to select on (train.dev_fraction 0.2) are not
    assert [r["round"] for r in record["remining"]] == [1] and record["remining"][0]["queries"] == 320
    trained = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert trained["config"]["dev_corpus_size"] == 600 and trained["summary"]["best_dev"] is not None
    for produced in ("pools/pools.jsonl", "logs/train_log.jsonl", "eval/test/metrics.json", "model/README.md",
                     "eval-before/test/run.trec", "remined/round-1/pools.meta.json", "training_config.json"):
        assert (tmp_path / "out" / produced).is_file(), produced
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "## Evaluation" in card and f"{record['metrics']['after']['test']['nDCG@10']:.4f}" in card
    # The recipe on other data (only data.path changed, as the recipes say) into that folder: refused before any
    # work, not a silent replacement of this finished run; the same data spelt otherwise is the same data.
    other = shutil.copytree(REPO / "retriever" / "bundled" / "nfcorpus-demo", tmp_path / "other")
    qrels = other / "qrels" / "train.tsv"
    qrels.write_text("".join(qrels.read_text().splitlines(keepends=True)[:-1]))
    assert main(["--quiet", "run", str(REPO / "configs" / "nfcorpus-demo.yaml"), "--model", str(tiny_model),
                 "--output-dir", str(tmp_path / "out"), "--set", f"data.path={other}"]) == 2
    assert "holds a finished run on other data (its run.json names other input files than other/train's)" in \
        capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == record
    from hardneg.pipeline import _refuse_other_data
    from retriever.data import load_dataset

    _refuse_other_data(tmp_path / "out", load_dataset(str(REPO / "retriever" / "bundled" / "nfcorpus-demo") + "/",
                                                      "train"))


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["model", "table"])
def test_the_teacher_recipe_runs_whole(tiny_model, tmp_path, capsys, teacher):
    """configs/recipe-distill.yaml as shipped (a BM25-fused teacher scores the pools, then every cell of each step)
    through `hardneg run`, the tiny model standing in for both all-MiniLM-L6-v2 and all-mpnet-base-v2, or a table
    of its embeddings (`hardneg encode`) for the teacher: mining, the in-batch teacher and the evaluation then run
    without the teacher model."""
    if teacher == "table":
        assert main(["--quiet", "encode", "--model", str(tiny_model), "--data", "nfcorpus-demo", "--max-length",
                     "32", "--output", str(tmp_path / "teacher")]) == 0, capsys.readouterr().err
    where = tiny_model if teacher == "model" else tmp_path / "teacher"
    code = main(["--quiet", "run", str(REPO / "configs" / "recipe-distill.yaml"), "--model", str(tiny_model),
                 "--output-dir", str(tmp_path / "out"), "--set", f"mine.teacher={where}",
                 "--set", "encode.max_length=32", "--set", "train.max_length=32", "--set", "train.max_steps=2",
                 "--set", "train.epochs=1", "--set", "evaluate.depth=100", "--set", "evaluate.before=false",
                 "--set", "encode.cache=false"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    meta = json.loads((tmp_path / "out" / "pools" / "pools.meta.json").read_text())
    assert meta["settings"]["rescorer"].startswith("fused-z(1*embeddings:" if teacher == "table" else "fused-z(")
    assert meta["counts"]["queries_with_hard_negatives"] > 0
    trained = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert trained["config"]["distill_scope"] == "batch" and trained["summary"]["steps"] == 2
    assert set(record["metrics"]["after"]["test"]) == {"nDCG@10", "Recall@100", "MRR@10", "AUC"}


@pytest.mark.slow
def test_a_killed_run_continues_when_the_same_command_runs_again(tiny_model, tmp_path, capsys, monkeypatch):
    """`hardneg run` killed in its second epoch, run again as it was: mining's shards and the end-of-epoch
    checkpoint are reused, and the model is the uninterrupted run's; another config into that folder is refused."""
    from safetensors.torch import load_file

    from retriever.train import Trainer

    def command(output: Path, *extra: str) -> list[str]:
        return ["--quiet", "run", str(REPO / "configs" / "nfcorpus-demo.yaml"), "--model", str(tiny_model),
                "--output-dir", str(output), "--set", "train.batch_size=32", "--set", "encode.max_length=32",
                "--set", "train.max_length=32", "--set", "train.epochs=2", "--set", "evaluate.depth=100",
                "--set", "evaluate.before=false", *extra]

    assert main(command(tmp_path / "whole")) == 0, capsys.readouterr().err
    train_step = Trainer.train_step

    def killed_in_epoch_two(self, *args, **kwargs):
        if self.step == 12:  # 320 training queries / 32 = 10 steps per epoch
            raise KeyboardInterrupt
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", killed_in_epoch_two)
    assert main(command(tmp_path / "cut")) == 130
    assert "(mine, run) continues" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(command(tmp_path / "cut", "--set", "train.learning_rate=1e-4")) == 2
    assert "checkpoints of an interrupted run of another config (train.learning_rate differ)" in \
        capsys.readouterr().err
    assert main(command(tmp_path / "cut")) == 0, capsys.readouterr().err
    assert "continuing from" in capsys.readouterr().out
    record = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert record["training"]["resumed_from"].endswith("step-0000010") and record["training"]["steps"] == 20
    whole = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_a_run_continues_across_the_changes_training_allows_on_resume(tmp_path):
    """The cache chunk (and the other RESUMABLE_CHANGES) may change when a killed run is started again, as
    `hardneg train --resume` allows; any other setting may not."""
    import yaml

    from hardneg.pipeline import _interrupted_training, load_config
    from retriever.checkpoint import STATE_FILE

    config = load_config(REPO / "configs" / "nfcorpus-demo.yaml")
    (tmp_path / "checkpoints" / "step-0000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000010" / STATE_FILE).write_bytes(b"")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert _interrupted_training(tmp_path, config) == "latest"
    assert _interrupted_training(tmp_path, config | {"train": config["train"] | {"cache_chunk": 8}}) == "latest"
    with pytest.raises(HardnegError, match=r"another config \(train.learning_rate differ\)"):
        _interrupted_training(tmp_path, config | {"train": config["train"] | {"learning_rate": 1e-4}})
    # train.resume says how to continue, not what: set once, then dropped, the run still continues
    assert _interrupted_training(tmp_path, config | {"train": config["train"] | {"resume": "latest"}}) == "latest"
    resumed = config | {"train": config["train"] | {"resume": "latest"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(resumed, sort_keys=False))
    assert _interrupted_training(tmp_path, config) == "latest"


def test_a_resume_that_cannot_continue_is_refused_before_any_work(tiny_model, tmp_path, capsys):
    """train.resume with no checkpoint was an IndexError after mining; one of other training settings was refused
    only when training started, after mining, and left its config.yaml over the interrupted run's."""
    import dataclasses

    from hardneg.pipeline import load_config, section_settings
    from retriever.checkpoint import STATE_FILE, STATE_JSON
    from retriever.train import TrainConfig

    def command(output: Path, resume: Path | str) -> list[str]:
        return ["--quiet", "run", str(REPO / "configs" / "nfcorpus-demo.yaml"), "--model", str(tiny_model),
                "--output-dir", str(output), "--set", f"train.resume={resume}"]

    assert main(command(tmp_path / "fresh", "latest")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.resume latest: no checkpoint in" in err, err
    assert not (tmp_path / "fresh").exists()
    other = tmp_path / "other" / "checkpoints" / "step-0000010"
    other.mkdir(parents=True)
    (other / STATE_FILE).write_bytes(b"")
    config = section_settings(TrainConfig, load_config(REPO / "configs" / "nfcorpus-demo.yaml"), "train")
    identity = {f"config.{key}": value for key, value in dataclasses.asdict(config).items()}
    identity |= {"config.model": str(tiny_model), "config.learning_rate": 1.0}
    (other / STATE_JSON).write_text(json.dumps({"identity": identity}))
    assert main(command(tmp_path / "out", tmp_path / "other")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.learning_rate: checkpoint has 1.0, this run has 3e-05" in err, err
    assert not (tmp_path / "out").exists()


def _copy_demo(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(DEMO, folder)
    with gzip.open(folder / "corpus.jsonl.gz", "rt", encoding="utf-8") as handle:
        (folder / "corpus.jsonl").write_text(handle.read(), encoding="utf-8")
    (folder / "corpus.jsonl.gz").unlink()
    return folder


def _break_json(folder: Path) -> str:
    lines = (folder / "corpus.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:40] + "\n"
    (folder / "corpus.jsonl").write_text("".join(lines))
    return "corpus.jsonl:3"


def _drop_qrels_column(folder: Path) -> str:
    lines = (folder / "qrels" / "train.tsv").read_text().splitlines(keepends=True)
    lines[5] = "\t".join(lines[5].split("\t")[:2]) + "\n"
    (folder / "qrels" / "train.tsv").write_text("".join(lines))
    return "train.tsv:6"


def _empty_corpus(folder: Path) -> str:
    (folder / "corpus.jsonl").write_text("")
    return "corpus is empty"


@pytest.mark.parametrize("breaker", [_break_json, _drop_qrels_column, _empty_corpus])
def test_bad_data_is_one_line_error_and_no_output(breaker, tmp_path, capsys):
    folder = _copy_demo(tmp_path)
    expected = breaker(folder)
    code = main(["--quiet", "mine", "--data", str(folder), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("hardneg: error:") and expected in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "--data", "nfcorpus-demo", "--retriever", "./no/such/model"], "does not exist"),
    (["train", "--pools", "{pools}", "--data", "nfcorpus-demo", "--model", "/no/such/model"], "does not exist"),
    (["mine", "--data", "nfcorpus-demo", "--depth", "3", "--num-negatives", "8"], "depth"),
    (["mine", "--data", "nfcorpus-demo", "--perc", "1.5"], "perc"),
    (["evaluate", "--data", "nfcorpus-demo", "--split", "nope", "--retriever", "bm25"], "available splits"),
])
def test_bad_settings_are_one_line_errors(argv, expected, tmp_path, capsys):
    with gzip.open(DEMO / "corpus.jsonl.gz", "rt", encoding="utf-8") as handle:
        doc_id = json.loads(handle.readline())["_id"]
    pools = tmp_path / "pools.jsonl"
    pools.write_text(json.dumps({"query_id": "q", "query": "x", "positives": [{"doc_id": doc_id, "score": 1}],
                                 "negatives": []}) + "\n")
    argv = [a.replace("{pools}", str(pools)) for a in argv] + ["--output", str(tmp_path / "out")]
    code = main(["--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_config_key_is_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: {path: nfcorpus-demo}\ntrain: {epochs: 1, batchsize: 8}\n")
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert "unknown setting 'train.batchsize'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_more_negatives_per_step_than_mined_is_refused(tmp_path, capsys):
    """Training samples from what mining wrote: asking for more per step was silently capped at mine.num_negatives."""
    config = tmp_path / "c.yaml"
    config.write_text("data: {path: nfcorpus-demo}\nmine: {num_negatives: 2}\ntrain: {negatives_per_query: 4}\n")
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.negatives_per_query 4 is more than the 2 negatives" in err, err
    assert not (tmp_path / "out").exists()


def test_train_refuses_more_negatives_per_step_than_the_pools_were_mined_with(tmp_path, capsys):
    from mining.mine import mine

    mine(load_dataset("nfcorpus-demo", "train"), "bm25", depth=10, num_negatives=2, output_dir=tmp_path / "pools",
         show_progress=False)
    assert main(["train", "--pools", str(tmp_path / "pools"), "--data", "nfcorpus-demo", "--negatives-per-query", "3",
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mined with num_negatives 2, fewer than --negatives-per-query 3" in err, err
    assert not (tmp_path / "out").exists()


def test_quiet_after_the_command_silences_every_bar(capsys, tmp_path):
    assert main(["evaluate", "--quiet", "--data", "nfcorpus-demo", "--retriever", "bm25", "--metrics", "nDCG@10",
                 "--depth", "100", "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "nDCG@10" in captured.out
