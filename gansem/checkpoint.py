"""Orbax checkpoints of a KLiSH run: the merge trajectory and the resumable state.

A run directory holds two Orbax ``CheckpointManager`` trees:

* ``trajectory/<step>/`` — one entry per merge step, kept forever: ``record``
  (K, W_K, b_K, IoU, ECoS, p, q, sizes, solver statistics) and ``meta`` (JSON).
* ``state/<step>/`` — the algorithm state after that step (weights, current
  labels, sizes, ids), the last two kept. Step 0 is the state after K-means and
  the initial-cluster filter. ``--resume`` restarts from the latest state.

Both are written synchronously and atomically (Orbax finalises a step by a
rename), so a run killed at any moment resumes from its last completed step.

A step damaged afterwards (a truncated or emptied file) fails to load with
:class:`CorruptCheckpointError`, which names the step folder and, where it can
tell, the file. :meth:`RunCheckpoints.resume_point` picks the latest kept state
that loads *and* whose trajectory records ``1..step`` all load, falling back to
the older kept state (the run is deterministic: the steps after it are
recomputed bit for bit), and says so; it raises before any work is done when no
kept state can be used.

Several processes (``jax.distributed``): every process calls :meth:`RunCheckpoints.save_step`
with the same values. Row-sharded state arrays (the current labels) are written shard by
shard by the processes that hold them, never gathered on one host; host values (the
records, K-shaped arrays) are written once. A state is read back as host arrays on every
process (the labels are 4 bytes per pixel) and placed on the current mesh, so a run can
resume on another device or process count.

Example::

    traj = load_trajectory("runs/dcgan")        # list of MergeRecord, K0 → 1
    W, b = traj[0].W, traj[0].b                 # the K0 classifiers (raw feature space)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from .cluster.klish import MergeRecord

__all__ = ["RunCheckpoints", "CorruptCheckpointError", "load_trajectory", "split_record"]


class CorruptCheckpointError(ValueError):
    """A saved step (``trajectory/<step>`` or ``state/<step>``) cannot be read back.

    Attributes:
        path: the step folder, relative to the run directory (e.g. ``"state/12"``).
        reason: what failed, naming the damaged file where it can be told.
    """

    def __init__(self, path: str, reason: str, message: Optional[str] = None):
        self.path, self.reason = path, reason
        super().__init__(message or f"{path} is corrupt ({reason})")


_JSON_FILES = ("metadata", "_METADATA", "_CHECKPOINT_METADATA", "_sharding")


def _describe_failure(step_dir: str, rel: str, exc: BaseException) -> str:
    """A short reason for a failed restore of ``step_dir``, naming the damaged file where possible."""
    if isinstance(exc, json.JSONDecodeError) or "Expecting value" in str(exc):
        for root, _, files in sorted(os.walk(step_dir)):
            for name in sorted(files):
                if name not in _JSON_FILES:
                    continue
                path = os.path.join(root, name)
                try:
                    with open(path) as f:
                        json.load(f)
                except (OSError, ValueError) as e:
                    return f"{os.path.join(rel, os.path.relpath(path, step_dir))} is not valid JSON: {e}"
    msg = str(exc) or type(exc).__name__
    msg = msg.split(" [tensorstore_spec=")[0]  # tensorstore appends its whole (long) spec
    if len(msg) > 400:
        msg = msg[:400] + "..."
    return f"{type(exc).__name__}: {msg}"


_SHAPES = "_array_shapes"  # meta entry: {name: [shape, dtype]} of the saved arrays


def split_record(tree) -> tuple[dict, dict]:
    """Split a NamedTuple/dict into arrays (saved with Orbax) and JSON-able values.

    Arrays that span several processes stay device arrays (Orbax writes each process's
    shards); everything else becomes numpy. Strings, bools, ``None`` and tuples of ints go to the JSON part, which
    also records every array's shape and dtype (to read the arrays back as host arrays).

    Returns:
        ``(arrays: dict[str, array], meta: dict)``.
    """
    if hasattr(tree, "_asdict"):
        tree = tree._asdict()
    arrays, meta = {}, {}
    for k, v in tree.items():
        if isinstance(v, (str, bool)) or v is None:
            meta[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, np.integer)) for x in v):
            meta[k] = [int(x) for x in v]
        elif isinstance(v, jax.Array) and v.ndim > 0 and not v.is_fully_addressable:
            arrays[k] = v  # spans processes: each writes its own shards
        else:
            a = np.asarray(v)
            if a.dtype.kind in "US":
                meta[k] = a.tolist()
            else:
                arrays[k] = a
    meta[_SHAPES] = {k: [list(a.shape), np.dtype(a.dtype).str] for k, a in arrays.items()}
    return arrays, meta


class RunCheckpoints:
    """Write and read the trajectory/state checkpoints of one run directory."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        opts = dict(enable_async_checkpointing=False, create=True)
        self._traj = ocp.CheckpointManager(
            os.path.join(os.path.abspath(run_dir), "trajectory"),
            options=ocp.CheckpointManagerOptions(max_to_keep=None, **opts),
        )
        self._state = ocp.CheckpointManager(
            os.path.join(os.path.abspath(run_dir), "state"),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, **opts),
        )

    # -- writing ------------------------------------------------------------------------
    def save_step(self, step: int, record: Optional[Any], state: Any, state_meta: Optional[dict] = None):
        """Save the merge record of ``step`` (if any) and the state after it.

        The record is written first: a state at step s implies records 1..s exist.
        A run killed between the two writes leaves a record without its state; the
        resumed run recomputes that step (deterministically, the same record) and
        replaces it here.
        """
        if record is not None:
            if step in self._traj.all_steps():
                self._traj.delete(step)
            arrays, meta = split_record(record)
            self._traj.save(step, args=ocp.args.Composite(
                record=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        arrays, meta = split_record(state)
        meta.update(state_meta or {})
        if step in self._state.all_steps():
            self._state.delete(step)
        self._state.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)

    # -- reading ------------------------------------------------------------------------
    def latest_state_step(self) -> Optional[int]:
        self._state.reload()
        return self._state.latest_step()

    def state_steps(self) -> list[int]:
        """Steps of the kept states, ascending."""
        self._state.reload()
        return sorted(self._state.all_steps())

    def _restore_arrays(self, manager, kind: str, step: int, name: str) -> tuple[dict, dict]:
        """Arrays (as host numpy, whatever sharding they were saved with) and JSON values of one step."""
        meta = dict(self._restore(manager, kind, step, meta=ocp.args.JsonRestore())["meta"])
        shapes = meta.pop(_SHAPES, None)
        target = None if shapes is None else {k: np.zeros(s, np.dtype(t)) for k, (s, t) in shapes.items()}
        r = self._restore(manager, kind, step, **{name: ocp.args.StandardRestore(target)})
        return {k: np.asarray(v) for k, v in r[name].items()}, meta

    def _restore(self, manager, kind: str, step: int, **items):
        rel = f"{kind}/{step}"
        try:
            return manager.restore(step, args=ocp.args.Composite(**items))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # Orbax/tensorstore raise ValueError, JSONDecodeError, FileNotFoundError...
            step_dir = os.path.join(os.path.abspath(self.run_dir), kind, str(step))
            raise CorruptCheckpointError(rel, _describe_failure(step_dir, rel, e)) from e

    def load_state(self, step: Optional[int] = None) -> tuple[dict, dict]:
        """The state after ``step`` (default: the latest); :class:`CorruptCheckpointError` if it does not load."""
        step = self.latest_state_step() if step is None else step
        return self._restore_arrays(self._state, "state", step, "state")

    def record_steps(self) -> list[int]:
        self._traj.reload()
        return list(self._traj.all_steps())

    def load_record(self, step: int) -> dict:
        """The merge record of ``step``; :class:`CorruptCheckpointError` if it does not load."""
        r = self._restore(self._traj, "trajectory", step, record=ocp.args.StandardRestore(),
                          meta=ocp.args.JsonRestore())  # records are host arrays: no target needed
        meta = dict(r["meta"])
        meta.pop(_SHAPES, None)
        return {**meta, **{k: np.asarray(v) for k, v in r["record"].items()}}

    def resume_point(self, log: Optional[Callable[[str], None]] = None) -> Optional[tuple[int, dict, dict]]:
        """The state to resume from: ``(step, arrays, meta)``, or ``None`` when no state was saved yet.

        Tries the kept states from the latest down. A state is used when it loads and
        the trajectory records ``1..step`` all load (they are the run's results; the
        records after ``step`` are rewritten as the run goes on). When the latest state
        or one of its records is damaged, the older kept state is used and ``log``
        says so (``"state/<s> is corrupt (...); resuming from step <prev>"``); the run
        is deterministic, so the recomputed steps are the same, bit for bit.

        Raises:
            CorruptCheckpointError: states exist but none can be used (every kept state
                is damaged, or a damaged record precedes them); the message says what to do.
        """
        steps = sorted(self.state_steps(), reverse=True)
        if not steps:
            return None
        records = set(self.record_steps())
        first_bad = None  # (record step, reason) of the first record 1..max(steps) that does not load
        for r in range(1, steps[0] + 1):
            if r not in records:
                first_bad = (r, CorruptCheckpointError(f"trajectory/{r}", "missing"))
                break
            try:
                self.load_record(r)
            except CorruptCheckpointError as e:
                first_bad = (r, e)
                break
        problems = []
        for s in steps:
            if first_bad is not None and s >= first_bad[0]:
                if str(first_bad[1]) not in problems:
                    problems.append(str(first_bad[1]))
                continue
            try:
                arrays, meta = self.load_state(s)
            except CorruptCheckpointError as e:
                problems.append(str(e))
                continue
            if problems and log is not None:
                log(f"{'; '.join(problems)}; resuming from step {s}")
            return s, arrays, meta
        run = os.path.abspath(self.run_dir)
        raise CorruptCheckpointError(
            "state" if first_bad is None else first_bad[1].path, "; ".join(problems),
            f"{'; '.join(problems)}; no kept state (steps {sorted(steps)}) precedes the damage, so the run cannot "
            f"continue. Start it again: delete {os.path.join(run, 'state')} and {os.path.join(run, 'trajectory')} "
            "and rerun with --resume (the run is deterministic: the same trajectory is recomputed), or choose "
            "a new --out")

    def close(self):
        self._traj.close()
        self._state.close()


def load_trajectory(run_dir: str) -> list[MergeRecord]:
    """All merge records of a run, ordered by step (K0 first, K = 1 last when complete).

    The records are :class:`gansem.cluster.klish.MergeRecord`, the type the merge loop
    returns; their classifiers ``W [k, D]``, ``b [k]`` act on raw generator features.
    """
    if not os.path.isdir(os.path.join(run_dir, "trajectory")):
        raise FileNotFoundError(
            f"{run_dir!r} has no trajectory/ folder: is it a gansem KLiSH run directory "
            "(python launch/klish.py --out DIR)?"
        )
    ck = RunCheckpoints(run_dir)
    try:
        return [MergeRecord.from_saved(ck.load_record(s)) for s in ck.record_steps()]
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(e.path, e.reason, f"{os.path.join(run_dir, e.path)} is corrupt ({e.reason}); "
                                     "resume the run (launch/klish.py ... --resume) to recompute it") from e
    finally:
        ck.close()
