"""Orbax checkpoints of a KLiSH run: the merge trajectory and the resumable state.

A run directory holds two Orbax ``CheckpointManager`` trees:

* ``trajectory/<step>/`` — one entry per merge step, kept forever: ``record``
  (K, W_K, b_K, IoU, ECoS, p, q, sizes, solver statistics) and ``meta`` (JSON).
* ``state/<step>/`` — the algorithm state after that step (weights, current
  labels, sizes, ids), the last two kept. Step 0 is the state after K-means and
  the initial-cluster filter. ``--resume`` restarts from the latest state.

Both are written synchronously and atomically (Orbax finalises a step by a
rename), so a run killed at any moment resumes from its last completed step.

Example::

    traj = load_trajectory("runs/dcgan")         # list of dicts, K0 → 1
    W, b = traj[-26 - 1 + len(traj)]["W"], ...    # or classifier_at(traj, 26)
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

__all__ = ["RunCheckpoints", "load_trajectory", "record_to_host"]


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def record_to_host(tree) -> dict:
    """Convert a NamedTuple/dict of arrays and scalars to host numpy / JSON-able parts.

    Returns:
        ``(arrays: dict[str, np.ndarray], meta: dict)`` where strings/bools/ints go to meta.
    """
    if hasattr(tree, "_asdict"):
        tree = tree._asdict()
    arrays, meta = {}, {}
    for k, v in tree.items():
        if isinstance(v, (str, bool)) or v is None:
            meta[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, np.integer)) for x in v):
            meta[k] = [int(x) for x in v]
        else:
            a = np.asarray(v)
            if a.dtype.kind in "US":
                meta[k] = a.tolist()
            else:
                arrays[k] = a
    return arrays, meta


class RunCheckpoints:
    """Write and read the trajectory/state checkpoints of one run directory."""

    def __init__(self, run_dir: str):
        ocp = _ocp()
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
        ocp = _ocp()
        if record is not None:
            if step in self._traj.all_steps():
                self._traj.delete(step)
            arrays, meta = record_to_host(record)
            self._traj.save(step, args=ocp.args.Composite(
                record=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        arrays, meta = record_to_host(state)
        meta.update(state_meta or {})
        if step in self._state.all_steps():
            self._state.delete(step)
        self._state.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)

    # -- reading ------------------------------------------------------------------------
    def latest_state_step(self) -> Optional[int]:
        self._state.reload()
        return self._state.latest_step()

    def load_state(self, step: Optional[int] = None) -> tuple[dict, dict]:
        ocp = _ocp()
        step = self.latest_state_step() if step is None else step
        r = self._state.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        return dict(r["state"]), dict(r["meta"])

    def record_steps(self) -> list[int]:
        self._traj.reload()
        return list(self._traj.all_steps())

    def load_record(self, step: int) -> dict:
        ocp = _ocp()
        r = self._traj.restore(step, args=ocp.args.Composite(
            record=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        out = dict(r["meta"])
        out.update({k: np.asarray(v) for k, v in r["record"].items()})
        return out

    def close(self):
        self._traj.close()
        self._state.close()


def load_trajectory(run_dir: str) -> list[dict]:
    """All merge records of a run, ordered by step (K0 first, K = 1 last when complete).

    Each record is a dict with at least ``k``, ``W [k, D]``, ``b [k]``, ``iou [k]``,
    ``ecos [k, k]``, ``p``, ``q``, ``sizes [k]``.
    """
    if not os.path.isdir(os.path.join(run_dir, "trajectory")):
        raise FileNotFoundError(
            f"{run_dir!r} has no trajectory/ folder: is it a gansem KLiSH run directory "
            "(python launch/klish.py --out DIR)?"
        )
    ck = RunCheckpoints(run_dir)
    try:
        return [ck.load_record(s) for s in ck.record_steps()]
    finally:
        ck.close()
