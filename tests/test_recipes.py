"""`tlserve train --config`: recipe files (YAML/JSON, any train option as a key, the command line
over the file), a run's record.json re-running its exact configuration, every file in recipes/
valid as it stands, and the bad-input cases (one line, exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from training.record.records import RunRecord

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"), key=lambda p: ("from-run" in p.read_text(), p.name))
# What makes any recipe tiny; every other key of the file is used as written.
TINY = {"data": "synthetic", "limit": "32", "epochs": "1", "finetune-epochs": "1", "weights": "none",
        "input-size": "32", "image-size": "32", "batch-size": "16", "precision": "float32"}


def _record(run: Path) -> RunRecord:
    return RunRecord.load(run / "record.json")


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipe-runs")


def test_recipes_cover_the_benchmark_and_the_seeds():
    names = {p.stem for p in RECIPES}
    assert len(names) == 27
    text = (ROOT / "benchmarks" / "cifar_recipes.py").read_text()
    for recipe in ("seed002-as-written", "cnn-bn", "resnet9s", "resnet9m", "resnet9m-page", "resnet9m-page-tta",
                   "resnet9-page-tta"):
        assert f"cifar-{recipe}" in names and f'"{recipe}"' in text
    seeds = (ROOT / "docs" / "seeds.md").read_text()
    for name in names:
        assert f"recipes/{name}.yaml" in seeds, f"docs/seeds.md does not point to recipes/{name}.yaml"


# Trained for real (tiny): one recipe of each kind, so the suite stays within its time budget; every
# recipe's keys and values are checked without training by the test after this one.
TRAINED = ("cifar-resnet9m-page-tta", "s001-partial", "s002-vgg16-block3", "s004-base", "s004-last1")


@pytest.mark.fast
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_is_a_valid_configuration_as_written(recipe):
    """The file through `tlserve train`'s own parsing: every key an option, every value of its type,
    and the resulting configuration passes the checks a run makes before it loads any data."""
    from typer.main import get_command

    import cli
    from training.fit.recipes import merge, train_config
    from training.fit.validation import resolve

    command = get_command(cli.app).commands["train"]
    ctx = command.make_context("train", ["--config", str(recipe)])
    cfg = resolve(train_config(merge(ctx, recipe)))
    written = yaml.safe_load(recipe.read_text())
    assert cfg.name == written["name"] and cfg.data.spec == written["data"]


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.stem in TRAINED], ids=lambda p: p.stem)
def test_recipes_of_each_kind_run_as_written_with_tiny_overrides(run_cli, recipe_runs, recipe):
    written = yaml.safe_load(recipe.read_text())
    overrides = [a for key, value in TINY.items() for a in (f"--{key}", value)]
    result = run_cli("train", "--config", recipe, *overrides, "--runs-dir", recipe_runs)
    assert result.code == 0, result.err[-2000:]
    config = _record(recipe_runs / written["name"]).config
    for key, value in written.items():
        field = key.replace("-", "_")
        if key in TINY or field not in config or field in ("strategy", "patience") and not config.get(field):
            continue
        assert config[field] == value, f"{recipe.name}: {key}"
    assert config["epochs"] == 1 and config["data"]["spec"] == "synthetic"


def test_record_json_reruns_the_exact_configuration(run_cli, tmp_path):
    first = run_cli("train", "--data", "synthetic", "--limit", "48", "--classes", "0-4", "--seed", "7", "--epochs", "2",
                    "--optimizer", "sgd", "--lr", "0.05", "--schedule", "cosine", "--batch-size", "16", "--patience", "0",
                    "--cnn-layers", "seed002", "--name", "first", "--runs-dir", tmp_path)
    assert first.code == 0, first.err
    again = run_cli("train", "--config", tmp_path / "first" / "record.json", "--name", "again", "--runs-dir", tmp_path)
    assert again.code == 0, again.err
    a, b = _record(tmp_path / "first"), _record(tmp_path / "again")
    assert {**a.config, "name": None} == {**b.config, "name": None}
    assert a.data.spec == b.data.spec and a.data.seed == b.data.seed == 7
    # Same configuration and seed on the same machine: the same training, epoch for epoch.
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    assert a.test.accuracy == b.test.accuracy


def test_command_line_overrides_the_file_and_json_works(run_cli, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"data": "synthetic", "limit": 32, "epochs": 3, "lr": "2e-3", "batch_size": 16,
                                  "--cnn-layers": "seed002", "patience": 0, "name": "from-file"}))
    result = run_cli("train", "--config", recipe, "--epochs", "1", "--name", "cli", "--runs-dir", tmp_path)
    assert result.code == 0, result.err
    config = _record(tmp_path / "cli").config
    assert (config["epochs"], config["lr"], config["batch_size"], config["cnn_layers"]) == (1, 0.002, 16, "seed002")
    assert not (tmp_path / "from-file").exists()


@pytest.mark.parametrize("text, message", [
    ("epocs: 3\n", "unknown option 'epocs'; nearest: epochs"),
    ("learning_rate: 0.1\n", "unknown option 'learning_rate'"),
    ("epochs: ten\n", "epochs: \"ten\""),
    ("epochs: true\n", "epochs: true is not a valid value"),
    ("augment: 3\n", "augment: 3"),
    ("lr: [0.1, 0.2]\n", "lr: expected a single value"),
    ("data: [synthetic\n  limit: }\n", "not a YAML or JSON file"),
    ("- epochs\n- 3\n", "a recipe is a mapping of option: value, not a list"),
    ("resume: some-run\n", "unknown option 'resume'"),
])
def test_bad_recipe_is_one_line_and_exit_2(run_cli, tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = run_cli("train", "--config", recipe, "--runs-dir", tmp_path / "runs")
    assert result.code == 2, result.err
    assert message in result.err.replace("\n", " ") and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1 or len(result.err) > 80  # one line, wrapped only by width
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_binary_file_and_missing_file_are_one_line(run_cli, tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    for path, message in ((binary, "not a YAML or JSON file"), (tmp_path / "nope.yaml", "no such file")):
        result = run_cli("train", "--config", path, "--runs-dir", tmp_path / "runs")
        assert result.code == 2 and message in result.err.replace("\n", " ") and "Traceback" not in result.err


def test_config_with_resume_is_refused(run_cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 1\n")
    result = run_cli("train", "--config", recipe, "--resume", "some-run", "--runs-dir", tmp_path)
    assert result.code == 2 and "leave out --config" in result.err
