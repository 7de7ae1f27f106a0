"""The USCS painting page: a small Flask app around a mask-to-image synthesiser.

A user paints a semantic layout with the classes a KLiSH run discovered; the page posts
the mask and shows the image the synthesiser draws for it. The app takes any object
with the synthesiser interface (:class:`SynthesizerLike`, the interface of
``gansem.uscs.synth.Synthesizer``), so it is tested with a small fake.

HTTP interface (``R`` the resolution, ``K`` the number of classes; every JSON answer is
an object, every error ``{"error": "<message>"}``; the page's own files are under
``/page/``)::

    GET  /                  the painting page (HTML)
    GET  /api/info          {"run", "num_classes": K, "resolution": R, "palette": [[r, g, b]] * K,
                             "class_names": [str] * K, "num_examples", "max_payload_bytes", "max_seed"}
    POST /generate          Content-Type: application/json, body {"mask": [[id] * R] * R, "seed": s}
                            (ids are integers in 0..K-1, rows top to bottom; "seed" optional, an
                            integer in 0..max_seed, default 0). Answer 200
                            {"image": "data:image/png;base64,...", "width": R, "height": R, "seed": s},
                            or the PNG itself (image/png, header X-Seed) when the request's Accept
                            header prefers image/png over application/json.
    GET  /api/example/<i>   a dataset pair for "start from a sample", 0 <= i < num_examples:
                            {"index": i, "image": "data:image/png;base64,...", "mask": [[id] * R] * R}

Status codes: 400 a body that is not valid JSON, not an object, has unknown fields, a
mask that is not ``R x R`` integer ids in ``0..K-1`` or a bad seed; 404 an unknown path
or example; 405 a wrong method; 413 a body over ``max_payload_bytes``; 415 a body that
is not ``application/json``; 500 the synthesiser failed (the traceback goes to the
server's log, never to the client). Generation is serialised (one request at a time
reaches the synthesiser); everything else is answered in parallel.

Example::

    synth = gansem.uscs.synth.load_synthesizer("runs/uscs")
    serve(synth, port=8000)          # http://127.0.0.1:8000/
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import os
import socket
import threading
from typing import Any, Optional, Protocol, Sequence

import flask
import numpy as np
from PIL import Image
from werkzeug import serving
from werkzeug.exceptions import HTTPException

__all__ = [
    "MAX_SEED",
    "PAGE_DIR",
    "RequestError",
    "SynthesizerLike",
    "create_app",
    "default_max_payload_bytes",
    "encode_png",
    "make_server",
    "parse_generate_request",
    "parse_json_body",
    "serve",
    "validate_mask",
    "validate_seed",
]

#: The largest seed a request may ask for (seeds are 0..MAX_SEED, a non-negative int32).
MAX_SEED = 2**31 - 1

#: The page's files (index.html, paint.js, paint.css), shipped as package data.
PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page")

#: Host names a server bound to a loopback address answers to (a guard against DNS rebinding).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")

_FIELDS = ("mask", "seed")
_log = logging.getLogger(__name__)

# The page loads nothing from elsewhere and has no inline script or style.
_SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                                "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                                "frame-ancestors 'none'; form-action 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class SynthesizerLike(Protocol):
    """What the server needs of a synthesiser (``gansem.uscs.synth.Synthesizer`` has it).

    Attributes:
        num_classes: K, the number of classes a mask may use.
        resolution: R; masks and images are ``R x R``.
        palette: ``[K, 3]`` uint8, the colour of each class.
        class_names: K names.
        run_dir: the run directory it was loaded from (its last component names the run on the page).
        num_examples: dataset pairs available to :meth:`example` (0 if none).
    """

    num_classes: int
    resolution: int
    palette: np.ndarray
    class_names: Sequence[str]
    run_dir: str
    num_examples: int

    def generate(self, masks: np.ndarray, *, seed: int = 0) -> np.ndarray:
        """``masks``: int ``[R, R]`` with ids in ``0..K-1`` -> uint8 ``[R, R, 3]``; deterministic per (mask, seed)."""

    def example(self, i: int) -> tuple:
        """``(image uint8 [R, R, 3], mask int [R, R])`` of dataset pair ``i``."""


class RequestError(ValueError):
    """A request the server refuses; ``status`` is its HTTP status, the message goes to the client."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def default_max_payload_bytes(resolution: int) -> int:
    """The default body limit of ``POST /generate``: 8 bytes per mask pixel plus 64 KiB.

    A mask written by ``JSON.stringify`` takes 2 bytes per pixel for ids below 10 and 4
    for ids up to 999; the limit leaves room for spaces after the commas and for line
    breaks, and refuses anything far larger than a mask before it is parsed.
    """
    return 8 * resolution * resolution + 65536


def encode_png(image: np.ndarray) -> bytes:
    """The PNG file of ``image``: uint8 ``[H, W, 3]`` (or ``[H, W]`` greyscale)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _refuse_constant(name: str):
    raise RequestError(f"the body is not valid JSON: {name} is not a JSON number")


def _short(value: Any, limit: int = 40) -> str:
    """``value`` as a short JSON fragment for an error message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    """What a JSON value is, for an error message: ``a list of 31 items``, ``a string``, ..."""
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    names = {dict: "an object", str: "a string", bool: "a boolean", type(None): "null", float: "a number"}
    return names.get(type(value), "a number")


def parse_json_body(body: bytes) -> Any:
    """The JSON value of a request body; :class:`RequestError` (400) if it is not UTF-8 JSON.

    ``NaN``/``Infinity`` (which Python's parser accepts) are refused like any other
    non-JSON text.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the body is not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise RequestError(f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise RequestError("the body is not usable JSON: nested too deeply") from None


def validate_mask(value: Any, num_classes: int, resolution: int) -> np.ndarray:
    """A request's ``"mask"`` as int32 ``[R, R]``; :class:`RequestError` naming the first problem.

    Args:
        value: the parsed JSON value; must be a list of ``R`` rows, each a list of ``R``
            integers in ``0..K-1`` (booleans and numbers with a fraction part or exponent
            are not integers).
        num_classes: K.
        resolution: R.
    """
    k, r = num_classes, resolution
    if not isinstance(value, list) or len(value) != r:
        raise RequestError(f'"mask" must be a list of {r} rows of {r} class ids; got {_kind(value)}')
    for y, row in enumerate(value):
        if not isinstance(row, list) or len(row) != r:
            raise RequestError(f'"mask" row {y} must be a list of {r} class ids; got {_kind(row)}')
    bad = next(((y, x, v) for y, row in enumerate(value) for x, v in enumerate(row)
                if type(v) is not int or not 0 <= v < k), None)
    if bad is not None:
        y, x, v = bad
        if type(v) is not int:
            raise RequestError(f'"mask" row {y}, column {x}: class ids are integers; got {_short(v)}')
        raise RequestError(f'"mask" row {y}, column {x}: unknown class id {v} (this model has classes 0..{k - 1})')
    return np.asarray(value, dtype=np.int32)


def validate_seed(value: Any) -> int:
    """A request's ``"seed"``: an integer in ``0..MAX_SEED``; :class:`RequestError` otherwise."""
    if type(value) is not int or not 0 <= value <= MAX_SEED:
        raise RequestError(f'"seed" must be an integer in 0..{MAX_SEED}; got {_short(value)}')
    return value


def parse_generate_request(body: bytes, num_classes: int, resolution: int) -> tuple[np.ndarray, int]:
    """``(mask int32 [R, R], seed)`` of a ``POST /generate`` body, or :class:`RequestError` (400).

    The body is ``{"mask": [[id] * R] * R, "seed": s}`` (``"seed"`` optional, default 0;
    no other fields).
    """
    request = parse_json_body(body)
    if not isinstance(request, dict):
        raise RequestError(f'the body must be a JSON object {{"mask": [...], "seed": ...}}; got {_kind(request)}')
    unknown = sorted(set(request) - set(_FIELDS))
    if unknown:
        raise RequestError(f"unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                           'a request has "mask" and optionally "seed"')
    if "mask" not in request:
        raise RequestError('the body has no "mask" (a list of rows of class ids)')
    mask = validate_mask(request["mask"], num_classes, resolution)
    seed = validate_seed(request.get("seed", 0))
    return mask, seed


def _synth_description(synth: SynthesizerLike) -> dict:
    """The run's facts the page needs, checked once: ``ValueError`` if ``synth`` breaks the interface."""
    k, r = int(synth.num_classes), int(synth.resolution)
    if k < 1 or r < 1:
        raise ValueError(f"the synthesiser needs K >= 1 classes and resolution R >= 1; got K={k}, R={r}")
    palette = np.asarray(synth.palette)
    if palette.shape != (k, 3) or palette.min(initial=0) < 0 or palette.max(initial=0) > 255:
        raise ValueError(f"the synthesiser's palette must be [K={k}, 3] colours in 0..255; got shape {palette.shape}")
    names = [str(n) for n in synth.class_names]
    if len(names) != k:
        raise ValueError(f"the synthesiser has {len(names)} class names for K={k} classes")
    examples = int(synth.num_examples)
    run = os.path.basename(os.path.normpath(str(synth.run_dir))) if synth.run_dir else ""
    return {"run": run, "num_classes": k, "resolution": r, "palette": palette.astype(int).tolist(),
            "class_names": names, "num_examples": max(examples, 0)}


def _checked_image(image: Any, resolution: int) -> np.ndarray:
    image = np.asarray(image)
    if image.shape != (resolution, resolution, 3) or image.dtype != np.uint8:
        raise RuntimeError(f"the synthesiser returned {image.dtype} {image.shape}, "
                           f"not uint8 ({resolution}, {resolution}, 3)")
    return image


def _error(message: str, status: int) -> flask.Response:
    response = flask.jsonify(error=message)
    response.status_code = status
    return response


def create_app(synth: SynthesizerLike, *, max_payload_bytes: Optional[int] = None,
               trusted_hosts: Optional[Sequence[str]] = None) -> flask.Flask:
    """The painting page's Flask app for ``synth`` (the interface in the module docstring).

    Args:
        synth: any object with the :class:`SynthesizerLike` attributes and methods.
        max_payload_bytes: the largest request body (413 above it); default
            :func:`default_max_payload_bytes` of the resolution.
        trusted_hosts: if given, requests whose ``Host`` is not one of these names are
            refused (400); :func:`make_server` passes the loopback names when it binds a
            loopback address, so a web page elsewhere cannot reach the server by DNS rebinding.

    Returns:
        The app; ``app.test_client()`` for tests, :func:`make_server` / :func:`serve` to serve it.

    Raises:
        ValueError: ``synth`` has an impossible K, R, palette or class names, or the limit is not positive.
    """
    info = _synth_description(synth)
    k, r = info["num_classes"], info["resolution"]
    limit = default_max_payload_bytes(r) if max_payload_bytes is None else int(max_payload_bytes)
    if limit < 1:
        raise ValueError(f"max_payload_bytes must be positive; got {limit}")
    info.update(max_payload_bytes=limit, max_seed=MAX_SEED)
    generate_lock = threading.Lock()

    app = flask.Flask(__name__, static_folder=PAGE_DIR, static_url_path="/page")
    app.config.update(MAX_CONTENT_LENGTH=limit, TRUSTED_HOSTS=list(trusted_hosts) if trusted_hosts else None)
    app.json.sort_keys = False

    @app.get("/")
    def index():
        return flask.send_from_directory(PAGE_DIR, "index.html")

    @app.get("/api/info")
    def api_info():
        return flask.jsonify(info)

    @app.post("/generate")
    def generate():
        if not flask.request.is_json:
            raise RequestError(f"send the mask as JSON (Content-Type: application/json); got "
                               f"{flask.request.mimetype or 'no Content-Type'}", status=415)
        mask, seed = parse_generate_request(flask.request.get_data(cache=False), k, r)
        with generate_lock:
            try:
                image = synth.generate(mask, seed=seed)
            except ValueError as e:  # the interface's answer to a mask it cannot take: the client's mistake
                raise RequestError(f"the synthesiser refused the mask: {e}") from e
        png = encode_png(_checked_image(image, r))
        if flask.request.accept_mimetypes.best_match(["application/json", "image/png"]) == "image/png":
            return flask.Response(png, mimetype="image/png", headers={"X-Seed": str(seed)})
        return flask.jsonify(image=_data_url(png), width=r, height=r, seed=seed)

    @app.get("/api/example/<int:index>")
    def example(index: int):
        if not index < info["num_examples"]:
            available = (f"0..{info['num_examples'] - 1}" if info["num_examples"]
                         else "none: the run's dataset is not available")
            raise RequestError(f"no example {index}; examples are {available}", status=404)
        with generate_lock:
            image, mask = synth.example(index)
        mask = np.asarray(mask)
        if mask.shape != (r, r) or not np.issubdtype(mask.dtype, np.integer) or mask.min() < 0 or mask.max() >= k:
            raise RuntimeError(f"example {index} has a mask of {mask.dtype} {mask.shape}, not class ids "
                               f"0..{k - 1} ({r}, {r})")
        return flask.jsonify(index=index, image=_data_url(encode_png(_checked_image(image, r))),
                             mask=mask.astype(int).tolist())

    @app.errorhandler(RequestError)
    def request_error(e: RequestError):
        return _error(str(e), e.status)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        if e.code == 413:
            return _error(f"the request body is larger than this server's limit of {limit} bytes "
                          f"(a {r} x {r} mask needs far less)", 413)
        return _error(f"{e.name}: {e.description}" if e.description else e.name, e.code or 500)

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        _log.exception("USCS page: %s %s failed", flask.request.method, flask.request.path)
        return _error("internal error: the server could not answer this request (details in its log)", 500)

    @app.after_request
    def security_headers(response: flask.Response) -> flask.Response:
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _QuietHandler(serving.WSGIRequestHandler):
    """Logs errors but not every request."""

    def log_request(self, code="-", size="-") -> None:
        pass


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` and listening; ``OSError`` if that is impossible.

    Bound here rather than by werkzeug, whose server prints the error and exits the process.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def make_server(synth: SynthesizerLike, host: str = "127.0.0.1", port: int = 8000, *,
                max_payload_bytes: Optional[int] = None, log_requests: bool = True) -> serving.BaseWSGIServer:
    """A threaded HTTP server for the page of ``synth``, bound but not yet serving.

    Args:
        synth: the synthesiser (see :func:`create_app`).
        host: the address to bind; the loopback address by default (the page has no
            authentication: bind another address only on a trusted network).
        port: the TCP port; 0 picks a free one (``server.port`` tells which).
        max_payload_bytes: see :func:`create_app`.
        log_requests: log one line per request (errors are logged either way).

    Returns:
        A werkzeug server: ``serve_forever()`` in a thread, ``shutdown()`` and
        ``server_close()`` to stop it.

    Raises:
        OSError: the address cannot be bound (e.g. the port is in use).
    """
    trusted = list(LOOPBACK_NAMES) if _is_loopback(host) else None
    app = create_app(synth, max_payload_bytes=max_payload_bytes, trusted_hosts=trusted)
    handler = serving.WSGIRequestHandler if log_requests else _QuietHandler
    with _listening_socket(host, port) as sock:  # the server listens on a duplicate of it
        return serving.make_server(host, port, app, threaded=True, request_handler=handler, fd=sock.fileno())


def serve(synth: SynthesizerLike, host: str = "127.0.0.1", port: int = 8000, *,
          max_payload_bytes: Optional[int] = None, log_requests: bool = True, echo=print) -> None:
    """Serve the painting page of ``synth`` at ``http://host:port/`` until Ctrl+C.

    Args:
        synth: the synthesiser (see :func:`create_app`).
        host: the address to bind (loopback by default; see :func:`make_server`).
        port: the TCP port (0: a free one, printed).
        max_payload_bytes: see :func:`create_app`.
        log_requests: log one line per request.
        echo: where the address and warnings are printed.

    Raises:
        OSError: the address cannot be bound.
    """
    server = make_server(synth, host, port, max_payload_bytes=max_payload_bytes, log_requests=log_requests)
    shown = f"[{host}]" if ":" in host else host
    echo(f"USCS painting page for {synth.run_dir} (K={synth.num_classes}, {synth.resolution}x{synth.resolution}): "
         f"http://{shown}:{server.port}/  (Ctrl+C stops)")
    if not _is_loopback(host):
        echo(f"warning: bound to {host}, reachable from other machines; the page has no authentication")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
