"""``--method auto``: a purification that checks its own result, from clean data alone.

The model as received is scanned first (:mod:`smoothpurify.scan`, through the caller's ``scan_fn``).
Then a short list of methods is tried in order. A result is *kept* when it did not diverge and its
clean validation accuracy is within ``acc_tolerance`` of the received model's; each kept result is
scanned and compared with the received model's scan (:func:`smoothpurify.scan.residual`): where the
received model was flagged at class ``t``, a result is *clear* when ``t`` is no longer anomalous (a
class flagged only after purification is a side effect of it, reported, not the received backdoor);
where it was not flagged, a result is clear when it is not flagged either. The first kept, clear
result is returned at once (the list starts with ``recommended``, so on a model it purifies, ``auto``
is ``recommended`` plus two scans); when no kept result is clear, the one with the smallest residual
anomaly is returned. Only clean data and the scan decide: never test ASR.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.purify import PurifyResult
from smoothpurify.scan import residual

# Three mechanisms: FST + distillation (the default), FST alone (a stronger shift, more ACC cost),
# ASAM (no fresh classifier): a backdoor one of them leaves, another may remove.
AUTO_CANDIDATES = ("recommended", "fst", "ft-sam")
AUTO_ACC_TOLERANCE = 0.05   # clean validation accuracy a candidate may lose and still be kept

ScanFn = Callable[[nn.Module], Any]   # model -> smoothpurify.scan.ScanResult


def auto_runner(scan_fn: ScanFn, candidates: tuple[str, ...] = AUTO_CANDIDATES,
                acc_tolerance: float = AUTO_ACC_TOLERANCE, overrides: dict[str, Any] | None = None,
                make_runner: Callable | None = None,
                log: Callable[[str], None] | None = None) -> Callable[..., PurifyResult]:
    """A method runner (``run(model, x, y, likelihood, **kw)``) that purifies with each candidate in
    turn and returns the one the clean data and the scan prefer (module docstring). ``overrides``
    (e.g. epochs) apply to every candidate."""
    if not candidates:
        raise SmoothPurifyError("auto: the candidate list is empty")
    if make_runner is None:
        from smoothpurify.runner import make_runner
    runners = [(name, make_runner(name, overrides)[1]) for name in candidates]  # unknown names fail before any work
    say = log or (lambda _m: None)

    def run(model: nn.Module, inputs: Any, targets: Any, likelihood: Any, **kw: Any) -> PurifyResult:
        t0 = time.perf_counter()
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        received = scan_fn(model)
        say(f"auto: the received model: largest anomaly {received.max_anomaly:.2f}"
            + (f", flagged at class {received.suspected}" if received.flagged else ", not flagged"))
        trials: list[dict[str, Any]] = []
        kept: list[tuple[float, PurifyResult, dict[str, Any]]] = []
        for name, runner in runners:
            model.load_state_dict(start)  # every candidate starts from the model as received
            result = runner(model, inputs, targets, likelihood, **kw)
            rec = result.record
            trial = {"method": name, "val_acc_start": rec["val_acc_start"], "val_acc_end": rec["val_acc_end"],
                     "diverged": bool(rec.get("diverged")), "seconds": rec["seconds"]["total"]}
            trials.append(trial)
            if trial["diverged"] or rec["val_acc_end"] < rec["val_acc_start"] - acc_tolerance:
                trial["kept"] = False
                say(f"auto: {name} dropped (clean validation accuracy {rec['val_acc_start']:.1%} -> "
                    f"{rec['val_acc_end']:.1%}{', diverged' if trial['diverged'] else ''})")
                continue
            scanned = scan_fn(result.model)
            left = residual(received, scanned)
            trial.update(kept=True, max_anomaly=scanned.max_anomaly, flagged=scanned.flagged,
                         suspected=scanned.suspected, scan_seconds=round(scanned.seconds, 3),
                         residual_anomaly=left["anomaly"], clear=left["cleared"], new_flag=left["new_flag"])
            followed = f"class {left['tracked']}" if left["tracked"] is not None else "largest"
            say(f"auto: {name}: clean validation accuracy {rec['val_acc_end']:.1%}, {followed} anomaly "
                f"{left['anomaly']:.2f}{' (clear)' if left['cleared'] else ' (flagged)'}")
            kept.append((left["anomaly"], result, trial))
            if left["cleared"]:
                break
        if not kept:
            raise SmoothPurifyError(f"auto: every candidate ({', '.join(candidates)}) lost more than "
                                    f"{acc_tolerance:.0%} clean validation accuracy or diverged; nothing was chosen")
        # the clear result that stopped the loop, else the smallest residual (the first of equals: the list's order)
        _, best, trial = kept[-1] if kept[-1][2]["clear"] else min(kept, key=lambda k: k[0])
        best.record["auto"] = {"candidates": trials, "chosen": trial["method"], "acc_tolerance": acc_tolerance,
                               "received": {"max_anomaly": received.max_anomaly, "flagged": received.flagged,
                                            "suspected": received.suspected},
                               "wall_seconds": round(time.perf_counter() - t0, 3)}
        best.record["method"] = f"auto ({trial['method']})"
        return best

    return run
