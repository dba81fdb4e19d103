"""``hardneg compare`` (paired tests against scipy and a brute-force randomization) and ``hardneg reproduce``."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from eval.compare import compare, markdown_comparison, paired_t_test, randomization_test
from hardneg.cli import main
from hardneg.reproduce import MATCH, OFF, WITHIN, check, load_benchmark_config, reproduce
from retriever.io import DataError, HardnegError

REPO = Path(__file__).resolve().parents[1]


def write_per_query(folder: Path, values: dict[str, dict[str, float]], split: str = "test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "per_query.json").write_text(json.dumps({"dataset": "d", "split": split, "per_query": values}))
    return folder


def test_randomization_test_equals_exact_enumeration():
    """With 8 queries all 2^8 sign patterns can be enumerated: the sampled p-value converges to the exact one."""
    differences = np.array([0.3, -0.1, 0.25, 0.4, 0.05, -0.2, 0.15, 0.35])
    observed = abs(differences.mean())
    exact = np.mean([abs(np.dot(signs, differences)) / 8 >= observed - 1e-12
                     for signs in itertools.product([-1, 1], repeat=8)])
    sampled = randomization_test(differences, permutations=40_000, seed=1)
    assert sampled == pytest.approx(exact, abs=0.01)
    assert randomization_test(differences, 1000, seed=5) == randomization_test(differences, 1000, seed=5)
    assert randomization_test(np.zeros(10), 500) == 1.0


def test_paired_t_test_equals_scipy():
    rng = np.random.default_rng(0)
    a = rng.random(50)
    b = a + rng.normal(0.02, 0.05, 50)
    assert paired_t_test(a, b) == pytest.approx(stats.ttest_rel(b, a).pvalue, abs=1e-12)
    assert paired_t_test(a, a) == 1.0 and paired_t_test(a, a + 0.1) == 0.0


def test_compare_two_runs(tmp_path, capsys):
    rng = np.random.default_rng(3)
    queries = [f"q{i}" for i in range(60)]
    base = {q: float(v) for q, v in zip(queries, rng.random(60))}
    better = {q: min(1.0, v + 0.15) for q, v in base.items()}
    same = {q: v + float(rng.normal(0, 0.001)) for q, v in base.items()}
    a = write_per_query(tmp_path / "a", {"nDCG@10": base, "AUC": base})
    b = write_per_query(tmp_path / "b", {"nDCG@10": better, "AUC": dict(list(better.items())[:50])})
    c = write_per_query(tmp_path / "c", {"nDCG@10": same, "AUC": same})
    result = compare([a, b, c], permutations=2000)
    rows = {row["run"]: row for row in result["metrics"]["nDCG@10"]["against"]}
    assert rows["b"]["p_randomization"] < 0.01 and rows["b"]["p_t_test"] < 1e-6 and rows["b"]["wins"] > 40
    assert rows["c"]["p_randomization"] > 0.05 or abs(rows["c"]["difference"]) < 1e-3
    assert rows["b"]["difference"] == pytest.approx(np.mean(list(better.values())) - np.mean(list(base.values())))
    # a metrics.json path works too (its per_query.json beside it is read)
    again = compare([a / "metrics.json", b / "per_query.json"], permutations=2000)
    assert again["metrics"]["nDCG@10"]["against"][0]["p_randomization"] == rows["b"]["p_randomization"]
    auc_b = result["metrics"]["AUC"]["against"][0]
    assert auc_b["queries"] == 50  # AUC is compared on the queries both defined it for
    table = markdown_comparison(result)
    assert table.count("\n| nDCG@10 |") == 2 and " *" in table
    assert main(["compare", str(a), str(b), "--permutations", "500", "--output", str(tmp_path / "cmp")]) == 0
    assert "| nDCG@10 | b |" in capsys.readouterr().out
    assert (tmp_path / "cmp.json").is_file() and (tmp_path / "cmp.md").is_file()


def test_compare_refuses_different_queries_and_missing_files(tmp_path, capsys):
    a = write_per_query(tmp_path / "a", {"nDCG@10": {"q1": 0.5, "q2": 0.1}})
    b = write_per_query(tmp_path / "b", {"nDCG@10": {"q1": 0.5, "q3": 0.1}})
    with pytest.raises(HardnegError, match="evaluate both on the same split"):
        compare([a, b])
    with pytest.raises(HardnegError, match="two or more"):
        compare([a])
    assert main(["compare", str(a), str(tmp_path / "nowhere")]) == 2
    assert "nowhere/per_query.json: not found" in capsys.readouterr().err
    # The same queries scored at another relevance level: the same numbers would mean other things
    c = write_per_query(tmp_path / "c", {"nDCG@10": {"q1": 0.4, "q2": 0.2}})
    for folder, level in ((a, 1), (c, 2)):
        (folder / "metrics.json").write_text(json.dumps({"options": {"relevance_level": level,
                                                                     "ignore_identical_ids": False}}))
    with pytest.raises(HardnegError, match="a was evaluated with relevance_level 1 and c with 2"):
        compare([a, c])


# ------------------------------------------------------------------------------------------- reproduce


def demo_config(tmp_path: Path, **changes) -> Path:
    config = {"name": "demo-bm25", "data": {"path": "nfcorpus-demo", "split": "test"}, "retriever": "bm25",
              "evaluate": {"metrics": ["nDCG@10", "Recall@100", "AUC-pooled"], "depth": 100},
              "output_dir": str(tmp_path / "out")}
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    path = tmp_path / "configs" / "demo.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def expected_table(tmp_path: Path, metrics: dict) -> Path:
    path = tmp_path / "configs" / "expected_scores.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"demo-bm25": {"metrics": metrics}}, sort_keys=False))
    return path


def test_check_statuses():
    assert check(0.31594, 0.3159, 0.01) == MATCH
    assert check(0.3170, 0.3159, 0.01) == WITHIN
    assert check(0.3300, 0.3159, 0.01) == OFF


def test_reproduce_match_within_and_off(tmp_path, capsys):
    config = demo_config(tmp_path)
    expected_table(tmp_path, {"nDCG@10": {"expected": 0.5, "tolerance": 0.5}})
    first = reproduce(config, show_progress=False)
    measured = first["record"]["metrics"]
    assert (tmp_path / "out" / "reproduce.json").is_file() and (tmp_path / "out" / "metrics.json").is_file()
    expected_table(tmp_path, {
        "nDCG@10": {"expected": round(measured["nDCG@10"], 4), "tolerance": 0.001,
                    "published": round(measured["nDCG@10"], 4) + 0.004, "published_tolerance": 0.005},
        "Recall@100": {"expected": round(measured["Recall@100"], 4) + 0.01, "tolerance": 0.005},
    })
    assert main(["--quiet", "reproduce", str(config)]) == 1
    out = capsys.readouterr().out
    statuses = [line.split()[-1] for line in out.splitlines()[2:]]
    assert "OFF" in out.splitlines()[0] and statuses == ["match", "tolerance", "off"]
    stored = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert [c["status"] for c in stored["checks"]] == [MATCH, WITHIN, OFF] and stored["ok"] is False


def test_reproduce_config_errors_name_file_line_field(tmp_path, capsys):
    expected_table(tmp_path, {"nDCG@10": {"expected": 0.3, "tolerance": 0.1}})
    config = demo_config(tmp_path, **{"data.path": str(tmp_path / "no" / "such" / "dataset")})
    assert main(["--quiet", "reproduce", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "demo.yaml:3:" in err and "field 'data.path'" in err
    assert "dataset folder not found" in err
    assert not (tmp_path / "out").exists()

    config.write_text(config.read_text().replace("depth: 100", "depth: 100\n  dept: 5"))
    with pytest.raises(DataError) as info:
        load_benchmark_config(config)
    line = next(i for i, text in enumerate(config.read_text().splitlines(), start=1) if "dept:" in text)
    assert info.value.field == "evaluate.dept" and info.value.line == line

    config = demo_config(tmp_path, **{"evaluate.metrics": ["Recall@100"]})
    with pytest.raises(DataError, match="which this config does not compute"):
        reproduce(config)
    config = demo_config(tmp_path, retriever=None)
    with pytest.raises(DataError, match="exactly one of 'retriever'"):
        reproduce(config)
    config = demo_config(tmp_path, retriever=str(tmp_path / "no-model"))
    with pytest.raises(DataError) as info:
        reproduce(config)
    line = next(i for i, text in enumerate(config.read_text().splitlines(), start=1) if text.startswith("retriever:"))
    assert info.value.field == "retriever" and info.value.line == line
    assert not (tmp_path / "out").exists()


def test_checked_in_configs_load_and_have_expected_scores():
    table = yaml.safe_load((REPO / "configs" / "expected_scores.yaml").read_text())
    configs = sorted((REPO / "configs").glob("eval-*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        config, _ = load_benchmark_config(path)
        assert config["name"] == path.stem, path
        entry = table[config["name"]]["metrics"]
        assert set(entry) <= set(config["evaluate"]["metrics"])
        assert all(isinstance(spec["expected"], float) for spec in entry.values())
    minilm = table["eval-nfcorpus-minilm"]["metrics"]["nDCG@10"]
    assert minilm["published"] == 0.316 and minilm["published_tolerance"] == 0.01
    # issue 10's quality guard: bf16 encoding within tolerance (nDCG@10: 0.002) of float32 on every metric
    fp32, bf16 = table["eval-nfcorpus-minilm"]["metrics"], table["eval-nfcorpus-minilm-bf16"]["metrics"]
    assert set(fp32) == set(bf16)
    assert all(abs(bf16[m]["expected"] - fp32[m]["expected"]) <= fp32[m]["tolerance"] for m in fp32)
    assert load_benchmark_config(REPO / "configs" / "eval-nfcorpus-minilm.yaml")[0]["encode"]["precision"] == "fp32"
    bm25 = table["eval-nfcorpus-bm25"]["metrics"]["nDCG@10"]
    assert bm25["published"] == 0.32 and bm25["published_tolerance"] == 0.02


def test_the_runs_paired_tests_never_stop_a_finished_run(tmp_path):
    """`hardneg run` tests each before/after change after training: a metric with no query in common or no
    per-query values (pooled AUC) is left out, and an error gives a note, never an exit that would lose the run's
    record."""
    from hardneg.pipeline import _paired_tests, format_comparison

    notes = []
    ndcg = {"q1": 0.2, "q2": 0.4, "q3": 0.1}
    before = write_per_query(tmp_path / "before", {"nDCG@10": ndcg, "AUC": {"q1": 0.5}})
    after = write_per_query(tmp_path / "after", {"nDCG@10": {"q1": 0.3, "q2": 0.5, "q3": 0.1}, "AUC": {"q2": 0.7}})
    assert list(_paired_tests(before, after, notes.append)["metrics"]) == ["nDCG@10"]
    assert _paired_tests(write_per_query(tmp_path / "b", {}), write_per_query(tmp_path / "a", {}), notes.append) == {}
    fewer = write_per_query(tmp_path / "fewer", {"nDCG@10": {"q1": 0.3}})  # not comparable: a note, no test
    assert _paired_tests(before, fewer, notes.append) == {} and "scored on 3 queries" in notes[0]
    after = write_per_query(tmp_path / "after2", {"nDCG@10": {"q1": 0.3, "q2": 0.5, "q3": 0.1},
                                                  "AUC": {"q1": 0.6, "q2": 0.7}})
    tests = _paired_tests(before, after, notes.append)["metrics"]
    table = format_comparison({"nDCG@10": 0.2333, "AUC": 0.5}, {"nDCG@10": 0.3, "AUC": 0.65}, tests).splitlines()
    assert table[1].split()[5] == "2/0" and "(tested on the 1 queries both define it for)" in table[2]
