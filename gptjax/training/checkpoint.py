"""Orbax checkpoints of the TrainState {params, opt_state, step} under run_dir/checkpoints.

Saves are asynchronous and sharded (each process writes its own shards). Orbax writes a step
under a temporary name and renames it when complete, so a half-written step is never listed;
old steps are removed only after a newer one is complete. Restores go through abstract targets
carrying the new shardings, so a checkpoint written on one mesh restores onto any other mesh and
any number of processes. Each step also stores the resolved config as JSON.

A save that fails (out of disk space, most likely) stops the run with one line naming the step
and the newest complete checkpoint, which a failed save never touches: Orbax deletes old steps
only after a newer one is complete, and the failed step's temporary directory is deleted when
training starts again.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gptjax import distributed
from gptjax.errors import UserError

log = logging.getLogger("gptjax")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message is one line."""


def _first_line(error: BaseException) -> str:
    """The first line of the innermost cause: Orbax wraps TensorStore's error (which names the
    file, e.g. 'Error reading "params.wte/1.0" in OCDBT database at ...: ... size 1000') in a
    message that is a page of JSON."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


def _out_of_space(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is ENOSPC; TensorStore says it in words."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


class _ReportedOutOfSpace(logging.Filter):
    """Drops Orbax's own tracebacks of a save that ran out of space (absl logs one per
    background thread, a page each): the run reports it in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.exc_info[1] if record.exc_info else None
        return not (
            record.levelno >= logging.ERROR and failure is not None and _out_of_space(failure)
        )


_ABSL_FILTER = _ReportedOutOfSpace()


class _ReadFailure:
    """What the state handler's `restore` returns instead of raising (_reporting_handler)."""

    def __init__(self, error: BaseException):
        self.error = error


def _reporting_handler() -> ocp.StandardCheckpointHandler:
    """Orbax's standard handler whose `restore` returns a failure to read instead of raising it.

    With several processes each reads its own shards, so one may fail where the others succeed;
    Orbax's restore ends in a barrier that a raising process would skip (the others then wait,
    or pair it with the next collective). Returned, the failure lets every process reach that
    barrier, then all agree on the step. (The instance keeps its type, so checkpoints still name
    Orbax's handler in their metadata.)"""
    handler = ocp.StandardCheckpointHandler()
    read = handler.restore

    def restore(directory, *args, **kwargs):
        try:
            return read(directory, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure to read means an unusable step
            return _ReadFailure(error)

    handler.restore = restore
    return handler


def _processes_failing(failed_here: bool) -> list[int]:
    """The indices of the processes for which `failed_here` is True (an all-gather)."""
    return [i for i, failed in enumerate(distributed.gather_ints(failed_here)) if failed]


def _open_manager(directory: Path, options, handlers, attempts: int = 5):
    """An Orbax CheckpointManager of `directory`. Opening it lists the steps and reads each
    one's metadata; a run training meanwhile may delete an old step (checkpoint.keep) between
    the two, which Orbax reports as FileNotFoundError: list again."""
    for attempt in range(attempts):
        try:
            return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
        except FileNotFoundError:
            if attempt == attempts - 1 or not directory.is_dir():
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


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
        self._saving: int | None = None  # the step of a save that may still be running
        self._failed = False
        logging.getLogger("absl").addFilter(_ABSL_FILTER)  # once: filters are a set
        # (Not Orbax's own read_only option: it logs three warnings each time.)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            keep_period=None if read_only else keep_period or None,
            create=not read_only,
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of a save killed mid-way
        )
        handlers = {"state": _reporting_handler(), "config": ocp.JsonCheckpointHandler()}
        self.manager = _open_manager(self.directory, options, handlers)

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
        self._finish()  # a failure of the previous save is reported as that step's
        self._saving = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:  # noqa: BLE001 - Orbax and TensorStore raise many kinds
            raise self._save_failed(error) from None

    def complete_steps(self) -> list[int]:
        """Steps whose directory is complete on disk (renamed from Orbax's temporary name)."""
        try:
            names = [p.name for p in self.directory.iterdir() if p.is_dir()]
        except OSError:
            return []
        return sorted(int(name) for name in names if name.isdigit())

    def _save_failed(self, error: BaseException) -> CheckpointError:
        """The one line for a failed save of step `self._saving`."""
        step, self._saving, self._failed = self._saving, None, True
        complete = [s for s in self.complete_steps() if s != step]
        if _out_of_space(error):
            reason, fix = f"no space left on device ({self.directory})", "free space"
        else:
            reason, fix = _first_line(error), "fix that"
        if complete:
            kept = f"the newest complete checkpoint, step {complete[-1]}, is intact: {fix} and "
            kept += "run the same command to resume from it"
        else:
            kept = f"there is no complete checkpoint yet: {fix} and run the same command"
        return CheckpointError(f"saving checkpoint step {step} failed: {reason}; {kept}")

    def _finish(self) -> None:
        """Wait for the save in flight; CheckpointError if it failed."""
        if self._saving is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._save_failed(error) from None
        self._saving = None

    def _existing(self, step: int | None) -> int:
        """`step`, or the newest when None; CheckpointError when there is no such step."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}")
        return step

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restore `step` (default newest) onto the shardings in `abstract_state`."""
        step = self._existing(step)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception as error:  # noqa: BLE001 - any failure here means an unusable step
            restored = {"state": _ReadFailure(error)}
        if isinstance(restored["state"], _ReadFailure):
            reason = _first_line(restored["state"].error)
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: {reason}")
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
                state, error = self.restore(abstract_state, step), None
            except CheckpointError as failure:
                state, error = None, failure
                log.warning("skipping checkpoint: %s", error)
            # With several processes each reads its own shards: a step is used only when every
            # process read it, so all of them resume from the same step.
            failed = _processes_failing(error is not None)
            if failed:
                if error is None:
                    names = ", ".join(str(i) for i in failed)
                    log.warning(
                        "skipping checkpoint: process %s could not restore step %d from %s",
                        names,
                        step,
                        self.directory,
                    )
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
        self._finish()

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters of `step` (default newest), onto the shardings in
        `abstract_params`: the optimiser state is never read (it may have another structure)."""
        step = self._existing(step)
        reader = _open_manager(  # a partial restore needs the PyTree handler
            self.directory,
            ocp.CheckpointManagerOptions(
                create=False, enable_async_checkpointing=False, cleanup_tmp_directories=False
            ),
            {"state": ocp.PyTreeCheckpointHandler()},
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
        """Wait for the save in flight and close; a failed save is reported (CheckpointError)
        once."""
        try:
            self._finish()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failed save again, already reported
                if not self._failed:
                    raise
