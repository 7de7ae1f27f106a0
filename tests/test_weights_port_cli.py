"""`python -m weights_port inspect/convert` on every fixture family, and the converted checkpoints load."""

import json
import os
import subprocess
import sys

import pytest

from gansem.zoo import load_generator
from gansem.generators.base import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")

CASES = [
    ("stylegan2_ada/uncond32.pkl", "stylegan2", 32),
    ("stylegan2_ada/cond16.pkl", "stylegan2", 16),
    ("rosinality_stylegan2/stylegan2_tiny32.pt", "stylegan2", 32),
    ("genforce_pggan/pggan_tiny32.pth", "pggan", 32),
    ("genforce_stylegan/stylegan_tiny32.pth", "stylegan", 32),
    ("biggan", "biggan", 64),
]


def _run(args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "weights_port"] + args, cwd=ROOT, capture_output=True,
                          text=True, env=env)


@pytest.mark.parametrize("src,family,res", CASES)
def test_inspect_reports_family_and_resolution(src, family, res):
    r = _run(["inspect", os.path.join(FIX, src), "--json"])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["family"] == family and int(info["resolution"]) == res
    assert int(info["num_parameters"]) > 0


@pytest.mark.parametrize("src,family,res", CASES)
def test_convert_then_load(src, family, res, tmp_path):
    dst = str(tmp_path / "ck")
    r = _run(["convert", os.path.join(FIX, src), dst])
    assert r.returncode == 0, r.stderr
    gen, params, meta = load_checkpoint(dst)
    assert gen.family == family and gen.resolution == res
    assert meta["source"]["sha256"]
    # the in-memory conversion of the original file gives the same generator
    gen2, _, _ = load_generator(os.path.join(FIX, src))
    assert gen2 == gen


def test_convert_refuses_to_overwrite_and_reports_bad_files(tmp_path):
    dst = str(tmp_path / "ck")
    assert _run(["convert", os.path.join(FIX, "genforce_pggan", "pggan_tiny32.pth"), dst]).returncode == 0
    r = _run(["convert", os.path.join(FIX, "genforce_pggan", "pggan_tiny32.pth"), dst])
    assert r.returncode == 2 and "--force" in r.stderr
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    r = _run(["inspect", str(bad)])
    assert r.returncode == 2 and "x.pt" in r.stderr and "Traceback" not in r.stderr
    r = _run(["convert", os.path.join(FIX, "genforce_pggan", "pggan_tiny32.pth"), str(tmp_path / "o"),
              "--family", "biggan"])
    assert r.returncode == 2 and "biggan" in r.stderr and "Traceback" not in r.stderr
