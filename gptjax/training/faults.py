"""What stops a run: a stop signal (handled cleanly) or a run that cannot go on.

SIGTERM / SIGINT: finish the step, checkpoint, exit 0.

The first signal only sets a flag; the loop checks it between steps. With several processes they
agree on the step to stop at (an all-gather of the flags at fixed steps), so none is left waiting
in a collective. A second signal aborts at once.
"""

from __future__ import annotations

import os
import signal
import sys

import jax

from gptjax.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the message is one line."""


class NonFiniteSteps:
    """Counts steps whose update was skipped for a non-finite loss or gradient; too many in a
    row (`train.max_bad_steps`) end the run with a TrainingError."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def update(self, step: int, skipped: bool) -> list[str]:
        """Record `step`; returns the lines to tell the user."""
        if not skipped:
            self.in_a_row = 0
            return []
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingError(
                f"{self.in_a_row} steps in a row (to step {step}) had a non-finite loss or "
                "gradient; stopping. The last checkpoint holds finite weights: lower optim.lr "
                "or check the data"
            )
        return [f"gptjax: step {step}: non-finite loss or gradient, update skipped"]


class PreemptionGuard:
    """Context manager; `should_stop(step)` is True once any process got a stop signal."""

    def __init__(self, sync_every: int = 1):
        self.requested: int | None = None  # the signal number received, if any
        self.sync_every = max(sync_every, 1)
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            print(f"gptjax: second {signal.Signals(signum).name}: aborting now", file=sys.stderr)
            os._exit(128 + signum)
        self.requested = signum
        print(
            f"gptjax: {signal.Signals(signum).name} received: finishing the step and saving a "
            "checkpoint (send it again to abort)",
            file=sys.stderr,
        )

    def install(self) -> PreemptionGuard:
        try:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous.clear()
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def should_stop(self, step: int) -> bool:
        """Whether to stop after `step`. Every process must call this at every step."""
        if jax.process_count() == 1:
            return self.requested is not None
        if step % self.sync_every:
            return False
        from gptjax import distributed

        return any(distributed.gather_ints(self.requested is not None))
