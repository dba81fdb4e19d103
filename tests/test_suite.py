"""Several datasets at once (``evaluate --data A --data B``, ``hardneg.evaluate_datasets``): each row is the
single-dataset evaluation, the mean row is their mean, and the README's examples run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA

import hardneg
from eval.evaluate import evaluate
from eval.suite import SUMMARY_JSON, SUMMARY_MD, evaluate_datasets
from hardneg.cli import main
from retriever.data import load_beir
from retriever.io import HardnegError

ROOT = Path(__file__).resolve().parents[1]
MSMARCO_SAMPLE = SHARED_DATA / "msmarco" / "beir-sample"
METRICS = ("nDCG@10", "Recall@100", "MRR@10", "AUC")


@pytest.fixture(scope="module")
def datasets(demo_test):
    if not MSMARCO_SAMPLE.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return [demo_test, load_beir(MSMARCO_SAMPLE, "test")]


def test_each_row_is_the_single_evaluation_and_the_mean_row_their_mean(datasets, tmp_path):
    suite = evaluate_datasets(datasets, "bm25", metrics=METRICS, depth=100, output_dir=tmp_path / "suite")
    assert list(suite.records) == ["nfcorpus-demo", "beir-sample"]
    for label, dataset in zip(suite.records, datasets):
        alone = evaluate(dataset, "bm25", metrics=METRICS, depth=100)["metrics"]
        assert suite.records[label]["metrics"] == pytest.approx(alone, abs=1e-12)
        written = json.loads((tmp_path / "suite" / label / "metrics.json").read_text())
        assert written["metrics"] == pytest.approx(alone, abs=1e-12)
    for metric in METRICS:
        values = [record["metrics"][metric] for record in suite.records.values()]
        assert suite.mean[metric] == pytest.approx(sum(values) / 2)
    summary = json.loads((tmp_path / "suite" / SUMMARY_JSON).read_text())
    assert summary["mean"] == pytest.approx(suite.mean) and set(summary["datasets"]) == set(suite.records)
    table = (tmp_path / "suite" / SUMMARY_MD).read_text()
    assert f"| **mean** (2 datasets) | | **{suite.mean['nDCG@10']:.4f}**" in table
    assert f"| beir-sample | 43 | {suite.records['beir-sample']['metrics']['nDCG@10']:.4f} |" in table
    assert repr(suite).startswith("SuiteResult(bm25") and len(repr(suite)) < 200


def test_the_same_dataset_twice_and_a_run_file_are_refused(datasets, tmp_path):
    with pytest.raises(HardnegError, match="the same dataset is given twice"):
        evaluate_datasets([datasets[0], datasets[0]], "bm25")
    with pytest.raises(HardnegError, match="a run file scores one dataset"):
        evaluate_datasets(datasets, "bm25", run={})
    assert main(["evaluate", "--data", "nfcorpus-demo", "--data", str(MSMARCO_SAMPLE), "--run-file", "x.trec"]) == 2


def test_the_cli_prints_the_table_and_writes_to_a_default_folder(datasets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--quiet", "--data", "nfcorpus-demo", "--data", str(MSMARCO_SAMPLE), "--retriever",
                 "bm25", "--metrics", "nDCG@10,Recall@100", "--depth", "100", "--no-plots"]) == 0
    out = capsys.readouterr().out
    folder = Path("runs/evaluate/bm25/test")
    assert f"to {folder}" in out and re.search(r"^\| \*\*mean\*\* \(2 datasets\) \| \| \*\*0\.\d{4}\*\*", out, re.M)
    assert sorted(p.name for p in folder.iterdir()) == ["beir-sample", "nfcorpus-demo", SUMMARY_JSON, SUMMARY_MD]
    assert main(["evaluate", "--quiet", "--data", "nfcorpus-demo", "--retriever", "bm25", "--metrics", "nDCG@10",
                 "--depth", "100"]) == 0
    assert "runs/evaluate/bm25/nfcorpus-demo-test" in capsys.readouterr().out
    assert Path("runs/evaluate/bm25/nfcorpus-demo-test/metrics.json").is_file()


def test_one_dataset_commands_refuse_a_second_data_or_pools(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["mine", "--data", "nfcorpus-demo", "--data", "nfcorpus-demo", "--output", "x"])
    assert stopped.value.code == 2 and "--data given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--pools", "a", "--pools", "b", "--output", "x"])
    assert "--pools given twice" in capsys.readouterr().err  # train takes several (tests/test_mixture.py)


def _readme_block(language: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n### Several datasets: the BEIR table\n", 1)[1].split("\n### ", 1)[0]
    (block,) = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
    return block


@pytest.mark.slow
def test_the_readme_several_dataset_examples_run_as_written(datasets, tmp_path, monkeypatch, capsys):
    """The README's commands, from a folder beside ../shared as a checkout is (the real all-MiniLM-L6-v2)."""
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    monkeypatch.chdir(work)
    command = " ".join(_readme_block("bash").replace("\\\n", " ").split())
    assert command.startswith("hardneg evaluate ")
    assert main(["--quiet", *command.split()[1:]]) == 0
    summary = json.loads(Path("runs/table/summary.json").read_text())
    assert set(summary["datasets"]) == {"nfcorpus-demo", "beir-sample"}
    assert summary["mean"]["nDCG@10"] > 0.3  # all-MiniLM-L6-v2: about 0.38 and 0.6 on these two
    exec(compile(_readme_block("python"), "README several-datasets block", "exec"), {"__name__": "readme"})  # noqa: S102
    out = capsys.readouterr().out
    assert "| **mean** (2 datasets) |" in out and Path("runs/table-bm25/summary.md").is_file()
    assert hardneg.evaluate_datasets is evaluate_datasets
