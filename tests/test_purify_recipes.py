"""The purification recipes beyond the papers' math: augmentation, batch-norm mode, label smoothing,
FT-init and FST (Min et al. 2023), iterations with replacement, and the destroyed-model guard."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pipeline
from smoothpurify import SmoothPurifyError
from smoothpurify.likelihood import Bernoulli, Categorical
from smoothpurify.methods import method_config
from smoothpurify.runner import make_runner
from smoothpurify.objective import Objective
from smoothpurify.purify import collapsed, purify
from tests.test_purify import TinyCNN, toy_data


def test_label_smoothing_matches_the_hand_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    eps = 0.1
    logp = torch.log_softmax(logits, -1)
    want = -((1 - eps) * logp[torch.arange(2), y] + eps * logp.mean(-1))
    torch.testing.assert_close(Categorical().smoothed_nll(logits, y, eps), want)
    torch.testing.assert_close(Categorical().smoothed_nll(logits, y, eps),
                               nn.functional.cross_entropy(logits, y, label_smoothing=eps, reduction="none"))
    t = torch.tensor([[1.0, 0.0, 1.0]])
    torch.testing.assert_close(Bernoulli().smoothed_nll(logits[:1], t, 0.2),
                               Bernoulli().nll(logits[:1], torch.tensor([[0.9, 0.1, 0.9]])))


def test_ft_sam_is_the_authors_adaptive_sam_and_the_sft_reading_stays():
    authors, sft_reading = method_config("ft-sam"), method_config("ft-sam-sft")
    assert (authors.sam_adaptive, authors.sam_rho, authors.label_smoothing) == (True, 2.0, 0.1)
    assert (sft_reading.sam_adaptive, sft_reading.sam_rho, sft_reading.label_smoothing) == (False, 0.05, 0.0)


def test_fst_term_is_the_inner_product_with_the_original_classifier():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    params = dict(model.named_parameters())
    ref = torch.randn_like(params["head.weight"])
    obj = Objective(Categorical(), shift_weight=0.2, shift_reference={"head.weight": ref})
    loss, parts = obj(model, params, x, y, step=0)
    nll = Categorical().nll(model(x), y).mean()
    torch.testing.assert_close(loss, nll + 0.2 * (params["head.weight"] * ref).sum())
    assert math.isclose(parts["shift"], float((params["head.weight"] * ref).sum().detach()), rel_tol=1e-6)


def test_distillation_is_the_tempered_kl_from_the_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5)  # 4 sequences of 3 tokens, 5 classes
    y = torch.tensor([[1, 2, -1], [0, -1, -1], [4, 4, 4], [3, 0, 1]])
    temp = 2.0
    p_t, p_s = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1) * (y != -1)
    torch.testing.assert_close(Categorical(ignore_index=-1).distill(s, t, y, temp), temp ** 2 * kl.sum(1))
    q, p = torch.sigmoid(t[:, 0] / temp), torch.sigmoid(s[:, 0] / temp)
    bern = (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).sum(1)
    torch.testing.assert_close(Bernoulli().distill(s[:, 0], t[:, 0], y[:, 0], temp), temp ** 2 * bern)
    assert float(Categorical().distill(s[:, 0], s[:, 0], y[:, 0], temp).abs().max()) < 1e-6


def test_distillation_term_in_the_objective_and_what_it_keeps():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    params = dict(model.named_parameters())
    teacher = TinyCNN()
    obj = Objective(Categorical(), distill_weight=0.7, distill_temperature=3.0, teacher=teacher)
    loss, parts = obj(model, params, x, y, step=0)
    kd = Categorical().distill(model(x), teacher(x), y, 3.0).mean()
    torch.testing.assert_close(loss, Categorical().nll(model(x), y).mean() + 0.7 * kd)
    assert math.isclose(parts["distill"], float(kd.detach()), rel_tol=1e-5)
    # with a fresh classifier, the received model's clean outputs are kept closer with the term than without
    gaps = {}
    for weight in (0.0, 5.0):
        cfg = method_config("fst", {"epochs": 5, "batch_size": 16, "distill_weight": weight, "augment": False})
        out = purify(model, x, y, Categorical(), cfg, progress=False).model.eval()
        with torch.no_grad():
            gaps[weight] = float(Categorical().distill(out(x), model.eval()(x), y, 1.0).mean())
    assert gaps[5.0] < 0.5 * gaps[0.0], gaps


def test_mixup_distillation_matches_teacher_and_student_on_the_same_convex_view():
    torch.manual_seed(0)
    model, teacher, (x, y) = TinyCNN(), TinyCNN(), toy_data()
    obj = Objective(Categorical(), distill_weight=1.0, distill_temperature=2.0, teacher=teacher, distill_mixup=0.5,
                    generator=torch.Generator().manual_seed(3))
    view = obj.mixup_view(x)
    # each view is lam x_i + (1 - lam) x_j for one partner j and lam in [0, 1]: solve for lam against every j
    flat, mixed = x.flatten(1), view.flatten(1)
    for i in range(len(x)):
        d = flat[i] - flat                                       # x_i - x_j for every j
        lam = ((mixed[i] - flat) * d).sum(1) / (d * d).sum(1).clamp_min(1e-12)
        resid = (flat + lam[:, None] * d - mixed[i]).norm(dim=1)
        j = int(resid.argmin())
        assert float(resid[j]) < 1e-4 and -1e-5 <= float(lam[j]) <= 1 + 1e-5
    assert not torch.equal(view, x)
    # the KD term is measured on a view drawn from the same generator state, teacher and student alike
    obj.generator = torch.Generator().manual_seed(3)
    loss, parts = obj(model, dict(model.named_parameters()), x, y, step=0)
    kd = Categorical().distill(model(view), teacher(view), y, 2.0).mean()
    assert math.isclose(parts["distill"], float(kd.detach()), rel_tol=1e-5)
    torch.testing.assert_close(loss, Categorical().nll(model(x), y).mean() + kd)


def test_teachers_mixup_view_is_made_from_the_clean_batch_when_overlays_are_on():
    torch.manual_seed(0)
    model, teacher, (x, y) = TinyCNN(), TinyCNN(), toy_data()
    seen = []
    obj = Objective(Categorical(), distill_weight=1.0, teacher=lambda v: seen.append(v) or teacher(v),
                    distill_mixup=0.5, overlay_max=0.4, generator=torch.Generator().manual_seed(5))
    obj(model, dict(model.named_parameters()), x, y, step=0)
    # replay the generator: the overlay's draws come first, then the mixup's, made from the clean x
    replay = Objective(Categorical(), distill_mixup=0.5, overlay_max=0.4, generator=torch.Generator().manual_seed(5))
    overlaid = replay.overlay_view(x)
    assert not torch.equal(overlaid, x)
    torch.testing.assert_close(seen[0], replay.mixup_view(x))


@pytest.mark.parametrize("option, value", [("distill_mixup", 1.0), ("overlay_max", 0.3)])
def test_mixing_options_refuse_inputs_they_cannot_mix(option, value):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randint(0, 10, (8, 3)), torch.randint(0, 3, (8,))
    cfg = method_config("fst-kd", {"epochs": 1, option: value, "augment": False})
    with pytest.raises(SmoothPurifyError, match=option):
        purify(model, x, y, Categorical(), cfg, progress=False)


def test_overlay_view_lays_a_batch_partner_over_about_half_the_inputs():
    torch.manual_seed(0)
    x = torch.rand(400, 1, 4, 4)
    obj = Objective(Categorical(), overlay_max=0.3, generator=torch.Generator().manual_seed(1))
    view = obj.overlay_view(x)
    flat, mixed = x.flatten(1), view.flatten(1)
    unchanged = (flat == mixed).all(1)
    assert 150 < int(unchanged.sum()) < 250            # Bernoulli(1/2) per input
    for i in torch.nonzero(~unchanged).flatten().tolist()[:40]:
        d = flat - flat[i]                             # view_i = x_i + u (x_j - x_i), u in (0, 0.3]
        u = ((mixed[i] - flat[i]) * d).sum(1) / (d * d).sum(1).clamp_min(1e-12)
        resid = (flat[i] + u[:, None] * d - mixed[i]).norm(dim=1)
        j = int(resid.argmin())
        assert float(resid[j]) < 1e-5 and 0 < float(u[j]) <= 0.3 + 1e-6


def test_overlay_student_sees_the_overlaid_view_and_the_teacher_the_clean_batch():
    torch.manual_seed(0)
    model, teacher, (x, y) = TinyCNN(), TinyCNN(), toy_data()
    obj = Objective(Categorical(), distill_weight=0.5, distill_temperature=2.0, teacher=teacher, overlay_max=0.3,
                    generator=torch.Generator().manual_seed(3))
    view = obj.overlay_view(x)
    assert not torch.equal(view, x)
    obj.generator = torch.Generator().manual_seed(3)
    loss, parts = obj(model, dict(model.named_parameters()), x, y, step=0)
    kd = Categorical().distill(model(view), teacher(x), y, 2.0).mean()
    torch.testing.assert_close(loss, Categorical().nll(model(view), y).mean() + 0.5 * kd)
    assert math.isclose(parts["distill"], float(kd.detach()), rel_tol=1e-5)


def test_fst_kd_overlay_is_fst_kd_with_a_stronger_shift_teacher_and_overlays():
    cfg, base = method_config("fst-kd-overlay"), method_config("fst-kd")
    changed = {k for k, v in cfg.model_dump().items() if v != base.model_dump()[k]} - {"name"}
    assert changed <= {"feature_shift_weight", "distill_weight", "overlay_max", "epochs", "lr_step"}
    assert (cfg.feature_shift_weight, cfg.distill_weight, cfg.overlay_max) == (2.0, 2.0, 0.3)
    assert method_config("fst-kd").overlay_max == 0


def test_recommended_is_fst_with_distillation_and_a_light_overlay():
    cfg = method_config("recommended")
    assert cfg.reinit_classifier and cfg.project_classifier_norm and cfg.distill_weight == 3.0
    assert (cfg.feature_shift_weight, cfg.overlay_max, cfg.epochs) == (2.0, 0.15, 100)


def test_tokens_run_recommended_without_overlays_and_clouds_with_their_own():
    from modalities.contract import get_modality, method_defaults

    assert method_defaults(get_modality("translation"), "recommended")["overlay_max"] == 0.0
    for name in ("image", "pointcloud"):
        assert "overlay_max" not in method_defaults(get_modality(name), "recommended")
    assert callable(get_modality("pointcloud").overlay) and not hasattr(get_modality("image"), "overlay")


def test_fst_reinitialises_the_classifier_and_keeps_its_norm():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    norm = float(model.head.weight.detach().norm())
    for method, keeps_norm in (("fst", True), ("ft-init", False)):
        cfg = method_config(method, {"epochs": 3, "batch_size": 16, "lr": 0.5})
        out = purify(model, x, y, Categorical(), cfg, progress=False).model
        cos = nn.functional.cosine_similarity(out.head.weight.flatten(), model.head.weight.flatten(), dim=0)
        assert abs(float(cos.detach())) < 0.5, method  # a fresh head, not the backdoored one fine-tuned
        assert math.isclose(float(out.head.weight.detach().norm()), norm, rel_tol=1e-5) == keeps_norm, method


def test_augmentation_is_applied_to_every_tuning_batch_and_can_be_switched_off():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    seen = []

    def augment(batch, gen):
        seen.append(len(batch))
        return batch + 0.01 * torch.randn(batch.shape, generator=gen)

    purify(model, x, y, Categorical(), method_config("ft", {"epochs": 2, "batch_size": 16}), progress=False,
           augment=augment)
    assert seen == [16] * 6
    seen.clear()
    purify(model, x, y, Categorical(), method_config("ft", {"epochs": 2, "batch_size": 16, "augment": False}),
           progress=False, augment=augment)
    purify(model, x, y, Categorical(), method_config("ngf", {"epochs": 2}), progress=False, augment=augment)
    assert seen == []  # switched off; NGF tunes on cached features


def test_batch_norm_mode_eval_keeps_running_statistics():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    for mode, frozen in (("eval", True), ("train", False)):
        out = purify(model, x, y, Categorical(), method_config("ft", {"epochs": 1, "bn_mode": mode}),
                     progress=False).model
        assert torch.equal(out.bn.running_mean, model.bn.running_mean) == frozen, mode


def test_iterations_draw_batches_with_replacement():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    cfg = method_config("sft-authors", {"iterations": 7, "batch_size": 32, "trace_every": 3})
    record = purify(model, x, y, Categorical(), cfg, progress=False).record
    assert record["steps"] == 7 and len(record["val_loss"]) == 4  # ceil(48 / 32) = 2 steps per epoch
    assert "trace_f" in record["terms_per_epoch"][0]


def test_a_destroyed_model_is_flagged_whatever_its_loss():
    assert collapsed(0.94, 0.13) and collapsed(0.9, float("nan")) and not collapsed(0.9, 0.75)

    def destroy(model, x, y, likelihood, options, **kw):
        from smoothpurify.purify import PurifyResult
        out = TinyCNN()
        nn.init.zeros_(out.head.weight)
        nn.init.constant_(out.head.bias, 0.0)
        out.head.bias.data[1] = 5.0  # predicts class 1 everywhere: clean accuracy 1/3
        return PurifyResult(out, {"method": "destroy"})

    from smoothpurify import defenses
    defenses._load_builtin()
    defenses.DEFENSES["destroy"] = destroy
    try:
        torch.manual_seed(0)
        model, (x, y) = TinyCNN(), toy_data()
        purify(model, x, y, Categorical(), method_config("ft", {"epochs": 20, "batch_size": 16, "lr": 0.1}),
               progress=False)
        trained = purify(model, x, y, Categorical(), method_config("ft", {"epochs": 30, "batch_size": 16, "lr": 0.1}),
                         progress=False).model
        _, run = make_runner("destroy")
        with pytest.warns(RuntimeWarning, match="destroyed"):
            record = run(trained, x, y, Categorical()).record
        assert record["diverged"] and record["diverged_reason"] == "clean validation accuracy collapsed"
        assert record["val_acc_start"] > 0.9 and record["val_acc_end"] < 0.4
        _, run = make_runner("ft", {"epochs": 1})
        assert run(trained, x, y, Categorical()).record["diverged"] is False
    finally:
        del defenses.DEFENSES["destroy"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fst", "ft-init", "fst-kd", "fst-kd-overlay", "recommended", pytest.param("ft-sam", marks=pytest.mark.xfail(
    strict=True, reason="finding: ASAM (rho 2) leaves this tiny small_cnn BadNets at 100 % ASR; on WRN-16-1 it "
                        "removes BadNets (README, purification matrix)"))])
def test_new_methods_lower_asr_on_a_backdoored_tiny_model(tiny_params, method):
    tiny_params["image"]["attacks"] = ["badnets"]
    pipeline.prepare("image", tiny_params)
    pipeline.train_attack("image", tiny_params, "badnets", progress=False)
    tiny_params["purify"] = {"common": {"epochs": 20, "lr_step": 8, "augment": False}}  # shifts change the class
    record = pipeline.purify("image", tiny_params, "badnets", method, progress=False)
    assert record["before"]["asr"] >= 0.9
    assert record["after"]["asr"] < record["before"]["asr"] - 0.5, record["after"]
    assert record["after"]["acc"] >= record["before"]["acc"] - 0.1 and not record["diverged"]


class _DropoutCNN(TinyCNN):
    """TinyCNN with dropout before its head: a layer that draws from torch's global generator."""

    def forward(self, x):
        return self.head(nn.functional.dropout(torch.relu(self.bn(self.conv(x))).flatten(1), 0.5, self.training))


@pytest.mark.parametrize("method", ["ft", "recommended"])
def test_a_purification_repeats_bit_for_bit_whatever_the_global_generator_holds(method):
    from smoothpurify.runner import make_runner

    torch.manual_seed(0)
    model, (x, y) = _DropoutCNN(), toy_data()
    _, run = make_runner(method, {"epochs": 2, "batch_size": 16})
    weights = []
    for outside in (1, 2):
        torch.manual_seed(outside)                 # another process, another state: same result
        out = run(model, x, y, Categorical(), seed=3, progress=False).model
        weights.append(torch.cat([p.detach().flatten() for p in out.parameters()]))
    assert torch.equal(weights[0], weights[1])
    after = torch.rand(1)
    torch.manual_seed(2)
    assert torch.equal(after, torch.rand(1))       # the caller's generator is left where it was
