"""Run directories of resumable optax training runs (UFGS segmenters, USCS generators).

What every such run shares, whatever it trains::

    model.json        what the run is: model options, data, training config and the settings a resume must match
    checkpoints/<s>/  Orbax steps (the latest 2), items named by the trainer
    metrics.jsonl     one JSON line per logged step (and per evaluation)

and the rules around them: a new run goes into a new or empty directory (checked before
anything is written); an existing one is continued only when asked (``resume``) and only
with the settings it was created with; a resumed run restores the latest checkpoint that
loads (an older kept one, with a warning, when the latest is damaged) and drops the metric
records of the steps after it, which it recomputes.

Each trainer passes its own error class (a ``ValueError``) and words, so the messages say
which kind of run is meant.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from . import sharding, viz
from .run import jsonable

__all__ = [
    "MODEL_FILE",
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "write_json",
    "read_json",
    "read_metrics",
    "MetricsLog",
    "StepTimer",
    "RunDescription",
    "checkpoint_manager",
    "stored_run",
    "create_run_dir",
    "check_same_settings",
    "restore_latest",
    "restore_step",
    "save_checkpoint",
    "close_training",
    "replicated_state",
]

MODEL_FILE = "model.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


def write_json(path: str, obj) -> None:
    """Write ``obj`` (numpy values made plain, :func:`gansem.run.jsonable`) as indented JSON, atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(jsonable(obj), f, indent=2)
    os.replace(tmp, path)


def read_json(path: str, error: Callable[[str], Exception], missing: str) -> Any:
    """The JSON value in ``path``.

    Raises:
        ``error(missing)`` when there is no such file, ``error(...)`` when it is not JSON.
    """
    if not os.path.isfile(path):
        raise error(missing)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{path} cannot be read as JSON ({e}); the file is damaged") from e


def read_metrics(run_dir: str, max_step: Optional[int] = None) -> list[dict]:
    """The records of ``metrics.jsonl`` (``[]`` if there is none), only those with ``step <= max_step`` if given.

    A last line cut short by a killed process is skipped.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if max_step is None or rec.get("step", 0) <= max_step:
                out.append(rec)
    return out


class MetricsLog:
    """The metric records of a run: in memory (``history``) and appended to ``metrics.jsonl``.

    Opening it for a run resumed at step ``start`` rewrites the file with the records up to
    ``start`` only: those after it belong to steps that are computed again. A training loop
    hands each step's device metrics to :meth:`defer` and records them with :meth:`flush` every
    few steps, so the host does not wait for every step.

    Args:
        run_dir: the run directory, or ``None`` (records kept in memory only).
        start: the step the run continues from (0 for a new run).
    """

    def __init__(self, run_dir: Optional[str], start: int = 0):
        self.path = None if run_dir is None else os.path.join(run_dir, METRICS_FILE)
        self.history: list[dict] = [] if run_dir is None else read_metrics(run_dir, start)
        if self.path is not None:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        self._pending: list = []

    def append(self, rec: dict) -> None:
        """Add one record (a JSON object with a ``step``)."""
        self.history.append(rec)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def defer(self, step: int, metrics: Mapping) -> None:
        """Keep a step's metrics (device scalars) to record at the next :meth:`flush`, without waiting for them."""
        self._pending.append((int(step), metrics))

    @property
    def num_deferred(self) -> int:
        """Steps deferred since the last flush."""
        return len(self._pending)

    def flush(self) -> Optional[dict]:
        """Fetch the deferred metrics from the devices (one transfer) and record them as ``{"step", name: float}``.

        Returns:
            The last record (``None`` when nothing was deferred).
        """
        if not self._pending:
            return None
        values = jax.device_get([m for _, m in self._pending])
        for (step, _), v in zip(self._pending, values):
            self.append({"step": step, **{name: float(x) for name, x in v.items()}})
        self._pending = []
        return self.history[-1]


class StepTimer:
    """Steps per second of a training call, without its first (compiling) step and the pauses marked as excluded.

    ::

        timer = StepTimer()
        for t in ...:
            state, metrics = step(state, batch)
            timer.step_done(metrics)            # the first call waits for the step, then starts the clock
            with timer.excluded():              # evaluations, sample grids, checkpoints
                ...
        timer.summary(steps_done, batch_size)
    """

    def __init__(self):
        self.start = time.perf_counter()
        self._timed_from: Optional[float] = None
        self._excluded = 0.0

    def step_done(self, outputs) -> None:
        if self._timed_from is None:
            jax.block_until_ready(outputs)
            self._timed_from = time.perf_counter()

    @contextlib.contextmanager
    def excluded(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._timed_from is not None:
                self._excluded += time.perf_counter() - t0

    def summary(self, steps_done: int, batch_size: int, excluded: str = "evaluations and checkpoints") -> dict:
        """``{"seconds", "steps_per_s", "images_per_s", "timing"}`` of the call (rates ``None`` below 2 steps)."""
        now = time.perf_counter()
        timed = (now - self._timed_from - self._excluded) if self._timed_from is not None else 0.0
        rate = (steps_done - 1) / timed if steps_done > 1 and timed > 0 else None
        return {"seconds": now - self.start, "steps_per_s": rate,
                "images_per_s": None if rate is None else rate * batch_size,
                "timing": f"steps/s over the steps of this call after the first (compiling) one, {excluded} excluded"}


class RunDescription:
    """What a trained model's ``model.json`` (``self.meta``) says about its classes and images."""

    meta: dict

    @property
    def num_classes(self) -> int:
        """K: class ids are in ``[0, K)``."""
        return int(self.meta["num_classes"])

    @property
    def resolution(self) -> int:
        """The training image size R (images are R × R)."""
        return int(self.meta["resolution"])

    @property
    def palette(self) -> np.ndarray:
        """``[K, 3]`` uint8: the training data's palette, or :func:`gansem.viz.palette` of K."""
        pal = self.meta.get("palette")
        return viz.palette(self.num_classes) if pal is None else np.asarray(pal, np.uint8).reshape(-1, 3)


def checkpoint_manager(run_dir: str, *, create: bool = False, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """The Orbax manager of ``run_dir/checkpoints`` (synchronous saves, the latest ``max_to_keep`` kept).

    Saves are atomic (Orbax finalises a step by renaming its folder), so a process
    killed during a save leaves the previous steps intact.
    """
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(run_dir), CHECKPOINT_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                             enable_async_checkpointing=False),
    )


def stored_run(out_dir: str, resume: bool, *, read_meta: Callable[[str], dict], error: type, what: str,
               meta_file: str = MODEL_FILE) -> Optional[dict]:
    """The description (``meta_file``, default ``model.json``) of the run in ``out_dir`` to resume;
    ``None`` if ``out_dir`` is new or empty.

    Args:
        read_meta: reads and checks the ``meta_file`` of a run directory.
        error: the exception class to raise; ``what``: the kind of run, for messages (``"segmenter"``).
        meta_file: the file whose presence marks a run directory of this kind.

    Raises:
        error: ``out_dir`` holds such a run and ``resume`` is false, or it holds anything else.
    """
    if os.path.isfile(os.path.join(out_dir, meta_file)):
        if not resume:
            raise error(f"{out_dir!r} already holds a {what} training run; pass resume=True (--resume) to continue it, "
                        "or choose a new directory")
        return read_meta(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise error(f"{out_dir!r} exists and is not a {what} run directory (no {meta_file}); "
                    "choose a new or empty directory")
    return None


def create_run_dir(out_dir: str, meta: dict, *, error: type) -> None:
    """Create ``out_dir`` with its ``model.json`` (call it after every check: a failed run leaves no folder)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, MODEL_FILE), meta)
    except OSError as e:
        raise error(f"cannot create the run directory {out_dir!r} ({e.strerror or e}); "
                    "choose a writable location") from e


def check_same_settings(out_dir: str, old: Mapping, new: Mapping, keys: Sequence[str], *, error: type) -> None:
    """Refuse to resume ``out_dir`` when a setting in ``keys`` differs between its ``old`` and the ``new`` call.

    Raises:
        error: naming every differing setting with its stored and its requested value.
    """
    diff = [k for k in keys if k in old and old[k] != new[k]]
    if diff:
        was = ", ".join(f"{k}={json.dumps(old[k])}" for k in diff)
        now = ", ".join(f"{k}={json.dumps(new[k])}" for k in diff)
        raise error(f"cannot resume {out_dir!r}: it was created with {was}, this call has {now}; "
                    "resume with the run's settings (and data), or train into a new directory")


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).split(' [tensorstore_spec=')[0][:300]}"


def _restore(mngr, step: int, targets: Mapping[str, Any], with_meta: bool = False) -> dict:
    args = {name: ocp.args.StandardRestore(t) for name, t in targets.items()}
    if with_meta:
        args["meta"] = ocp.args.JsonRestore()
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    return {name: out[name] for name in args}


def restore_latest(mngr, targets: Mapping[str, Any], out_dir: str, *, error: type,
                   with_meta: bool = False) -> Optional[tuple[int, dict]]:
    """The items ``targets`` of the latest checkpoint that loads, restored into their abstract targets.

    Args:
        mngr: the run's :func:`checkpoint_manager`.
        targets: item name -> pytree of ``jax.ShapeDtypeStruct`` (with shardings: restored in place).
        with_meta: also return the JSON ``meta`` item of :func:`save_checkpoint` (under ``"meta"``).

    Returns:
        ``(step, {name: pytree})``, or ``None`` when there is no checkpoint. A damaged step is
        reported on stderr and the next older one tried.

    Raises:
        error: checkpoints exist but none of them loads.
    """
    errors = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return int(step), _restore(mngr, step, targets, with_meta)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # Orbax/tensorstore: ValueError, FileNotFoundError, JSONDecodeError, ...
            errors.append(f"{CHECKPOINT_DIR}/{step}: {_short(e)}")
            print(f"[gansem] warning: {errors[-1]}; trying an older checkpoint", file=sys.stderr, flush=True)
    if errors:
        raise error(f"cannot resume {out_dir!r}: no kept checkpoint loads ({'; '.join(errors)})")
    return None


def restore_step(run_dir: str, targets: Mapping[str, Any], step: Optional[int], *, error: type,
                 training_hint: str = "resume the training or wait for it") -> tuple[int, dict]:
    """The items ``targets`` of checkpoint ``step`` (``None``: the latest) of ``run_dir``.

    Returns:
        ``(step, {name: pytree})``.

    Raises:
        error: no checkpoint yet, no such step (the kept steps are named), or a damaged step.
    """
    mngr = checkpoint_manager(run_dir)
    try:
        steps = sorted(mngr.all_steps())
        if not steps:
            raise error(f"{run_dir!r} has no checkpoint yet (training has not reached its first checkpoint); "
                        f"{training_hint}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise error(f"{run_dir!r} has no checkpoint at step {step}; kept steps: {', '.join(map(str, steps))}")
        try:
            return int(step), _restore(mngr, step, targets)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # Orbax/tensorstore raise ValueError, FileNotFoundError, ...
            raise error(f"{CHECKPOINT_DIR}/{step} of {run_dir!r} cannot be read ({_short(e)})") from e
    finally:
        mngr.close()


def save_checkpoint(mngr, step: int, items: Mapping[str, Any], meta: Mapping) -> None:
    """Save the pytrees ``items`` (item name -> pytree) and the JSON ``meta`` as checkpoint ``step``."""
    mngr.save(int(step), args=ocp.args.Composite(
        **{name: ocp.args.StandardSave(item) for name, item in items.items()}, meta=ocp.args.JsonSave(dict(meta))),
        force=True)


def close_training(bar, batches, mngr) -> None:
    """End a training loop: close its progress bar and batch iterator, finish and close its checkpoint manager."""
    bar.close()
    if hasattr(batches, "close"):
        batches.close()
    if mngr is not None:
        mngr.wait_until_finished()
        mngr.close()


def replicated_state(init_state: Callable, mesh) -> tuple[Any, Any]:
    """Shapes first, then shardings: the state that ``init_state(seed)`` returns, every leaf replicated on ``mesh``.

    Args:
        init_state: ``seed uint32 [] -> pytree`` (traced with :func:`jax.eval_shape`; nothing is computed).

    Returns:
        ``(abstract, shardings)``: the state as ``jax.ShapeDtypeStruct`` leaves carrying their sharding
        (a target to restore checkpoints into) and the matching pytree of ``NamedSharding`` objects
        (for ``jax.jit``'s ``in_shardings`` / ``out_shardings``).
    """
    repl = sharding.replicated(mesh)
    shapes = jax.eval_shape(init_state, jax.ShapeDtypeStruct((), jnp.uint32))
    return (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), shapes),
            jax.tree.map(lambda _: repl, shapes))
