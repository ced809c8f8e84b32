"""Image backdoor attacks, selectable by name (params.yaml ``image.attacks``, CLI ``--attack``).

One class per attack; fixed triggers (BadNets, Blend, Trojan, SIG, CLB, WaNet, BPPA, CBA) and
learned ones (Dynamic, LIRA, ISSBA, FBA), whose generator weights are saved as trigger tensors.
"""
from __future__ import annotations

from typing import Any

from smoothpurify.registry import Registry
from modalities.contract import Attack
from modalities.image.attacks.blend import SIG, Blend
from modalities.image.attacks.bppa import BPPA
from modalities.image.attacks.cba import CBA
from modalities.image.attacks.clb import CLB
from modalities.image.attacks.dynamic import Dynamic, DynamicAll
from modalities.image.attacks.fba import FBA
from modalities.image.attacks.issba import ISSBA
from modalities.image.attacks.lira import LIRA
from modalities.image.attacks.mixture import Mixture
from modalities.image.attacks.patch import BadNets, Trojan
from modalities.image.attacks.wanet import WaNet

ATTACKS = Registry("attack", {cls.name: cls for cls in (
    BadNets, Blend, Trojan, SIG, CLB, Dynamic, DynamicAll, WaNet, LIRA, ISSBA, BPPA, CBA, FBA, Mixture)})


def create_attack(name: str, **kwargs: Any) -> Attack:
    return ATTACKS.get_or_raise(name)(**kwargs)
