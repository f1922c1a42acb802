"""A newcomer adds a backbone: one registry entry, nothing else."""
from __future__ import annotations

import json

from training.model import backbones


def test_a_new_backbone_is_one_registry_entry(run_cli, tmp_path, monkeypatch):
    # DenseNet121 is in keras.applications but not in our registry; its own preprocess_input comes
    # from the module named in the entry, so the model, the summary and a run need nothing else.
    entry = backbones.BackboneSpec("densenet121", "DenseNet121, ImageNet weights", app="DenseNet121",
                                   preprocess="densenet", default_input=32)
    monkeypatch.setitem(backbones.REGISTRY, entry.name, entry)

    listed = run_cli("backbones")
    assert listed.code == 0 and "densenet121" in listed.out
    summary = run_cli("summary", "-b", "densenet121", "-s", "finetune", "--unfreeze", "10", "--json")
    assert summary.code == 0, summary.err
    phases = json.loads(summary.out)["phases"]
    assert phases[0]["facts"]["trainable_params"] < phases[1]["facts"]["trainable_params"]

    run = run_cli("train", "--data", "synthetic", "--limit", "40", "-b", "densenet121", "-s", "frozen",
                  "--weights", "none", "--epochs", "1", "--batch-size", "20", "--name", "dn",
                  "--runs-dir", tmp_path, "--json")
    assert run.code == 0, run.err
    record = json.loads(run.out)
    assert record["model"]["backbone"] == "densenet121" and record["test"]["accuracy"] is not None
