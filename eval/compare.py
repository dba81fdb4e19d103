"""``hardneg compare``: two or more evaluations side by side, each against the first with paired tests.

A difference of 0.005 nDCG@10 on 323 queries may be noise; the paired tests say how likely. For
each metric and each run after the first (the baseline), on the queries both were scored on:

* the paired t-test on the per-query differences (``scipy.stats.ttest_rel``, two-sided);
* the paired randomization test (Fisher's sign-flip test, two-sided): the sign of each query's
  difference is flipped at random ``permutations`` times with ``numpy.random.default_rng(seed)``;
  p = (1 + #|mean of flipped| >= |observed mean|) / (1 + permutations), so it is never 0.

Inputs are evaluation folders (``per_query.json`` written by ``hardneg evaluate``) or the
``per_query.json`` / ``metrics.json`` files themselves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.report import markdown_table, number
from retriever.io import DataError, HardnegError

COMPARABLE_OPTIONS = ("relevance_level", "ignore_identical_ids")
"""Evaluation options under which per-query values of the same metric are not comparable."""


@dataclass
class Evaluation:
    label: str
    path: Path
    dataset: str
    split: str
    per_query: dict[str, dict[str, float]]
    options: dict = field(default_factory=dict)  # what metrics.json beside it says the values were computed with


def load_evaluation(path: str | os.PathLike, label: str | None = None) -> Evaluation:
    """An evaluation folder, its ``per_query.json``, or its ``metrics.json`` (the per-query file beside it)."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "per_query.json"
    elif path.name != "per_query.json" and path.suffix == ".json":
        path = path.with_name("per_query.json")
    if not path.is_file():
        raise DataError(path, "not found", hint="give an evaluation folder written by 'hardneg evaluate --output' "
                                                "(it holds per_query.json)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"not valid JSON ({err})") from None
    values = record.get("per_query") if isinstance(record, dict) else None
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise DataError(path, "missing or not a mapping of metric -> {query id: value}", field="per_query")
    try:
        options = json.loads(path.with_name("metrics.json").read_text(encoding="utf-8")).get("options", {})
    except (OSError, ValueError, AttributeError):  # a per_query.json on its own: nothing to check against
        options = {}
    return Evaluation(label or path.parent.name, path, str(record.get("dataset", "?")),
                      str(record.get("split", "?")), values, options if isinstance(options, dict) else {})


def randomization_test(differences: np.ndarray, permutations: int = 10_000, seed: int = 42) -> float:
    """Two-sided paired sign-flip randomization test on per-query differences; returns the p-value."""
    differences = np.asarray(differences, dtype=np.float64)
    n = differences.size
    if n == 0:
        return float("nan")
    observed = abs(differences.mean())
    rng = np.random.default_rng(seed)
    at_least, done = 0, 0
    block = max(1, min(permutations, (8 << 20) // max(n, 1)))  # bounded memory: ~8M signs at a time
    while done < permutations:
        size = min(block, permutations - done)
        signs = rng.integers(0, 2, size=(size, n), dtype=np.int8) * 2 - 1
        means = np.abs(signs @ differences) / n
        at_least += int(np.count_nonzero(means >= observed - 1e-12))
        done += size
    return (at_least + 1) / (permutations + 1)


def paired_t_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired t-test p-value (differences all equal: 1.0 when zero, else 0.0)."""
    from scipy import stats

    differences = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if differences.size < 2:
        return float("nan")
    if np.ptp(differences) <= 1e-12 * max(1.0, float(np.abs(differences).max())):
        return 1.0 if abs(differences.mean()) <= 1e-12 else 0.0  # no variance: t is 0 (no change) or infinite
    return float(stats.ttest_rel(b, a).pvalue)


def compare(paths: list[str | os.PathLike], *, metrics: list[str] | None = None, permutations: int = 10_000,
            seed: int = 42, labels: list[str] | None = None) -> dict:
    """Compare evaluations; the first is the baseline. Returns ``{"runs": [...], "metrics": {...}}``.

    Ranking metrics must have been computed on the same queries (else the runs are not comparable
    and this is an error); AUC is compared on the queries both defined it for.
    """
    if len(paths) < 2:
        raise HardnegError("compare needs two or more evaluations (folders written by 'hardneg evaluate')")
    if permutations < 1:
        raise HardnegError(f"permutations must be >= 1, got {permutations}")
    if labels is not None and len(labels) != len(paths):
        raise HardnegError(f"{len(labels)} labels for {len(paths)} evaluations")
    runs = [load_evaluation(path, labels[i] if labels else None) for i, path in enumerate(paths)]
    seen = {}
    for run in runs:  # two folders both called "eval": label them by their path instead
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1 and not labels:
            run.label = str(run.path.parent)
    base = runs[0]
    for key in COMPARABLE_OPTIONS:  # the same per-query numbers would mean different things
        differing = [r for r in runs[1:] if key in r.options and key in base.options
                     and r.options[key] != base.options[key]]
        if differing:
            raise HardnegError(f"{base.label} was evaluated with {key} {base.options[key]} and {differing[0].label} "
                               f"with {differing[0].options[key]}: evaluate both with the same {key}")
    names = metrics or [m for m in base.per_query if all(m in r.per_query for r in runs[1:])]
    if not names:
        raise HardnegError("the evaluations share no metric")
    result: dict = {"runs": [{"label": r.label, "path": str(r.path), "dataset": r.dataset, "split": r.split}
                             for r in runs],
                    "baseline": base.label, "permutations": permutations, "seed": seed, "metrics": {}}
    for name in names:
        for run in runs:
            if name not in run.per_query:
                raise DataError(run.path, f"no per-query values for metric {name!r}",
                                hint=f"it has {', '.join(run.per_query)}")
        rows = []
        base_values = base.per_query[name]
        for run in runs[1:]:
            values = run.per_query[name]
            common = sorted(set(base_values) & set(values))
            if not name.upper().startswith("AUC") and set(base_values) != set(values):
                raise HardnegError(f"{name}: {base.label} was scored on {len(base_values)} queries and {run.label} "
                                   f"on {len(values)} ({len(common)} in common): evaluate both on the same split (an "
                                   "evaluation older than the one counting judged queries with nothing relevant "
                                   "may differ: evaluate it again)")
            if not common:
                raise HardnegError(f"{name}: {base.label} and {run.label} have no query in common")
            a = np.array([base_values[q] for q in common])
            b = np.array([values[q] for q in common])
            rows.append({"run": run.label, "queries": len(common), "baseline_mean": float(a.mean()),
                         "mean": float(b.mean()), "difference": float(b.mean() - a.mean()),
                         "wins": int((b > a).sum()), "losses": int((b < a).sum()),
                         "p_t_test": paired_t_test(a, b),
                         "p_randomization": randomization_test(b - a, permutations, seed)})
        result["metrics"][name] = {"baseline_mean": float(np.mean(list(base_values.values()))), "against": rows}
    return result


def p_value(p: float) -> str:
    if p != p:
        return "n/a"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.4f}"


def markdown_comparison(result: dict, alpha: float = 0.05) -> str:
    """One row per metric and run: means, difference, wins/losses, both p-values (* when below ``alpha``)."""
    header = ["metric", "run", "queries", result["baseline"], "run mean", "difference", "wins/losses",
              "p (t-test)", "p (randomization)"]
    rows = []
    for name, entry in result["metrics"].items():
        for row in entry["against"]:
            star = " *" if row["p_randomization"] < alpha else ""
            rows.append([name, row["run"], str(row["queries"]), number(row["baseline_mean"]), number(row["mean"]),
                         f"{row['difference']:+.4f}{star}", f"{row['wins']}/{row['losses']}",
                         p_value(row["p_t_test"]), p_value(row["p_randomization"])])
    note = (f"\nBaseline: {result['baseline']}. Paired two-sided tests per metric; randomization test with "
            f"{result['permutations']} sign flips (seed {result['seed']}); * marks p < {alpha}.\n")
    return markdown_table(header, rows) + note
