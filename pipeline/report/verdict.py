"""The answer a report opens with: per attack, did purification remove the backdoor, and at what cost.

A verdict reads the modality's own metrics through their roles (``attack``: ASR; ``clean``: ACC,
mAP, BLEU), so it holds for any modality. The two thresholds are parameters (``report.verdict`` in
params.yaml) and the report prints them next to the verdict, so a reader can check every word:

- **removed**: after purification the attack metric is at most ``removed_at`` and the clean metric
  fell by at most ``max_clean_drop`` points;
- **removed at a cost**: the attack metric is at most ``removed_at``, the clean metric fell by more;
- **reduced**: the attack metric fell to half its value before, or lower, but stays above ``removed_at``;
- **not removed**: anything else;
- **diverged**: the run's guard flagged it (its model is not a purified model);
- **no backdoor to remove**: the undefended model's attack metric is already at most ``removed_at``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from smoothpurify.metrics import Metric, metric_with_role

REMOVED, COSTLY, REDUCED, NOT_REMOVED, DIVERGED, NOTHING = (
    "removed", "removed at a cost", "reduced", "not removed", "diverged", "no backdoor to remove")


class VerdictThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    removed_at: float = Field(5.0, ge=0.0, le=100.0,
                              description="attack metric (e.g. ASR %) at or below which a backdoor counts as removed")
    max_clean_drop: float = Field(5.0, ge=0.0,
                                  description="points of the clean metric (ACC, mAP, BLEU) a removal may cost")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "VerdictThresholds":
        from modalities.kit import validate_section

        return validate_section(cls, {"report.verdict": (params.get("report") or {}).get("verdict")}, "report.verdict")

    def sentence(self, attack: Metric, clean: Metric) -> str:
        a, c = _name(attack), _name(clean)
        return (f"Verdict rules: a backdoor is removed when {a} after purification is at most {self.removed_at:g}"
                f"{_unit(attack)} and {c} fell by at most {self.max_clean_drop:g} points; removed at a cost when "
                f"{a} is that low but {c} fell further; reduced when {a} at least halved; diverged when the run's "
                "guard flagged the model (clean validation accuracy or loss collapsed). Thresholds: params.yaml "
                "report.verdict.")


def _name(metric: Metric) -> str:
    return metric.label.replace("%", "").strip()


def _unit(metric: Metric) -> str:
    return " %" if metric.percent else ""


@dataclass
class MethodVerdict:
    method: str
    status: str
    attack_after: float | None
    clean_change: float | None  # after - before, in the clean metric's display units


@dataclass
class AttackVerdict:
    attack: str
    attack_metric: Metric
    clean_metric: Metric
    attack_before: float | None
    clean_before: float | None
    methods: list[MethodVerdict] = field(default_factory=list)

    @property
    def removed_by(self) -> list[MethodVerdict]:
        return [m for m in self.methods if m.status == REMOVED]

    def sentence(self) -> str:
        """One line in plain words, e.g. "badnets (ASR 100 % before): removed by fst (ASR 100 % -> 1.2 %,
        ACC -1.9 points); not removed by ft (ASR 99 %)"."""
        a, c, unit = _name(self.attack_metric), _name(self.clean_metric), _unit(self.attack_metric)
        head = f"{self.attack} ({a} {_num(self.attack_before)}{unit} before)"
        if not self.methods:
            return f"{head}: no purification results yet."
        if self.methods[0].status == NOTHING:
            return f"{head}: no backdoor to remove (the attack did not take)."
        parts = []
        for status in (REMOVED, COSTLY, REDUCED, NOT_REMOVED, DIVERGED):
            group = [m for m in self.methods if m.status == status]
            if not group:
                continue
            if status == DIVERGED:
                parts.append("diverged: " + ", ".join(m.method for m in group))
                continue
            group.sort(key=lambda m: (m.attack_after if m.attack_after is not None else 1e9,
                                      -(m.clean_change if m.clean_change is not None else -1e9)))
            detail = [f"{m.method} ({a} {_num(self.attack_before)}{unit} -> {_num(m.attack_after)}{unit}, "
                      f"{c} {_signed(m.clean_change)} points)" for m in group]
            parts.append(f"{status} by " + ", ".join(detail))
        return f"{head}: " + "; ".join(parts) + "."


def _num(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}".rstrip("0").rstrip(".")


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def classify(attack_before: float | None, attack_after: float | None, clean_change: float | None,
             diverged: bool, t: VerdictThresholds) -> str:
    if diverged:
        return DIVERGED
    if attack_before is not None and attack_before <= t.removed_at:
        return NOTHING
    if attack_after is None:
        return NOT_REMOVED
    if attack_after <= t.removed_at:
        return REMOVED if clean_change is None or -clean_change <= t.max_clean_drop else COSTLY
    if attack_before is not None and attack_after <= attack_before / 2:
        return REDUCED
    return NOT_REMOVED


def attack_verdicts(rows: list[dict[str, Any]], metrics: tuple[Metric, ...],
                    thresholds: VerdictThresholds) -> list[AttackVerdict]:
    """Verdicts from the report's method rows (reference row first per attack, values in display units).

    Sets ``row["verdict"]`` on every purified row as a side effect, so the table shows it too.
    """
    attack_m, clean_m = metric_with_role(metrics, "attack"), metric_with_role(metrics, "clean")
    if attack_m is None or clean_m is None:
        return []
    out: dict[str, AttackVerdict] = {}
    for row in rows:
        attack = row["attack"]
        if row.get("reference"):
            out[attack] = AttackVerdict(attack, attack_m, clean_m, row.get(attack_m.key), row.get(clean_m.key))
            continue
        v = out.setdefault(attack, AttackVerdict(attack, attack_m, clean_m, None, None))
        after, clean_after = row.get(attack_m.key), row.get(clean_m.key)
        change = None if clean_after is None or v.clean_before is None else clean_after - v.clean_before
        if not clean_m.higher_is_better and change is not None:
            change = -change
        status = classify(v.attack_before, after, change, bool(row.get("diverged")), thresholds)
        row["verdict"] = status
        v.methods.append(MethodVerdict(row.get("method_name", row["method"]), status, after, change))
    return list(out.values())


def overall_sentence(verdicts: list[AttackVerdict]) -> str:
    with_results = [v for v in verdicts if v.methods and v.methods[0].status != NOTHING]
    if not with_results:
        return "No purification result to judge yet."
    removed = [v for v in with_results if v.removed_by]
    if not removed:
        return (f"No method removed the backdoor of any of the {len(with_results)} attack(s) "
                "within the thresholds below.")
    return f"The backdoor was removed for {len(removed)} of {len(with_results)} attack(s) by at least one method."
