"""``hardneg reproduce CONFIG``: run one benchmark evaluation and check it against the expected scores.

A benchmark config (``configs/eval-*.yaml``) names the data, the retriever and the evaluation
options; ``configs/expected_scores.yaml`` holds, per config name and metric, the score this project
measured (``expected``, with a ``tolerance`` for library and hardware drift) and, where one exists,
the published figure (``published``, with ``published_tolerance``). Each check is reported as

* ``match``: equal to the expected value at its printed precision (|difference| <= 0.5e-4);
* ``within tolerance``: |difference| <= tolerance;
* ``off``: anything else, which makes the command exit with status 1.

Every key of the config is checked, and the data and model are loaded, before anything is written;
an error names the config file, the line and the field (``configs/x.yaml:5: field 'data.path': ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eval.settings import EvaluateSettings
from hardneg.pipeline import RunData
from retriever.encoding import EncodeSettings, encode_options
from retriever.io import DataError, HardnegError, write_json
from retriever.settings import ConfigSource, from_mapping, resolve_sections, setting

MATCH = "match"
WITHIN = "within tolerance"
OFF = "off"
MATCH_PRECISION = 0.5e-4 + 1e-12

@dataclass
class BenchmarkData(RunData):
    """The ``data:`` section of a benchmark config: the dataset and the split scored."""

    split: str = setting("test", "qrels split evaluated")


@dataclass
class BenchmarkConfig:
    """The top level of a benchmark config (``configs/eval-*.yaml``)."""

    name: str | None = setting(None, "the config's key in expected_scores.yaml")
    description: str = setting("", "what the benchmark measures", empty=True)
    retriever: str | None = setting(None, "a model directory or name, or bm25 (or give run_file)")
    run_file: str | None = setting(None, "a TREC run to score instead of retrieving")
    output_dir: str | None = setting(None, "evaluation folder (default: runs/reproduce/NAME)")
    data: dict = setting({}, "see BenchmarkData", cli=False)
    encode: dict = setting({}, "see retriever.encoding.EncodeSettings", cli=False)
    evaluate: dict = setting({}, "see eval.settings.EvaluateSettings", cli=False)


BENCHMARK_SECTIONS = {"data": BenchmarkData, "encode": EncodeSettings, "evaluate": EvaluateSettings}


def load_benchmark_config(path: str | Path) -> tuple[dict, ConfigSource]:
    """Read a benchmark config through its schema: defaults filled, unknown keys, wrong types and bad values
    refused with their line."""
    source = ConfigSource(path)
    config = resolve_sections(from_mapping(BenchmarkConfig, source.data, section="", source=source),
                              BENCHMARK_SECTIONS, source)
    if not config["name"]:
        raise source.error("name", "missing: every benchmark config needs a name (its key in expected_scores.yaml)")
    if bool(config["retriever"]) == bool(config["run_file"]):
        raise source.error("retriever", "give exactly one of 'retriever' (a model, bm25) and 'run_file'")
    data = config["data"]
    if not data["path"] and not (data["corpus"] and data["queries"] and data["qrels"]):
        raise source.error("data", "set data.path (a BEIR folder, bundled name or beir:NAME) or data.corpus, "
                                   "data.queries and data.qrels")
    return config, source


def _resolve(value: str | None, source: ConfigSource) -> str | None:
    """A relative path is taken from the working directory, else from the repository root above configs/."""
    if not value or ":" in value.split("/")[0] or Path(value).is_absolute() or Path(value).exists():
        return value
    beside = source.path.resolve().parent.parent / value
    return str(beside) if beside.exists() else value


def load_expected(path: str | Path, name: str) -> tuple[dict, ConfigSource]:
    """The expected scores of config ``name``: metric -> {expected, tolerance, published?, ...}."""
    table = ConfigSource(path)
    entry = table.data.get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict) or not entry["metrics"]:
        raise DataError(table.path, f"no expected scores for config {name!r}", field=name,
                        hint="add an entry with 'metrics: {nDCG@10: {expected: ..., tolerance: ...}}'")
    for metric, spec in entry["metrics"].items():
        field = f"{name}.metrics.{metric}"
        if not isinstance(spec, dict):
            raise table.error(field, "expected a mapping with 'expected' and 'tolerance'")
        for key in ("expected", "tolerance", "published", "published_tolerance"):
            value = spec.get(key)
            if key in ("expected", "tolerance") and value is None:
                raise table.error(field, f"missing '{key}'")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise table.error(f"{field}.{key}", f"expected a number, got {value!r}")
        if (spec.get("published") is None) != (spec.get("published_tolerance") is None):
            raise table.error(field, "give both 'published' and 'published_tolerance', or neither")
    return entry["metrics"], table


def check(measured: float, expected: float, tolerance: float) -> str:
    difference = abs(measured - expected)
    if difference <= MATCH_PRECISION:
        return MATCH
    return WITHIN if difference <= tolerance + 1e-12 else OFF


def reproduce(config_path: str | Path, *, expected: str | Path | None = None, output_dir: str | Path | None = None,
              show_progress: bool = True) -> dict:
    """Run the benchmark config, compare with the expected scores, write ``reproduce.json`` beside the run.

    Returns ``{"name", "checks": [{metric, against, measured, reference, tolerance, status}], "ok",
    "record"}``; ``ok`` is False when any check is off.
    """
    from eval.evaluate import evaluate
    from eval.runs import read_run
    from retriever.data import load_dataset
    from retriever.factory import as_retriever

    config, source = load_benchmark_config(config_path)
    expected_path = Path(expected) if expected else source.path.parent / "expected_scores.yaml"
    table, _ = load_expected(expected_path, config["name"])
    settings = EvaluateSettings(**config["evaluate"])
    missing = [metric for metric in table if metric not in settings.metrics]
    if missing:
        raise source.error("evaluate.metrics", f"the expected scores check {missing}, which this config does not "
                                               "compute")
    data = config["data"]
    try:
        dataset = load_dataset(_resolve(data["path"], source), data["split"], corpus=_resolve(data["corpus"], source),
                               queries=_resolve(data["queries"], source), qrels=_resolve(data["qrels"], source))
    except HardnegError as err:
        field = "data.path" if data["path"] else "data"
        raise source.error(field, f"cannot load the dataset: {err}") from None
    output = Path(output_dir or config["output_dir"] or Path("runs") / "reproduce" / config["name"])
    options = settings.options() | {"output_dir": output, "config": config, "show_progress": show_progress}
    if config["run_file"]:
        run_path = _resolve(config["run_file"], source)
        try:
            run = read_run(run_path, dataset.queries)
        except HardnegError as err:
            raise source.error("run_file", str(err)) from None
        record = evaluate(dataset, run_path, run=run, **options)
    else:
        encode = encode_options(config["encode"], show_progress=show_progress)
        try:
            retriever = as_retriever(_resolve(config["retriever"], source), **encode)
        except (HardnegError, OSError, ValueError) as err:
            raise source.error("retriever", f"cannot load: {err}") from None
        record = evaluate(dataset, retriever, **options)
    record["model"] = config["retriever"] or config["run_file"]

    checks = []
    for metric, spec in table.items():
        measured = record["metrics"][metric]
        checks.append({"metric": metric, "against": "expected", "measured": measured, "reference": spec["expected"],
                       "tolerance": spec["tolerance"], "status": check(measured, spec["expected"], spec["tolerance"])})
        if spec.get("published") is not None:
            checks.append({"metric": metric, "against": "published", "measured": measured,
                           "reference": spec["published"], "tolerance": spec["published_tolerance"],
                           "status": check(measured, spec["published"], spec["published_tolerance"]),
                           "source": spec.get("source", "")})
    outcome = {"name": config["name"], "config": str(source.path), "expected_scores": str(expected_path),
               "output_dir": str(output), "checks": checks, "ok": all(c["status"] != OFF for c in checks)}
    write_json(output / "reproduce.json", outcome)
    outcome["record"] = record
    return outcome


def format_checks(outcome: dict) -> str:
    lines = [f"{outcome['name']}: {'OK' if outcome['ok'] else 'OFF'} (outputs in {outcome['output_dir']})",
             f"  {'metric':<12}{'against':<11}{'measured':>10}{'reference':>11}{'tolerance':>11}  status"]
    for c in outcome["checks"]:
        lines.append(f"  {c['metric']:<12}{c['against']:<11}{c['measured']:>10.4f}{c['reference']:>11.4f}"
                     f"{c['tolerance']:>11.4f}  {c['status']}")
    return "\n".join(lines)
