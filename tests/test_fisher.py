"""Fisher diagonal / trace against brute-force loops over samples (SFT paper Eq. 4-6).

The brute force is the definition: one ``torch.autograd.grad`` per sample, model in eval mode for
batch norm. Everything runs on tiny models so the whole file stays in a few seconds on 2 cores.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.fisher import fisher_diagonal, fisher_trace, per_sample_grads, sample_targets, tuned_parameters
from smoothpurify.spectral_trace import spectral_fisher_trace, verify_spectral_trace
from smoothpurify.likelihood import Bernoulli, Categorical
from smoothpurify.model import call_model
from smoothpurify.parametrize import prepare

CE = Categorical()


class TinyCNN(nn.Module):
    """Covers: BN, in-place ReLU right after a conv (no BN between), grouped and strided conv,
    reflect padding, a 1-D conv and a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.c3 = nn.Conv1d(6, 5, 2, bias=False)
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x), inplace=True)
        x = self.c3(x.flatten(2)).mean(2)
        return self.fc(x)


class TinyMLP(nn.Module):
    def __init__(self, d_in=6, d_out=4):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d_in, 8), nn.Linear(8, d_out)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class TinySeq(nn.Module):
    """Tuple input ``(src, tgt)`` -> per-token logits; cross-attention (separate q/kv in-proj)."""

    def __init__(self, vocab=7, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.out = nn.Linear(dim, vocab)

    def forward(self, src, tgt):
        mem = self.conv(self.emb(src).transpose(1, 2)).transpose(1, 2)
        q = self.emb(tgt)
        h, _ = self.attn(q, mem, mem, need_weights=False)
        return self.out(torch.tanh(h + q))


def _warm_bn(model, x):
    """Non-trivial running statistics, then a train-mode model as a training loop would have."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            call_model(model, x)
    return model


def cnn_data(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyCNN()
    x = torch.randn(batch, 3, 6, 6, generator=g)
    y = torch.randint(0, 5, (batch,), generator=g)
    return _warm_bn(model, x), x, y


def seq_data(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    src = torch.randint(1, 7, (batch, 5), generator=g)
    tgt = torch.randint(1, 7, (batch, 4), generator=g)
    y = torch.randint(1, 7, (batch, 4), generator=g)
    y[:, -1] = 0  # padding
    y[0, 1:] = 0
    return TinySeq(), (src, tgt), y


def brute_per_sample(model, inputs, y, lik, params, create_graph=False):
    """The definition: one autograd.grad of l_j = -nll_j per sample, BN in eval mode."""
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    names = list(params)
    out = []
    for j in range(y.shape[0]):
        l_j = -lik.nll(call_model(model, tuple(x[j:j + 1] for x in xs)), y[j:j + 1]).sum()
        gs = torch.autograd.grad(l_j, [params[n] for n in names], create_graph=create_graph,
                                 allow_unused=True, materialize_grads=True)
        out.append(dict(zip(names, gs)))
    for m, f in flags.items():
        m.training = f
    return out


def brute_trace(model, inputs, y, lik, params):
    per = brute_per_sample(model, inputs, y, lik, params, create_graph=True)
    return sum(g.pow(2).sum() for d in per for g in d.values()) / y.shape[0]


def assert_dicts_close(a, b, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def test_per_sample_grads_match_loop_and_restore_flags():
    model, x, y = cnn_data()
    params = tuned_parameters(model)
    running = model.bn.running_mean.clone()
    got = per_sample_grads(model, x, y, CE)
    ref = brute_per_sample(model, x, y, CE, params)
    for name, g in got.items():
        assert g.shape == (6, *params[name].shape)
        torch.testing.assert_close(g, torch.stack([r[name] for r in ref]), rtol=1e-5, atol=1e-7)
        assert g.grad_fn is None  # no graph unless asked
    assert model.training and model.bn.training
    torch.testing.assert_close(model.bn.running_mean, running)  # eval inside: stats untouched


def test_fisher_diagonal_is_mean_of_squared_per_sample_grads():
    model, x, y = cnn_data(batch=8)
    params = tuned_parameters(model)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # unequal sizes: n counts samples, not batches
    diag = fisher_diagonal(model, batches, CE)
    ref = brute_per_sample(model, x, y, CE, params)
    expected = {n: sum(r[n].pow(2) for r in ref) / 8 for n in params}
    assert_dicts_close(diag, expected)
    squared_mean = {n: (sum(r[n] for r in ref) / 8).pow(2) for n in params}
    assert not torch.allclose(diag["fc.weight"], squared_mean["fc.weight"], rtol=1e-2)
    assert all((d >= 0).all() and d.grad_fn is None for d in diag.values())


def test_true_fisher_reproducible_with_seeded_generator():
    model, x, y = cnn_data(batch=8)
    batches = [(x, y)]
    first = fisher_diagonal(model, batches, CE, "true", torch.Generator().manual_seed(3))
    again = fisher_diagonal(model, batches, CE, "true", torch.Generator().manual_seed(3))
    other = fisher_diagonal(model, batches, CE, "true", torch.Generator().manual_seed(4))
    empirical = fisher_diagonal(model, batches, CE)
    assert_dicts_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])
    assert not torch.equal(first["fc.weight"], empirical["fc.weight"])


def test_fisher_input_errors():
    model, x, y = cnn_data()
    with pytest.raises(SmoothPurifyError, match="empty"):
        fisher_diagonal(model, [], CE)
    with pytest.raises(SmoothPurifyError, match="unknown Fisher mode"):
        fisher_diagonal(model, [(x, y)], CE, mode="exact")
    batch_stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(SmoothPurifyError, match="running statistics"):
        fisher_trace(batch_stats, torch.randn(4, 3), torch.randint(0, 4, (4,)), CE)


def test_fisher_trace_value_and_gradient_match_loop():
    model, x, y = cnn_data()
    params = tuned_parameters(model)
    trace = fisher_trace(model, x, y, CE)
    ref = brute_trace(model, x, y, CE, params)
    torch.testing.assert_close(trace, ref, rtol=1e-5, atol=0)
    assert trace.item() > 0
    names = list(params)
    got = torch.autograd.grad(trace, [params[n] for n in names])
    exp = torch.autograd.grad(ref, [params[n] for n in names])
    assert_dicts_close(dict(zip(names, got)), dict(zip(names, exp)), rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in got) > 0


def test_trace_descent_reduces_trace():
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = fisher_trace(model, x, y, CE).item()
    for _ in range(5):
        opt.zero_grad()
        fisher_trace(model, x, y, CE).backward()
        opt.step()
    assert fisher_trace(model, x, y, CE).item() < 0.9 * start


@pytest.mark.parametrize("tune_bias,tune_norm", [(False, False), (True, False), (True, True)])
def test_spectral_fast_trace_equals_vmap_trace(tune_bias, tune_norm):
    model, x, y = cnn_data()
    tuned = prepare(model, "spectral", tune_bias=tune_bias, tune_norm=tune_norm)
    with torch.no_grad():  # move away from delta = 0 and clip some singular values (relu' = 0)
        for name, p in tuned.named_tuned().items():
            if name.endswith("delta"):
                p.copy_(0.3 * torch.randn_like(p))
        tuned.model.c2.parametrizations.weight[0].delta[-1] = -10.0
    params = tuned.named_tuned()
    fast = spectral_fisher_trace(tuned.model, x, y, CE)
    ref = fisher_trace(tuned.model, x, y, CE)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=0)
    names = list(params)
    got = torch.autograd.grad(fast, [params[n] for n in names])
    exp = torch.autograd.grad(ref, [params[n] for n in names])
    assert_dicts_close(dict(zip(names, got)), dict(zip(names, exp)), rtol=1e-4, atol=1e-6)
    assert got[names.index("c2.parametrizations.weight.0.delta")][-1] == 0  # clipped shift
    assert tuned.model.bn.training == tune_norm  # frozen BN in eval, restored after the trace
    # the Fisher diagonal takes the same fast path for the shifts
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    assert_dicts_close(fisher_diagonal(tuned.model, batches, CE),
                       fisher_diagonal(tuned.model, batches, CE, fast=False))


def test_spectral_fast_trace_falls_back_for_outside_weight_reads_and_sums_shared_calls():
    class Odd(nn.Module):
        """fc1 applied twice (per-sample grads sum over calls); fc2's weight read via F.linear."""

        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.fc1(torch.tanh(self.fc1(x))))
            return F.linear(h, self.fc2.weight, self.fc2.bias)

    torch.manual_seed(1)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    tuned = prepare(Odd(), "spectral", tune_bias=True)
    fast = spectral_fisher_trace(tuned.model, x, y, CE)
    torch.testing.assert_close(fast, fisher_trace(tuned.model, x, y, CE), rtol=1e-5, atol=0)
    assert verify_spectral_trace(tuned.model, x, y, CE) < 1e-5


def test_spectral_fast_trace_conv3d_and_dilation():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv3d(2, 3, (2, 3, 3), dilation=(1, 2, 1), padding=1), nn.Tanh(),
                          nn.Flatten(), nn.LazyLinear(4))
    x, y = torch.randn(3, 2, 3, 6, 5), torch.randint(0, 4, (3,))
    model(x)  # materialise the lazy layer
    tuned = prepare(model, "spectral", tune_bias=True)
    torch.testing.assert_close(spectral_fisher_trace(tuned.model, x, y, CE),
                               fisher_trace(tuned.model, x, y, CE), rtol=1e-5, atol=0)


def test_non_spectral_model_uses_vmap_trace():
    model, x, y = cnn_data()
    torch.testing.assert_close(spectral_fisher_trace(model, x, y, CE), fisher_trace(model, x, y, CE))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over CPU attention
def test_tuple_input_sequence_model_with_ignore_index():
    model, inputs, y = seq_data()
    lik = Categorical(ignore_index=0)
    params = tuned_parameters(model)
    got = per_sample_grads(model, inputs, y, lik)
    ref = brute_per_sample(model, inputs, y, lik, params)
    for name, g in got.items():
        torch.testing.assert_close(g, torch.stack([r[name] for r in ref]), rtol=1e-5, atol=1e-6)
    # the true Fisher samples real tokens but keeps padding positions ignored
    sampled = sample_targets(model, inputs, y, lik, torch.Generator().manual_seed(0))
    assert (sampled[y == 0] == 0).all() and sampled.dtype == y.dtype
    diag = fisher_diagonal(model, [(inputs, y)], lik, "true", torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v).all() for v in diag.values())
    tuned = prepare(model, "spectral", tune_bias=True)
    with torch.no_grad():
        for p in tuned.named_tuned().values():
            p.add_(0.1 * torch.randn_like(p))
    fast = spectral_fisher_trace(tuned.model, inputs, y, lik)  # attention in-proj: vmap part
    torch.testing.assert_close(fast, fisher_trace(tuned.model, inputs, y, lik), rtol=1e-5, atol=0)


def test_bernoulli_likelihood():
    torch.manual_seed(2)
    model = TinyMLP(6, 5)
    x = torch.randn(7, 6)
    y = (torch.rand(7, 5) > 0.5).float()
    lik = Bernoulli()
    params = tuned_parameters(model)
    diag = fisher_diagonal(model, [(x, y)], lik)
    ref = brute_per_sample(model, x, y, lik, params)
    assert_dicts_close(diag, {n: sum(r[n].pow(2) for r in ref) / 7 for n in params})
    torch.testing.assert_close(fisher_trace(model, x, y, lik), brute_trace(model, x, y, lik, params),
                               rtol=1e-5, atol=0)
    true = fisher_diagonal(model, [(x, y)], lik, "true", torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v).all() for v in true.values())
    tuned = prepare(model, "spectral")
    torch.testing.assert_close(spectral_fisher_trace(tuned.model, x, y, lik),
                               fisher_trace(tuned.model, x, y, lik), rtol=1e-5, atol=0)


def test_batch_statistics_measures_the_trace_on_the_network_the_nll_trains():
    """SFT's divergence: Tr(F) in eval mode with stale running statistics. Inside batch_statistics the
    per-sample gradients use this batch's statistics (by hand: a copy whose running statistics are the
    batch's), samples stay independent, and the running statistics come back untouched."""
    from smoothpurify.fisher import batch_statistics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 16, 4)).train()
    x, y = torch.randn(8, 1, 4, 4) * 3 + 1, torch.randint(0, 4, (8,))
    model[1].running_mean.fill_(-5.0)  # stale: far from this batch's statistics
    saved = (model[1].running_mean.clone(), model[1].running_var.clone(), int(model[1].num_batches_tracked))
    params = dict(model.named_parameters())
    with batch_statistics(model, x):
        inside = fisher_trace(model, x, y, Categorical(), params)
    inside.backward()  # the graph survives leaving the context
    assert torch.equal(model[1].running_mean, saved[0]) and torch.equal(model[1].running_var, saved[1])
    assert int(model[1].num_batches_tracked) == saved[2] and model.training

    by_hand = copy.deepcopy(model)
    h = by_hand[0](x).detach()
    by_hand[1].running_mean.copy_(h.mean((0, 2, 3)))
    by_hand[1].running_var.copy_(h.transpose(0, 1).reshape(3, -1).var(1, unbiased=True))
    want = fisher_trace(by_hand, x, y, Categorical(), dict(by_hand.named_parameters()))
    torch.testing.assert_close(inside, want)
    stale = fisher_trace(model, x, y, Categorical(), params)
    assert not torch.allclose(stale, want)  # the bug this guards against measured another network
