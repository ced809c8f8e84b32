"""The scan of a user's checkpoint from the command line: ``smoothpurify scan`` (optionally with a
purified copy) and ``smoothpurify purify --scan``. Both judge the received model's scan against the
purified model's (:func:`pipeline.scan.removal`); one :func:`pipeline.scan.scanner` serves every scan of a
call, so a clean reference (``--reference``) is trained once."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from modalities.contract import method_defaults
from pipeline.own_checkpoint import load_user_model, purify_checkpoint
from pipeline.scan import removal, removal_line, save_scan, scan_lines, scanner
from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import write_json
from smoothpurify.methods import PRESETS
from smoothpurify.runner import make_runner
from smoothpurify.scan import ScanSettings, residual, residual_line

Echo = Callable[[str], None]


def report_removal(received: Any, purified: Any, path: Path, echo: Echo) -> None:
    """What the purification removed: written to ``path`` and said in one line."""
    removed = removal(received, purified)
    write_json(path, removed.to_record())
    echo("what the purification removed: " + removal_line(removed))


def copy_purifier(mod, method: str, epochs: int | None, augment: bool | None):
    """The method runner that purifies the scanned model's copy: ``method`` with the modality's own settings
    of it, ``epochs`` / ``augment`` where given; one error line for a method that is not a tuning preset."""
    if method not in PRESETS:
        raise SmoothPurifyError(f"--purify-method {method!r}: choose a tuning preset ({', '.join(PRESETS)})")
    tuning = {k: v for k, v in (("epochs", epochs), ("augment", augment)) if v is not None}
    return make_runner(method, {**method_defaults(mod, method), **tuning})[1]


def scan_checkpoint(mod, checkpoint: Path, model: str, num_classes: int, clean, out_dir: Path, *,
                    settings: ScanSettings, seed: int, device: str, reference: bool, families: list[str] | None,
                    purify_runner=None, purify_label: str = "", echo: Echo, warn: Echo) -> None:
    """``smoothpurify scan``: the received model's scan in ``out_dir``; with ``purify_runner`` also a purified
    copy (``out_dir/purified.safetensors``), its scan (``out_dir/purified/``) and ``out_dir/removed.json``."""
    scan_one = scanner(mod, clean, num_classes, reference=reference, settings=settings, seed=seed, device=device,
                       families=families)
    received = scan_one(load_user_model(mod, checkpoint, model, num_classes, clean))
    record = save_scan(received, out_dir, f"scan of {checkpoint.name}")
    echo("\n".join(scan_lines(received, checkpoint.name)))
    echo(f"record: {out_dir / 'scan.json'}" + (f"; triggers: {', '.join(record['figures'])}"
                                               if record.get("figures") else ""))
    if purify_runner is None:
        return
    out = out_dir / "purified.safetensors"
    purify_checkpoint(mod, checkpoint=checkpoint, model_spec=model, num_classes=num_classes, clean=clean,
                      method_runner=purify_runner, out=out, seed=seed, device=device, warn=warn)
    purified = scan_one(load_user_model(mod, out, model, num_classes, clean))
    save_scan(purified, out_dir / "purified", "the purified copy")
    echo("\n".join(scan_lines(purified, f"purified copy ({purify_label})")))
    report_removal(received, purified, out_dir / "removed.json", echo)


def scan_before_after(mod, checkpoint: Path, out: Path, model: str, num_classes: int, clean, *, seed: int,
                      device: str, reference: bool, echo: Echo) -> None:
    """``purify --scan``: the received and the purified model scanned, followed and compared."""
    scans, scan_one = {}, scanner(mod, clean, num_classes, reference=reference, seed=seed, device=device)
    for label, path in (("received", checkpoint), ("purified", out)):
        scans[label] = scan_one(load_user_model(mod, path, model, num_classes, clean))
        save_scan(scans[label], out.parent / f"{out.stem}.scan-{label}", f"{label} model")
        echo("\n".join(scan_lines(scans[label], f"{label} model")))
    echo("before and after: " + residual_line(residual(scans["received"], scans["purified"]),
                                              scans["purified"].threshold))
    report_removal(scans["received"], scans["purified"], out.parent / f"{out.stem}.scan-removed.json", echo)
