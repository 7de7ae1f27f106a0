"""The USCS painting server (gansem.uscs.server): its HTTP interface and its request validation.

Flask's test client against the fake synthesiser of tests/uscs_fake.py (K = 4, R = 32): every
bad request gets a 4xx with a JSON message and no traceback; a good one gets the fake's image.
"""

import base64
import importlib.util
import io
import json
import os
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from gansem.uscs import server
from uscs_fake import FakeSynthesizer, check_synthesizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, R = 4, 32

# launch/paint.py imports gansem.uscs.synth (the SPADE part of issue 22); until that is in the tree its
# two tests are skipped, with this reason in the report.
needs_synth = pytest.mark.skipif(importlib.util.find_spec("gansem.uscs.synth") is None,
                                 reason="launch/paint.py needs gansem.uscs.synth, not in this tree yet")


@pytest.fixture(scope="module")
def synth():
    return FakeSynthesizer(num_classes=K, resolution=R, num_examples=3, class_names=["sky", "sand", "rock", "grass"])


@pytest.fixture(scope="module")
def client(synth):
    return server.create_app(synth).test_client()


def _mask(value=0):
    return [[value] * R for _ in range(R)]


def _post(client, body, content_type="application/json", **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/generate", data=data, content_type=content_type, **kw)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _data_url_png(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return _png(base64.b64decode(url[len(prefix):]))


def _assert_error(response, status, *needles):
    """A JSON ``{"error": ...}`` answer with ``status``, naming every needle, and no traceback."""
    assert response.status_code == status, (response.status_code, response.data[:300])
    assert response.mimetype == "application/json"
    message = response.get_json()["error"]
    assert "Traceback" not in message and "File \"" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_fake_follows_the_contract(synth):
    check_synthesizer(synth)


def test_page_and_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert '<canvas id="mask"' in html and "/page/paint.js" in html and "/page/paint.css" in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere
    for asset, mimetype in (("paint.js", "text/javascript"), ("paint.css", "text/css")):
        r = client.get(f"/page/{asset}")
        assert r.status_code == 200 and r.mimetype == mimetype, asset
        assert "https://" not in r.get_data(as_text=True)
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"


def test_info(client, synth):
    info = client.get("/api/info").get_json()
    assert info == {"run": "fake-uscs", "num_classes": K, "resolution": R, "palette": synth.palette.tolist(),
                    "class_names": ["sky", "sand", "rock", "grass"], "num_examples": 3,
                    "max_payload_bytes": server.default_max_payload_bytes(R), "max_seed": server.MAX_SEED}


def test_generate_returns_the_synthesisers_image(client, synth):
    mask = np.zeros((R, R), np.int32)
    mask[4:20, 8:30] = 2
    mask[20:, :] = 3
    r = _post(client, {"mask": mask.tolist(), "seed": 7})
    assert r.status_code == 200, r.data
    body = r.get_json()
    assert (body["width"], body["height"], body["seed"]) == (R, R, 7)
    np.testing.assert_array_equal(_data_url_png(body["image"]), synth.generate(mask, seed=7))
    # the seed is optional (0) and changes the image
    default = _data_url_png(_post(client, {"mask": mask.tolist()}).get_json()["image"])
    np.testing.assert_array_equal(default, synth.generate(mask, seed=0))
    assert not np.array_equal(default, synth.generate(mask, seed=7))


def test_generate_answers_png_when_asked(client, synth):
    mask = _mask(1)
    r = _post(client, {"mask": mask, "seed": 3}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.mimetype == "image/png" and r.headers["X-Seed"] == "3"
    np.testing.assert_array_equal(_png(r.data), synth.generate(np.asarray(mask), seed=3))
    assert _post(client, {"mask": mask}, headers={"Accept": "*/*"}).mimetype == "application/json"


def test_oversized_payload_is_413(client):
    limit = server.default_max_payload_bytes(R)
    padded = json.dumps({"mask": _mask()}) + " " * limit
    _assert_error(_post(client, padded), 413, f"{limit} bytes")
    small = server.create_app(FakeSynthesizer(), max_payload_bytes=100).test_client()
    _assert_error(_post(small, {"mask": _mask()}), 413, "100 bytes")


@pytest.mark.parametrize("body, needles", [
    ('{"mask": [[0, 1], ', ("not valid JSON", "line 1")),
    ("", ("not valid JSON",)),
    (b"\xff\xfe{}", ("not UTF-8",)),
    ('{"mask": NaN}', ("NaN",)),
    ("[" * 30000 + "]" * 30000, ("nested too deeply",)),
    ("[1, 2]", ("JSON object", "a list of 2 items")),
    ("{}", ('no "mask"',)),
    ('{"mask": [], "seeds": 1}', ("unknown field 'seeds'",)),
])
def test_malformed_bodies_are_400(client, body, needles):
    _assert_error(_post(client, body), 400, *needles)


@pytest.mark.parametrize("edit, needles", [
    (lambda m: m[:-1], ("list of 32 rows", "a list of 31 items")),
    (lambda m: m + [[0] * R], ("a list of 33 items",)),
    (lambda m: m[:5] + [m[5][:-1]] + m[6:], ("row 5", "a list of 31 items")),
    (lambda m: m[:3] + ["abc"] + m[4:], ("row 3", "a string")),
    (lambda m: "0" * (R * R), ("list of 32 rows", "a string")),
])
def test_wrong_shapes_are_400(client, edit, needles):
    _assert_error(_post(client, {"mask": edit(_mask())}), 400, *needles)


@pytest.mark.parametrize("value, needles", [
    (K, ("unknown class id 4", "classes 0..3", "row 7, column 9")),
    (-1, ("unknown class id -1",)),
    (10**30, ("unknown class id",)),
    (1.0, ("integer", "1.0")),
    (1.5, ("integer",)),
    (True, ("integer", "true")),
    ("1", ("integer", '"1"')),
    (None, ("integer", "null")),
])
def test_unknown_or_non_integer_class_ids_are_400(client, value, needles):
    mask = _mask()
    mask[7][9] = value
    _assert_error(_post(client, {"mask": mask}), 400, *needles)


@pytest.mark.parametrize("seed", [-1, server.MAX_SEED + 1, 1.5, "3", True, None])
def test_bad_seeds_are_400(client, seed):
    _assert_error(_post(client, {"mask": _mask(), "seed": seed}), 400, '"seed"', str(server.MAX_SEED))


def test_max_seed_is_accepted(client):
    assert _post(client, {"mask": _mask(), "seed": server.MAX_SEED}).status_code == 200


def test_content_type_must_be_json(client):
    body = json.dumps({"mask": _mask()})
    _assert_error(_post(client, body, content_type="text/plain"), 415, "application/json", "text/plain")
    _assert_error(client.post("/generate", data=body), 415, "no Content-Type")


def test_unknown_paths_and_methods_answer_json(client):
    _assert_error(client.get("/nope"), 404, "Not Found")
    _assert_error(client.get("/page/../server.py"), 404)
    _assert_error(client.get("/generate"), 405, "Method Not Allowed")
    _assert_error(client.put("/api/info"), 405)


def test_examples(client, synth):
    body = client.get("/api/example/2").get_json()
    image, mask = synth.example(2)
    assert body["index"] == 2
    np.testing.assert_array_equal(np.asarray(body["mask"]), mask)
    np.testing.assert_array_equal(_data_url_png(body["image"]), image)
    _assert_error(client.get("/api/example/3"), 404, "no example 3", "0..2")
    _assert_error(client.get("/api/example/-1"), 404)
    _assert_error(client.get("/api/example/x"), 404)
    empty = server.create_app(FakeSynthesizer(num_examples=0)).test_client()
    assert empty.get("/api/info").get_json()["num_examples"] == 0
    _assert_error(empty.get("/api/example/0"), 404, "not available")


class _Broken(FakeSynthesizer):
    """A synthesiser that fails: with ValueError on class 3 (the interface's refusal), else with a bug."""

    def generate(self, masks, *, seed=0):
        if np.any(np.asarray(masks) == 3):
            raise ValueError("class 3 is not supported by this model")
        if seed == 1:
            return np.zeros((R, R), np.uint8)
        raise RuntimeError("secret internal detail")


def test_synthesiser_failures_are_clean(caplog):
    client = server.create_app(_Broken()).test_client()
    _assert_error(_post(client, {"mask": _mask(3)}), 400, "class 3 is not supported")
    with caplog.at_level("ERROR", logger="gansem.uscs.server"):
        message = _assert_error(_post(client, {"mask": _mask()}), 500, "internal error")
    assert "secret" not in message and "RuntimeError" not in message
    assert "secret internal detail" in caplog.text  # the traceback goes to the server's log
    _assert_error(_post(client, {"mask": _mask(), "seed": 1}), 500, "internal error")  # an image of the wrong shape
    _assert_error(client.get("/api/example/0"), 500, "internal error")  # its examples come from generate too


def test_create_app_checks_the_synthesiser():
    bad = FakeSynthesizer()
    bad.palette = bad.palette[:3]
    with pytest.raises(ValueError, match="palette"):
        server.create_app(bad)
    bad = FakeSynthesizer()
    bad.class_names = ("a",)
    with pytest.raises(ValueError, match="class names"):
        server.create_app(bad)
    with pytest.raises(ValueError, match="max_payload_bytes"):
        server.create_app(FakeSynthesizer(), max_payload_bytes=0)


def test_trusted_hosts(synth):
    client = server.create_app(synth, trusted_hosts=server.LOOPBACK_NAMES).test_client()
    assert client.get("/api/info", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    _assert_error(client.get("/api/info", headers={"Host": "evil.example:8000"}), 400)


def test_make_server_binds_loopback_and_serves(synth):
    srv = server.make_server(synth, port=0, log_requests=False)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert srv.server_address[0] == "127.0.0.1"
        base = f"http://127.0.0.1:{srv.port}"
        with urllib.request.urlopen(f"{base}/api/info", timeout=10) as r:
            assert json.load(r)["resolution"] == R
        req = urllib.request.Request(f"{base}/generate", data=b"{", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and "not valid JSON" in json.load(e.value)["error"]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _paint_script():
    """launch/paint.py as a module (its ``main(argv)`` runs in this process)."""
    spec = importlib.util.spec_from_file_location("uscs_paint_script", os.path.join(ROOT, "launch", "paint.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(ROOT, "launch"))  # for its `import _common`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.join(ROOT, "launch"))
    return module


@needs_synth
def test_paint_script_help(capsys):
    with pytest.raises(SystemExit) as e:
        _paint_script().main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--step", "--host", "--port", "--max-payload-bytes", "--quiet"):
        assert flag in out, flag
    assert "127.0.0.1" in out and "8000" in out


@needs_synth
def test_paint_script_user_errors(capsys, synth):
    paint = _paint_script()
    assert paint.main(["--model", "no/such/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no/such/run" in err and "train_uscs.py" in err
    for flag, value in (("--port", "70000"), ("--max-payload-bytes", "0")):
        with pytest.raises(SystemExit) as e:
            paint.main(["--model", ".", flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    with server._listening_socket("127.0.0.1", 0) as taken:  # a port in use: one line, exit status 2
        port = taken.getsockname()[1]
        paint.load_synthesizer = lambda run, step=None: synth
        assert paint.main(["--model", ROOT, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
