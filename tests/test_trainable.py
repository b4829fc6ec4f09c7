"""One trial: a rerun trial re-reports the result in its checkpoint instead of recomputing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vs2ray.config import load_config


class Recomputed(Exception):
    pass


def test_a_rerun_trial_whose_checkpoint_holds_its_result_reports_it_instead_of_recomputing(tmp_path, monkeypatch):
    """A driver kill lands between a report and Tune's state save only by chance; here Tune's session is faked."""
    from ray import tune

    from vs2ray import trainable

    def recompute(*args, **kwargs):
        raise Recomputed

    reported = []
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "abc123"))
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reported.append((metrics, checkpoint)))
    monkeypatch.setattr(trainable, "get_or_train_sae", recompute)
    monkeypatch.setattr(trainable, "build_evaluator", recompute)
    base_config = load_config().model_dump(mode="json", by_alias=True)  # defaults: every value fixed
    data = SimpleNamespace(split=None)  # never read: both paths stop before the data is used
    checkpoint = tmp_path / "trial_abc123" / "checkpoint_000000"
    checkpoint.mkdir(parents=True)

    with pytest.raises(Recomputed):  # a checkpoint without the saved result: the trial runs
        trainable.run_trial({}, base_config, data, experiment=str(tmp_path))
    saved = {"val_top1_vs2": 0.75, "eval_seconds": 0.0311, "vs2ray_complete": True}
    (checkpoint / trainable.METRICS_FILE).write_text(json.dumps(saved))
    with pytest.raises(Recomputed):  # the result without the per-class files (an upload cut short): it runs
        trainable.run_trial({}, base_config, data, experiment=str(tmp_path))
    for name in trainable.CHECKPOINT_FILES[:-1]:
        (checkpoint / name).write_bytes(b"written")
    trainable.run_trial({}, base_config, data, experiment=str(tmp_path))
    assert reported == [(saved, None)]
