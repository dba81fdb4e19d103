"""Bad input, bad settings and faults, tried as a careful user would: each case ends in one line naming what is
wrong (the file, line and field, or the setting), exit status 2 and nothing written, or in the right result
(a rule stated and counted in the output) -- never in a traceback or an exit 0 with a wrong number.

The cases are grouped by class (settings, output folders, ids, silent merges, byte-order marks, pools, faults);
``python tests/test_bad_inputs.py`` prints them as the Markdown table in BENCHMARKS.md ("Bad inputs").
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "retriever" / "bundled" / "nfcorpus-demo"


# ------------------------------------------------------------------------------------------------ the data


def write_beir(folder: Path, documents: int = 400) -> Path:
    """A small real BEIR folder: the first ``documents`` of the demo corpus and the queries judged on them."""
    (folder / "qrels").mkdir(parents=True)
    with gzip.open(DEMO / "corpus.jsonl.gz", "rt", encoding="utf-8") as handle:
        docs = [json.loads(line) for _, line in zip(range(documents), handle)]
    ids = {doc["_id"] for doc in docs}
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    judged = set()
    for split in ("train", "test"):
        rows = [line.split("\t") for line in (DEMO / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]]
        rows = [row for row in rows if row[1] in ids]
        judged |= {row[0] for row in rows}
        (folder / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    lines = [line for line in (DEMO / "queries.jsonl").read_text(encoding="utf-8").splitlines()
             if json.loads(line)["_id"] in judged]
    (folder / "queries.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def edit(path: Path, change: Callable[[str], str]) -> None:
    path.write_text(change(path.read_text(encoding="utf-8")), encoding="utf-8")


def first_row(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()[1].split("\t")


def write_run_of(data: Path) -> Path:
    """A small run file over the test split (three lines)."""
    rows = [line.split("\t")[:2] for line in (data / "qrels" / "test.tsv").read_text().splitlines()[1:4]]
    path = data / "run.trec"
    path.write_text("".join(f"{q} Q0 {d} {i + 1} {10 - i} x\n" for i, (q, d) in enumerate(rows)))
    return path


# ------------------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    """One bad input: how to make it, the command, and what it must now get.

    ``error``: a regex the one error line must match (exit 2, no output folder). Without it the command must
    succeed and ``check(metrics, reference)`` holds, where ``reference`` are the metrics of the clean data.
    """

    group: str
    name: str
    argv: list[str]
    prepare: Callable[[Path], None] | None = None
    error: str | None = None
    check: Callable[[dict, dict], None] | None = None
    outcome: str = ""  # for the table, when the case succeeds
    tags: list[str] = field(default_factory=list)


MODEL = "{model}"
EVAL_BM25 = ["evaluate", "--retriever", "bm25", "--split", "test", "--no-plots", "--depth", "100",
             "--metrics", "nDCG@10,Recall@100"]
EVAL_MODEL = ["evaluate", "--retriever", MODEL, "--split", "test", "--no-plots", "--depth", "100",
              "--metrics", "nDCG@10"]
MINE = ["mine", "--retriever", "bm25", "--split", "train", "--depth", "30", "--num-negatives", "4"]
MINE_MODEL = ["mine", "--retriever", MODEL, "--split", "train", "--depth", "30", "--num-negatives", "4"]
TRAIN = ["train", "--model", MODEL, "--epochs", "1", "--train-batch-size", "8", "--pools", "{pools}"]
RUN_FILE = ["evaluate", "--run-file", "{data}/run.trec", "--split", "test", "--no-plots", "--metrics", "nDCG@10"]


def _same(metrics: dict, reference: dict) -> None:
    assert metrics["metrics"] == pytest.approx(reference["metrics"], abs=1e-12)


def _same_counted(key: str, count: int):
    def check(metrics: dict, reference: dict) -> None:
        _same(metrics, reference)
        assert metrics[key] == count
    return check


def _add_qrels_row(row: Callable[[list[str]], str]):
    def prepare(data: Path) -> None:
        path = data / "qrels" / "test.tsv"
        extra = row(first_row(path))
        edit(path, lambda text: text + extra + "\n")
    return prepare


POOLS: dict[str, Path] = {}  # where the module's pools were mined (set by the ``world`` fixture)


def _pools_copy(change: Callable[[str], str] | None = None, *, corpus_edit: bool = False):
    def prepare(data: Path) -> None:
        shutil.copytree(POOLS["clean"], data / "pools")
        if change:
            edit(data / "pools" / "pools.jsonl", change)
        if corpus_edit:
            edit(data / "corpus.jsonl", lambda text: text.replace('"text": "', '"text": "EDITED ', 1))
    return prepare


def _bom(relative: str, *, drop_header: bool = False):
    def prepare(data: Path) -> None:
        if relative == "run.trec":
            write_run_of(data)
        path = data / relative
        text = path.read_text(encoding="utf-8")
        if drop_header:
            text = "\n".join(text.splitlines()[1:]) + "\n"
        path.write_text("\ufeff" + text, encoding="utf-8")
    return prepare


def _damaged_model(data: Path) -> None:
    shutil.copytree(POOLS["model"], data / "model")
    weights = data / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _output_is_a_file(data: Path) -> None:
    (data.parent / "out").write_text("not a folder")


def _output_under_a_file(data: Path) -> None:
    (data.parent / "blocker").write_text("not a folder")


CASES = [
    # settings: types and ranges, checked before any model or document is read
    Case("settings", "evaluate --batch-size 0", EVAL_MODEL + ["--batch-size", "0"], error=r"batch_size .*>= 1"),
    Case("settings", "evaluate --max-length -5", EVAL_MODEL + ["--max-length", "-5"], error=r"max_length .*>= 1"),
    Case("settings", "evaluate --max-length beyond the model", EVAL_MODEL + ["--max-length", "100000"],
         error=r"max_length 100000 .*128 positions"),
    Case("settings", "evaluate --metrics Foo@3", EVAL_BM25[:-2] + ["--metrics", "nDCG@10,Foo@3"],
         error=r"unknown metric 'Foo@3'"),
    Case("settings", "evaluate --metrics nDCG@x", EVAL_BM25[:-2] + ["--metrics", "nDCG@x"],
         error=r"needs a positive cut-off"),
    Case("settings", "evaluate --depth 0", EVAL_BM25 + ["--depth", "0"], error=r"depth.*>= 1"),
    Case("settings", "evaluate --seed -1", EVAL_BM25 + ["--seed", "-1"], error=r"seed.*>= 0"),
    Case("settings", "evaluate --relevance-level 0", EVAL_BM25 + ["--relevance-level", "0"],
         error=r"relevance_level.*>= 1"),
    Case("settings", "mine --depth 0", MINE + ["--depth", "0"], error=r"depth.*>= 1"),
    Case("settings", "mine --seed -1", MINE + ["--seed", "-1"], error=r"seed.*>= 0"),
    Case("settings", "mine --batch-size -1 (dense)", MINE_MODEL + ["--batch-size", "-1"], error=r"batch_size .*>= 1"),
    Case("settings", "mine --index IVF4096,Flat on 400 documents", MINE_MODEL + ["--index", "IVF4096,Flat"],
         error=r"IVF4096.*4096 .*400 documents"),
    Case("settings", "mine --index Garbage", MINE_MODEL + ["--index", "Garbage"], error=r"unknown faiss index"),
    Case("settings", "train --max-length 0", TRAIN + ["--max-length", "0"], error=r"max_length.*>= 1"),
    Case("settings", "train --max-length beyond the model", TRAIN + ["--max-length", "4096"],
         error=r"max_length 4096 .*128 positions"),
    Case("settings", "train --train-batch-size 0", TRAIN + ["--train-batch-size", "0"], error=r"batch_size"),
    Case("settings", "train --seed -1", TRAIN + ["--seed", "-1"], error=r"seed.*>= 0"),
    Case("settings", "train --lr -1", TRAIN + ["--lr", "-1"], error=r"learning_rate.*> 0"),
    # output folders: refused at the start, for train too (not at the final save)
    Case("outputs", "evaluate --output is a file", EVAL_BM25, _output_is_a_file, error=r"is a file, not a folder"),
    Case("outputs", "mine --output is a file", MINE, _output_is_a_file, error=r"is a file, not a folder"),
    Case("outputs", "train --output is a file", TRAIN, _output_is_a_file, error=r"is a file, not a folder"),
    Case("outputs", "evaluate --output under a file", EVAL_BM25 + ["--output", "{blocker}/out"],
         _output_under_a_file, error=r"cannot be made, .*blocker is a file"),
    Case("outputs", "mine --output under a file", MINE + ["--output", "{blocker}/out"], _output_under_a_file,
         error=r"cannot be made, .*blocker is a file"),
    Case("outputs", "train --output under a file", TRAIN + ["--output", "{blocker}/out"], _output_under_a_file,
         error=r"cannot be made, .*blocker is a file"),
    # ids that would break the TREC run file and the TSVs hardneg writes
    Case("ids", "corpus id with a space", EVAL_BM25,
         lambda d: edit(d / "corpus.jsonl", lambda t: t.replace('"_id": "', '"_id": "x ', 1)),
         error=r"corpus.jsonl:1: field '_id': id 'x MED-\d+' contains SPACE"),
    Case("ids", "corpus id with a newline", EVAL_BM25,
         lambda d: edit(d / "corpus.jsonl", lambda t: t.replace('"_id": "', '"_id": "x\\ny', 1)),
         error=r"corpus.jsonl:1: field '_id': .*control character"),
    Case("ids", "query id with a tab", EVAL_BM25,
         lambda d: edit(d / "queries.jsonl", lambda t: t.replace('"_id": "', '"_id": "x\\t', 1)),
         error=r"queries.jsonl:1: field '_id': .*'\\t'"),
    Case("ids", "qrels id with a space", EVAL_BM25,
         _add_qrels_row(lambda row: f"{row[0]}\tMED 1\t1"), error=r"test.tsv:\d+: field 'corpus-id': id 'MED 1'"),
    Case("ids", "pools doc id with a no-break space", TRAIN,
         _pools_copy(lambda t: t.replace('"doc_id": "', '"doc_id": "x\\u00a0', 1)),
         error=r"pools.jsonl:1: field 'positives': id .*NO-BREAK SPACE"),
    # silent merges: a rule, stated and counted, or an error
    Case("merges", "qrels row judged twice, same grade", EVAL_BM25, _add_qrels_row("\t".join),
         check=_same_counted("duplicate_qrels_rows", 1), outcome="read once, `duplicate_qrels_rows: 1`"),
    Case("merges", "qrels row judged twice, other grade", EVAL_BM25,
         _add_qrels_row(lambda row: "\t".join(row[:2] + [str(int(row[2]) + 1)])),
         error=r"judges document .* twice, \d on line 2 and \d here"),
    Case("merges", "run file with a document listed twice", RUN_FILE,
         lambda d: edit(write_run_of(d), lambda t: t + t.splitlines()[0] + "\n"),
         error=r"run.trec:4: field 'docid': .*listed a second time"),
    Case("merges", "corpus with a duplicated id", EVAL_BM25,
         lambda d: edit(d / "corpus.jsonl", lambda t: t + t.splitlines()[0] + "\n"), error=r"duplicate id"),
    Case("merges", "queries with a duplicated id", EVAL_BM25,
         lambda d: edit(d / "queries.jsonl", lambda t: t + t.splitlines()[0] + "\n"), error=r"duplicate id"),
    Case("merges", "pools with a duplicated query", TRAIN,
         _pools_copy(lambda t: t + t.splitlines()[0] + "\n"), error=r"has a second pool \(the first is on line 1\)"),
    # byte-order marks: an encoding marker, read as one
    Case("bom", "BOM on corpus.jsonl", EVAL_BM25, _bom("corpus.jsonl"), check=_same, outcome="same metrics"),
    Case("bom", "BOM on queries.jsonl", EVAL_BM25, _bom("queries.jsonl"), check=_same, outcome="same metrics"),
    Case("bom", "BOM on header-less qrels", EVAL_BM25, _bom("qrels/test.tsv", drop_header=True), check=_same,
         outcome="same metrics (first row kept)"),
    Case("bom", "BOM on a run file", RUN_FILE, _bom("run.trec"), check=_same, outcome="same metrics"),
    # models
    Case("models", "model folder with a truncated model.safetensors",
         ["evaluate", "--retriever", "{data}/model", "--split", "test", "--no-plots"], _damaged_model,
         error=r"cannot load model .*SafetensorError: .*truncated or damaged"),
    Case("models", "a model path that does not exist", ["evaluate", "--retriever", "{data}/nowhere", "--split", "test"],
         error=r"model path .*nowhere' does not exist"),
    Case("models", "a near miss of a built-in name", ["evaluate", "--retriever", "bm-25", "--split", "test"],
         error=r"unknown retriever 'bm-25': did you mean 'bm25'\?"),
    # pools tied to their corpus, and their scores
    Case("pools", "pools mined on other texts (same ids)", TRAIN, _pools_copy(corpus_edit=True),
         error=r"mined on another corpus"),
    Case("pools", "... with --allow-corpus-mismatch", TRAIN + ["--allow-corpus-mismatch"],
         _pools_copy(corpus_edit=True), outcome="trains (the user said so)"),
    Case("pools", "pools score NaN", TRAIN, _pools_copy(lambda t: t.replace('"score": ', '"score": NaN, "x": ', 1)),
         error=r"score nan is not a finite number"),
    Case("pools", "pools file cut in the middle of a line", TRAIN, _pools_copy(lambda t: t[: len(t) // 2]),
         error=r"pools.jsonl:\d+: malformed JSON"),
]


# ------------------------------------------------------------------------------------------------ running


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """The clean data, pools mined on it, and the reference metrics of the evaluate cases."""
    from hardneg.cli import main

    root = tmp_path_factory.mktemp("bad-inputs")
    clean = write_beir(root / "clean" / "data")
    assert main(["--quiet", "mine", "--data", str(clean), "--output", str(root / "pools"), *MINE[1:]]) == 0
    POOLS["clean"], POOLS["model"] = root / "pools", tiny_model
    references = {}
    for argv in (EVAL_BM25, RUN_FILE):
        folder = root / "reference" / argv[1].lstrip("-")
        data = shutil.copytree(clean, folder / "data")
        write_run_of(data)
        argv = [a.replace("{data}", str(data)) for a in argv]
        assert main(["--quiet", *argv[:1], "--data", str(data), "--output", str(folder / "out"), *argv[1:]]) == 0
        references[tuple(argv[:2])] = json.loads((folder / "out" / "metrics.json").read_text())
    return {"root": root, "clean": clean, "model": tiny_model, "references": references}


def _command(case: Case, world: dict, folder: Path) -> tuple[list[str], Path]:
    data = shutil.copytree(world["clean"], folder / "data")
    if case.prepare:
        case.prepare(data)
    values = {"{model}": str(world["model"]), "{pools}": str(data / "pools") if (data / "pools").exists()
              else str(world["root"] / "pools"), "{data}": str(data), "{blocker}": str(folder / "blocker")}
    argv = [values.get(a, a) for a in case.argv]
    argv = [a.replace("{data}", str(data)).replace("{blocker}", str(folder / "blocker")) for a in argv]
    output = folder / "out"
    if "--output" in argv:
        output = Path(argv[argv.index("--output") + 1])
    else:
        argv += ["--output", str(output)]
    return [argv[0], "--data", str(data), *argv[1:]], output


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}: {c.name}" for c in CASES])
def test_bad_input_gets_one_clear_line_or_the_right_result(case, world, tmp_path, capsys):
    from hardneg.cli import main

    argv, output = _command(case, world, tmp_path)
    before = output.exists() and output.is_dir()
    code = main(["--quiet", *argv])  # an exception escaping here is the traceback this test exists to catch
    err = capsys.readouterr().err.strip().splitlines()  # --quiet: no progress bar of any library either
    _record(case, err[0] if err else f"exit {code}")
    if case.error:
        assert code == 2, err
        assert len(err) == 1 and err[0].startswith("hardneg: error: "), err
        assert re.search(case.error, err[0]), err[0]
        assert before or not (output.is_dir() and any(output.iterdir())), "an error left output behind"
        return
    assert code == 0, err
    if case.check:
        reference = world["references"][tuple(case.argv[:2])]
        case.check(json.loads((output / "metrics.json").read_text()), reference)


# ------------------------------------------------------------------------------------ reference-exact eval


def test_judged_documents_missing_from_the_corpus_count_as_beir_and_pytrec_eval_do(world, tmp_path):
    """A query whose only relevant document is missing from the corpus still counts (at 0), and a missing
    relevant document lowers recall: hardneg's means equal pytrec_eval's over the full qrels."""
    import pytrec_eval

    from eval.evaluate import evaluate
    from eval.runs import read_run
    from retriever.data import load_beir, load_qrels

    data = shutil.copytree(world["clean"], tmp_path / "data")
    qrels_path = data / "qrels" / "test.tsv"
    query_ids = [json.loads(line)["_id"] for line in (data / "queries.jsonl").read_text().splitlines()]
    judged = {line.split("\t")[0] for line in qrels_path.read_text().splitlines()[1:]}
    unjudged = next(q for q in query_ids if q not in judged)
    edit(qrels_path, lambda text: text + f"{unjudged}\tGONE-1\t1\n{sorted(judged)[0]}\tGONE-2\t2\n")
    dataset = load_beir(data, "test")
    assert dataset.unretrievable_qrels == 2 and unjudged in dataset.queries and not dataset.relevant(unjudged)
    record = evaluate(dataset, "bm25", metrics=("nDCG@10", "Recall@100", "AUC", "AUC-corpus"), depth=100,
                      output_dir=tmp_path / "out")
    for auc in ("AUC", "AUC-corpus"):  # a relevant document that cannot be scored loses every pair, in both
        assert record["per_query"][auc][unjudged] == 0.0
    evaluated = [q for q in dataset.queries if any(g > 0 for g in dataset.qrels[q].values())]
    assert unjudged in evaluated
    assert record["unretrievable_qrels_rows"] == 2 and record["queries"] == len(evaluated)
    run = read_run(tmp_path / "out" / "run.trec")
    reference = pytrec_eval.RelevanceEvaluator(load_qrels(qrels_path), {"ndcg_cut_10", "recall_100"}).evaluate(run)
    assert reference[unjudged]["ndcg_cut_10"] == 0.0
    for ours, theirs in (("nDCG@10", "ndcg_cut_10"), ("Recall@100", "recall_100")):
        expected = sum(reference.get(q, {}).get(theirs, 0.0) for q in evaluated) / len(evaluated)  # trec_eval -c
        assert record["metrics"][ours] == pytest.approx(expected, abs=1e-12)


def test_mining_never_takes_a_missing_document_as_a_positive(world, tmp_path):
    from mining.filters import TopK
    from mining.mine import mine
    from retriever.data import load_beir

    data = shutil.copytree(world["clean"], tmp_path / "data")
    qrels_path = data / "qrels" / "train.tsv"
    query = first_row(qrels_path)[0]
    edit(qrels_path, lambda text: text + f"{query}\tGONE-1\t1\n")
    judged = {line.split("\t")[0] for line in qrels_path.read_text().splitlines()[1:]}
    unjudged = next(json.loads(line)["_id"] for line in (data / "queries.jsonl").read_text().splitlines()
                    if json.loads(line)["_id"] not in judged)
    edit(qrels_path, lambda text: text + f"{unjudged}\tGONE-2\t1\n")  # judged, but its document is gone
    dataset = load_beir(data, "train")
    result = mine(dataset, "bm25", depth=20, num_negatives=2, filter=TopK(), show_progress=False)
    assert all(p.doc_id in dataset.corpus for pool in result.pools for p in pool.positives)
    assert any(pool.query_id == query for pool in result.pools)
    assert all(pool.query_id != unjudged for pool in result.pools)
    assert result.meta["counts"]["queries_without_relevant_document"] == 1
    assert "1 more queries of the split have no relevant document in the corpus" in result.summary()


def test_run_refuses_training_data_it_cannot_select_on_before_any_stage(world, tmp_path, capsys, monkeypatch):
    """One training query, with train.dev_fraction: nothing to hold out; no query with a relevant document: nothing
    to train on. Both refused before the evaluation and mining that come first (minutes to hours on a real corpus),
    leaving nothing behind; a data.path with ~ is the user's home, as in a shell."""
    from hardneg.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    data = shutil.copytree(world["clean"], tmp_path / "data")
    qrels_path = data / "qrels" / "train.tsv"
    rows = qrels_path.read_text().splitlines()
    first = rows[1].split("\t")[0]
    config = REPO / "configs" / "nfcorpus-demo.yaml"
    for kept, error in (([r for r in rows[1:] if r.split("\t")[0] == first],
                         r"train.dev_fraction \(--dev-fraction\) .* needs at least two with a positive; there is 1:"),
                        ([r.rsplit("\t", 1)[0] + "\t0" for r in rows[1:]],
                         r"data/train: no query has a relevant document \(grade > 0\) in the corpus")):
        qrels_path.write_text("\n".join([rows[0], *kept]) + "\n")
        output = tmp_path / "out"
        assert main(["--quiet", "run", str(config), "--set", "data.path=~/data", "--output-dir", str(output)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(error, err[0]), err
        assert not (output.is_dir() and any(output.iterdir())), "a refused run left output behind"
    # Ten queries: it runs, with a note that 2 held-out queries make the kept epoch partly chance (then stops
    # here at a model that does not exist, before any work).
    ten = sorted({r.split("\t")[0] for r in rows[1:]})[:10]
    qrels_path.write_text("\n".join([rows[0], *(r for r in rows[1:] if r.split("\t")[0] in ten)]) + "\n")
    assert main(["run", str(config), "--set", "data.path=~/data", "--output-dir", str(tmp_path / "out"),
                 "--model", str(tmp_path / "no-model")]) == 2
    assert "holds out only 2 training queries to select on" in capsys.readouterr().out


def test_run_refuses_an_output_folder_it_cannot_write_before_any_stage(tmp_path, capsys):
    from hardneg.cli import main

    (tmp_path / "blocker").write_text("not a folder")
    config = REPO / "configs" / "nfcorpus-demo.yaml"
    assert main(["--quiet", "run", str(config), "--output-dir", str(tmp_path / "blocker" / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"output_dir .*blocker/run: cannot be made, .*blocker is a file", err[0]), err


# ------------------------------------------------------------------------------------------------ faults


def _hardneg(args: list[str], **options) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "hardneg", "--quiet", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


def _limit_file_size(limit: int):
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_write_that_fails_mid_run_is_one_line_and_leaves_no_partial_file(world, tmp_path):
    output = tmp_path / "out"
    process = _hardneg(["mine", "--data", str(world["clean"]), "--output", str(output), *MINE[1:]],
                       preexec_fn=_limit_file_size(4096))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("hardneg: error: File too large")
    assert not (output / "pools.jsonl").exists()
    assert not [p for p in output.rglob("*") if p.name.endswith(".tmp")]


def test_stale_staging_of_a_killed_run_is_removed_and_a_live_ones_kept(tmp_path):
    from retriever.io import remove_stale_staging, staging_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours = staging_prefix("x")  # ".x.h<machine>p<pid>."
    host = ours.split(".")[2][: ours.split(".")[2].index("p")]

    def name(target: str, pid: int, machine: str = host) -> str:
        return f".{target}.{machine}p{pid}.abcd_123"

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    stale_file = tmp_path / (name("train_log.jsonl", dead.pid) + ".tmp")
    stale_folder = checkpoints / name("step-0000004", dead.pid)
    other_machine = tmp_path / (name("pools.jsonl", dead.pid, machine="h00000000") + ".tmp")
    live = tmp_path / f"{staging_prefix('pools.jsonl')}zzzz9999.tmp"
    namesake = tmp_path / (name("run.trec", os.getpid()) + ".tmp")  # our pid, but older than this process
    kept = tmp_path / ".hidden-user-file"
    for path in (stale_file, other_machine, live, namesake, kept):
        path.write_text("x")
    os.utime(namesake, (time.time() - 3600, time.time() - 3600))
    stale_folder.mkdir()
    (stale_folder / "model.safetensors").write_text("half")
    aside = tmp_path / name("best.old", dead.pid)  # a swap of best/ cut off between its two renames
    (aside / "previous").mkdir(parents=True)
    (aside / "previous" / "model.safetensors").write_text("the old best")
    assert sorted(remove_stale_staging(tmp_path)) == sorted([stale_file, stale_folder, namesake, aside])
    assert live.exists() and kept.exists() and other_machine.exists() and checkpoints.exists()
    assert (tmp_path / "best" / "model.safetensors").read_text() == "the old best"


def test_sigterm_stops_like_ctrl_c(world, tmp_path):
    output = tmp_path / "out"
    process = _hardneg(["train", "--data", str(world["clean"]), "--pools", str(world["root"] / "pools"),
                        "--model", str(world["model"]), "--epochs", "50", "--train-batch-size", "8",
                        "--save-steps", "1", "--output", str(output)])
    deadline = time.time() + 240
    while time.time() < deadline and not list((output / "checkpoints").glob("step-*")):
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "hardneg: interrupted" in err
    assert not [p for p in output.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ the table

TABLE_ENV = "HARDNEG_BAD_INPUTS_TABLE"


def _record(case: Case, line: str) -> None:
    """With ``HARDNEG_BAD_INPUTS_TABLE=FILE`` set, note what each case got, for :func:`markdown_table`."""
    if os.environ.get(TABLE_ENV):
        with open(os.environ[TABLE_ENV], "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"name": case.name, "line": line}) + "\n")


def markdown_table(recorded: Path) -> str:
    got = {}
    for line in recorded.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        got[entry["name"]] = entry["line"]
    rows = ["| class | input | what it gets now |", "|---|---|---|"]
    for case in CASES:
        if case.error:
            line = re.sub(r"/\S*/(data|out|blocker|tiny-bert\d*)", r"…/\1", got.get(case.name, "(not run)"))
            outcome = f"exit 2: `{line.removeprefix('hardneg: error: ')}`"
        else:
            outcome = f"exit 0, {case.outcome or 'the right result'}"
        rows.append(f"| {case.group} | {case.name} | {outcome} |")
    return "\n".join(rows)


if __name__ == "__main__":
    # HARDNEG_BAD_INPUTS_TABLE=/tmp/bad.jsonl pytest tests/test_bad_inputs.py
    # python tests/test_bad_inputs.py /tmp/bad.jsonl
    print(markdown_table(Path(sys.argv[1])))
