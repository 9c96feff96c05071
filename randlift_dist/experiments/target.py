"""What counts as success in an experiment: one metric of the trainer and a bound on it.

    experiment.target: {metric: test_loss, max: 0.01}        # success: final test loss <= 0.01
    experiment.target: {metric: test_accuracy, min: 0.9}     # success: final test accuracy >= 0.9
    experiment.eps: 0.01                                     # the same as the first line

The metrics are the trainer's evaluation metrics of the final weights (`tasks.Task`): `test_loss`,
`train_loss` (any task) and `test_accuracy`, `train_accuracy` (classification,
`train.loss=cross_entropy`). A loss takes an upper bound (`max`), an accuracy a lower bound
(`min`); a value that is missing or not finite never succeeds. `Target.label` (`test_loss <= 0.01`)
is how tables and figures name the criterion.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

LOSS_METRICS = ("test_loss", "train_loss")
ACCURACY_METRICS = ("test_accuracy", "train_accuracy")
METRICS = LOSS_METRICS + ACCURACY_METRICS


class TargetError(ValueError):
    """A bad success criterion; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class Target:
    metric: str
    bound: float
    direction: str  # "max": value <= bound; "min": value >= bound

    @property
    def label(self) -> str:
        return f"{self.metric} {'<=' if self.direction == 'max' else '>='} {self.bound:g}"

    @property
    def is_loss(self) -> bool:
        return self.metric in LOSS_METRICS

    @property
    def classification(self) -> bool:
        return self.metric in ACCURACY_METRICS

    @property
    def train_metric(self) -> str:
        """The training-split analogue of the metric (`test_loss` -> `train_loss`)."""
        return self.metric.replace("test_", "train_", 1)

    def met(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return value <= self.bound if self.direction == "max" else value >= self.bound

    def first_step(self, records: list[dict[str, Any]], metric: str | None = None) -> int | None:
        """The first logged step whose `metric` (default: the target's) meets the bound."""
        key = metric or self.metric
        for r in records:
            if key in r and self.met(r[key]):
                return int(r["step"])
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, self.direction: self.bound}


def parse_target(value: Any, key: str = "experiment.target") -> Target:
    """A `Target` from `{metric: M, max: X}` / `{metric: M, min: X}` (or a `Target`)."""
    if isinstance(value, Target):
        return value
    if not isinstance(value, dict) or "metric" not in value:
        raise TargetError(f"{key}={value!r}: write {{metric: test_loss, max: 0.01}} or "
                          "{metric: test_accuracy, min: 0.9}")
    unknown = sorted(set(value) - {"metric", "max", "min"})
    if unknown:
        raise TargetError(f"{key}: unknown key(s) {unknown}; a target has metric and max (losses) or min (accuracies)")
    metric = value["metric"]
    if metric not in METRICS:
        raise TargetError(f"{key}.metric={metric!r}: choose one of {', '.join(METRICS)}")
    direction = "max" if metric in LOSS_METRICS else "min"
    other = "min" if direction == "max" else "max"
    if other in value:
        better = "lower is better" if direction == "max" else "higher is better"
        raise TargetError(f"{key}: {metric} takes a bound '{direction}' ({better}), "
                          f"not '{other}': write {{metric: {metric}, {direction}: {value[other]}}}")
    if direction not in value:
        raise TargetError(f"{key}: {metric} needs a bound: {{metric: {metric}, {direction}: X}}")
    bound = value[direction]
    if isinstance(bound, str):
        try:
            bound = float(bound)
        except ValueError:
            pass
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
        raise TargetError(f"{key}.{direction}={value[direction]!r}: expected a number")
    if direction == "max" and not bound > 0:
        raise TargetError(f"{key}.max={bound!r}: a loss bound must be > 0")
    if direction == "min" and not 0 < bound <= 1:
        raise TargetError(f"{key}.min={bound!r}: an accuracy bound must be in (0, 1]")
    return Target(metric, float(bound), direction)


def from_experiment(section: dict[str, Any], key: str = "experiment") -> Target:
    """The target of an experiment section: `target:` or the older `eps:` (`test_loss <= eps`), not both."""
    has_eps, has_target = section.get("eps") is not None, section.get("target") is not None
    if has_eps and has_target:
        raise TargetError(f"{key}.eps and {key}.target are both set: keep one (eps: X means "
                          "target: {metric: test_loss, max: X})")
    if not has_eps and not has_target:
        raise TargetError(f"{key}.target is missing: the success criterion, e.g. {{metric: test_loss, max: 0.01}} "
                          f"or {{metric: test_accuracy, min: 0.9}} (or {key}.eps: X for test_loss <= X)")
    if has_target:
        return parse_target(section["target"], f"{key}.target")
    eps = section["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise TargetError(f"{key}.eps={eps!r}: expected a number > 0")
    return Target("test_loss", float(eps), "max")


def check_task(target: Target, loss: str, key: str = "experiment.target") -> None:
    """An accuracy target needs a classification task."""
    if target.classification and loss != "cross_entropy":
        raise TargetError(f"{key}: {target.metric} is only measured for classification (train.loss=cross_entropy), "
                          f"and this task has train.loss={loss}: use test_loss / train_loss, or set "
                          "train.loss=cross_entropy")
