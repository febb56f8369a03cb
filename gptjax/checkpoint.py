"""Orbax checkpoints of the TrainState {params, opt_state, step} under run_dir/checkpoints.

Saves are asynchronous and sharded (each process writes its own shards); a step is visible only
once complete. Restores go through abstract targets carrying the new shardings, so a checkpoint
written on one mesh restores onto any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line."""


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Start saving `state` as `step` (returns once the device-to-host copy is done)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restore `step` (default newest) onto the shardings in `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except (ValueError, KeyError, FileNotFoundError, OSError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            message = f"cannot restore step {step} from {self.directory}: {first}"
            raise CheckpointError(message) from None
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
