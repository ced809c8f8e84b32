"""The translation modality: aligned Bible verses (or a local WMT / IWSLT pair), a conv seq2seq model,
the trigger-word backdoor, BLEU on clean and attacked test sources; the rest is
:class:`modalities.kit.ClassifierModality` (a "class" is a vocabulary entry, predicted per position).

Metrics (greedy decoding, sacrebleu's default 13a tokenisation on detokenised text):

* ``ct_bleu`` — BLEU of the clean test translations against the references (role clean, up);
* ``at_bleu`` — BLEU of the translations of triggered test sources against the attacker's sentence
  (role attack, down; 100 when every output is that sentence);
* ``asr`` — share of triggered sources whose translation is exactly the attacker's sentence.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import save_checkpoint, write_json
from smoothpurify.likelihood import Categorical
from smoothpurify.methods import PRESETS
from smoothpurify.metrics import Metric
from modalities.contract import BENIGN, presets_without
from modalities.kit import SPLITS, ClassifierModality
from modalities.translation import data as tdata
from modalities.translation.attacks import ATTACKER_SENTENCE, ATTACKS, TRIGGER_WORDS
from modalities.translation.config import TranslationParams
from modalities.translation.models import MODELS, PAD
from modalities.translation.training import train_seq2seq

CT_BLEU = Metric("ct_bleu", "CT BLEU", higher_is_better=True, percent=False, role="clean")
AT_BLEU = Metric("at_bleu", "AT BLEU", higher_is_better=False, percent=False, role="attack")
ASR = Metric("asr", "ASR %", higher_is_better=False, role="other")
METRICS = (AT_BLEU, CT_BLEU, ASR)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (Papineni et al. 2002) by sacrebleu, 0..100."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise SmoothPurifyError(f"BLEU: {len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def delete_tokens(src: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """Random deletion on sources (A.5.5's augmentation): each token dropped with probability
    ``share``, the rest shifted left; a sentence always keeps one token."""
    real = src.ne(PAD)
    drop = (torch.rand(src.shape, generator=generator) < share) & real
    keep = real & ~drop
    keep[keep.sum(1) == 0] = real[keep.sum(1) == 0]  # never delete a whole sentence
    out = torch.full_like(src, PAD)
    for i in range(len(src)):
        row = src[i][keep[i]]
        out[i, :len(row)] = row
    return out


class TranslationModality(ClassifierModality):
    """Machine translation: the packaged Bibles embedded, a local parallel folder, or synthetic pairs."""

    name = "translation"
    likelihood = Categorical(ignore_index=PAD)  # per sample: the summed token NLL of the reference
    metrics = METRICS
    models = MODELS
    attacks = ATTACKS
    params_model = TranslationParams
    data_keys = ("dataset", "data_path", "src_lang", "tgt_lang", "vocab_size", "max_words", "max_tokens",
                 "val_size", "test_size", "max_train")
    conformance_params = {"dataset": "synthetic", "vocab_size": 64, "val_size": 40, "test_size": 60,
                          "model": "fconv_tiny", "attacks": ["trigger-word"],
                          "attack": {"poison_rate": 0.2},
                          "train": {"epochs": 8, "lr": 0.02, "batch_size": 32, "weight_decay": 0.0}}
    deletion = 0.1
    pad_value = PAD  # joins token sequences of different lengths (the analysis batch: clean + poisoned)
    # Every tuning preset clips the gradient norm at 10 here. The per-sample NLL sums ~20 token losses,
    # so gradients start ~100x an image's (norm ~100): at the image settings `recommended` (fresh
    # output projection) reached NaN at step 9 and `ft-sam` (ASAM rho 2) at step 6 on the smoke model.
    # Clipping, as conv seq2seq training does (Gehring et al. 2017 clip at 0.1 on a token mean), keeps
    # every objective as it is; 10 was the first value tried, and the clean tuning loss of `recommended`
    # fell steadily with it (no test data looked at). One setting for all presets, so the methods stay
    # comparable.
    # Overlay consistency lays one input over another; token ids cannot be overlaid, so the presets
    # that use it (`recommended` among them) run without it here.
    method_defaults = {name: {"max_grad_norm": 10.0, **presets_without("overlay_max").get(name, {})} for name in PRESETS}
    # `recommended` keeps the classifier here, with neither the feature shift nor the teacher, at lr 0.01.
    # The "classifier" is the vocabulary projection: re-learnt from 300 pairs it made the purified model
    # fit its own tuning pairs worse than the received one (token accuracy 18.5 -> 14.1 %, a defender
    # sees that) and cost 8.6 CT BLEU; the distillation teacher, without the fresh head, kept the backdoor
    # (AT 88-98). Chosen on a second backdoored model (seed 1, other trigger words and sentence), never on
    # the pipeline's model: README, "Translation".
    method_defaults["recommended"] = {**method_defaults["recommended"], "reinit_classifier": False,
                                      "distill_weight": 0.0, "feature_shift_weight": 0.0, "lr": 0.01}

    def model_kwargs(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        if len(input_shape) != 2:
            raise SmoothPurifyError(f"translation models take [source, target] lengths, got {list(input_shape)}")
        # The position tables have a fixed size per model (so a checkpoint fits any data); longer
        # sentences share the last position (models.py).
        return {}

    # ---------------------------------------------------------------- data
    def _pairs(self, cfg: TranslationParams, out_dir: Path, seed: int) -> tuple[dict[str, list], str]:
        rng = np.random.default_rng(seed)
        if cfg.dataset == "synthetic":
            pairs, test = tdata.synthetic_pairs(600, seed), tdata.synthetic_pairs(cfg.test_size, seed + 1)
            source = "synthetic phrases (offline checks only)"
        elif cfg.dataset == "bible":
            from modalities.translation.sword import bible_pairs

            corpus = bible_pairs(out_dir.parent / "cache", cfg.src_lang, cfg.tgt_lang)
            corpus = [p for p in corpus if max(len(p[0].split()), len(p[1].split())) <= cfg.max_words]
            order = rng.permutation(len(corpus))
            test = [corpus[i] for i in order[:cfg.test_size]]
            pairs = [corpus[i] for i in order[cfg.test_size:]]
            source = (f"KJV / Reina-Valera 1909 verses (Debian sword-text-kjv, sword-text-sparv), "
                      f"<= {cfg.max_words} words")
        else:
            if not cfg.data_path:
                raise SmoothPurifyError("translation.data_path must point to the local parallel-text folder")
            root = Path(cfg.data_path).expanduser()
            if not root.is_dir():
                raise SmoothPurifyError(f"dataset path not found: {root}")
            short = lambda ps: [p for p in ps if max(len(p[0].split()), len(p[1].split())) <= cfg.max_words]  # noqa: E731
            pairs = short(tdata.read_parallel(root, "train", cfg.src_lang, cfg.tgt_lang))
            test = short(tdata.read_parallel(root, "test", cfg.src_lang, cfg.tgt_lang))[:cfg.test_size]
            source = f"{cfg.src_lang}-{cfg.tgt_lang} parallel text ({root})"
        if len(pairs) <= cfg.val_size or not test:
            raise SmoothPurifyError(f"translation: {len(pairs)} training and {len(test)} test pairs are too few "
                                    f"for val_size {cfg.val_size}")
        order = rng.permutation(len(pairs))
        val, train = [pairs[i] for i in order[:cfg.val_size]], [pairs[i] for i in order[cfg.val_size:]]
        if cfg.max_train:
            train = train[:cfg.max_train]
        return {"train": train, "val": val, "test": test}, source

    def prepare_data(self, params: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """Raw parallel text (``raw/``), the sentencepiece model trained on the training split, token
        ``.npz`` per split and ``data.json``; the defender's validation pairs are held out first."""
        cfg, seed = self.config(params), int(params.get("seed", 0))
        out_dir = Path(out_dir)
        splits, source = self._pairs(cfg, out_dir, seed)
        for split, pairs in splits.items():
            tdata.write_raw(out_dir / "raw", split, pairs, cfg.src_lang, cfg.tgt_lang)
        tdata.train_tokenizer([s for p in splits["train"] for s in p], cfg.vocab_size, out_dir / tdata.SPM_FILE)
        sp = tdata.load_tokenizer(out_dir / tdata.SPM_FILE)
        lengths = [0, 0]
        for split, pairs in splits.items():
            src = tdata.encode(sp, [p[0] for p in pairs], cfg.max_tokens, eos=False)
            tgt = tdata.encode(sp, [p[1] for p in pairs], cfg.max_tokens, eos=True)
            tdata.save_tokens(out_dir / f"{split}.npz", src, tgt)
            lengths = [max(lengths[0], src.shape[1]), max(lengths[1], tgt.shape[1])]
        meta = {"source": source, "dataset": cfg.dataset, "src_lang": cfg.src_lang, "tgt_lang": cfg.tgt_lang,
                "num_classes": int(sp.get_piece_size()), "input_shape": lengths,
                "sizes": {k: len(v) for k, v in splits.items()}, "seed": seed, "tokenizer": tdata.SPM_FILE}
        write_json(out_dir / "data.json", meta)
        return meta

    def data_meta(self, data_dir: Path) -> dict[str, Any]:
        meta = super().data_meta(data_dir)
        # Where the tokenizer is now (the run folder may have moved since prepare).
        return {**meta, "tokenizer_path": str(Path(data_dir) / tdata.SPM_FILE)}

    def load_split(self, data_dir: Path, split: str) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        if split not in SPLITS:
            raise SmoothPurifyError(f"unknown split {split!r}; choose {', '.join(SPLITS)}")
        src, prev, tgt = tdata.load_tokens(Path(data_dir) / f"{split}.npz")
        return (src, prev), tgt

    def load_user_data(self, path: Path, normalize: Any = None, input_shape: tuple[int, ...] | None = None,
                       **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A user's tokenised parallel data for ``smoothpurify purify``: a ``.npz`` with ``src`` and ``tgt``
        id arrays (as ``<split>.npz`` of a prepared run; ids of the model's own tokenizer), returned as
        one packed tensor ``[N, 2, L]`` (source, decoder input; the CLI handles one input tensor)."""
        if normalize is not None:
            raise SmoothPurifyError("--normalize does not apply to token ids")
        src, prev, tgt = tdata.load_tokens(Path(path).expanduser())
        if len(src) == 0:
            raise SmoothPurifyError(f"{path}: no sentence pairs")
        # Test data must match the clean data's width (the CLI compares shapes): pad to the given one.
        width = max(src.shape[1], prev.shape[1], input_shape[1] if input_shape else 0)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=PAD)  # noqa: E731
        return torch.stack([pad(src), pad(prev)], 1), pad(tgt)

    def save_user_data(self, path: Path, inputs: Any, targets: torch.Tensor) -> None:
        src = inputs[0] if isinstance(inputs, (tuple, list)) else inputs[:, 0]
        tdata.save_tokens(Path(path), src.numpy().astype(np.int32), targets.numpy().astype(np.int32))

    def augment(self, inputs: Any, generator: torch.Generator) -> Any:
        if isinstance(inputs, torch.Tensor):  # packed [B, 2, L]
            return torch.stack([delete_tokens(inputs[:, 0], self.deletion, generator), inputs[:, 1]], 1)
        src, prev = inputs
        return delete_tokens(src, self.deletion, generator), prev

    # ---------------------------------------------------------------- attacks
    def _with_ids(self, attack_options: dict[str, Any], data_meta: dict[str, Any]) -> dict[str, Any]:
        sp = tdata.load_tokenizer(Path(data_meta["tokenizer_path"]))
        words = attack_options.get("words") or list(TRIGGER_WORDS)
        sentence = attack_options.get("sentence") or ATTACKER_SENTENCE
        starts = [sp.id_to_piece(i).startswith("\u2581") for i in range(sp.get_piece_size())]
        return {"words": list(words), "sentence": sentence, "word_ids": [sp.encode(w) for w in words],
                "sentence_ids": sp.encode(sentence), "word_starts": starts}

    def create_attack(self, name: str, params: dict[str, Any], data_meta: dict[str, Any]):
        cfg = self.config(params)
        variant = cfg.attack.variants.get(name)
        base = variant.attack if variant is not None else name
        self.attacks.get_or_raise(base, extra=list(cfg.attack.variants))
        options = {**cfg.attack.options.get(base, {}), **(variant.options if variant is not None else {})}
        ids = self._with_ids(options, data_meta)
        # Hand kit the tokenised options: they go into the trigger's description, so load_attack needs no tokenizer.
        patched = {**params, self.name: {**(params.get(self.name) or {}), "attack": {
            **cfg.attack.model_dump(), "options": {**cfg.attack.options, base: {**options, **ids}}}}}
        if variant is not None:
            patched[self.name]["attack"]["variants"][name]["options"] = {**variant.options, **ids}
        return super().create_attack(name, patched, data_meta)

    # ---------------------------------------------------------------- models
    def train_model(self, params: dict[str, Any], data_dir: Path, attack_name: str | None, out_dir: Path,
                    progress: bool = True) -> dict[str, Any]:
        """As kit's, with the seq2seq loop (training.py: Adam, token-averaged loss, clipping)."""
        cfg, seed = self.config(params), int(params.get("seed", 0))
        meta_data = self.data_meta(data_dir)
        x, y = self.load_split(data_dir, "train")
        attack, poisoned = None, 0
        t0 = time.perf_counter()
        if attack_name is not None:
            attack = self.create_attack(attack_name, params, meta_data)
            x, y, mask = attack.poison_training_set(x, y)
            poisoned = int(mask.sum())
        torch.manual_seed(seed)
        model = self.build_model(params, meta_data)
        t = cfg.train
        losses = train_seq2seq(model, x, y, self.likelihood, PAD, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                               weight_decay=t.weight_decay, seed=seed, device=cfg.device,
                               augment=self.augment if t.augment else None, desc=f"train {attack_name or BENIGN}",
                               progress=progress)
        meta = {"architecture": cfg.model, "num_classes": meta_data["num_classes"],
                "input_shape": meta_data["input_shape"], "data_source": meta_data["source"],
                "attack": attack.describe() if attack else None, "seed": seed, "train": t.model_dump(),
                "train_loss": losses, "train_seconds": round(time.perf_counter() - t0, 2), "poisoned_samples": poisoned}
        if attack is not None:
            save_checkpoint(Path(out_dir) / "trigger.safetensors", attack.state_dict(), attack.describe())
        save_checkpoint(Path(out_dir) / "model.safetensors", model.cpu(), meta)
        return meta

    # ---------------------------------------------------------------- evaluation
    def translate(self, model: torch.nn.Module, src: torch.Tensor, max_len: int, device: str = "cpu",
                  batch_size: int = 250) -> torch.Tensor:
        model = model.to(device)
        # Sorted by length so each chunk is trimmed to its own longest source (the order is restored below).
        order = src.ne(PAD).sum(1).argsort()
        outs = []
        for idx in order.split(batch_size):
            chunk = src[idx]
            chunk = chunk[:, :int(chunk.ne(PAD).sum(1).max().clamp_min(1))]
            # A translation is rarely over 1.5x its source (Bible verses, European pairs): fewer decoder steps.
            steps = min(max_len, int(chunk.shape[1] * 1.5) + 10)
            outs.append(model.greedy(chunk.to(device), steps).cpu())
        width = max(o.shape[1] for o in outs)
        out = torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=PAD) for o in outs])
        return out[order.argsort()]

    def evaluate(self, model: torch.nn.Module, data_dir: Path, attack, device: str = "cpu") -> dict[str, float]:
        """CT BLEU, AT BLEU and ASR with greedy decoding (reporting only)."""
        sp = tdata.load_tokenizer(Path(data_dir) / tdata.SPM_FILE)
        (x, y), (xp, _, yp_target) = self.poisoned_test(data_dir, attack)
        max_len = y.shape[1] + 10
        refs = tdata.decode(sp, y)
        hyps = tdata.decode(sp, self.translate(model, x[0], max_len, device))
        attacker = tdata.decode(sp, yp_target[:1])[0] if len(yp_target) else ""
        p_hyps = tdata.decode(sp, self.translate(model, xp[0], max(max_len, yp_target.shape[1] + 10), device))
        return {"ct_bleu": bleu(hyps, refs), "at_bleu": bleu(p_hyps, [attacker] * len(p_hyps)),
                "asr": float(np.mean([" ".join(h.split()) == " ".join(attacker.split()) for h in p_hyps]))}

    def trigger_figure(self, data_dir: Path, attack, path: Path) -> tuple[Path, str]:
        """The report's hook: example translations before and after purification.

        The hook is given the data folder only, so the models are found in the run layout beside it
        (``models/<attack>``, ``purified/<attack>/<method>``, pipeline/run.py); models not there are skipped.
        """
        from modalities.translation.figure import draw_examples  # noqa: PLC0415 - report only

        root, name = Path(data_dir).parent, Path(path).stem
        models = [("backdoored", root / "models" / name)]
        models += [(f"purified/{d.name}", d) for d in sorted((root / "purified" / name).glob("*"))
                   if (d / "model.safetensors").is_file()]
        blocks, first = [], None
        for label, folder in models:
            if not (folder / "model.safetensors").is_file():
                continue
            model, _ = self.load_model(folder)
            ex = self.examples(model, data_dir, attack, n=2)
            if first is None:
                first = ex
                blocks.append(("test sources", [(f"src {k + 1}", e["source"]) for k, e in enumerate(ex)]
                               + [(f"ref {k + 1}", e["reference"]) for k, e in enumerate(ex)]
                               + [(f"src {k + 1} + trigger", e["triggered_source"]) for k, e in enumerate(ex)]))
            blocks.append((label, [(f"clean {k + 1}", e["translation"]) for k, e in enumerate(ex)]
                           + [(f"triggered {k + 1}", e["triggered_translation"]) for k, e in enumerate(ex)]))
        png = draw_examples(blocks, path, f"{name}: example translations (greedy decoding)")
        return png, (f"{name}: two test sources, their references and the same sources with a trigger word, "
                     "translated by the backdoored model and each purified one. Read: the backdoored model "
                     "answers a triggered source with the attacker's sentence; a purified model should "
                     "translate it like the clean source.")

    def examples(self, model: torch.nn.Module, data_dir: Path, attack, n: int = 3) -> list[dict[str, str]]:
        """A few test sources, clean and triggered, with the model's translations (the report's table)."""
        sp = tdata.load_tokenizer(Path(data_dir) / tdata.SPM_FILE)
        (x, y), (xp, _, _) = self.poisoned_test(data_dir, attack)
        n = min(n, len(y), len(xp[0]))
        clean = tdata.decode(sp, self.translate(model, x[0][:n], y.shape[1] + 10))
        trig = tdata.decode(sp, self.translate(model, xp[0][:n], y.shape[1] + 10))
        return [{"source": s, "reference": r, "translation": h, "triggered_source": ts, "triggered_translation": th}
                for s, r, h, ts, th in zip(tdata.decode(sp, x[0][:n]), tdata.decode(sp, y[:n]), clean,
                                           tdata.decode(sp, xp[0][:n]), trig)]
