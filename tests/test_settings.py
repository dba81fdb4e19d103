"""The settings schema: one declaration gives the CLI flags, the YAML checks (with file:line) and the defaults."""

from __future__ import annotations

import dataclasses

import pytest

from eval.settings import EvaluateSettings
from hardneg.cli import build_parser, main
from hardneg.pipeline import SECTIONS, load_config
from mining.settings import MineSettings
from retriever.encoding import EncodeSettings
from retriever.io import DataError
from retriever.settings import settings_of
from retriever.train_settings import TrainConfig


def _config(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: nfcorpus-demo}\n" + text)
    return path


def test_yaml_numbers_are_read_as_yaml_1_2(tmp_path):
    config = load_config(_config(tmp_path, "train:\n  learning_rate: 3e-5\n  temperature: 5E-2\n"))
    assert config["train"]["learning_rate"] == 3e-5 and config["train"]["temperature"] == 0.05
    assert load_config(_config(tmp_path, "mine: {depth: 20}\n"), ["train.learning_rate=1e-4"])["train"][
        "learning_rate"] == 1e-4


@pytest.mark.parametrize("text, line, field, message", [
    ('mine:\n  depth: "100"\n', 3, "mine.depth", "expected a whole number, got '100' (a string: remove the quotes)"),
    ("train:\n  loss: infonce\n  epochs: two\n", 4, "train.epochs", "expected a whole number, got 'two'"),
    ("train:\n  batch_size: 8.5\n", 3, "train.batch_size", "expected a whole number, got 8.5"),
    ("evaluate:\n  metrics: [nDCG@10, bpref]\n", 2, "evaluate", "unknown metric 'bpref'"),
    ("train:\n  dev_fraction: 0.9\n", 3, "train.dev_fraction", "must be <= 0.5"),
    ("mine:\n  anchor_fallback: median\n", 3, "mine.anchor_fallback", "unknown anchor_fallback 'median'"),
    ('mine:\n  teacher: ""\n', 3, "mine.teacher", "is empty: leave it out (or null) for none"),
    ("model: '  '\n", 2, "model", "must not be empty"),
])
def test_bad_yaml_values_name_the_file_line_and_key(tmp_path, text, line, field, message):
    path = _config(tmp_path, text)
    with pytest.raises(DataError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}:{line}: field '{field}': ") and message in str(error.value)


def test_a_config_builds_on_its_base_and_errors_name_the_file_that_set_the_key(tmp_path):
    (tmp_path / "recipes").mkdir()
    base = tmp_path / "recipes" / "base.yaml"
    base.write_text("seed: 7\ndata: {path: nfcorpus-demo}\nmine:\n  filter: topk-percpos\n"
                    "  filter_params: {perc: 0.9}\n  depth: 50\ntrain:\n  epochs: 3\n  loss: mw\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: recipes/base.yaml\nmine:\n  filter: topk-marginpos\n  filter_params: {margin: 0.1}\n"
                     "train:\n  epochs: 2\n")
    config = load_config(child)
    assert config["seed"] == 7 and config["mine"]["depth"] == 50 and config["train"]["loss"] == "mw"
    assert config["train"]["epochs"] == 2 and config["mine"]["filter_params"] == {"margin": 0.1}  # replaced whole
    base.write_text(base.read_text().replace("depth: 50", "depth: fifty"))
    with pytest.raises(DataError, match=f"^{base}:6: field 'mine.depth'"):
        load_config(child)
    base.write_text("base: ../child.yaml\n")
    with pytest.raises(DataError, match="a cycle"):
        load_config(child)


def test_a_bad_run_config_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = _config(tmp_path, "train:\n  epochs: two\n")
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{path}:3: field 'train.epochs'" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, field", [("train.epochs=two", "train.epochs"), ("seed=-1", "seed"),
                                             ("evaluate.depth=0", "evaluate.depth"),
                                             ("train.learning_rate=nan", "train.learning_rate"),
                                             ("mine.fuse_bm25=inf", "mine.fuse_bm25")])
def test_a_bad_value_given_with_set_names_the_override_not_a_line(tmp_path, override, field):
    path = _config(tmp_path, "train:\n  epochs: 2\n  loss: nosuch\n")
    with pytest.raises(DataError) as error:
        load_config(path, [override, "train.loss=infonce"])
    assert str(error.value).startswith(f"--set {override.partition('=')[0]}: field '{field}': ")


def test_run_flags_are_named_in_errors_and_a_file_value_is_not_blamed_on_an_override(tmp_path, capsys):
    path = _config(tmp_path, "train:\n  epochs: 2\n  loss: nosuch\n")
    assert main(["run", str(path), "--seed", "-1", "--output-dir", str(tmp_path / "out")]) == 2
    assert "hardneg: error: --seed: field 'seed': must be >= 0" in capsys.readouterr().err
    with pytest.raises(DataError) as error:
        load_config(path, ["train.epochs=3"])
    assert str(error.value).startswith(f"{path}:4: field 'train.loss'")


def test_blank_text_is_refused_except_where_it_is_a_value_of_its_own(tmp_path, capsys):
    assert main(["mine", "--data", "nfcorpus-demo", "--teacher", "", "--output", str(tmp_path / "pools")]) == 2
    assert "hardneg: error: mine: teacher: is empty" in capsys.readouterr().err
    assert not (tmp_path / "pools").exists()
    config = load_config(_config(tmp_path, 'train:\n  query_prefix: ""\n  document_prefix: ""\n'))
    assert config["train"]["query_prefix"] == "" and config["train"]["document_prefix"] == ""  # no prefix


def test_a_section_with_every_key_commented_out_is_empty(tmp_path):
    config = load_config(_config(tmp_path, "train:\n  # epochs: 3\nmine:\n  depth: 20\n"))
    assert config["train"]["epochs"] == 1 and config["mine"]["depth"] == 20
    child = tmp_path / "child.yaml"  # ... and changes nothing of its base's section
    child.write_text("base: c.yaml\nmine:\n  # depth: 50\n")
    assert load_config(child)["mine"]["depth"] == 20


def test_a_rule_between_settings_blames_the_override_it_names_and_else_the_section(tmp_path):
    """A section's check() relates several settings; when a --set value broke it, the flag is named, not the file's
    ``train:`` line (which the user did not change)."""
    path = _config(tmp_path, "seed: 1\ntrain:\n  epochs: 2\n")
    with pytest.raises(DataError) as error:
        load_config(path, ["train.remine_every=2"])
    assert str(error.value).startswith("--set train.remine_every: field 'train.remine_every': "), error.value
    with pytest.raises(DataError) as error:  # of several overrides, the one the rule names
        load_config(path, ["train.learning_rate=1e-4", "train.distill_scope=batch"])
    assert str(error.value).startswith("--set train.distill_scope: "), error.value
    path = _config(tmp_path, "train:\n  epochs: 2\n  remine_every: 2\n")  # the rule names no overridden key
    with pytest.raises(DataError) as error:
        load_config(path, ["train.learning_rate=1e-4"])
    assert str(error.value).startswith(f"{path}:2: field 'train': "), error.value


def test_the_python_functions_default_to_the_schema():
    """``mine()`` and ``evaluate()`` take their settings as keyword arguments; where a default is a plain value
    it must be the schema's (the CLI's, the YAML's), so the three ways in cannot drift apart."""
    import inspect

    from eval.evaluate import evaluate
    from mining.mine import mine

    for function, cls, objects in [(mine, MineSettings, {"retriever", "filter"}), (evaluate, EvaluateSettings, set())]:
        parameters = inspect.signature(function).parameters
        shared = [item for item in settings_of(cls) if item.name in parameters and item.name not in objects]
        assert len(shared) >= 6
        for item in shared:
            default = tuple(item.default) if isinstance(item.default, list) else item.default
            assert parameters[item.name].default == default, (function.__name__, item.name)


def _flags(command: str) -> dict[str, object]:
    """dest -> default of every option of a sub-command."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {action.dest: action.default for action in sub._actions if action.option_strings}


@pytest.mark.parametrize("command, cls, prefix", [("train", TrainConfig, ""), ("mine", MineSettings, ""),
                                                  ("train", EncodeSettings, "encode_"),
                                                  ("evaluate", EncodeSettings, "encode_"),
                                                  ("evaluate", EvaluateSettings, "")])
def test_cli_flags_and_defaults_come_from_the_schema(command, cls, prefix):
    flags = _flags(command)
    for item in settings_of(cls):
        if item.meta.cli:
            assert f"{prefix}{item.name}" in flags, item.name
            expected = None if item.kind is list else item.default  # list flags append onto None
            assert flags[f"{prefix}{item.name}"] == expected, item.name


def test_every_setting_has_help_and_one_declaration():
    """Each section's names are unique across the schema classes a command combines, and every field is a
    declared setting (a plain dataclass field would bypass the checks)."""
    for cls in [*SECTIONS.values(), TrainConfig, MineSettings]:
        for field in dataclasses.fields(cls):
            assert "setting" in field.metadata, f"{cls.__name__}.{field.name}"
        assert all(item.meta.help for item in settings_of(cls))


def test_help_shows_every_default(capsys):
    for command in ("train", "mine", "evaluate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: 32)" in text or command != "train"
        assert "(default: 64)" in text  # the encode batch size


def test_the_shipped_run_configs_load_and_the_recipes_differ_only_where_they_say(tmp_path):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    # the teacher's folder exists once fetch_mpnet.sh has run; a config naming a missing one is refused on load
    (tmp_path / "config.json").write_text("{}")  # a model folder, as far as the check on load can tell
    teacher = {"recipe-distill": [f"mine.teacher={tmp_path}"]}
    loaded = {name: load_config(configs / f"{name}.yaml", teacher.get(name))
              for name in ("nfcorpus-demo", "nfcorpus", "recipe-minilm", "recipe-distill")}
    cheap, distill, demo = loaded["recipe-minilm"], loaded["recipe-distill"], loaded["nfcorpus-demo"]
    changed = {(section, key) for section in ("mine", "train") for key in cheap[section]
               if cheap[section][key] != distill[section][key]}
    assert changed == {("mine", key) for key in ("teacher", "fuse_bm25", "filter", "filter_params", "anchor",
                                                 "anchor_fallback")} | \
        {("train", key) for key in ("negatives_per_query", "distill_weight", "distill_scope", "teacher_temperature",
                                    "max_length", "dropout")}
    assert cheap["train"]["dev_fraction"] and cheap["mine"]["retriever"] == ["model"]  # selects on held-out queries
    assert {k: v for k, v in demo.items() if k not in ("name", "output_dir")} == \
        {k: v for k, v in cheap.items() if k not in ("name", "output_dir")}  # the demo is the cheap recipe


def test_every_lever_of_the_recipe_benchmark_is_a_config_that_loads(tmp_path):
    """bench/bench_recipes.py's ablation table switches one lever of recipe-distill at a time; a lever that the
    settings' rules refuse would only show hours into a sweep."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_recipes", root / "bench" / "bench_recipes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "config.json").write_text("{}")  # the teacher's folder, as far as the check on load can tell
    recipe = root / "configs" / "recipe-distill.yaml"
    base = load_config(recipe, [f"mine.teacher={tmp_path}"])
    for name, changes in bench.LEVERS.items():
        config = load_config(recipe, [f"mine.teacher={tmp_path}", *changes.split(",")])
        switched = {(section, key) for section in ("mine", "train") for key in base[section]
                    if base[section][key] != config[section][key]}
        said = {tuple(change.partition("=")[0].split(".")) for change in changes.split(",")}
        assert switched and switched <= said, name  # the lever changes something, and only what it says
