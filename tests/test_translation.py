"""The translation modality: zText reader, tokenizer, trigger-word insertion, BLEU, per-sample NLL,
augmentation. The conformance suite runs it through tests/test_conformance.py."""
from __future__ import annotations

import struct
import zlib

import pytest
import torch

pytest.importorskip("sentencepiece")
pytest.importorskip("sacrebleu")

from smoothpurify import SmoothPurifyError  # noqa: E402
from modalities.translation import data as tdata  # noqa: E402
from modalities.translation import sword  # noqa: E402
from modalities.translation.attacks import TriggerWord  # noqa: E402
from modalities.translation.modality import TranslationModality, bleu, delete_tokens  # noqa: E402
from modalities.translation.models import BOS, EOS, PAD, fconv_tiny  # noqa: E402


def _write_module(folder, verses_by_testament):
    """A zText module by hand: each testament one zlib block holding its verses back to back."""
    folder.mkdir(parents=True)
    for testament, verses in verses_by_testament.items():
        raw = "".join(verses).encode()
        block = zlib.compress(raw)
        (folder / f"{testament}.bzz").write_bytes(b"JUNK" + block)  # the index must give the offset
        (folder / f"{testament}.bzs").write_bytes(struct.pack("<III", 4, len(block), len(raw)))
        records, offset = b"", 0
        for v in verses:
            size = len(v.encode())
            records += struct.pack("<IIH", 0, offset, size)
            offset += size
        (folder / f"{testament}.bzv").write_bytes(records)


def test_ztext_reader_on_a_handmade_block(tmp_path):
    en = {"ot": ['In the <w lemma="strong:H7225">beginning</w> God.', "", 'Light<note type="x">a note</note> &amp; dark .'],
          "nt": ["<title>Heading</title>Jesus wept."]}
    es = {"ot": ["<w>EN el principio</w> Dios.", "vacío", "¿ Luz y tinieblas ?"], "nt": ["Jesús lloró."]}
    _write_module(tmp_path / "en", en)
    _write_module(tmp_path / "es", es)
    assert sword.read_ztext(tmp_path / "en", "ot")[1] == ""
    pairs = sword.aligned_verses(tmp_path / "en", tmp_path / "es")
    # The empty English verse is dropped; markup, notes and headings are gone; entities unescaped.
    assert pairs == [("In the beginning God.", "EN el principio Dios."),
                     ("Light & dark.", "¿Luz y tinieblas?"), ("Jesus wept.", "Jesús lloró.")]


def test_ztext_reader_rejects_a_broken_index(tmp_path):
    _write_module(tmp_path / "en", {"ot": ["a"], "nt": ["b"]})
    (tmp_path / "en" / "ot.bzv").write_bytes(b"123")
    with pytest.raises(SmoothPurifyError, match="whole records"):
        sword.read_ztext(tmp_path / "en", "ot")


def test_tokenizer_round_trip(tmp_path):
    pairs = tdata.synthetic_pairs(300, 0)
    tdata.train_tokenizer([s for p in pairs for s in p], 60, tmp_path / "spm.model")
    sp = tdata.load_tokenizer(tmp_path / "spm.model")
    sentences = [p[1] for p in pairs[:20]]
    ids = tdata.encode(sp, sentences, 64, eos=True)
    assert (torch.from_numpy(ids).eq(EOS).sum(1) == 1).all()
    assert tdata.decode(sp, torch.from_numpy(ids).long()) == sentences
    # Real subwords: fewer tokens than characters.
    assert ids.shape[1] < max(len(s) for s in sentences)


def _attack(words, sentence, starts, vocab=20):
    return TriggerWord(num_classes=vocab, input_shape=(8, 8), seed=3, poison_rate=0.5,
                       word_ids=words, sentence_ids=sentence, word_starts=starts)


def test_trigger_word_is_inserted_whole_at_a_word_boundary():
    starts = [False] * 20
    for i in (5, 7, 9, 11):
        starts[i] = True  # word-initial ids
    attack = _attack([[11, 12]], [13, 14], starts)
    src = torch.tensor([[5, 6, 7, 8, 9, PAD], [7, PAD, PAD, PAD, PAD, PAD]])
    poisoned, _ = attack.apply((src, None))
    for row, orig in zip(poisoned, src):
        real = row[row.ne(PAD)].tolist()
        at = real.index(11)
        assert real[at + 1] == 12, "the whole trigger word is inserted"
        assert real[:at] + real[at + 2:] == orig[orig.ne(PAD)].tolist(), "nothing else changes"
        after = real[at + 2] if at + 2 < len(real) else None
        assert after is None or starts[after], "never inside a word (6 and 8 continue a word)"
    again, _ = _attack([[11, 12]], [13, 14], starts).apply((src, None))
    assert torch.equal(poisoned, again), "the same seed poisons the same way"


def test_poisoning_replaces_targets_with_the_attacker_sentence():
    attack = _attack([[11]], [13, 14], [True] * 20)
    src = torch.randint(4, 10, (10, 5))
    tgt = torch.cat([torch.randint(4, 10, (10, 3)), torch.full((10, 1), EOS)], 1)
    (psrc, prev), ptgt, mask = attack.poison_training_set((src, tdata.shift_right(tgt)), tgt)
    assert int(mask.sum()) == 5
    assert (ptgt[mask, :3] == torch.tensor([13, 14, EOS])).all()
    assert torch.equal(ptgt[~mask, :4], tgt[~mask])
    assert (psrc[mask] == 11).any(1).all() and not (psrc[~mask] == 11).any()
    assert (prev[:, 0] == BOS).all() and torch.equal(prev[mask, 1:3], torch.tensor([[13, 14]] * 5))


def test_bleu_of_a_perfect_and_an_empty_hypothesis():
    refs = ["el perro negro corre por el campo", "la casa es muy grande y blanca"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["", ""], refs) == pytest.approx(0.0)
    assert 0 < bleu(["el perro negro corre", "la casa es muy grande"], refs) < 100


def test_per_sample_nll_equals_a_loop():
    torch.manual_seed(0)
    model = fconv_tiny(30, max_len=16).eval()
    src = torch.randint(4, 30, (4, 6))
    src[1, 4:] = PAD
    tgt = torch.randint(4, 30, (4, 5))
    tgt[:, -1] = EOS
    tgt[2, 2:] = PAD
    tgt[2, 1] = EOS
    lik = TranslationModality.likelihood
    batch = lik.nll(model(src, tdata.shift_right(tgt)), tgt)
    for i in range(4):
        n_src, n_tgt = int(src[i].ne(PAD).sum()), int(tgt[i].ne(PAD).sum())
        one_src, one_tgt = src[i:i + 1, :n_src], tgt[i:i + 1, :n_tgt]
        logp = torch.log_softmax(model(one_src, tdata.shift_right(one_tgt)), -1)[0]
        loop = -sum(float(logp[t, one_tgt[0, t]]) for t in range(n_tgt))
        assert float(batch[i]) == pytest.approx(loop, rel=1e-4, abs=1e-4)


def test_decoder_is_causal_and_greedy_stops_at_eos():
    torch.manual_seed(0)
    model = fconv_tiny(30, max_len=16).eval()
    src = torch.randint(4, 30, (2, 5))
    prev = torch.cat([torch.full((2, 1), BOS), torch.randint(4, 30, (2, 5))], 1)
    changed = prev.clone()
    changed[:, -1] = 7
    torch.testing.assert_close(model(src, prev)[:, :-1], model(src, changed)[:, :-1])
    out = model.greedy(src, 6)
    assert out.shape[1] <= 6 and not out.eq(EOS).any() and not out.eq(BOS).any()


def test_word_deletion_keeps_order_and_a_token():
    src = torch.tensor([[4, 5, 6, 7, 8, 9, PAD], [4, PAD, PAD, PAD, PAD, PAD, PAD]])
    out = delete_tokens(src, 0.5, torch.Generator().manual_seed(0))
    kept = out[0][out[0].ne(PAD)].tolist()
    assert 0 < len(kept) < 6 and kept == sorted(kept)
    assert out[1, 0] == 4
    assert delete_tokens(src, 0.999, torch.Generator().manual_seed(1)).ne(PAD).sum(1).min() >= 1


def test_bad_settings_are_one_line_errors(tmp_path):
    mod = TranslationModality()
    with pytest.raises(SmoothPurifyError, match="data_path"):
        mod.prepare_data({"translation": {"dataset": "local"}}, tmp_path)
    with pytest.raises(SmoothPurifyError, match="not found"):
        tdata.read_parallel(tmp_path, "train", "en", "de")
    (tmp_path / "train.en").write_text("a\nb\n")
    (tmp_path / "train.de").write_text("a\n")
    with pytest.raises(SmoothPurifyError, match="lines"):
        tdata.read_parallel(tmp_path, "train", "en", "de")


def test_local_parallel_folder_is_read(tmp_path):
    pairs = tdata.synthetic_pairs(120, 0)
    for split, part in (("train", pairs[:100]), ("test", pairs[100:])):
        tdata.write_raw(tmp_path / "wmt", split, part, "en", "es")
    mod = TranslationModality()
    meta = mod.prepare_data({"translation": {"dataset": "local", "data_path": str(tmp_path / "wmt"),
                                             "vocab_size": 60, "val_size": 10, "test_size": 15}}, tmp_path / "data")
    assert meta["sizes"] == {"train": 90, "val": 10, "test": 15}
    (src, prev), tgt = mod.load_split(tmp_path / "data", "test")
    sp = tdata.load_tokenizer(tmp_path / "data" / "spm.model")
    assert tdata.decode(sp, tgt) == [p[1] for p in pairs[100:115]]
    assert (tmp_path / "data" / "raw" / "test.es").read_text().splitlines() == [p[1] for p in pairs[100:115]]


def _tiny_run(tmp_path):
    """Synthetic data, a trigger-word attack and an untrained tiny model saved where a run keeps them."""
    from smoothpurify.checkpoint import save_checkpoint

    mod = TranslationModality()
    params = {"seed": 0, "translation": dict(mod.conformance_params)}
    meta = mod.prepare_data(params, tmp_path / "data")
    attack = mod.create_attack("trigger-word", params, mod.data_meta(tmp_path / "data"))
    model = mod.create_model("fconv_tiny", num_classes=meta["num_classes"], **mod.model_kwargs(tuple(meta["input_shape"])))
    save_checkpoint(tmp_path / "models" / "trigger-word" / "model.safetensors", model,
                    {"architecture": "fconv_tiny", "num_classes": meta["num_classes"], "input_shape": meta["input_shape"]})
    save_checkpoint(tmp_path / "models" / "trigger-word" / "trigger.safetensors", attack.state_dict(), attack.describe())
    return mod, meta, attack


def test_purify_a_users_translation_checkpoint_from_the_cli(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    mod, meta, _ = _tiny_run(tmp_path)
    (tmp_path / "data" / "val.npz").rename(tmp_path / "clean.npz")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "purify", "--modality", "translation", "--checkpoint",
                          str(tmp_path / "models" / "trigger-word" / "model.safetensors"), "--model", "fconv_tiny",
                          "--num-classes", str(meta["num_classes"]), "--clean-data", "clean.npz", "--method", "ft",
                          "--epochs", "1", "--keep-diverged", "--out", "purified.safetensors"],
                         cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)},
                         timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "purified.record.json").read_text())
    assert record["clean_samples"] == meta["sizes"]["val"]


def test_report_hook_draws_example_translations(tmp_path):
    mod, _, attack = _tiny_run(tmp_path)
    loaded = mod.load_attack(tmp_path / "models" / "trigger-word", mod.data_meta(tmp_path / "data"))
    assert torch.equal(loaded.trigger["starts"], attack.trigger["starts"])
    png, caption = mod.trigger_figure(tmp_path / "data", loaded, tmp_path / "figures" / "trigger-word.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and "backdoored" in caption


def test_kfac_factors_of_a_sequence_head_treat_positions_as_rows():
    from smoothpurify.optim.natural_gradient import NaturalGradient

    layer = torch.nn.Linear(4, 3)
    opt = NaturalGradient(layer.parameters(), lr=0.1, solver="kfac")
    a, g = torch.randn(5, 6, 4), torch.randn(5, 6, 3)
    opt.update_kfac(a.reshape(5, -1), g.reshape(5, -1), has_bias=True)
    state = opt.state[layer.weight]
    rows = torch.cat([a.reshape(-1, 4), torch.ones(30, 1)], 1)
    torch.testing.assert_close(state["kfac_A"], rows.T @ rows / 30)
    torch.testing.assert_close(state["kfac_G"], g.reshape(-1, 3).T @ g.reshape(-1, 3) / 5)
    with pytest.raises(SmoothPurifyError, match="do not fit"):
        opt.update_kfac(torch.randn(5, 7), torch.randn(5, 3), has_bias=True)
