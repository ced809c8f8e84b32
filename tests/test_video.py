"""Video modality: PyAV round trips, UCF-101 / HMDB-51 split lists, the composed clips, the LSTM
against torch.nn.LSTM, f-SFT's wrap of its matrices and the per-sample Fisher against brute force,
the attacks' patch and PGD bound, and user-data round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.fisher import fisher_diagonal, fisher_trace
from smoothpurify.spectral_trace import spectral_fisher_trace
from smoothpurify.likelihood import Categorical
from smoothpurify.parametrize import prepare, spectral_layers
from modalities.contract import get_modality
from modalities.video import codec
from modalities.video import data as vdata
from modalities.video.attacks import BadNetsFrames, CleanLabelVideo, patch_mask, stamp
from modalities.video.models import LSTM, MODELS

pytest.importorskip("av")


def _clip(t=6, side=16, channels=1, seed=0, colour_noise=False):
    """Noise (the same in every channel unless ``colour_noise``: yuv420p keeps chroma at half
    resolution, so per-pixel colour noise is exactly what h264 is allowed to drop)."""
    rng = np.random.default_rng(seed)
    x = (rng.random((t, side, side, channels if colour_noise else 1)) * 60).astype(np.uint8)
    x = x.repeat(channels // x.shape[-1], -1)
    x[:, 4:10, 3:9] = 210                                   # a bright block: structure the codec must keep
    return x


@pytest.mark.parametrize("channels", [1, 3])
def test_h264_round_trip_keeps_frames_within_codec_tolerance(tmp_path, channels):
    x = _clip(channels=channels)
    back = codec.decode(codec.encode(tmp_path / "a.mp4", x, codec="h264"), channels)
    assert back.shape == x.shape                            # every frame comes back, none added by the encoder
    err = np.abs(back.astype(int) - x.astype(int))
    assert err.mean() < 4 and np.abs(back[:, 4:10, 3:9].astype(int) - 210).mean() < 8


def test_an_h264_encode_repeats_byte_for_byte(tmp_path):
    # With x264's default macroblock tree about 1 composed clip in 60 came out different on a re-encode
    # (more under load), so a re-run of the prepare stage changed the data and every model after it.
    clips, _ = vdata.compose_clips(vdata.blob_items(50, 0), 15, 8, 32, seed=0)
    differing = 0
    for i, clip in enumerate(clips):
        first = codec.encode(tmp_path / f"{i}a.mp4", clip).read_bytes()
        differing += any(codec.encode(tmp_path / f"{i}{k}.mp4", clip).read_bytes() != first for k in "bc")
    assert differing == 0


def test_ffv1_round_trip_is_exact(tmp_path):
    for channels in (1, 3):
        x = _clip(channels=channels, seed=channels, colour_noise=True)
        np.testing.assert_array_equal(codec.decode(codec.encode(tmp_path / f"{channels}.avi", x, codec="ffv1"),
                                                   channels), x)


def test_bad_video_input_is_one_error_line(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    for bad in (lambda: codec.decode(tmp_path / "junk.mp4"),
                lambda: codec.encode(tmp_path / "x.mp4", np.zeros((2, 15, 16, 1), np.uint8)),   # odd size for yuv420p
                lambda: codec.encode(tmp_path / "x.avi", _clip(), codec="h264"),
                lambda: codec.encode(tmp_path / "x.mp4", _clip().astype(np.float32))):
        with pytest.raises(SmoothPurifyError) as err:
            bad()
        assert "\n" not in str(err.value)


def test_uniform_temporal_subsampling_and_resize():
    np.testing.assert_array_equal(codec.uniform_indices(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(codec.uniform_indices(2, 4), [0, 0, 1, 1])   # short videos repeat frames
    frames = np.zeros((10, 40, 60, 3), np.uint8)
    frames[:, :, 30:] = 200                                  # right half bright
    clip = codec.to_clip(frames, 4, 20)
    assert clip.shape == (3, 4, 20, 20)                      # short side scaled to 20, centre crop
    assert clip[:, :, :, :9].max() == 0 and clip[:, :, :, 11:].min() == 200


def test_ucf101_layout_and_split_lists(tmp_path):
    x = np.stack([_clip(4, 16, 1, s) for s in range(12)])
    y = np.arange(12) % 3
    counts = vdata.write_ucf101(tmp_path, {"train": (x[:9], y[:9]), "test": (x[9:], y[9:])}, ["Jump", "Run", "Sit"],
                                codec="ffv1")
    assert counts == {"train": 9, "test": 3}
    lists = tmp_path / "ucfTrainTestlist"
    assert (lists / "classInd.txt").read_text() == "1 Jump\n2 Run\n3 Sit\n"
    train_lines = (lists / "trainlist01.txt").read_text().split("\n")
    assert train_lines[0].startswith("Jump/v_Jump_g") and train_lines[0].endswith(".avi 1")
    test_lines = [s for s in (lists / "testlist01.txt").read_text().split("\n") if s]
    assert all(" " not in s and 1 <= int(s.split("_g")[1][:2]) <= 7 for s in test_lines)  # split 1: groups 1-7
    assert all(int(s.split("_g")[1][:2]) >= 8 for s in train_lines if s)
    xs, ys, classes = vdata.load_videos(tmp_path, "train", 4, 16, 1)
    assert classes == ["Jump", "Run", "Sit"] and xs.shape == (9, 1, 4, 16, 16)
    np.testing.assert_array_equal(ys, y[:9])
    np.testing.assert_array_equal(xs[3, 0], x[3][..., 0])   # lossless codec: the same pixels
    (lists / "testlist01.txt").write_text("Walk/v_Walk_g01_c01.avi\n")
    with pytest.raises(SmoothPurifyError, match="in no class"):
        vdata.ucf101_index(tmp_path, "test")


def test_hmdb51_split_files(tmp_path):
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    for k, name in enumerate(["wave", "clap"]):
        (tmp_path / name).mkdir()
        for v in range(3):
            codec.encode(tmp_path / name / f"{name}{v}.avi", _clip(3, 16, 1, 10 * k + v), codec="ffv1")
        (splits / f"{name}_test_split1.txt").write_text(f"{name}0.avi 1 \n{name}1.avi 2 \n{name}2.avi 0 \n")
    paths, labels, classes = vdata.hmdb51_index(tmp_path, "train")
    assert classes == ["clap", "wave"] and [p.name for p in paths] == ["clap0.avi", "wave0.avi"]
    assert labels.tolist() == [0, 1]
    x, y, _ = vdata.load_videos(tmp_path, "test", 3, 16, 1)
    assert x.shape == (2, 1, 3, 16, 16) and y.tolist() == [0, 1]
    with pytest.raises(SmoothPurifyError):
        vdata.hmdb51_index(tmp_path, "test", fold=2)


def test_composed_clips_encode_the_motion():
    """The main item's brightness centroid moves the way the class says (no distractor or noise)."""
    items = vdata.blob_items(20, 0)
    x, y = vdata.compose_clips(items, 3, 6, 32, seed=0, noise=0.0, distractor=0.0)
    assert x.shape == (24, 6, 32, 32, 1) and x.dtype == np.uint8
    grid = np.arange(32)
    for clip, label in zip(x.astype(float)[..., 0], y):
        mass = clip.sum((1, 2))
        cx = (clip.sum(1) * grid).sum(1) / mass
        cy = (clip.sum(2) * grid).sum(1) / mass
        name = vdata.MOTIONS[label]
        if name == "MoveLeft":
            assert cx[-1] < cx[0] - 4
        elif name == "MoveRight":
            assert cx[-1] > cx[0] + 4
        elif name == "MoveUp":
            assert cy[-1] < cy[0] - 4
        elif name == "MoveDown":
            assert cy[-1] > cy[0] + 4
        elif name == "ZoomIn":
            assert mass[-1] > 1.3 * mass[0]
        elif name == "ZoomOut":
            assert mass[-1] < 0.77 * mass[0]


def test_lstm_matches_torch_lstm():
    torch.manual_seed(0)
    ours, ref = LSTM(5, 7), nn.LSTM(5, 7, batch_first=True)
    with torch.no_grad():
        ours.ih.weight.copy_(ref.weight_ih_l0)
        ours.hh.weight.copy_(ref.weight_hh_l0)
        ours.ih.bias.copy_(ref.bias_ih_l0 + ref.bias_hh_l0)
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(ours(x), ref(x)[0])


def _tiny():
    torch.manual_seed(0)
    return MODELS["cnn_lstm_tiny"](num_classes=4, channels=1, frames=3, size=16).eval()


def test_fsft_wraps_the_lstm_matrices_output_identical_and_merges_back():
    model = _tiny()
    assert {"lstm.ih", "lstm.hh"} <= {n for n, _, _ in spectral_layers(model)}
    x = torch.rand(5, 1, 3, 16, 16)
    tuned = prepare(model, "spectral")
    names = set(tuned.named_tuned())
    assert {"lstm.ih.parametrizations.weight.0.delta", "lstm.hh.parametrizations.weight.0.delta"} <= names
    torch.testing.assert_close(tuned.model.eval()(x), model(x), atol=1e-5, rtol=1e-5)   # delta = 0: same net
    with torch.no_grad():
        for n, p in tuned.named_tuned().items():
            p.add_(0.05 * torch.randn_like(p))
    shifted = tuned.model.eval()(x)
    merged = tuned.merge().eval()
    assert type(merged.lstm) is LSTM and set(merged.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(merged(x), shifted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged.lstm.hh.weight, model.lstm.hh.weight)


def _brute_force_grads(model, x, y, params):
    rows = []
    for j in range(len(y)):
        loss = Categorical().nll(model(x[j:j + 1]), y[j:j + 1]).sum()
        rows.append(torch.autograd.grad(-loss, list(params.values())))
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(params)}


def test_per_sample_fisher_of_the_lstm_against_a_loop():
    model = _tiny()
    x, y = torch.rand(6, 1, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    full = {n: p for n, p in model.named_parameters() if n.startswith("lstm.")}
    ref = _brute_force_grads(model, x, y, full)
    diag = fisher_diagonal(model, [(x, y)], Categorical(), params=full)
    for n in full:
        torch.testing.assert_close(diag[n], ref[n].pow(2).mean(0), atol=1e-6, rtol=1e-4)
    trace = fisher_trace(model, x, y, Categorical(), params=full)
    torch.testing.assert_close(trace, sum(g.reshape(6, -1).pow(2).sum() for g in ref.values()) / 6)
    # f-SFT: the ghost-norm path sums the T calls of hh; it must equal vmap and the loop over samples.
    tuned = prepare(model, "spectral").eval()
    shifts = tuned.named_tuned()
    lstm_shifts = {n: p for n, p in shifts.items() if n.startswith("lstm.")}
    loop = _brute_force_grads(tuned.model, x, y, lstm_shifts)
    fast = fisher_diagonal(tuned.model, [(x, y)], Categorical(), params=lstm_shifts, fast=True)
    for n in lstm_shifts:
        torch.testing.assert_close(fast[n], loop[n].pow(2).mean(0), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(spectral_fisher_trace(tuned.model, x, y, Categorical()),
                               fisher_trace(tuned.model, x, y, Categorical()), atol=1e-6, rtol=1e-4)


def test_badnets_stamps_every_frame_and_poisons_labels():
    attack = BadNetsFrames(8, (1, 5, 16, 16), target_label=2, poison_rate=0.25, size=3)
    x = torch.rand(4, 1, 5, 16, 16)
    out = attack.apply(x)
    mask = patch_mask((1, 5, 16, 16), 3)
    assert torch.equal(out[:, ~mask], x[:, ~mask].reshape(4, -1).reshape(out[:, ~mask].shape))
    for t in range(5):
        assert torch.equal(out[:, 0, t, 12:15, 12:15], attack.trigger["patch"][0].expand(4, 3, 3))
    y = torch.arange(16) % 8
    _, yp, m = attack.poison_training_set(torch.rand(16, 1, 5, 16, 16), y)
    assert int(m.sum()) == 4 and (yp[m] == 2).all() and torch.equal(yp[~m], y[~m])
    with pytest.raises(SmoothPurifyError):
        stamp(torch.rand(2, 1, 5, 3, 3), attack.trigger["patch"])


def test_clean_label_patch_and_pgd_bound():
    mod = get_modality("video")
    torch.manual_seed(0)
    x, y = torch.rand(48, 1, 3, 16, 16), torch.arange(48) % 4
    eps = 8 / 255
    attack = CleanLabelVideo(4, (1, 3, 16, 16), target_label=1, poison_rate=0.2, size=4, eps=eps, steps=3,
                             patch_steps=3, surrogate_epochs=1)
    before = attack.trigger["patch"].clone()
    from smoothpurify.training import train
    ctx = {"likelihood": Categorical(), "train": {"lr": 0.05, "batch_size": 16}, "device": "cpu",
           "make_model": lambda: mod.create_model("cnn_lstm_tiny", num_classes=4, channels=1, frames=3, size=16),
           "train_fn": train}
    attack.fit(x, y, ctx)
    patch = attack.trigger["patch"]
    assert patch.shape == (1, 3, 4, 4) and not torch.equal(patch, before) and 0 <= patch.min() <= patch.max() <= 1
    xp, yp, m = attack.poison_training_set(x, y)
    assert torch.equal(yp, y) and (y[m] == 1).all() and int(m.sum()) == 10      # clean label: target clips only
    mask = patch_mask((1, 3, 16, 16), 4)
    diff = (xp[m] - x[m])[:, ~mask]
    assert diff.abs().max() <= eps + 1e-6 and diff.abs().max() > eps / 2       # perturbed, within the L_inf ball
    assert torch.equal(xp[m][:, mask], patch.expand(int(m.sum()), *patch.shape)[:, torch.ones_like(patch, dtype=bool)])
    assert torch.equal(xp[~m], x[~m])
    with pytest.raises(SmoothPurifyError, match="fit"):
        CleanLabelVideo(4, (1, 3, 16, 16), target_label=1, poison_rate=0.2).poison_training_set(x, y)


def test_user_data_round_trip_keeps_a_trigger_exactly(tmp_path):
    mod = get_modality("video")
    attack = BadNetsFrames(4, (1, 4, 16, 16), target_label=0, poison_rate=0.1, size=3)
    x = attack.apply(torch.from_numpy(np.stack([_clip(4, 16, 1, s) for s in range(6)])).permute(0, 4, 1, 2, 3) / 255)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    mod.save_user_data(tmp_path / "clips", x, y)
    back, yb = mod.load_user_data(tmp_path / "clips")
    assert back.shape == x.shape and torch.equal(yb, y)
    torch.testing.assert_close(back, (x * 255).round() / 255)
    with pytest.raises(SmoothPurifyError):
        mod.save_user_data(tmp_path / "clips", x, y)                 # never overwrites
    with pytest.raises(SmoothPurifyError) as err:
        mod.load_user_data(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    with pytest.raises(SmoothPurifyError):
        mod.load_user_data(tmp_path / "clips", normalize=(0.5, 0.5))


def test_augment_shifts_whole_clips_without_flipping():
    mod = get_modality("video")
    x = torch.zeros(3, 1, 4, 16, 16)
    x[:, :, :, 6:9, 6:9] = 1
    out = mod.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.allclose(out.sum((1, 3, 4)), x.sum((1, 3, 4)))
    for clip in out:                                               # the same shift in every frame
        assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(4))
    with pytest.raises(SmoothPurifyError):
        mod.model_kwargs((1, 4, 16, 12))
