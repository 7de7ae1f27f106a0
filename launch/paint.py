#!/usr/bin/env python
"""Serve the USCS painting page for a mask-to-image model trained by launch/train_uscs.py.

    python launch/paint.py --model runs/uscs                  # then open http://127.0.0.1:8000/
    python launch/paint.py --model runs/uscs --port 8080 --step 2000

The page paints a mask with the run's classes (the KLiSH clusters it was trained on) and
shows the image the model generates for it. Its HTTP interface (GET /, GET /api/info,
POST /generate, GET /api/example/<i>) is documented in gansem/uscs/server.py and the README.
The server binds 127.0.0.1 unless told otherwise: the page has no authentication, so give
--host 0.0.0.0 only on a network you trust. Ctrl+C stops it.
"""

import argparse
import os
import sys

import _common  # first: puts gansem on the import path

from gansem.uscs import server
from gansem.uscs.synth import load_synthesizer


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535 (0: any free port); got {port}")
    return port


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of bytes; got {value}")
    return value


def build_parser():
    p = argparse.ArgumentParser(
        prog="launch/paint.py",
        description="Serve a local page to paint a mask with a USCS run's classes and generate its image.",
    )
    p.add_argument("--model", required=True, help="run directory written by launch/train_uscs.py")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to use (default: the latest)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: reachable from this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free port, printed)")
    p.add_argument("--max-payload-bytes", type=_positive, default=None,
                   help="largest POST /generate body; default 8 bytes per mask pixel + 64 KiB")
    p.add_argument("--quiet", action="store_true", help="no log line per request (errors are still logged)")
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.model):
        return _common.fail(f"--model {args.model!r} is not a run directory (train one with launch/train_uscs.py)")
    synth = load_synthesizer(args.model, step=args.step)
    try:
        server.serve(synth, args.host, args.port, max_payload_bytes=args.max_payload_bytes,
                     log_requests=not args.quiet)
    except OSError as e:
        return _common.fail(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); "
                            "choose another --port or --host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
