"""The method registry: one consistent entry per method, and a new entry is all a new method needs."""

from __future__ import annotations

import torch

from vs2ray import methods, steering
from vs2ray.config import STEERING_METHODS
from vs2ray.evaluate import Evaluator, Grid, settings_for
from vs2ray.methods import GRID_PARAMS, METHODS, Method, method_of, metric_name
from vs2ray.results import METHOD_LABELS


def test_every_entry_is_consistent_and_read_by_config_and_tables():
    assert tuple(METHODS) == STEERING_METHODS
    for name, method in METHODS.items():
        assert method.name == name and method.kind in ("token", "final", "embedding")
        assert set(method.params) <= set(GRID_PARAMS), name
        assert (method.steer is None) == bool(method.unavailable), name
        if method.steer is not None:
            assert METHOD_LABELS[name] == method.label
    assert len({m.label for m in METHODS.values()}) == len(METHODS)
    assert method_of(metric_name("val_top1", "vs2pp_oracle"), "val_top1") == "vs2pp_oracle"
    assert method_of("fvu", "val_top1") is None


def test_settings_are_the_product_of_a_methods_grid_parameters():
    grid = Grid(gammas=(1.5, 2.0), lambdas=(1.0,), positive_rules=("query", "majority"), n_neighbors=7)
    assert settings_for("vs2pp", grid) == [
        {"rule": r, "gamma": g, "lambda": 1.0, "n_neighbors": 7} for r in ("query", "majority") for g in (1.5, 2.0)
    ]
    assert settings_for("vs2pp_oracle", grid) == [{"gamma": g, "lambda": 1.0, "n_neighbors": 7} for g in (1.5, 2.0)]
    assert settings_for("zero_shot", grid) == [{}]


def test_a_new_registry_entry_is_evaluated_like_the_others(monkeypatch):
    # docs/development.md's worked example: VS2 without the norm-preserving step, from its maths and one entry
    def vs2_unnormalised(x, direction, gamma, lam):
        return x + lam * (gamma - 1) * direction

    def steer(ctx, split, s):
        direction, _ = ctx.sae_pass(split)
        return vs2_unnormalised(split.cls, direction, s["gamma"], s["lambda"]), None

    entry = Method("vs2_unnormalised", "VS2 (no norm preservation)", "token", ("gamma", "lambda"), steer)
    monkeypatch.setitem(METHODS, "vs2_unnormalised", entry)
    from test_evaluate import CLASSES, EMBED, WIDTH, make_split

    from vs2ray.evaluate import accuracy
    from vs2ray.sae import SAETrainParams, train_sae

    g = torch.Generator().manual_seed(0)
    head = {
        "ln_post.weight": torch.ones(WIDTH),
        "ln_post.bias": torch.zeros(WIDTH),
        "proj": torch.randn(WIDTH, EMBED, generator=g),
    }
    pool, val, test = (make_split(*spec, head) for spec in (("pool", 500, 1), ("val", 100, 2), ("test", 100, 3)))
    classifier = torch.nn.functional.normalize(torch.randn(CLASSES, EMBED, generator=g), dim=1)
    sae = train_sae(pool.cls, SAETrainParams(k=4, expansion=2, steps=20, batch_size=128, warmup_steps=5)).sae
    evaluator = Evaluator(sae, head, classifier, pool, val, test)
    result = evaluator.evaluate("vs2_unnormalised", Grid(gammas=(1.5, 3.0), lambdas=(0.5, 4.0)))
    assert result.settings == [{"gamma": g, "lambda": lam} for g in (1.5, 3.0) for lam in (0.5, 4.0)]
    direction = steering.code_direction(sae, test.cls)
    for setting, top1 in zip(result.settings, result.test_top1, strict=True):
        steered = vs2_unnormalised(test.cls, direction, setting["gamma"], setting["lambda"])
        expected = accuracy(steering.classify(steered, head, classifier), test.labels, CLASSES)[0]
        assert top1 == expected
    assert "val_top1_vs2_unnormalised" in result.summary()
    assert methods.METHODS["vs2_unnormalised"] is entry
