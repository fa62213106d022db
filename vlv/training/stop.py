"""When a run stops: its step count (or the count a budgeted run plans for itself), this invocation's time and
step limits, and SIGTERM / SIGINT. Time is read from an injected clock, so tests pace a run without waiting."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlv.training.config import TrainConfig

Clock = Callable[[], float]  # seconds, monotonic

# A budgeted run times steps 2..PLAN_AFTER (step 1 pays one-off costs), then plans its length, and re-plans every
# REPLAN_EVERY steps from its average pace since step 1: a CPU's pace drifts over a run, either way, so no single
# early plan holds. The cosine follows the current plan; a re-plan moves the schedule's progress by the plan's
# relative change.
PLAN_AFTER = 20
REPLAN_EVERY = 50


def plan_steps(budget_minutes: float, elapsed_s: float, seconds_per_step: float, min_steps: int) -> int:
    """How many steps fill the budget at the measured pace: faster hardware simply trains further.

    The count is saved with the checkpoint, so a resume continues the same schedule and a finished run's re-run
    does nothing; it never drops below the steps already taken.
    """
    remaining = max(0.0, 60 * budget_minutes - elapsed_s)
    return max(min_steps, min_steps + int(remaining / max(seconds_per_step, 1e-6)))


@dataclass
class StopPolicy:
    """Owns the four ways a run ends: ``steps`` (or a budget's plan), ``max_minutes`` and ``stop_after`` in this
    invocation; ``budget_minutes`` (re)plans ``planned`` from the pace. Call :meth:`start` before the first step."""

    steps: int | None
    budget_minutes: float | None = None
    max_minutes: float | None = None
    stop_after: int | None = None
    planned: int | None = None  # a budgeted run's current plan, saved with its checkpoints
    clock: Clock = time.perf_counter
    start_step: int = field(default=0, init=False)
    t_start: float = field(default=0.0, init=False)
    elapsed0: float = field(default=0.0, init=False)
    pace_t0: float | None = field(default=None, init=False)  # when step 2 began: the pace leaves out step 1

    @classmethod
    def of(cls, cfg: TrainConfig, planned: int | None = None, clock: Clock = time.perf_counter) -> StopPolicy:
        return cls(cfg.steps, cfg.budget_minutes, cfg.max_minutes, cfg.stop_after, planned, clock)

    @property
    def total(self) -> int | None:
        """The run's step count as it stands: the plan, else the configured steps (None: not planned yet)."""
        return self.planned if self.planned is not None else self.steps

    def start(self, step: int, elapsed_s: float) -> None:
        self.start_step, self.elapsed0, self.t_start = step, elapsed_s, self.clock()

    def finished(self, step: int) -> bool:
        return self.total is not None and step >= self.total

    def step_begins(self, step: int) -> None:
        if self.budget_minutes and step - self.start_step == 1:
            self.pace_t0 = self.clock()  # after the first step's one-off costs

    def elapsed_s(self) -> float:
        """Training time over all invocations of the run."""
        return self.elapsed0 + self.clock() - self.t_start

    def steps_out(self, step: int) -> bool:
        """This invocation took its ``stop_after`` steps."""
        return self.stop_after is not None and step - self.start_step >= self.stop_after

    def time_out(self, now: float) -> bool:
        """This invocation ran past ``max_minutes``."""
        return self.max_minutes is not None and now - self.t_start > 60 * self.max_minutes

    def plan_due(self, step: int) -> bool:
        """A budgeted run (re)plans after this step: PLAN_AFTER steps into this process, then every REPLAN_EVERY."""
        if self.pace_t0 is None:
            return False
        done = step - self.start_step
        return done == PLAN_AFTER if self.planned is None else done > PLAN_AFTER and done % REPLAN_EVERY == 0

    def plan(self, step: int, elapsed_s: float, now: float) -> int:
        """The step count that fills the budget at the average pace since step 2 of this invocation."""
        assert self.budget_minutes is not None and self.pace_t0 is not None
        pace = (now - self.pace_t0) / (step - self.start_step - 1)
        return plan_steps(self.budget_minutes, elapsed_s, pace, step)


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints after the current step and returns."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.stop = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
