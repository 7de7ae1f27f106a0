"""What every launch script does first: find gansem, set up devices, report user errors in one line.

Import it before gansem (``import _common``; the script's folder is on the import
path): it puts the repository root on ``sys.path``. Importing gansem starts no JAX
backend, so :func:`setup_devices` still takes effect when called after the imports,
as long as it runs before the first computation.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gansem import sharding  # noqa: E402

__all__ = ["ROOT", "USER_ERRORS", "fail", "setup_devices", "user_errors", "add_output_args", "add_classifier_args",
           "parse_with_devices"]

#: Exceptions that mean "the request cannot be done as asked": printed as one line, exit status 2.
#: gansem's own errors (GeneratorError, RunError, EvaluationError, ConfigError, CheckpointError) are ValueErrors.
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, sharding.DeviceError)


def fail(message) -> int:
    """Print ``error: message`` on stderr; returns the exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def setup_devices(devices: Optional[int]) -> Optional[int]:
    """Simulate ``devices`` CPU devices if asked, before JAX starts; an exit status if that is impossible."""
    err = sharding.setup_devices_from_cli(devices)
    return fail(err) if err else None


def user_errors(fn: Callable[..., int]) -> Callable[..., int]:
    """Decorate ``main``: a :data:`USER_ERRORS` exception becomes one ``error:`` line and exit status 2."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            return fail(e)

    return wrapped


def add_output_args(p, devices_help: str, out_help: str, quiet: bool = True, out_required: bool = False) -> None:
    """The flags every launch script shares: ``--devices``, ``--out``, ``--no-progress`` (and ``--quiet``)."""
    p.add_argument("--devices", type=int, default=None, help=devices_help)
    p.add_argument("--out", required=out_required, default=None, help=out_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no log lines")


def add_classifier_args(p) -> None:
    """``--run`` and one of ``--k`` / ``--threshold``: the KLiSH classifier of a run at a chosen K."""
    p.add_argument("--run", required=True, help="run directory written by launch/klish.py")
    sel = p.add_mutually_exclusive_group(required=True)
    sel.add_argument("--k", type=int, help="number of clusters K (must be in the run's trajectory)")
    sel.add_argument("--threshold", type=float,
                     help="φ*: use the first K (from K0 down) whose minimum cluster IoU reaches this value")


def parse_with_devices(parser, argv):
    """Parsed flags, with ``--devices`` set up before JAX starts.

    Raises:
        sharding.DeviceError: the devices cannot be provided (a :data:`USER_ERRORS` exception:
            a ``main`` decorated with :func:`user_errors` prints it as one ``error:`` line, status 2).
    """
    args = parser.parse_args(argv)
    err = sharding.setup_devices_from_cli(args.devices)
    if err:
        raise sharding.DeviceError(err)
    return args
