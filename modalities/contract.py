"""The modality contract: what a modality plugin provides, the Attack base its attacks follow, and
the registry that finds modalities by name.

Modalities are plugins: each package under ``modalities/`` declares an entry point in the group
``smoothpurify.modalities`` (pyproject.toml) and implements :class:`Modality`. The pipeline, CLI,
tasks and flows call :func:`get_modality` with a name; the library (``smoothpurify``) never sees a
modality. A modality imports ``smoothpurify``, this module and :mod:`modalities.kit`, never another
modality. ``modalities.testing`` is the conformance suite every modality must pass.

An attack is one class: ``apply`` (put the trigger on inputs), ``target_of`` (label mapping),
``poison_training_set`` and ``poisoned_test_set``; its trigger lives in ``trigger`` (a dict of
tensors, saved with safetensors next to the model so evaluation and purification use the same one).
Triggers are drawn from a generator seeded by the attack's seed, so they are deterministic.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.likelihood import Likelihood
from smoothpurify.metrics import Metric
from smoothpurify.registry import Registry

ENTRY_POINT_GROUP = "smoothpurify.modalities"
BENIGN = "benign"  # the clean reference model's name wherever an attack name is expected

MAPPINGS = ("all2one", "all2all")


class Attack:
    name: ClassVar[str] = "attack"
    clean_label: ClassVar[bool] = False  # True: poisons target-class samples only, labels unchanged

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], target_label: int = 0,
                 mapping: str = "all2one", poison_rate: float = 0.1, seed: int = 0, **options: Any):
        if not 0.0 < float(poison_rate) <= 1.0:
            raise SmoothPurifyError(f"poison rate must be in (0, 1], got {poison_rate}")
        if not 0 <= int(target_label) < num_classes:
            raise SmoothPurifyError(f"target label {target_label} is outside the classes 0..{num_classes - 1}")
        if mapping not in MAPPINGS:
            raise SmoothPurifyError(f"unknown label mapping {mapping!r}; choose {' or '.join(MAPPINGS)}")
        if self.clean_label and mapping != "all2one":
            raise SmoothPurifyError(f"{self.name} is a clean-label attack: only all2one applies")
        self.num_classes, self.input_shape = num_classes, tuple(input_shape)
        self.target_label, self.mapping = int(target_label), mapping
        self.poison_rate, self.seed, self.options = float(poison_rate), int(seed), options
        self.generator = torch.Generator().manual_seed(self.seed)
        self.trigger: dict[str, torch.Tensor] = self.make_trigger()

    # -- to implement -------------------------------------------------------------------------
    def make_trigger(self) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Poison a batch of inputs (values in [0, 1]); must not modify ``x`` in place."""
        raise NotImplementedError

    def fit(self, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any]) -> None:
        """Learn what the trigger needs from the clean training set before poisoning (default: nothing).

        ``context``: ``likelihood``, ``train`` (epochs, lr, batch_size, ...), ``device``, ``seed``,
        ``make_model`` (a fresh classifier of the run's architecture), ``train_fn``
        (:func:`smoothpurify.training.train`), ``progress``. E.g. CLB trains a clean surrogate for
        its PGD perturbation here; ISSBA trains its encoder.
        """

    def train_model(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                    context: dict[str, Any]) -> list[float] | None:
        """Train ``model`` on the poisoned set yourself (joint generator training: Dynamic, LIRA...).

        Return the per-epoch losses, or ``None`` (default) for standard training on ``(x, y)``.
        """
        return None

    # -- shared -------------------------------------------------------------------------------
    def target_of(self, y: torch.Tensor) -> torch.Tensor:
        if self.mapping == "all2all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target_label)

    def choose_poisoned(self, y: np.ndarray) -> np.ndarray:
        """Indices to poison: a ``poison_rate`` share of the training set.

        Label-poisoning all2one draws from non-target samples (relabelling a target sample is a
        no-op); clean-label attacks can only use target-class samples, so they take at most all of
        them.
        """
        rng = np.random.default_rng(self.seed)
        n = int(round(self.poison_rate * len(y)))
        if self.clean_label:
            pool = np.flatnonzero(y == self.target_label)
        elif self.mapping == "all2one":
            pool = np.flatnonzero(y != self.target_label)
        else:
            pool = np.arange(len(y))
        if len(pool) == 0:
            raise SmoothPurifyError(f"{self.name}: no training samples eligible for poisoning")
        return np.sort(rng.choice(pool, size=min(max(n, 1), len(pool)), replace=False))

    # Set by attacks whose ``fit`` precomputes the poisoned training samples as ``self.perturbed =
    # (idx, x)`` (clean-label attacks that train a surrogate); says what ``fit`` trains, for the error.
    fit_trains: str | None = None

    def poison_training_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        """Return ``(x_poisoned, y_poisoned, mask)``; ``mask[i]`` tells whether sample i was poisoned."""
        idx = torch.from_numpy(self.choose_poisoned(y.numpy()))
        x, y = x.clone(), y.clone()
        if self.fit_trains is not None:
            done = getattr(self, "perturbed", None)
            if done is None or not torch.equal(done[0], idx):
                raise SmoothPurifyError(f"{self.name}: call fit() on this training set first (it trains the "
                                        f"surrogate for {self.fit_trains})")
            x[idx] = done[1]
        else:
            for chunk in idx.split(batch):
                x[chunk] = self.apply(x[chunk])
                if not self.clean_label:
                    y[chunk] = self.target_of(y[chunk])
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[idx] = True
        return x, y, mask

    def poisoned_test_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        """``(x_poisoned, y_true, y_target)`` over test inputs whose true label differs from the target."""
        targets = self.target_of(y)
        keep = targets != y
        x, y, targets = x[keep], y[keep], targets[keep]
        poisoned = torch.cat([self.apply(c) for c in x.split(batch)]) if len(x) else x
        return poisoned, y, targets

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "clean_label": self.clean_label, "target_label": self.target_label,
                "mapping": self.mapping, "poison_rate": self.poison_rate, "seed": self.seed, **self.options}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.trigger.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.trigger) - set(state)
        if missing:
            raise SmoothPurifyError(f"{self.name}: trigger file lacks {sorted(missing)}")
        self.trigger = {k: state[k] for k in self.trigger}


@runtime_checkable
class Modality(Protocol):
    """Everything the pipeline asks of a modality. Data are tensors: ``inputs`` (a tensor or a tuple
    of tensors) and ``targets``. :class:`modalities.kit.ClassifierModality` implements the generic
    half; ``modalities.testing`` checks a modality against this contract.

    Optional hooks (looked up with ``getattr``; :data:`OPTIONAL_HOOKS` names them, the conformance
    suite checks that any a modality defines is callable with these arguments):

    * ``trigger_figure(data_dir, attack, path) -> (png_path, caption)``: a picture of a clean and a
      triggered input for the report (point clouds, video frames);
    * ``scan_family() -> smoothpurify.scan.TriggerFamily``: the trigger the backdoor scan searches
      (default: mask and pattern for ``[..., C, H, W]`` inputs, else a universal additive perturbation;
      MM-BD's maximum-margin statistic is searched beside it in every case);
    * ``training_loss(...)``: the per-sample training loss where it is not the likelihood's NLL
      (multi-label's asymmetric loss);
    * ``overlay(inputs, partners, weights, generator)``: what laying ``partners`` over ``inputs`` at
      ``weights`` means for the presets' overlay consistency (``overlay_max``;
      :data:`smoothpurify.objective.Overlay`); default: the pixel-wise blend;
    * ``unlearn_families() -> {name: smoothpurify.unlearn.BudgetedFamily}``: the triggers, each within a
      fixed budget, that presets with ``unlearn_share`` reverse-engineer and unlearn (default: none, and
      such a preset is refused).

    Optional attribute ``method_defaults``: ``{preset: {setting: value}}``, the modality's own
    settings of a tuning preset (issue: "a modality may carry its own defaults"), applied under
    params.yaml's ``purify.common`` / ``purify.overrides`` and the command line's options
    (:func:`method_defaults`). Optional attribute ``pad_value``: the id that right-pads token
    sequences, so that batches of different lengths can be joined (the smoothness analysis batch).
    """

    name: str
    likelihood: Likelihood
    metrics: tuple[Metric, ...]  # what ``evaluate`` returns, each with its direction (reports use it)
    # The modality's params section for the conformance suite (modalities.testing): offline data,
    # the smallest model, a backdoor that a few epochs learn; seconds on one CPU core.
    conformance_params: dict[str, Any]

    # -- configuration (the modality's section of params.yaml)
    def config(self, params: dict[str, Any] | None) -> Any:
        """The validated section; a bad value raises one :class:`SmoothPurifyError` line."""

    def data_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The part of the params that shapes the prepared data (the prepare stage's fingerprint)."""

    def training_params(self, params: dict[str, Any], attack: str) -> dict[str, Any]:
        """The part of the params that training ``attack``'s (or the benign) model depends on."""

    # -- data
    def prepare_data(self, params: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """Build train / val (clean, held out) / test splits under ``out_dir``; return their metadata
        (``source``, ``num_classes``, ``input_shape``, ``sizes``), also written to ``data.json``."""

    def data_meta(self, data_dir: Path) -> dict[str, Any]:
        """The metadata :meth:`prepare_data` wrote."""

    def load_split(self, data_dir: Path, split: str) -> tuple[Any, torch.Tensor]:
        """Read back one split written by :meth:`prepare_data`: ``(inputs, targets)``."""

    def load_user_data(self, path: Path, **options: Any) -> tuple[Any, torch.Tensor]:
        """A user's own clean (or poisoned) data from a local path, for ``smoothpurify purify``."""

    def save_user_data(self, path: Path, inputs: Any, targets: torch.Tensor) -> None:
        """Write inputs in a format :meth:`load_user_data` reads back (``smoothpurify poison`` writes a
        poisoned copy of a user's data with it); atomic, never half-written."""

    def augment(self, inputs: Any, generator: torch.Generator) -> Any:
        """The training-time augmentation, applied to clean batches during purification (methods with
        ``augment: true``); return ``inputs`` unchanged where the modality has none."""

    # -- models
    def model_names(self) -> list[str]: ...

    def create_model(self, name: str, **kwargs: Any) -> nn.Module:
        """Model factory; unknown names raise :class:`SmoothPurifyError`."""

    def model_kwargs(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """What :meth:`create_model` needs besides ``num_classes``, from one input's shape."""

    def train_model(self, params: dict[str, Any], data_dir: Path, attack_name: str | None, out_dir: Path,
                    progress: bool = True) -> dict[str, Any]:
        """Train the benign (``attack_name`` None) or a backdoored model; write ``model.safetensors``
        (and ``trigger.safetensors``) under ``out_dir``; return the model's metadata."""

    def load_model(self, model_dir: Path) -> tuple[nn.Module, dict[str, Any]]: ...

    # -- attacks
    def attack_names(self, params: dict[str, Any] | None = None) -> list[str]:
        """Registered attacks, plus the variants ``params`` names (settings of registered ones)."""

    def create_attack(self, name: str, params: dict[str, Any], data_meta: dict[str, Any]) -> Attack: ...

    def load_attack(self, attack_dir: Path, data_meta: dict[str, Any]) -> Attack:
        """The attack whose trigger was saved in ``attack_dir`` by :meth:`train_model`."""

    # -- evaluation (reporting only: never steers a purification)
    def poisoned_test(self, data_dir: Path, attack: Attack) -> tuple[tuple[Any, torch.Tensor], tuple]:
        """``((x, y), (x_poisoned, y_true, y_target))`` over the test split."""

    def evaluate(self, model: nn.Module, data_dir: Path, attack: Attack, device: str = "cpu") -> dict[str, float]:
        """One value per entry of :attr:`metrics`, keyed by ``Metric.key``."""


def method_defaults(modality: Any, method: str) -> dict[str, Any]:
    """The modality's own settings of the tuning preset ``method`` (empty when it has none)."""
    return dict((getattr(modality, "method_defaults", None) or {}).get(method) or {})


def unlearn_families(modality: Any) -> dict[str, Any]:
    """The modality's budgeted trigger families for ``unlearn_share`` (empty when it has none)."""
    hook = getattr(modality, "unlearn_families", None)
    return dict(hook()) if callable(hook) else {}


def presets_without(option: str) -> dict[str, dict[str, float]]:
    """``method_defaults`` entries that switch ``option`` off (0) in every preset that turns it on: for a
    modality whose inputs an option cannot handle (overlays on tokens)."""
    from smoothpurify.methods import PRESETS

    return {name: {option: 0.0} for name, preset in PRESETS.items() if preset.get(option)}


OPTIONAL_HOOKS = {"trigger_figure": ("data_dir", "attack", "path"), "scan_family": (), "training_loss": None,
                  "unlearn_families": (),
                  "overlay": ("inputs", "partners", "weights", "generator")}

MODALITIES = Registry("modality")  # in-process registrations; installed ones come from entry points


def register_modality(name: str, modality_cls: Any) -> None:
    """Register in-process (tests, notebooks, a GPU box without the package installed)."""
    MODALITIES[name] = modality_cls


def available_modalities() -> list[str]:
    return sorted(set(MODALITIES) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_modality(name: str) -> Modality:
    """A fresh instance of the modality ``name``."""
    if name not in MODALITIES:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise SmoothPurifyError(
                f"unknown modality {name!r}; installed: {', '.join(available_modalities()) or 'none'}")
        MODALITIES[name] = found[0].load()
    return MODALITIES[name]()
