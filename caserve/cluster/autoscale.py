"""Autoscaling of assisted workers from the router's queue delay. Pure logic, no Ray, no HTTP.

The signal (:class:`QueueDelayEstimator`), sampled from the router's ``/metrics`` every control period:

* the mean ``caserve_queue_delay_seconds`` (arrival to first dispatch) of the requests dispatched since
  the previous sample: the histogram's ``_sum`` and ``_count`` deltas;
* when nothing was dispatched since the previous sample but the queue is not empty, how long it has
  been so (a lower bound of the head request's wait): a stalled queue is seen without waiting for the
  first dispatch, which under a burst may come only when a slow batch ends.

The policy (:class:`Autoscaler`), one decision per sample, the pool always kept in ``[min, max]``:

* **up** when the delay exceeds ``target_queue_delay_s``, no earlier new worker is still loading, and
  ``scale_up_cooldown_s`` passed since the last scale-up: by ``ceil(n * (delay / target - 1))``
  workers (at least 1, at most up to ``max``), i.e. proportionally to the overshoot;
* **down** by one worker when the delay stayed under ``scale_down_below * target`` with an empty queue
  and no worker loading for ``scale_down_after_s`` (the quiet clock restarts after each step, so the pool shrinks one worker
  per quiet period). The controller drains the worker before stopping it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families

from caserve.cluster.config import AssistedConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueSample:
    """What the router's ``/metrics`` said about one model at time ``t`` (controller clock)."""

    t: float
    queue_length: int
    delay_sum: float
    delay_count: float


def parse_router_metrics(text: str, model: str, t: float) -> QueueSample:
    """Pick one model's queue length and queue-delay histogram totals out of Prometheus text."""
    length, total, count = 0.0, 0.0, 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "caserve_queue_length":
                length = s.value
            elif s.name == "caserve_queue_delay_seconds_sum":
                total = s.value
            elif s.name == "caserve_queue_delay_seconds_count":
                count = s.value
    return QueueSample(t, int(length), total, count)


class QueueDelayEstimator:
    def __init__(self) -> None:
        self._last: Optional[QueueSample] = None
        self._stalled_since: Optional[float] = None
        self.delay_s = 0.0

    def update(self, sample: QueueSample) -> float:
        last, self._last = self._last, sample
        if last is None or sample.delay_count < last.delay_count:  # first sample, or the router restarted
            self._stalled_since = sample.t if sample.queue_length else None
            self.delay_s = 0.0
            return self.delay_s
        dispatched = sample.delay_count - last.delay_count
        recent = (sample.delay_sum - last.delay_sum) / dispatched if dispatched > 0 else 0.0
        if dispatched > 0 or sample.queue_length == 0:
            self._stalled_since = None
        elif self._stalled_since is None:
            self._stalled_since = last.t if last.queue_length else sample.t
        stalled = sample.t - self._stalled_since if self._stalled_since is not None else 0.0
        self.delay_s = max(recent, stalled)
        return self.delay_s


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str


class Autoscaler:
    def __init__(self, cfg: AssistedConfig) -> None:
        self.cfg = cfg
        self._last_up: Optional[float] = None
        self._quiet_since: Optional[float] = None

    def decide(self, now: float, delay_s: float, queue_length: int, current: int, loading: int) -> Decision:
        """The assisted pool size to aim for. ``current`` counts live workers (loading ones included,
        draining ones not); ``loading`` those not yet registered with the router."""
        c = self.cfg
        if current < c.min:
            return Decision(c.min, f"below min ({current} < {c.min})")
        if current > c.max:
            return Decision(c.max, f"above max ({current} > {c.max})")
        if delay_s > c.target_queue_delay_s:
            self._quiet_since = None
            cooling = self._last_up is not None and now - self._last_up < c.scale_up_cooldown_s
            if current >= c.max or loading or cooling:
                return Decision(current, "hold: delay over target but at max, loading or cooling down")
            step = max(1, math.ceil(current * (delay_s / c.target_queue_delay_s - 1)))
            self._last_up = now
            target = min(c.max, current + step)
            return Decision(target, f"up: queue delay {delay_s:.2f}s > target {c.target_queue_delay_s:.2f}s")
        if delay_s < c.scale_down_below * c.target_queue_delay_s and queue_length == 0 and not loading:
            if self._quiet_since is None:
                self._quiet_since = now
            if current > c.min and now - self._quiet_since >= c.scale_down_after_s:
                self._quiet_since = now
                return Decision(current - 1, f"down: quiet for {c.scale_down_after_s:.0f}s")
            return Decision(current, "hold: quiet")
        self._quiet_since = None
        return Decision(current, "hold: delay within target")
