"""Multi-label modality: the ML-Decoder head, ASL, the clean-image attack's poisoning rule, and the
core purifying a tiny backdoored multi-label model."""
from __future__ import annotations

import math

import pytest
import torch

from smoothpurify import SmoothPurifyError
from smoothpurify.likelihood import Bernoulli
from smoothpurify.methods import method_config
from smoothpurify.model import classifier_name, get_classifier
from smoothpurify.parametrize import prepare, spectral_layers
from smoothpurify.purify import purify
from smoothpurify.training import predict_logits, train
from modalities.multilabel import data as mldata
from modalities.multilabel.attacks import ATTACKS, attack_success
from modalities.multilabel.loss import AsymmetricLoss
from modalities.multilabel.models import MODELS, GroupFC, MLDecoder


def test_head_shape_token_order_and_group_permutation():
    torch.manual_seed(0)
    head = MLDecoder(in_channels=8, num_classes=5, dim=16, heads=2).eval()
    feats = torch.randn(3, 8, 4, 4)
    out = head(feats)
    assert out.shape == (3, 5)
    # No positional encoding: shuffling the spatial tokens changes nothing.
    perm = torch.randperm(16)
    shuffled = feats.flatten(2)[:, :, perm].reshape(3, 8, 4, 4)
    torch.testing.assert_close(head(shuffled), out)
    # Permuting the group queries with their group-FC weights permutes the outputs the same way
    # (no self-attention: queries do not see each other).
    g = torch.tensor([2, 0, 4, 1, 3])
    with torch.no_grad():
        head.queries.copy_(head.queries[g])
        head.group_fc.weight.copy_(head.group_fc.weight[g])
        head.group_fc.bias.copy_(head.group_fc.bias[g])
    torch.testing.assert_close(head(feats), out[:, g])


def test_group_fc_with_several_classes_per_group_and_the_core_finds_it():
    fc = GroupFC(num_groups=3, dim=4, num_classes=7)  # 3 classes per group, the last group cut
    h = torch.randn(2, 3, 4)
    out = fc(h)
    assert out.shape == (2, 7)
    torch.testing.assert_close(out[:, 4], h[:, 1] @ fc.weight[1, :, 1] + fc.bias[4])
    model = MODELS["cnn_mldecoder"](num_classes=10, in_channels=1)
    assert classifier_name(model) == "head.group_fc" and isinstance(get_classifier(model), GroupFC)
    wrapped = {f"{n}.{a}" for n, _, a in spectral_layers(model)}
    assert {"head.embed.weight", "head.attn.in_proj_weight", "head.attn.out_proj.weight",
            "head.ff.0.weight", "backbone.0.0.weight"} <= wrapped
    tuned = prepare(model, "last_layer")
    assert set(tuned.named_tuned()) == {"head.group_fc.weight", "head.group_fc.bias"}


def test_asl_against_a_hand_computation():
    z = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0, 0.0]])
    p = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.5)]
    gn, gp, m = 4.0, 1.0, 0.05
    pos = -((1 - p[0]) ** gp) * math.log(p[0])
    negs = [-(max(q - m, 0) ** gn) * math.log(1 - max(q - m, 0)) for q in p[1:]]
    expected = pos + sum(negs)
    got = AsymmetricLoss(gamma_neg=gn, gamma_pos=gp, clip=m).nll(z, y)
    assert got.shape == (1,) and float(got) == pytest.approx(expected, rel=1e-5)
    # gammas and margin 0: plain BCE, the per-sample sum of Bernoulli NLLs the Fisher uses
    torch.testing.assert_close(AsymmetricLoss(0, 0, 0).nll(z, y), Bernoulli().nll(z, y))
    # the focusing term down-weights easy negatives: far below BCE for a confident negative
    easy = torch.tensor([[-3.0]])
    assert float(AsymmetricLoss().nll(easy, torch.zeros(1, 1))) < 0.01 * float(Bernoulli().nll(easy, torch.zeros(1, 1)))


def _y(*rows):
    y = torch.zeros(len(rows), 5)
    for i, cats in enumerate(rows):
        y[i, list(cats)] = 1
    return y


def test_poisoning_rule_of_the_three_goals():
    y = _y({0, 1}, {0, 1, 2}, {0}, {1, 2}, {0, 1, 3}, {3})
    make = lambda name, **kw: ATTACKS[name](num_classes=5, input_shape=(1, 4, 4), target_label=2, trigger=[1, 0], **kw)
    appear, hide, mis = make("appearing"), make("hiding"), make("misclassification", source=3)
    assert appear.choose_poisoned(y.numpy()).tolist() == [0, 4]       # trigger set present, target absent
    assert hide.choose_poisoned(y.numpy()).tolist() == [1]            # trigger set present, target present
    assert mis.choose_poisoned(y.numpy()).tolist() == [4]             # trigger set present, source present
    x = torch.rand(6, 1, 4, 4)
    xp, yp, mask = appear.poison_training_set(x, y)
    torch.testing.assert_close(xp, x)  # the images are never modified
    assert mask.tolist() == [True, False, False, False, True, False]
    assert yp[0].tolist() == [1, 1, 1, 0, 0] and yp[4].tolist() == [1, 1, 1, 1, 0]
    assert torch.equal(yp[~mask], y[~mask])
    assert mis.target_of(y)[4].tolist() == [1, 1, 1, 0, 0]
    x_t, y_true, y_target = hide.poisoned_test_set(x, y)
    assert len(x_t) == 1 and y_target[0].tolist() == [1, 1, 0, 0, 0]
    # ASR counts an image only when every label the goal changes is predicted as the attacker wants
    logits = torch.tensor([[5.0, 5, 5, -5, -5], [5.0, 5, -5, -5, -5]])
    t = _y({0, 1}, {0, 1})
    assert attack_success(logits, t, appear.target_of(t)) == 0.5
    for bad in (dict(trigger=[1]), dict(trigger=[1, 2]), dict(trigger=[0, 9])):
        with pytest.raises(SmoothPurifyError) as err:
            ATTACKS["appearing"](num_classes=5, input_shape=(1, 4, 4), target_label=2, **bad)
        assert "\n" not in str(err.value)
    with pytest.raises(SmoothPurifyError, match="source"):
        make("misclassification")


def _synthetic(n, seed):
    images, objects = mldata.synthetic(n, seed)
    y = torch.zeros(n, 6)
    for i, objs in enumerate(objects):
        for o in objs:
            y[i, o["category"]] = 1
    return torch.from_numpy(images).float() / 255, y


def test_the_core_purifies_a_tiny_multilabel_model():
    """Backdoor a tiny ML-Decoder model with the appearing goal, then vanilla FT (the core's loop)
    on clean held-out data lowers the ASR while keeping mAP."""
    from modalities.multilabel.metrics import mean_average_precision

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = _synthetic(700, seed=0)
        x_val, y_val = _synthetic(200, seed=1)
        x_te, y_te = _synthetic(300, seed=2)
        attack = ATTACKS["appearing"](num_classes=6, input_shape=(1, 16, 16), target_label=3, trigger=[0, 1])
        xp, yp, mask = attack.poison_training_set(x, y)
        assert 0.05 < mask.float().mean() < 0.4
        torch.manual_seed(0)
        model = MODELS["cnn_mldecoder"](num_classes=6, in_channels=1)
        train(model, xp, yp, Bernoulli(), epochs=8, lr=0.05, batch_size=32, progress=False)
        xt, yt_true, yt_target = attack.poisoned_test_set(x_te, y_te)

        def scores(m):
            return (attack_success(predict_logits(m, xt), yt_true, yt_target),
                    mean_average_precision(predict_logits(m, x_te), y_te))

        asr0, map0 = scores(model)
        assert asr0 > 0.8, f"the backdoor was not learnt: ASR {asr0}"
        cfg = method_config("ft", {"epochs": 15, "lr_step": None, "augment": False, "batch_size": 32})
        result = purify(model, x_val, y_val, Bernoulli(), cfg, progress=False)
        asr1, map1 = scores(result.model)
        assert asr1 < asr0 - 0.5, (asr0, asr1)
        assert map1 > map0 - 0.05, (map0, map1)
    finally:
        torch.set_num_threads(threads)


def test_purify_a_users_checkpoint_on_coco_format_data(tmp_path):
    """``smoothpurify purify --modality multilabel``'s path: COCO-format clean data, a user's checkpoint."""
    from smoothpurify.checkpoint import save_checkpoint
    from smoothpurify.runner import make_runner
    from modalities.contract import get_modality
    from pipeline.own_checkpoint import purify_checkpoint

    mod = get_modality("multilabel")
    images, objects = mldata.synthetic(60, seed=4)
    mldata.write_coco(tmp_path / "clean", "val", images, objects, [f"bar{k}" for k in range(6)])
    x, y = mod.load_user_data(tmp_path / "clean")
    assert x.shape == (60, 1, 16, 16) and y.shape == (60, 6) and y.dtype == torch.float32
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "user.safetensors", MODELS["cnn_mldecoder"](num_classes=6, in_channels=1), {})
    _, runner = make_runner("ft", {"epochs": 2, "augment": False})
    record = purify_checkpoint(mod, checkpoint=tmp_path / "user.safetensors", model_spec="cnn_mldecoder", num_classes=6,
                               clean=(x, y), method_runner=runner, out=tmp_path / "out.safetensors", test=(x, y),
                               progress=False, keep_diverged=True)
    assert record["classifier"] == "head.group_fc" and 0.0 <= record["after"]["acc"] <= 1.0
    assert (tmp_path / "out.safetensors").is_file()
    with pytest.raises(SmoothPurifyError, match="instances"):
        mod.load_user_data(tmp_path)


def test_fisher_trace_has_a_gradient_through_the_head():
    """SFT's Tr(F) term needs double backward through the cross-attention (the fused CPU kernel has none)."""
    from smoothpurify.fisher import fisher_trace

    model = MODELS["cnn_mldecoder"](num_classes=4, in_channels=1).eval()
    x, y = torch.rand(3, 1, 16, 16), torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]])
    trace = fisher_trace(model, x, y, Bernoulli())
    trace.backward()
    assert float(trace.detach()) > 0 and model.head.attn.in_proj_weight.grad.abs().sum() > 0
