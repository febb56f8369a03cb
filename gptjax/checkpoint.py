"""Orbax checkpoints of the TrainState {params, opt_state, step} under run_dir/checkpoints.

Saves are asynchronous and sharded (each process writes its own shards). Orbax writes a step
under a temporary name and renames it when complete, so a half-written step is never listed;
old steps are removed only after a newer one is complete. Restores go through abstract targets
carrying the new shardings, so a checkpoint written on one mesh restores onto any other mesh and
any number of processes. Each step also stores the resolved config as JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("gptjax")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line."""


def _first_line(error: BaseException) -> str:
    """The first line of the innermost cause: Orbax wraps TensorStore's error (which names the
    file, e.g. 'Error reading "params.wte/1.0" in OCDBT database at ...: ... size 1000') in a
    message that is a page of JSON."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


class Checkpointer:
    def __init__(
        self,
        run_dir: str | Path,
        keep: int = 3,
        async_save: bool = True,
        keep_period: int | None = None,
        read_only: bool = False,
    ):
        """`read_only`: for readers (sample, eval, export) of a run that may be training right
        now: they must not delete its in-flight save (Orbax's tmp directory) nor create dirs."""
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.read_only = read_only
        # (Not Orbax's own read_only option: it logs three warnings each time.)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            keep_period=None if read_only else keep_period or None,
            create=not read_only,
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of a save killed mid-way
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, config: dict | None = None) -> None:
        """Start saving `state` as `step`; returns once the device-to-host copy is done."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        items = {"state": ocp.args.StandardSave(state)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restore `step` (default newest) onto the shardings in `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception as error:  # noqa: BLE001 - any failure here means an unusable step
            message = f"cannot restore step {step} from {self.directory}: {_first_line(error)}"
            raise CheckpointError(message) from None
        return restored["state"]

    def restore_newest_valid(self, abstract_state: Any) -> tuple[int, Any] | None:
        """(step, state) of the newest step that restores; a broken step is reported and skipped.

        None when there are no checkpoints at all; CheckpointError when none of them restores.
        """
        steps = self.all_steps()
        if not steps:
            return None
        broken = []
        for step in reversed(steps):
            try:
                state = self.restore(abstract_state, step)
            except CheckpointError as error:
                log.warning("skipping checkpoint: %s", error)
                broken.append(step)
                continue
            if broken and not self.read_only:
                self._set_aside(broken)
            return step, state
        raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} restores")

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unreadable steps to STEP.unreadable (kept for inspection, no longer listed),
        so the resumed run can save those steps again."""
        if jax.process_index() == 0:
            for step in steps:
                source = self.directory / str(step)
                target = self.directory / f"{step}.unreadable"
                n = 1
                while target.exists():
                    n += 1
                    target = self.directory / f"{step}.unreadable{n}"
                try:
                    source.rename(target)
                except OSError as error:  # it would block saving that step again
                    raise CheckpointError(
                        f"cannot move the unreadable checkpoint {source} aside: {error.strerror}"
                    ) from None
                log.warning("moved the unreadable checkpoint %s to %s", source, target.name)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("gptjax: unreadable checkpoints set aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters of `step` (default newest), onto the shardings in
        `abstract_params`: the optimiser state is never read (it may have another structure)."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            which = "any step" if step is None else f"step {step}"
            raise CheckpointError(f"no checkpoint for {which} in {self.directory}")
        reader = ocp.CheckpointManager(  # a partial restore needs the PyTree handler
            self.directory,
            options=ocp.CheckpointManagerOptions(
                create=False, enable_async_checkpointing=False, cleanup_tmp_directories=False
            ),
            item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        )
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        try:
            restored = reader.restore(step, args=ocp.args.Composite(state=args))
        except Exception as error:  # noqa: BLE001 - any failure here means an unusable step
            message = f"cannot restore step {step} from {self.directory}: {_first_line(error)}"
            raise CheckpointError(message) from None
        finally:
            reader.close()
        return restored["state"]["params"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
