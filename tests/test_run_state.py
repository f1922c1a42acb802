"""The training library's contracts that a resume depends on: state.json keeps its keys through
RunState, an epoch's batches depend on (seed, epoch) alone, and the schedule follows the step count."""
from __future__ import annotations

import json

import numpy as np
import pytest

from training.fit.run_state import STATE, RunState

pytestmark = pytest.mark.fast  # the fast tier: pytest -m 'not slow'

# A finetune run's state.json mid phase 2, as train.py wrote it before RunState (an untyped dict).
OLD_STATE = {
    "history": [{"epoch": 1, "phase": "head", "seconds": 1.5, "loss": 2.1, "accuracy": 0.2, "val_loss": 2.0,
                 "val_accuracy": 0.25, "lr": 0.001}],
    "phases_done": ["head"],
    "elapsed": 3.25,
    "checkpoint": "checkpoint/epoch-2",
    "stopping": {"phase": "finetune", "wait": 0, "best": 1.9, "best_epoch": 1, "stopped": 0,
                 "best_weights": "checkpoint/best-epoch-2.npz"},
    "phase1_accuracy": 0.3,
    "resumed": True,
}


def test_a_state_written_before_runstate_loads_and_saves_with_the_same_keys(tmp_path):
    (tmp_path / STATE).write_text(json.dumps(OLD_STATE))
    state = RunState.load(tmp_path)
    assert state.phases_done == ["head"] and state.checkpoint == "checkpoint/epoch-2" and state.resumed
    assert state.epochs_in("head") == 1 and state.epochs_in("finetune") == 0
    (tmp_path / "again").mkdir()
    state.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / STATE).read_text()) == OLD_STATE


def test_flags_stay_out_of_the_file_until_set(tmp_path):
    assert RunState.load(tmp_path) == RunState()  # no state.json yet: a fresh run
    assert set(RunState().to_dict()) == {"history", "phases_done", "elapsed", "checkpoint", "stopping"}
    assert RunState(cluster=True).to_dict()["cluster"] is True
    assert RunState.from_dict({"history": [{}, {}], "from_a_later_version": 1}).history == [{}, {}]


def test_an_epochs_batches_depend_on_seed_and_epoch_alone():
    from training.data.sources import epoch_batches

    x, y = np.arange(10, dtype=np.uint8).reshape(10, 1), np.arange(10)

    def labels(epochs: range) -> list[list[int]]:
        return [batch[1].numpy().tolist() for batch in epoch_batches(x, y, 4, seed=7, epochs=epochs)]

    whole, resumed = labels(range(0, 3)), labels(range(1, 3))
    assert len(whole) == 9 and whole[3:] == resumed  # 3 batches an epoch, the last one partial
    assert sorted(sum(whole[:3], [])) == list(range(10)) and whole[:3] != whole[3:6]


def test_onecycle_warms_up_to_the_rate_then_decays_to_zero():
    from training.fit import optim
    from training.config import TrainConfig

    rate = optim.schedule("onecycle", 0.1, 100)
    assert float(rate(0)) == pytest.approx(0.1 / 25) and float(rate(30)) == pytest.approx(0.1)
    assert float(rate(100)) == pytest.approx(0.0, abs=1e-7)
    assert optim.schedule("constant", 0.1, 100) == 0.1
    opt = optim.optimizer(TrainConfig(schedule="cosine", optimizer="sgd", nesterov=True, weight_decay=1e-4), 0.1, 100)
    assert type(opt).__name__ == "SGD" and opt.nesterov and opt.weight_decay == pytest.approx(1e-4)
