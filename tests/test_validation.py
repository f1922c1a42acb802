"""Every option is checked before any work starts: one error line naming the nearest valid value,
exit 2, no data loaded, no run or staging folder made (training/fit/validation.py)."""
from __future__ import annotations

import pytest

from serving.base.errors import UserError

# (options, what the one error line says): each check that used to fire only after the data loaded
# (--head, --truncate-at, --input-size) or after the staging folder existed (--precision, --distribute).
EARLY = [
    (["-b", "mobilenetv2", "-s", "frozen", "--head", "gapp"], "unknown --head 'gapp'; nearest: gap"),
    (["--precision", "float31"], "unknown --precision 'float31'; nearest: float32"),
    (["--distribute", "mirored"], "unknown --distribute 'mirored'; nearest: mirrored"),
    (["--cnn-padding", "sam"], "unknown --cnn-padding 'sam'; nearest: same"),
    (["--optimizer", "adamw"], "unknown --optimizer 'adamw'; nearest: adam"),
    (["--schedule", "cosin"], "unknown --schedule 'cosin'; nearest: cosine"),
    (["--augment-policy", "flipcrop"], "unknown --augment-policy 'flipcrop'; nearest: flip-crop"),
    (["--augment-views", "4", "--augment-policy", "crop-mixupp"], "unknown --augment-policy 'crop-mixupp'; nearest: crop-mixup"),
    (["--augment-policy", "mixup"], "--augment-policy mixup draws fixed views: give --augment-views K"),
    (["--augment", "--augment-policy", "crop"], "--augment-policy crop draws fixed views: give --augment-views K"),
    (["--tta", "flips"], "unknown --tta 'flips'; nearest: flip"),
    (["--data-check", "fats"], "unknown --data-check 'fats'; nearest: fast"),
    (["--backbone", "mobilenet"], "unknown backbone 'mobilenet'; nearest: mobilenetv2"),
    (["-b", "vgg16", "--strategy", "frozn"], "unknown strategy 'frozn'; nearest: frozen"),
    (["--data", "foldr:/tmp"], "unknown --data 'foldr:/tmp'; nearest: folder"),
    (["--truncate-at", "block3_pool"], "--truncate-at applies to pretrained backbones"),
    (["-b", "mobilenetv2", "-s", "frozen", "--input-size", "16"], "--input-size 16 is below mobilenetv2's minimum of 32"),
]


@pytest.mark.fast
@pytest.mark.parametrize(("options", "message"), EARLY, ids=[o[0] if o[0] != "-b" else o[-2] for o, _ in EARLY])
def test_a_bad_choice_is_one_line_before_any_data_or_folder(options, message, run_cli, tmp_path, monkeypatch):
    from training.data import sources as data

    def no_data(*_args, **_kwargs):
        raise AssertionError("the data loaded before the options were checked")

    monkeypatch.setattr(data, "load_dataset", no_data)
    runs = tmp_path / "runs"
    result = run_cli("train", "--runs-dir", runs, "--epochs", "1", "--weights", "none", *options)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2, result.err
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert message in lines[0]
    assert not runs.exists() or not any(runs.iterdir())  # no run folder, no .NAME.partial staging folder


@pytest.mark.fast
def test_choose_names_every_choice_and_the_nearest():
    from training.fit.validation import choose

    assert choose("--head", "gap", ("gap", "gap-dense")) == "gap"
    with pytest.raises(UserError) as caught:
        choose("--head", "gapp", ("gap", "gap-dense", "flatten-dense-bn"))
    assert str(caught.value) == "unknown --head 'gapp'; nearest: gap, gap-dense; choose from gap, gap-dense, flatten-dense-bn"
    with pytest.raises(UserError) as caught:
        choose("--precision", "zzz", ("auto", "float32"))
    assert str(caught.value) == "unknown --precision 'zzz'; choose from auto, float32"  # nothing close: no 'nearest'


@pytest.mark.fast
def test_summary_takes_the_train_config_and_its_checks(run_cli):
    result = run_cli("summary", "-b", "mobilenetv2", "-s", "frozen", "--head", "gapp")
    assert result.code == 2 and "unknown --head 'gapp'; nearest: gap" in result.err
    result = run_cli("summary", "--cnn-layers", "seed001", "--json")
    assert result.code == 0, result.err
    import json

    described = json.loads(result.out)
    assert described["backbone"] == "cnn" and described["strategy"] == "scratch" and described["input_size"] == 32


@pytest.mark.fast
def test_a_training_option_is_a_config_field_and_a_cli_parameter_only():
    """recipes.train_config maps every CLI parameter named like a config field: nothing to edit there."""
    import dataclasses

    import cli
    from training.config import DataConfig, TrainConfig
    from training.fit.recipes import NOT_IN_RECIPES, train_config

    command = next(c for c in cli.app.registered_commands if c.callback.__name__ == "train")
    import inspect

    # where the run's results go (stdout, a runs folder, a tracker), not what it trains
    params = set(inspect.signature(command.callback).parameters) - {"ctx", "json_out", "runs_dir", "track", *NOT_IN_RECIPES}
    fields = ({f.name for f in dataclasses.fields(TrainConfig)} - {"data"}) | {f.name for f in dataclasses.fields(DataConfig)}
    assert params == (fields - {"spec"}) | {"data"}
    cfg = train_config({"data": "synthetic", "label_smoothing": 0.1, "val_split": 0.2, "patience": 0})
    assert cfg.label_smoothing == 0.1 and cfg.data.val_split == 0.2 and cfg.patience is None
