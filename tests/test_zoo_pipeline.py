"""Every generator family runs through the KLiSH main job (tiny random-weight checkpoints, 1 and 8 devices)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gansem.checkpoint import load_trajectory
from gansem.generators import save_checkpoint
from gansem.generators.biggan import BigGANDeep
from gansem.generators.dcgan import DCGAN
from gansem.generators.pggan import PGGAN
from gansem.generators.stylegan import StyleGAN
from gansem.generators.stylegan2 import StyleGAN2
from gansem.pipeline import KlishJobConfig, run_klish_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "dcgan": DCGAN(nz=16, ngf=8, num_blocks=2),
    "stylegan2": StyleGAN2(z_dim=16, w_dim=16, img_resolution=16, channel_base=256, channel_max=16,
                           mapping_layers=2),
    "stylegan": StyleGAN(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, mapping_fmaps=16,
                         fmaps_base=256, fmaps_max=16),
    "pggan": PGGAN(resolution=16, z_dim=16, fmaps_base=256, fmaps_max=16),
    "biggan": BigGANDeep(z_dim=16, n_classes=10, channel_width=4,
                         layers=((False, 16, 16), (True, 16, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2),
                                 (True, 2, 1)),
                         attention_layer_position=3),
}


def _tiny_checkpoint(tmp, family):
    gen = TINY[family]
    params = jax.tree.map(np.asarray, gen.init_params(jax.random.key(7)))
    d = os.path.join(tmp, f"ck-{family}")
    save_checkpoint(d, gen, params, name=f"tiny-{family}")
    return d


def _run_family(tmp_path, family, devices_list):
    ck = _tiny_checkpoint(str(tmp_path), family)
    cfg = dict(generator=ck, num_images=2, resolution=8, k0=6, seed=1, svm_max_iter=300)
    merges = []
    for n in devices_list:
        d = str(tmp_path / f"run{n}")
        s = run_klish_job(KlishJobConfig(**cfg), d, devices=n, progress=False, quiet=True, num_vis=1)
        assert s["complete"]
        traj = load_trajectory(d)
        ks = [r.k for r in traj]
        assert ks[0] <= 6 and ks == list(range(ks[0], 0, -1))
        assert os.path.isfile(os.path.join(d, "clusters.png"))
        merges.append([(r.k, r.p, r.q) for r in traj])
    return merges


@pytest.mark.parametrize("family", sorted(TINY))
def test_family_runs_through_klish_on_8_devices(family, tmp_path):
    _run_family(tmp_path, family, (8,))


# The device-count invariance of the job itself is tested on the DCGAN in test_pipeline.py; here once per family.
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
def test_family_runs_through_klish_on_1_and_8_devices(family, tmp_path):
    merges = _run_family(tmp_path, family, (1, 8))
    assert merges[0] == merges[1]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
def test_family_runs_through_the_cli(family, tmp_path):
    ck = _tiny_checkpoint(str(tmp_path), family)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "launch/klish.py", "--checkpoint", ck, "--num-images", "2",
                        "--resolution", "8", "--k0", "5", "--devices", "8", "--out", str(tmp_path / "run"),
                        "--no-progress", "--quiet"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert len(load_trajectory(str(tmp_path / "run"))) >= 1
