"""Attack mechanics: where the trigger goes, how strong it is, who gets relabelled."""
from __future__ import annotations

import pytest
import torch

from modalities.image.attacks import create_attack
from smoothpurify import SmoothPurifyError

SHAPE = (1, 28, 28)


def make(name, **kw):
    return create_attack(name, num_classes=10, input_shape=SHAPE, **kw)


def test_badnets_checkerboard_in_corner_only():
    atk = make("badnets")
    x = torch.full((2, *SHAPE), 0.5)
    xp = atk.apply(x)
    changed = (xp != x).any(dim=0)[0]
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert rows.min() >= 24 and cols.min() >= 24 and rows.max() <= 26 and cols.max() <= 26
    patch = xp[0, 0, 24:27, 24:27]
    assert torch.equal(patch, torch.tensor([[1., 0, 1], [0, 1, 0], [1, 0, 1]]))


def test_blend_ratio_and_determinism():
    atk = make("blend", seed=5)
    x = torch.rand(3, *SHAPE)
    expected = 0.8 * x + 0.2 * atk.trigger["pattern"]
    assert torch.allclose(atk.apply(x), expected)
    assert torch.equal(make("blend", seed=5).trigger["pattern"], atk.trigger["pattern"])
    assert not torch.equal(make("blend", seed=6).trigger["pattern"], atk.trigger["pattern"])


def test_trojan_changes_only_the_watermark_region():
    atk = make("trojan")
    x = torch.full((1, *SHAPE), 0.5)
    changed = (atk.apply(x) != x)[0, 0]
    assert changed.any() and torch.all(atk.trigger["mask"][0][changed] == 1)
    assert not changed[:14, :14].any()


def test_label_poisoning_rate_and_mapping():
    y = torch.arange(1000) % 10
    x = torch.rand(1000, *SHAPE)
    atk = make("badnets", poison_rate=0.1, target_label=3)
    xp, yp, mask = atk.poison_training_set(x, y)
    assert int(mask.sum()) == 100 and torch.all(yp[mask] == 3) and torch.equal(yp[~mask], y[~mask])
    assert torch.all(y[mask] != 3)  # all2one never wastes poison on the target class
    assert torch.equal(xp[~mask], x[~mask])
    all2all = make("badnets", mapping="all2all")
    _, yp2, mask2 = all2all.poison_training_set(x, y)
    assert torch.equal(yp2[mask2], (y[mask2] + 1) % 10)


def test_poisoned_test_set_excludes_target_class():
    y = torch.arange(50) % 10
    xp, y_true, y_target = make("blend", target_label=0).poisoned_test_set(torch.rand(50, *SHAPE), y)
    assert len(y_true) == 45 and torch.all(y_true != 0) and torch.all(y_target == 0)


def test_sig_is_clean_label():
    y = torch.arange(1000) % 10
    x = torch.rand(1000, *SHAPE)
    atk = make("sig", poison_rate=0.05, target_label=2)
    xp, yp, mask = atk.poison_training_set(x, y)
    assert torch.equal(yp, y) and torch.all(y[mask] == 2) and int(mask.sum()) == 50
    pattern = atk.trigger["pattern"][0]
    assert torch.allclose(pattern[0], pattern[5]) and pattern[0].std() > 0.2  # horizontal sinusoid
    with pytest.raises(SmoothPurifyError, match="clean-label"):
        make("sig", mapping="all2all")


@pytest.mark.parametrize("kw,msg", [({"poison_rate": 0.0}, "poison rate"), ({"poison_rate": 1.5}, "poison rate"),
                                    ({"target_label": 10}, "outside the classes"), ({"mapping": "x"}, "mapping")])
def test_bad_attack_settings(kw, msg):
    with pytest.raises(SmoothPurifyError, match=msg):
        make("badnets", **kw)


def test_unknown_attack():
    with pytest.raises(SmoothPurifyError, match="unknown attack 'wanet2'"):
        make("wanet2")
