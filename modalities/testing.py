"""The conformance suite every modality must pass: the contract's promises, checked on real runs.

``tests/test_conformance.py`` runs every check on every installed modality (and a new modality's
author runs it before anything else)::

    built = build("image", tmp_path)           # prepare data, train the benign and one backdoored model
    for name, check in CHECKS.items():
        check(built)                           # raises AssertionError with what is wrong

``build`` uses the modality's ``conformance_params`` (offline data, the smallest model), so the
suite runs in seconds without a network.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from smoothpurify import SmoothPurifyError
from smoothpurify.metrics import Metric
from smoothpurify.model import call_model
from smoothpurify.training import index_inputs, num_samples
from modalities.contract import BENIGN, OPTIONAL_HOOKS, Attack, Modality, get_modality

CONTRACT_METHODS = ("config", "data_params", "training_params", "prepare_data", "data_meta", "load_split",
                    "load_user_data", "augment", "model_names", "create_model", "model_kwargs", "train_model",
                    "load_model", "attack_names", "create_attack", "load_attack", "poisoned_test", "evaluate")


@dataclass
class Built:
    """A modality with prepared data, a benign and a backdoored model, under ``root``."""

    name: str
    modality: Modality
    params: dict[str, Any]
    root: Path
    attack: str

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name


def build(name: str, root: Path) -> Built:
    mod = get_modality(name)
    params = {"seed": 0, name: dict(mod.conformance_params)}
    cfg = mod.config(params)
    attack = cfg.attacks[0] if hasattr(cfg, "attacks") else mod.attack_names()[0]
    mod.prepare_data(params, root / "data")
    for model in (BENIGN, attack):
        mod.train_model(params, root / "data", None if model == BENIGN else attack, root / "models" / model,
                        progress=False)
    return Built(name, mod, params, Path(root), attack)


def _batch(built: Built, split: str = "val", n: int = 8) -> tuple[Any, torch.Tensor]:
    x, y = built.modality.load_split(built.data_dir, split)
    idx = torch.arange(min(n, num_samples(x)))
    return index_inputs(x, idx), y[idx]


def check_protocol(built: Built) -> None:
    mod = built.modality
    assert isinstance(mod, Modality), f"{built.name} does not implement the Modality protocol"
    missing = [m for m in CONTRACT_METHODS if not callable(getattr(mod, m, None))]
    assert not missing, f"{built.name} lacks {missing}"
    assert mod.metrics and all(isinstance(m, Metric) for m in mod.metrics), "metrics must be a non-empty tuple of Metric"
    assert len({m.key for m in mod.metrics}) == len(mod.metrics), "metric keys must be unique"
    assert callable(getattr(mod.likelihood, "nll", None)), "likelihood needs nll(outputs, targets)"
    for hook, args in OPTIONAL_HOOKS.items():
        fn = getattr(mod, hook, None)
        if fn is None or args is None:
            continue
        assert callable(fn), f"{built.name}.{hook} must be callable"
        params = [p for p in inspect.signature(fn).parameters if p not in ("self",)]
        assert tuple(params[:len(args)]) == args, f"{built.name}.{hook} takes {params}, the contract says {list(args)}"


def check_names_and_errors(built: Built) -> None:
    mod = built.modality
    assert mod.model_names() and built.attack in mod.attack_names(built.params)
    for bad in (lambda: mod.create_model("no-such-model", num_classes=2),
                lambda: mod.create_attack("no-such-attack", built.params, mod.data_meta(built.data_dir)),
                lambda: mod.config({built.name: {"no_such_key": 1}})):
        try:
            bad()
        except SmoothPurifyError as err:
            assert "\n" not in str(err), "a user error must be one line"
        else:
            raise AssertionError("a bad name or setting must raise SmoothPurifyError")


def check_data(built: Built) -> None:
    mod = built.modality
    meta = mod.data_meta(built.data_dir)
    for key in ("source", "num_classes", "input_shape", "sizes"):
        assert key in meta, f"data.json lacks {key!r}"
    for split in ("train", "val", "test"):
        x, y = mod.load_split(built.data_dir, split)
        assert num_samples(x) == len(y) == meta["sizes"][split], f"{split}: sizes disagree with data.json"
    assert isinstance(mod.data_params(built.params), dict)
    x, _ = _batch(built)
    shifted = mod.augment(x, torch.Generator().manual_seed(0))
    assert type(shifted) is type(x) and num_samples(shifted) == num_samples(x), "augment must keep the batch"


def check_model_round_trip(built: Built) -> None:
    mod = built.modality
    meta = mod.data_meta(built.data_dir)
    fresh = mod.create_model(mod.model_names()[0] if not hasattr(mod.config(built.params), "model")
                             else mod.config(built.params).model, num_classes=meta["num_classes"],
                             **mod.model_kwargs(tuple(meta["input_shape"])))
    x, y = _batch(built)
    out = call_model(fresh.eval(), x)
    assert out.shape[-1] == meta["num_classes"], "model outputs must end in num_classes"
    assert torch.isfinite(mod.likelihood.nll(out, y)).all()
    model, model_meta = mod.load_model(built.model_dir(built.attack))
    again, _ = mod.load_model(built.model_dir(built.attack))
    torch.testing.assert_close(call_model(model, x), call_model(again, x))
    assert model_meta["num_classes"] == meta["num_classes"]


def check_attack_round_trip(built: Built) -> None:
    mod = built.modality
    meta = mod.data_meta(built.data_dir)
    made: Attack = mod.create_attack(built.attack, built.params, meta)
    loaded = mod.load_attack(built.model_dir(built.attack), meta)
    x, _ = _batch(built, "test")
    torch.testing.assert_close(made.apply(x), loaded.apply(x))
    (_, _), (xp, y_true, y_target) = mod.poisoned_test(built.data_dir, loaded)
    assert num_samples(xp) == len(y_true) == len(y_target) > 0
    # Per sample (multi-label targets are [N, C]): its target must differ from its true label somewhere.
    differs = (y_true != y_target).reshape(len(y_true), -1).any(dim=1)
    assert bool(differs.all()), "the poisoned test set must exclude inputs already of the target"


def check_evaluation(built: Built) -> None:
    """The backdoor is learnt (ASR-like metrics far apart between the benign and backdoored model)."""
    mod = built.modality
    trigger = mod.load_attack(built.model_dir(built.attack), mod.data_meta(built.data_dir))
    scores = {}
    for name in (BENIGN, built.attack):
        model, _ = mod.load_model(built.model_dir(name))
        scores[name] = mod.evaluate(model, built.data_dir, trigger)
        assert set(scores[name]) >= {m.key for m in mod.metrics}, "evaluate must return every metric"
        for m in mod.metrics:
            if m.percent:
                assert 0.0 <= scores[name][m.key] <= 1.0, f"{m.key} is a fraction"
    attack_metrics = [m for m in mod.metrics if not m.higher_is_better]
    assert any(scores[built.attack][m.key] > scores[BENIGN][m.key] + 0.3 for m in attack_metrics), \
        f"the conformance run's backdoor was not learnt: {scores}"


def check_training_params(built: Built) -> None:
    mod, params = built.modality, built.params
    assert mod.training_params(params, BENIGN) != mod.training_params(params, built.attack)
    more = {**params, built.name: {**params[built.name], "attacks": [*mod.attack_names()[:2]]}}
    assert mod.training_params(more, BENIGN) == mod.training_params(params, BENIGN), \
        "the benign model must not depend on the list of attacks"


CHECKS: dict[str, Callable[[Built], None]] = {
    "protocol": check_protocol, "names_and_errors": check_names_and_errors, "data": check_data,
    "model_round_trip": check_model_round_trip, "attack_round_trip": check_attack_round_trip,
    "evaluation": check_evaluation, "training_params": check_training_params,
}
