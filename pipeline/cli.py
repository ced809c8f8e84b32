"""The ``smoothpurify`` command. Reaches modalities only through the plugin registry."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from smoothpurify import SmoothPurifyError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Backdoor purification toolkit: prepare data, train/attack, evaluate, purify.")

ModalityOpt = typer.Option("image", "--modality", "-m", help="modality plugin name (see `smoothpurify list`)")
ReferenceOpt = typer.Option(False, "--reference/--no-reference",
                            help="judge the scan against a clean reference: the model's architecture re-initialised "
                                 "and trained on the clean data, scanned the same way (a class easy in both is the "
                                 "data's, not a backdoor); about doubles the scan's time")
ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="parameters file")
ProfileOpt = typer.Option(None, "--profile", help="params.yaml profile (default: the file's `profile`)")


def _params(params: Path, profile: Optional[str]) -> dict:
    from pipeline.params import load_params

    return load_params(params, profile)


def _method_help() -> str:
    from smoothpurify.methods import ABLATIONS, PRESETS
    from smoothpurify.runner import method_names

    presets = [m for m in PRESETS if m not in ABLATIONS]
    baselines = [m for m in method_names() if m not in PRESETS]
    return (f"recommended is the default (one setting for all attacks, chosen from the benchmark matrix). Presets: "
            f"{' '.join(presets)}; ablations: {' '.join(ABLATIONS)}; baselines: {' '.join(baselines)} "
            "(`smoothpurify list` describes each); auto: tries recommended, fst, ft-sam and keeps the first "
            "whose clean accuracy holds and that the backdoor scan does not flag (slower: one scan per try)")


NAME_WIDTH = 20


def _line(name: str, text: str, width: int = 150) -> str:
    pad = max(NAME_WIDTH, len(name) + 2)
    room = width - 4 - pad
    text = text if len(text) <= room else text[: room - 3].rstrip() + "..."
    return f"    {name:<{pad}}{text}"


def _listing(p: Optional[dict]) -> list[str]:
    from modalities.contract import available_modalities, get_modality
    from smoothpurify.defenses import DEFENSES
    from smoothpurify.methods import ABLATIONS, DESCRIPTIONS, PRESETS
    from smoothpurify.runner import method_names

    lines = []
    for name in available_modalities():
        mod = get_modality(name)
        doc = " ".join((type(mod).__doc__ or "").strip().split("\n\n")[0].split())
        lines += [f"modality {name}" + (f": {doc}" if doc else ""), "  models:"]
        lines += [_line(m, mod.models.describe(m) if hasattr(mod, "models") else "") for m in mod.model_names()]
        lines.append("  attacks (variants from params.yaml after the registered ones):")
        section = p if p is not None and name in p else None
        variants = {}
        if section is not None:
            cfg = mod.config(section)
            variants = getattr(getattr(cfg, "attack", None), "variants", None) or {}
        for attack in mod.attack_names(section):
            if attack in variants:
                v = variants[attack]
                change = ", ".join(f"{k} {val}" for k, val in v.model_dump(exclude={"attack"}).items() if val not in (None, {}))
                lines.append(_line(attack, f"variant of {v.attack}: {change or 'its own options'}"))
            else:
                lines.append(_line(attack, mod.attacks.describe(attack) if hasattr(mod, "attacks") else ""))
    lines.append("methods (every modality; `smoothpurify purify --method NAME`):")
    presets = ["recommended", *(m for m in PRESETS if m not in ABLATIONS and m != "recommended")]
    for title, names in (("presets of the tuning loop", presets),
                         ("ablations (one term or choice switched)", list(ABLATIONS)),
                         ("baseline defenses", [m for m in method_names() if m not in PRESETS])):
        lines.append(f"  {title}:")
        lines += [_line(m, DESCRIPTIONS.get(m) or DEFENSES.describe(m)) for m in names]
    return lines


@app.command("list")
def list_plugins(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Modalities with their models and attacks (plus the variants PARAMS names), and every method."""
    p = _params(params, profile) if params.is_file() else None
    typer.echo("\n".join(_listing(p)))


@app.command()
def prepare(modality: str = ModalityOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
            force: bool = typer.Option(False, help="rebuild even if current")) -> None:
    """Build the train / clean-validation / test splits under runs/<modality>/data."""
    import pipeline

    meta = pipeline.prepare(modality, _params(params, profile), force=force)
    typer.echo(f"data from {meta['source']}: {meta['sizes']}")


@app.command()
def attack(name: str = typer.Argument(..., help="attack name, or 'benign' for the clean reference model"),
           modality: str = ModalityOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
           force: bool = typer.Option(False, help="retrain even if current")) -> None:
    """Train a model backdoored by NAME (or the benign model) on the prepared data."""
    import pipeline

    p = _params(params, profile)
    mod_names = _modality(modality).attack_names(p)
    if name != pipeline.BENIGN and name not in mod_names:
        raise SmoothPurifyError(f"unknown attack {name!r}; choose benign or one of: {', '.join(mod_names)}")
    meta = pipeline.train_attack(modality, p, name, force=force)
    typer.echo(f"trained {name}: final loss {meta['train_loss'][-1]:.4f} in {meta['train_seconds']} s")


@app.command()
def evaluate(name: str = typer.Argument(..., help="attack whose model and trigger to evaluate"),
             modality: str = ModalityOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """ACC / ASR / RA of the benign and the NAME-backdoored model, under NAME's trigger."""
    import pipeline
    from pipeline.report.tables import attack_columns, attack_rows, print_table

    p = _params(params, profile)
    pipeline.evaluate(modality, p, name)
    print_table(attack_rows(pipeline.Run(modality, p), [name]), f"{modality}: {name}",
                attack_columns(_modality(modality).metrics))


@app.command()
def poison(
    trigger: Path = typer.Option(..., help="folder of a backdoored model and its trigger (trigger.safetensors + "
                                           "model.json), e.g. runs/image/models/badnets"),
    data: Path = typer.Option(..., help="clean data to poison, in a format `purify` reads (image: class "
                                        "folders, CIFAR layout or .npz)"),
    out: Path = typer.Option(..., help="where to write the poisoned copy (image: an .npz)"),
    modality: str = ModalityOpt,
) -> None:
    """Write the poisoned copy of DATA from a saved trigger, for `purify --poisoned-data`."""
    from pipeline.poison import poison_data

    info = poison_data(_modality(modality), trigger, data, out)
    typer.echo(f"{info['attack']}: {info['samples']} poisoned inputs -> {out} ({info['skipped']} inputs already of "
               "the target class left out)")
    if info["labels"] == "true":
        typer.echo(f"labels are the true labels: pass --poisoned-data {out} --target-label {info['target_label']} "
                   "to `smoothpurify purify` (ASR and RA)")
    else:
        typer.echo(f"labels are the per-sample attack targets: pass --poisoned-data {out} without --target-label "
                   "(ASR only)")


def _parse_normalize(text: Optional[str]):
    if not text:
        return None
    try:
        mean_s, std_s = text.split(",", 1) if text.count(",") == 1 else text.split("/", 1)
        parse = lambda part: [float(v) for v in part.replace(";", " ").split()]  # noqa: E731
        return parse(mean_s), parse(std_s)
    except ValueError:
        raise SmoothPurifyError(f"--normalize {text!r}: expected MEAN,STD, e.g. 0.5,0.5 or "
                                "'0.49 0.48 0.45,0.25 0.24 0.26' (per channel)") from None


@app.command()
def purify(
    checkpoint: Path = typer.Option(..., help="the vendor's model, a .safetensors file (pickles are refused)"),
    model: str = typer.Option(..., help="registry name (see `smoothpurify list`) or path/to/file.py:factory"),
    num_classes: int = typer.Option(..., help="number of classes the model outputs"),
    clean_data: Path = typer.Option(..., help="clean data: image folder (one subfolder per class), CIFAR layout, "
                                              "or .npz with x (uint8 NxCxHxW) and y"),
    method: str = typer.Option("recommended", help=_method_help()),
    out: Path = typer.Option(Path("purified.safetensors"), help="where to write the purified checkpoint"),
    classifier: Optional[str] = typer.Option(None, help="name of the classifier layer (default: the last Linear)"),
    normalize: Optional[str] = typer.Option(None, help="per-channel MEAN,STD your model expects (default: "
                                                       "pixels in [0, 1], no normalisation)"),
    test_data: Optional[Path] = typer.Option(None, help="clean test data, for ACC before/after"),
    poisoned_data: Optional[Path] = typer.Option(None, help="poisoned test data, for ASR/RA before/after"),
    target_label: Optional[int] = typer.Option(None, help="attack target; poisoned data then carries true labels "
                                                          "(else its labels are the per-sample targets)"),
    epochs: Optional[int] = typer.Option(None, help="override the method's epochs"),
    lr: Optional[float] = typer.Option(None, help="override the method's learning rate"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment",
                                           help="the modality's training-time shifts during tuning (default: the "
                                                "method's setting); off where a shift changes the label"),
    modality: str = ModalityOpt,
    device: str = typer.Option("cpu", help="cpu or cuda"),
    precision: str = typer.Option("auto", help="auto (GPU: channels_last, deferred checks, CUDA graphs; "
                                               "CPU: unchanged), fp32, or bf16 (autocast; pays on large inputs, "
                                               "README 'The fast GPU path')"),
    seed: int = typer.Option(0),
    keep_diverged: bool = typer.Option(False, help="write the model even when the method diverged or destroyed "
                                                   "clean accuracy (it is then not a purified model)"),
    scan: bool = typer.Option(False, "--scan", help="also scan the received and the purified model for a backdoor "
                                                    "(clean data only; `smoothpurify scan`)"),
    reference: bool = ReferenceOpt,
) -> None:
    """Purify your own checkpoint on a little clean data; report ACC/ASR/RA before and after."""
    from smoothpurify.methods import PRESETS, RECOMMENDED_FROM
    from smoothpurify.runner import make_runner
    from modalities.contract import method_defaults
    from pipeline.own_checkpoint import check_device, check_out, purify_checkpoint
    from pipeline.report.tables import print_table

    check_out(out, checkpoint)  # before any data is read: nothing runs for an output that cannot be written
    check_device(device)
    from smoothpurify.accel import PRECISIONS
    if precision not in PRECISIONS:
        raise SmoothPurifyError(f"--precision {precision!r}: choose {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
    mod = _modality(modality)
    overrides = {k: v for k, v in (("epochs", epochs), ("lr", lr), ("augment", augment)) if v is not None}

    def modality_runner(name: str, given: dict | None):  # the modality's own preset settings, then the options
        return make_runner(name, {**method_defaults(mod, name), **(given or {})} if name in PRESETS else {},
                           precision=precision)

    if method != "auto":
        _, runner = modality_runner(method, overrides)
    if overrides and method not in PRESETS and method != "auto":
        raise SmoothPurifyError(f"--epochs/--lr/--augment apply to the tuning presets ({', '.join(PRESETS)}), "
                                f"not {method}")
    norm = _parse_normalize(normalize)
    clean = mod.load_user_data(clean_data, norm)
    shape = tuple(clean[0].shape[1:])
    test = mod.load_user_data(test_data, norm, shape) if test_data else None
    poisoned = mod.load_user_data(poisoned_data, norm, shape) if poisoned_data else None
    if method == "auto":
        from pipeline.scan import scanner
        from smoothpurify.auto import auto_runner

        runner = auto_runner(scanner(mod, clean, num_classes, reference=reference, seed=seed, device=device),
                             overrides=overrides, make_runner=modality_runner, log=typer.echo)
    record = purify_checkpoint(mod, checkpoint=checkpoint, model_spec=model, num_classes=num_classes, clean=clean,
                               method_runner=runner, out=out, classifier=classifier, test=test, poisoned=poisoned,
                               target_label=target_label, seed=seed, device=device, keep_diverged=keep_diverged,
                               warn=lambda m: typer.echo(f"warning: {m}", err=True))
    label = (f"{method} (= {RECOMMENDED_FROM} settings)" if method == "recommended"
             else record.get("method", method))
    if record.get("diverged"):  # only with --keep-diverged
        typer.echo(f"warning: {label}: {record.get('diverged_reason', 'diverged')}; {out} is NOT a purified model",
                   err=True)
    rows, columns = _before_after(record, mod.metrics)
    print_table(rows, f"{label}: {record['seconds']['total']:.1f} s (setup {record['seconds']['setup']:.1f} s)",
                columns)
    if not test_data and not poisoned_data:
        typer.echo("no --test-data / --poisoned-data: clean validation accuracy only (it is the tuning data, so it "
                   "flatters the result); `smoothpurify poison` makes a poisoned test set from a saved trigger")
    kind = "checkpoint (diverged, kept)" if record.get("diverged") else "purified checkpoint"
    typer.echo(f"{kind}: {out} (record: {out.with_suffix('.record.json')})")
    if scan:
        from pipeline.scan_checkpoint import scan_before_after

        scan_before_after(mod, checkpoint, out, model, num_classes, clean, seed=seed, device=device,
                          reference=reference, echo=typer.echo)


@app.command("scan")
def scan_command(
    checkpoint: Path = typer.Option(..., help="the model to scan, a .safetensors file (pickles are refused)"),
    model: str = typer.Option(..., help="registry name (see `smoothpurify list`) or path/to/file.py:factory"),
    num_classes: int = typer.Option(..., help="number of classes the model outputs"),
    clean_data: Path = typer.Option(..., help="clean data, as for `purify` (no poisoned data is needed)"),
    out_dir: Path = typer.Option(Path("scan"), help="where scan.json and triggers.png go"),
    normalize: Optional[str] = typer.Option(None, help="per-channel MEAN,STD your model expects"),
    steps: int = typer.Option(120, help="optimisation steps per class of the trigger searches"),
    margin_steps: int = typer.Option(600, help="Adam steps per class of the maximum-margin statistic"),
    per_sample_steps: int = typer.Option(100, help="DDN steps per class of the per-sample family"),
    families: Optional[str] = typer.Option(None, help="comma-separated families to search (images: mask, "
                                                      "additive, margin, per-sample; default: all of the modality's)"),
    modality: str = ModalityOpt,
    device: str = typer.Option("cpu", help="cpu or cuda"),
    seed: int = typer.Option(0),
    reference: bool = ReferenceOpt,
    purify: bool = typer.Option(True, "--purify/--no-purify", help="also purify a copy (`recommended`) on the clean "
                                "data, scan it and judge what the purification removed: the verdict that flagged no "
                                "benign model (README); the copy is kept as OUT_DIR/purified.safetensors. "
                                "--no-purify: the received model's scan alone (half the time; flags natural hubs)"),
    purify_method: str = typer.Option("recommended", help="with --purify: the purification method"),
    epochs: Optional[int] = typer.Option(None, help="with --purify: tuning epochs (default: the preset's)"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment",
                                           help="with --purify: the modality's shifts during tuning (default: on); "
                                                "off where a shift changes the label"),
) -> None:
    """Does this model hold a backdoor, and to which class? From the model and clean data alone
    (Neural Cleanse: the smallest trigger per class, as a mask and pattern and as an additive
    perturbation; MM-BD: the largest logit margin any input reaches per class; a class needing a much
    smaller trigger, or reaching a much larger margin, than the others is flagged). By default a copy is
    also purified and scanned, and the verdict is what the purification removed."""
    from pipeline.own_checkpoint import check_device, check_out
    from pipeline.scan_checkpoint import copy_purifier, scan_checkpoint
    from smoothpurify.scan import ScanSettings

    check_device(device)
    if steps < 10:
        raise SmoothPurifyError("--steps must be at least 10 (the trigger cost is adapted every 10 steps)")
    if margin_steps < 1:
        raise SmoothPurifyError("--margin-steps must be at least 1")
    if per_sample_steps < 1:
        raise SmoothPurifyError("--per-sample-steps must be at least 1")
    if (epochs is not None or augment is not None) and not purify:
        raise SmoothPurifyError("--epochs and --augment/--no-augment go with --purify (not with --no-purify)")
    if epochs is not None and epochs < 1:
        raise SmoothPurifyError("--epochs must be at least 1")
    mod = _modality(modality)
    runner = copy_purifier(mod, purify_method, epochs, augment) if purify else None
    if purify:  # before any search: an output that cannot be written fails now, not after minutes
        check_out(out_dir / "purified.safetensors", checkpoint)
    clean = mod.load_user_data(clean_data, _parse_normalize(normalize))
    scan_checkpoint(mod, checkpoint, model, num_classes, clean, out_dir,
                    settings=ScanSettings(steps=steps, margin_steps=margin_steps, per_sample_steps=per_sample_steps),
                    seed=seed, device=device, reference=reference,
                    families=[f.strip() for f in families.split(",")] if families else None,
                    purify_runner=runner, purify_label=purify_method, echo=typer.echo,
                    warn=lambda m: typer.echo(f"warning: {m}", err=True))


def _before_after(record: dict, metrics) -> tuple[list[dict], list[tuple[str, str]]]:
    """Rows "before" / "after" with clean validation accuracy and every number the test data gave
    (the modality's metrics by their labels; other keys, e.g. a multi-label ACC, in percent)."""
    from smoothpurify.metrics import Metric
    from pipeline.report.tables import shown

    known = {m.key: m for m in metrics}
    keys = list(dict.fromkeys(k for w in ("before", "after") for k in (record.get(w) or {})))
    shown_metrics = [known.get(k) or Metric(k, f"{k.upper()} %", True) for k in keys]
    rows = [{"model": when, "val_acc": round(100 * record[key], 2) if record.get(key) is not None else None,
             **{m.key: shown(m, (record.get(when) or {}).get(m.key)) for m in shown_metrics}}
            for when, key in (("before", "val_acc_start"), ("after", "val_acc_end"))]
    return rows, [("model", "model"), ("val_acc", "clean val. ACC %"), *((m.key, m.label) for m in shown_metrics)]


@app.command()
def analyze(name: str = typer.Argument(..., help="attack whose fixed clean+poisoned batch to use"),
            model: str = typer.Option("backdoored", "--model", help="benign | backdoored | purified/<method>"),
            modality: str = ModalityOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
            force: bool = typer.Option(False, help="recompute even if current")) -> None:
    """lambda_max, Tr(H), Tr(F) of one model on the attack's fixed analysis batch."""
    from pipeline.analysis import analyze_stage

    rec = analyze_stage(modality, _params(params, profile), name, model, force=force)
    trf = "-" if rec["trace_f"] is None else f"{rec['trace_f']:.4g}"
    typer.echo(f"{name}/{model}: lambda_max {rec['lambda_max']:.4g}, Tr(H) {rec['trace_h']:.4g} "
               f"+- {rec['trace_h_stderr']:.2g}, Tr(F) {trf} ({rec['n_hvp']} HVPs, {rec['seconds']:.1f} s)")


@app.command()
def report(modality: str = ModalityOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
           attacks: Optional[str] = typer.Option(None, help="comma-separated (default: params)"),
           methods: Optional[str] = typer.Option(None, help="comma-separated (default: purify.methods)")) -> None:
    """Write runs/<modality>/report.md and report.html; print the method table."""
    from pipeline.report.tables import method_columns, method_rows, print_table, rows_and_verdicts
    from pipeline.report.document import write_report
    from pipeline.report.verdict import overall_sentence

    import pipeline

    p = _params(params, profile)
    att = attacks.split(",") if attacks else _modality(modality).config(p).attacks
    meth = methods.split(",") if methods else (p.get("purify") or {}).get("methods") or []
    pipeline.check_names(modality, p, att, meth)
    md, page = write_report(modality, p, att, meth)
    print_table(method_rows(modality, p, att, meth, mark_best=True),
                f"{modality}: purification (* best among the methods that removed the backdoor)",
                method_columns(_modality(modality).metrics))
    _, verdicts = rows_and_verdicts(modality, p, att, meth)
    typer.echo("\n".join([f"verdict: {overall_sentence(verdicts)}", *(f"  {v.sentence()}" for v in verdicts)]))
    typer.echo(f"report: {md} and {page}")


@app.command("fetch-data")
def fetch_data(modality: str = ModalityOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Locate (or fetch from the Debian package) the embedded default dataset; same as `prepare`."""
    prepare(modality=modality, params=params, profile=profile, force=False)


def _modality(name: str):
    from modalities.contract import get_modality

    return get_modality(name)


def main() -> None:
    try:
        app()
    except SmoothPurifyError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # a path the user gave that the system refuses (too long, not permitted...)
        typer.echo(f"error: {SmoothPurifyError(f'{err.strerror or err}: {err.filename}')}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
