"""Several attacks poisoning shares of one training set."""
from __future__ import annotations

import numpy as np
import torch

from smoothpurify import SmoothPurifyError
from modalities.contract import Attack

DEFAULT_COMPONENTS = ("badnets", "blend", "trojan")


class Mixture(Attack):
    """A mixture of backdoors in one model: the combined attack of the SFT paper (Karim et al.,
    "Fisher Information guided Backdoor Purification via Naive Exploitation of Smoothness",
    Table 21 and A.5: BadNets (Gu et al. 2017), Blend (Chen et al. 2017) and Trojan (Liu et al.
    2018), each an equal share of the poisoned data, poison rates 10% to 50%).

    ``components`` (default badnets, blend, trojan) are label-poisoning attacks with a fixed
    trigger; each poisons an equal, disjoint share of the ``poison_rate`` budget, all with the
    same target and mapping; ``component_options`` gives per-component options, e.g.
    ``{blend: {alpha: 0.2}}``. Component i uses seed ``seed + i``. Only the components'
    ``apply`` is used, so extras of their own ``poison_training_set`` (WaNet's noise mode) are
    left out.

    Test time: :meth:`poisoned_test_set` is the union (concatenation) of every component's
    poisoned test set, so ASR is their average; per-component sets come from
    ``self.components[i].poisoned_test_set``. :meth:`apply` stamps component ``i mod n`` on the
    i-th input (each input carries exactly one backdoor). ``self.component_of`` gives, after
    poisoning, the component index of each training sample (-1: clean).
    """

    name = "mixture"

    def make_trigger(self) -> dict[str, torch.Tensor]:
        from modalities.image.attacks import ATTACKS  # the registry imports this module

        names = list(self.options.get("components") or DEFAULT_COMPONENTS)
        extra = dict(self.options.get("component_options") or {})
        if len(names) < 2:
            raise SmoothPurifyError("mixture: give at least two component attacks")
        self.components: list[Attack] = []
        for i, name in enumerate(names):
            cls = ATTACKS.get(name)
            if cls is None or name == self.name:
                raise SmoothPurifyError(f"mixture: unknown component attack {name!r}")
            if cls.clean_label or cls.train_model is not Attack.train_model or cls.fit is not Attack.fit:
                raise SmoothPurifyError(f"mixture: component {name!r} must be a label-poisoning attack "
                                        "with a fixed trigger")
            self.components.append(cls(num_classes=self.num_classes, input_shape=self.input_shape,
                                       target_label=self.target_label, mapping=self.mapping,
                                       poison_rate=self.poison_rate / len(names), seed=self.seed + i,
                                       **extra.get(name, {})))
        return {f"{i}.{k}": v for i, c in enumerate(self.components) for k, v in c.trigger.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        for i, c in enumerate(self.components):
            c.load_state_dict({k.split(".", 1)[1]: v for k, v in self.trigger.items() if k.startswith(f"{i}.")})

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        for i, c in enumerate(self.components):
            sel = torch.arange(i, len(x), len(self.components))
            if len(sel):
                out[sel] = c.apply(x[sel])
        return out

    def poison_training_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        idx = self.choose_poisoned(y.numpy())
        shares = np.array_split(np.random.default_rng(self.seed + 7).permutation(idx), len(self.components))
        x, y = x.clone(), y.clone()
        self.component_of = torch.full((len(y),), -1, dtype=torch.long)
        for i, (c, share) in enumerate(zip(self.components, shares)):
            t = torch.from_numpy(np.sort(share))
            for chunk in t.split(batch):
                x[chunk] = c.apply(x[chunk])
                y[chunk] = c.target_of(y[chunk])
            self.component_of[t] = i
        return x, y, self.component_of >= 0

    def poisoned_test_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        parts = [c.poisoned_test_set(x, y, batch) for c in self.components]
        return tuple(torch.cat(p) for p in zip(*parts))
