"""The comparison of a `pixfleet eval` run: every model's figures, each one's difference from
the champion on the same images, and the promotion decision. Built in a task from the models'
manifests (`build_report`), returned to the driver as a few numbers per model and score."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from pixfleet.config.evaluation import FID, GuardConfig, PromotionConfig
from pixfleet.evaluation.statistics import Figure, bootstrap_mean, image_scores, paired_difference
from pixfleet.evaluation.summary import greater_is_better


@dataclass
class Decision:
    promote: bool
    reason: str


@dataclass
class Report:
    baseline: str  # the model the differences are taken from (the champion)
    figures: dict[str, dict[str, Figure]]  # model -> score -> figure
    differences: dict[str, dict[str, Figure]]  # model -> score -> (model - baseline) on shared images
    decision: Decision | None = None
    scores: list[str] = field(default_factory=list)

    def as_json(self) -> str:
        def table(figures):
            return {model: {s: f.as_dict() for s, f in by_score.items()} for model, by_score in figures.items()}

        decision = (
            None if self.decision is None else {"promote": self.decision.promote, "reason": self.decision.reason}
        )
        body = {"baseline": self.baseline, "figures": table(self.figures), "differences": table(self.differences)}
        return json.dumps(body | {"decision": decision}, indent=2)

    def as_markdown(self) -> str:
        """One row per model, one column per score: mean [95% interval] (n), then the
        difference from the baseline on the images both scored."""
        lines = [
            "| model | " + " | ".join(self.scores) + " |",
            "|---|" + "---|" * len(self.scores),
        ]
        for model, by_score in self.figures.items():
            cells = []
            for score in self.scores:
                cell = str(by_score[score]) if score in by_score else "-"
                if score in self.differences.get(model, {}):
                    cell += f"<br>vs {self.baseline}: {self.differences[model][score]}"
                cells.append(cell)
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        if self.decision:
            lines += ["", f"**{'promote' if self.decision.promote else 'no promotion'}**: {self.decision.reason}"]
        return "\n".join(lines) + "\n"


def build_report(
    outputs: dict[str, str],
    baseline: str,
    samples: int,
    promotion: PromotionConfig | None,
    fids: dict[str, Figure] | None = None,
) -> Report:
    """Every model's figures from its output folder's manifest, and its FID when measured;
    `baseline` names the champion."""
    scores = {model: image_scores(output) for model, output in outputs.items()}
    names = sorted({score for frame in scores.values() for score in frame.columns})
    figures = {
        model: {s: bootstrap_mean(frame[s].dropna().to_numpy(), samples) for s in names if frame[s].notna().any()}
        for model, frame in scores.items()
    }
    for model, figure in (fids or {}).items():
        figures[model][FID] = figure
    names += [FID] if fids else []
    differences = {
        model: {
            s: difference
            for s in names
            if s in frame
            and s in scores[baseline]
            and (difference := paired_difference(frame[s], scores[baseline][s], samples))
        }
        for model, frame in scores.items()
        if model != baseline
    }
    report = Report(baseline, figures, differences, scores=names)
    if promotion:
        champion, challenger = promotion.champion, promotion.challenger
        fid = {model: figure for model, figure in (fids or {}).items() if model in (champion, challenger)}
        report.decision = decide(promotion, scores[champion], scores[challenger], samples, fid or None)
    return report


def decide(
    promotion: PromotionConfig,
    champion: pd.DataFrame,
    challenger: pd.DataFrame,
    samples: int,
    fid: dict[str, Figure] | None = None,
) -> Decision:
    """Promote when the primary metric beats the champion's by the rule's margins and by more
    than the noise (the 95% interval of the paired difference excludes no gain), and no guard
    worsens past its tolerance. `fid` holds the two models' FIDs (by the promotion's names),
    a guard of the whole set: its point values are compared."""
    primary, rule = promotion.primary, promotion.rule
    for role, frame in (("champion", champion), ("challenger", challenger)):
        if primary not in frame:
            return Decision(False, f"the {role} has no {primary} scores (scores: {', '.join(frame.columns)})")
    sign = 1 if (rule.greater_is_better if rule.greater_is_better is not None else greater_is_better(primary)) else -1
    difference = paired_difference(challenger[primary], champion[primary], samples)
    if difference is None:
        return Decision(False, f"{primary}: no image was scored for both models")
    gain = _signed(difference, sign)
    value = float(challenger[primary].mean())
    if rule.threshold is not None and sign * (value - rule.threshold) < 0:
        return Decision(False, f"{primary} {value:.4g} does not reach the threshold {rule.threshold:g}")
    if gain.high < 0:
        return Decision(False, f"{primary} is worse than the champion's: change {gain}")
    if gain.low <= 0:
        return Decision(False, f"{primary}: change {gain} is within the noise (its 95% interval holds 0)")
    if rule.min_absolute_change is not None and gain.mean < rule.min_absolute_change:
        return Decision(
            False, f"{primary}: change {gain.mean:.4g} is under min_absolute_change {rule.min_absolute_change:g}"
        )
    if rule.min_relative_change is not None and gain.mean < rule.min_relative_change * abs(champion[primary].mean()):
        return Decision(
            False, f"{primary}: change {gain.mean:.4g} is under min_relative_change {rule.min_relative_change:g}"
        )
    for name, guard in promotion.guards.items():
        if name == FID:
            refusal = _fid_refusal(guard, fid[promotion.champion], fid[promotion.challenger])
        else:
            refusal = _guard_refusal(name, guard, champion, challenger, samples)
        if refusal:
            return Decision(False, refusal)
    return Decision(
        True, f"{primary} improves by {gain}; guards within tolerance ({', '.join(promotion.guards) or 'none'})"
    )


def _guard_refusal(
    name: str, guard: GuardConfig, champion: pd.DataFrame, challenger: pd.DataFrame, samples: int
) -> str | None:
    if name not in champion or name not in challenger:
        return f"guard {name}: not scored for both models"
    sign = 1 if (guard.greater_is_better if guard.greater_is_better is not None else greater_is_better(name)) else -1
    difference = paired_difference(challenger[name], champion[name], samples)
    if difference is None:
        return f"guard {name}: no image was scored for both models"
    worsening = -_signed(difference, sign).mean
    allowed = max(guard.max_absolute_worsening, (guard.max_relative_worsening or 0.0) * abs(champion[name].mean()))
    if worsening > allowed:
        return f"guard {name} worsens by {worsening:.4g} (tolerance {allowed:.4g})"
    return None


def _fid_refusal(guard: GuardConfig, champion: Figure, challenger: Figure) -> str | None:
    worsening = challenger.mean - champion.mean  # FID: lower is better
    allowed = max(guard.max_absolute_worsening, (guard.max_relative_worsening or 0.0) * champion.mean)
    if worsening > allowed:
        change = f"{champion.mean:.4g} -> {challenger.mean:.4g}"
        return f"guard fid worsens by {worsening:.4g}: {change} (tolerance {allowed:.4g})"
    return None


def _signed(figure: Figure, sign: int) -> Figure:
    """A difference turned into a gain: positive where the challenger is better."""
    low, high = sorted((sign * figure.low, sign * figure.high))
    return Figure(sign * figure.mean, low, high, figure.count)
