"""Hostile checkpoints: memory bombs, pathological object graphs, bad configs, corrupt zips, and a fuzzer.

Every file here is crafted by the test itself (tiny, hand-assembled pickles and zips, or byte edits of the shipped
fixtures). Each must either load correctly or fail with the reader's own error classes, quickly, with bounded
memory and without running anything from the file.
"""

import contextlib
import io
import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gansem.generators.base import GeneratorError, load_checkpoint, save_checkpoint
from gansem.generators.pggan import PGGAN
from gansem.generators.stylegan2 import StyleGAN2
from test_torch_reader import G, Call, Memo, PersId, Ref, assemble
from weights_port import stylegan2 as sg2_port
from weights_port.__main__ import main as cli
from weights_port.convert import convert_file, inspect_file
from weights_port.errors import CheckpointError, UnsafeCheckpointError
from weights_port.torch_reader import PersistentObject, load_any, load_nvidia_pickle, load_torch_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
ROS = os.path.join(FIXTURES, "rosinality_stylegan2", "stylegan2_tiny32.pt")
PGGAN_PTH = os.path.join(FIXTURES, "genforce_pggan", "pggan_tiny32.pth")
COND16 = os.path.join(FIXTURES, "stylegan2_ada", "cond16.pkl")
BIGGAN = os.path.join(FIXTURES, "biggan", "pytorch_model.bin")
BOMB_ELEMENTS = 300_000_000  # 1.2 GB of float32 if it were materialised


# --------------------------------------------------------------------------------------------- crafting helpers


def _od():
    return Call(G("collections", "OrderedDict"))


def _tensor(storage, size, stride, offset=0):
    return Call(G("torch._utils", "_rebuild_tensor_v2"), storage, offset, tuple(size), tuple(stride), False, _od())


def _zip_pid(key, numel):
    return PersId(("storage", G("torch", "FloatStorage"), key, "cpu", numel))


def _torch_zip(obj, storages, compress=zipfile.ZIP_STORED) -> bytes:
    """A torch zip file: ``obj`` as data.pkl, ``storages`` {key: float32 array} as data members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", assemble(obj, 2))
        zf.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", np.asarray(data, np.float32).tobytes(), compress_type=compress)
    return buf.getvalue()


def _torch_zip_raw_pickle(data_pkl: bytes) -> bytes:
    """A torch zip holding only ``data_pkl`` (a hand-written pickle)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
    return buf.getvalue()


def _legacy_torch(obj, storages) -> bytes:
    """A legacy torch.save stream whose storage pids are ``('storage', FloatStorage, key, 'cpu', n, None)``."""
    import pickle

    header = b"".join(pickle.dumps(v, protocol=2) for v in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                       "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    body = b"".join(struct.pack("<q", len(d)) + np.asarray(d, np.float32).tobytes() for d in storages.values())
    return header + assemble(obj, 2) + pickle.dumps(list(storages), protocol=2) + body


def _legacy_pid(key, numel):
    return PersId(("storage", G("torch", "FloatStorage"), key, "cpu", numel, None))


def _net(class_name, params=None, modules=None, init_kwargs=None, memo=None):
    """An NVIDIA persistence object (``_reconstruct_persistent_obj(meta)``)."""
    state = {"_parameters": params or {}, "_buffers": {}, "_modules": modules or {}}
    if init_kwargs is not None:
        state["_init_kwargs"] = init_kwargs
    meta = {"type": "class", "version": 6, "module_src": "raise SystemExit('never executed')",
            "class_name": class_name, "state": state}
    net = Call(G("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)
    return net if memo is None else Memo(memo, net)


def _nvidia_tensor(values, size, stride):
    """A tensor whose storage is a nested legacy torch.save blob (``torch.storage._load_from_bytes``)."""
    blob = _legacy_torch(_legacy_pid("0", len(values)), {"0": values})
    return _tensor(Call(G("torch.storage", "_load_from_bytes"), blob), size, stride)


def _nvidia_file(g_ema) -> bytes:
    return assemble({"G_ema": g_ema, "training_set_kwargs": None}, 2)


def _raw_zip(members) -> bytes:
    """A zip written by hand from ``(name, method, payload, crc, declared_size)``, so sizes and CRCs may lie."""
    out, central = bytearray(), bytearray()
    for name, method, payload, crc, size in members:
        raw_name = name.encode()
        offset = len(out)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(payload), size,
                           len(raw_name), 0) + raw_name + payload
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(payload),
                               size, len(raw_name), 0, 0, 0, 0, 0, offset) + raw_name
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    return bytes(out + central + end)


def _deflated_zeros(nbytes: int) -> bytes:
    """A raw deflate stream of ``nbytes`` zero bytes (a multiple of 1 MiB), built in milliseconds."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * (nbytes >> 20) + c.flush()


def _deflate_bomb(declared_numel: int) -> bytes:
    """A torch zip whose one tensor lives in a deflated member of 1.2 GB zeros squeezed into ~1.2 MB."""
    pkl = assemble({"w": _tensor(_zip_pid("0", declared_numel), (declared_numel,), (1,))}, 2)
    bomb = _deflated_zeros(1200 << 20)
    return _raw_zip([("archive/data.pkl", 0, pkl, zlib.crc32(pkl), len(pkl)),
                     ("archive/data/0", 8, bomb, 0, 4 * declared_numel)])


def _bombs(tmp_path) -> dict:
    """Files that expand a few hundred bytes (or ~1 MB of deflate) into 1.2 GB if the reader trusts them."""
    view = _tensor(_zip_pid("0", 1), (20000, 15000), (0, 0))
    files = {
        "zip-stride0": _torch_zip({"w": view}, {"0": [1.0]}),
        "zip-overlapping": _torch_zip({"w": _tensor(_zip_pid("0", 1 << 20), ((1 << 20) - 255, 256), (1, 1))},
                                      {"0": np.zeros(1 << 20)}),
        "legacy-stride0": _legacy_torch({"w": _tensor(_legacy_pid("0", 1), (20000, 15000), (0, 0))}, {"0": [1.0]}),
        "nvidia-stride0": _nvidia_file(_net("Generator", {"w": _nvidia_tensor([1.0], (20000, 15000), (0, 0))})),
        "zip-deflate-bomb": _deflate_bomb(BOMB_ELEMENTS),
        "zip-deflate-lying-size": _deflate_bomb(1 << 20),
    }
    return {name: _write(tmp_path, f"{name}.pt", data) for name, data in files.items()}


def _write(tmp_path, name, data: bytes) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _run_cli(capsys, *argv):
    code = cli(list(argv))
    err = capsys.readouterr().err
    return code, err


# ----------------------------------------------------------------------------------- (1) memory bombs


def test_view_and_deflate_bombs_are_refused(tmp_path):
    for name, path in _bombs(tmp_path).items():
        t = time.time()
        for action in (load_any, inspect_file, convert_file):
            with pytest.raises(CheckpointError) as info:
                action(path)
            message = str(info.value)
            assert path in message and "\n" not in message, (name, message)
            expected = {"deflate-bomb": "zip bomb", "lying-size": "more than its declared"}
            assert next((v for k, v in expected.items() if k in name), "memory bomb") in message, (name, message)
        assert time.time() - t < 3, name


_MEASURE_BOMBS = textwrap.dedent("""
    import json, sys
    from weights_port.convert import convert_file, inspect_file
    from weights_port.errors import CheckpointError
    from weights_port.torch_reader import PersistentObject, load_any

    def peak_mb():  # this process's peak resident set (VmHWM; ru_maxrss would include the forking parent)
        with open('/proc/self/status') as f:
            return next(int(l.split()[1]) for l in f if l.startswith('VmHWM')) / 1024

    def load_everything(path):  # NVIDIA tensors are lazy: reading them is part of loading
        kind, obj = load_any(path)
        for v in obj.values():
            if isinstance(v, PersistentObject):
                v.named_tensors()

    base, errors = peak_mb(), {}
    for path in sys.argv[1:]:
        for action in (load_everything, inspect_file, convert_file):
            try:
                action(path)
                errors[path] = 'accepted'
            except CheckpointError as e:
                errors[path] = str(e)
    print(json.dumps({'base': base, 'peak': peak_mb(), 'errors': errors}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS read from /proc (Linux)")
def test_bombs_use_little_memory(tmp_path):
    """Reading every bomb (and inspecting / converting it) in a fresh process stays far below 1.2 GB."""
    paths = list(_bombs(tmp_path).values())
    out = subprocess.run([sys.executable, "-c", _MEASURE_BOMBS, *paths], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert all(msg != "accepted" for msg in result["errors"].values()), result["errors"]
    assert result["peak"] - result["base"] < 400, result


def test_genuine_views_still_load(tmp_path):
    """Shared storages, transposes, slices and a stride-0 expansion of a small tensor are what torch writes."""
    base = np.arange(24, dtype=np.float32)
    obj = {"a": _tensor(_zip_pid("0", 24), (4, 6), (6, 1)), "t": _tensor(_zip_pid("0", 24), (6, 4), (1, 6)),
           "row": _tensor(_zip_pid("0", 24), (6,), (1,), offset=12),
           "expanded": _tensor(_zip_pid("1", 3), (3, 1000), (1, 0))}
    path = _write(tmp_path, "views.pt", _torch_zip(obj, {"0": base, "1": [1.0, 2.0, 3.0]}))
    got = load_torch_file(path)
    np.testing.assert_array_equal(got["t"], base.reshape(4, 6).T)
    np.testing.assert_array_equal(got["row"], base[12:18])
    np.testing.assert_array_equal(got["expanded"], np.repeat([[1.0], [2.0], [3.0]], 1000, axis=1))


def test_deflated_checkpoint_loads_like_the_stored_one(tmp_path):
    """A torch zip re-packed with deflate (stored members are what torch writes) reads bit-exactly."""
    path = str(tmp_path / "deflated.pt")
    with zipfile.ZipFile(ROS) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    ours, ref = load_torch_file(path), load_torch_file(ROS)
    assert list(ours["g_ema"]) == list(ref["g_ema"])
    for k, v in ref["g_ema"].items():
        assert ours["g_ema"][k].tobytes() == v.tobytes(), k


def test_repeated_copies_of_one_container_are_refused(tmp_path):
    """``set(big_list)`` called again and again through memo references (5 bytes each) would multiply memory."""
    big = Memo(0, list(range(100_000)))
    copies = [Call(G("builtins", "set"), Ref(0)) for _ in range(200)]
    path = _write(tmp_path, "copies.pt", _torch_zip({"big": big, "copies": copies}, {}))
    with pytest.raises(CheckpointError, match="memory bomb"):
        load_torch_file(path)


def test_deeply_nested_tuples_are_refused(tmp_path):
    """Hashing a tuple nested a million deep (a dict key) would overflow the C stack."""
    data = b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"K\x01s."
    path = _write(tmp_path, "deep.pt", _torch_zip_raw_pickle(data))
    with pytest.raises(CheckpointError, match="nests tuples"):
        load_torch_file(path)


# ------------------------------------------------------------------------- (2) pickled object graphs


def _shared_module_dag(levels):
    """Each module has two children that are the same module, ``levels`` deep: 2**levels paths, levels objects."""
    node = _net("Leaf", {"w": _nvidia_tensor([1.0], (1,), (1,))}, memo=0)
    for i in range(1, levels + 1):
        node = _net(f"Level{i}", modules={"a": node, "b": Ref(i - 1)}, memo=i)
    return node


def _cyclic_module():
    """A module whose child's ``_modules`` dict is the one that holds the child."""
    inner = _net("Inner", modules=Ref(0))
    return _net("Generator", modules=Memo(0, {"inner": inner}), init_kwargs=_SG2_KWARGS)


_SG2_KWARGS = {"z_dim": 8, "c_dim": 0, "w_dim": 8, "img_resolution": 8, "img_channels": 3,
               "mapping_kwargs": {"num_layers": 1}, "synthesis_kwargs": {"channel_base": 64, "channel_max": 8}}


@pytest.mark.parametrize("levels,fragment", [(30, "second time"), (40, "nested more than")])
def test_shared_module_graph_is_refused_quickly(tmp_path, levels, fragment):
    """Unmemoised, 30 levels of shared children are 2**30 paths to walk."""
    g_ema = _net("Generator", modules={"net": _shared_module_dag(levels)}, init_kwargs=_SG2_KWARGS)
    path = _write(tmp_path, "dag.pkl", _nvidia_file(g_ema))
    t = time.time()
    for action in (lambda p: load_nvidia_pickle(p)["G_ema"].named_tensors(), inspect_file, convert_file):
        with pytest.raises(CheckpointError, match=f"{path}.*{fragment}"):
            action(path)
    assert time.time() - t < 3


def test_cyclic_module_graph_is_refused(tmp_path, capsys):
    path = _write(tmp_path, "cycle.pkl", _nvidia_file(_cyclic_module()))
    with pytest.raises(CheckpointError, match="cycle"):
        load_nvidia_pickle(path)
    for command in ("inspect", "convert"):
        code, err = _run_cli(capsys, command, path, *([str(tmp_path / "out")] if command == "convert" else []))
        assert code == 2 and err.startswith("error: ") and path in err and "cycle" in err, err
    from gansem.zoo import load_generator  # what launch/klish.py --checkpoint calls

    with pytest.raises(GeneratorError, match="cycle"):
        load_generator(path)


def test_deeply_nested_containers_are_refused(tmp_path):
    """Lists nested 100k deep (3 bytes a level) load as an error, not a RecursionError traceback."""
    data = b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."
    path = _write(tmp_path, "nested.pt", _torch_zip_raw_pickle(data))
    with pytest.raises(CheckpointError, match="nested more than"):
        load_torch_file(path)


# ------------------------------------------------------------------- (3) configs checked before allocating


def _rosinality_sd(style_dim, style_shape=None):
    """Shapes of a 2-block rosinality g_ema; big tensors are zero-stride views (no memory)."""
    def t(*shape):
        return np.broadcast_to(np.float32(0.1), shape)

    d = style_dim
    sd = {"style.1.weight": t(*(style_shape or (d, d))), "style.1.bias": t(d), "input.input": t(1, 8, 4, 4)}
    for mod, cin, cout in (("conv1", 8, 8), ("convs.0", 8, 8), ("convs.1", 8, 8)):
        sd.update({f"{mod}.conv.weight": t(1, cout, cin, 3, 3), f"{mod}.conv.modulation.weight": t(cin, d),
                   f"{mod}.conv.modulation.bias": t(cin), f"{mod}.noise.weight": t(1),
                   f"{mod}.activate.bias": t(cout)})
    for mod in ("to_rgb1", "to_rgbs.0"):
        sd.update({f"{mod}.conv.weight": t(1, 3, 8, 1, 1), f"{mod}.conv.modulation.weight": t(8, d),
                   f"{mod}.conv.modulation.bias": t(8), f"{mod}.bias": t(1, 3, 1, 1)})
    sd.update({"noises.noise_0": t(1, 1, 4, 4), "noises.noise_1": t(1, 1, 8, 8), "noises.noise_2": t(1, 1, 8, 8)})
    return sd


def test_rosinality_latent_size_checked_before_estimating_w_avg():
    """Without latent_avg, w_avg is estimated from 4096 z of size z_dim: z_dim must match real tensors first."""
    gen, params, info = sg2_port.convert("torch-zip", {"g_ema": _rosinality_sd(16)})
    assert "estimated" in info["w_avg"] and gen.z_dim == 16
    t = time.time()
    with pytest.raises(CheckpointError, match=r"style\.1\.weight.*expected \(1048576, 1048576\)"):
        sg2_port.convert("torch-zip", {"g_ema": _rosinality_sd(1 << 20, style_shape=(4, 1 << 20))})
    with pytest.raises(CheckpointError, match="z_dim must be in"):
        sg2_port.convert("torch-zip", {"g_ema": _rosinality_sd(1 << 20)})
    assert time.time() - t < 2


@pytest.mark.parametrize("change", [
    {"img_resolution": 2 ** 40}, {"img_resolution": 48}, {"z_dim": -5}, {"w_dim": 0}, {"c_dim": -1},
    {"channel_base": 1}, {"channel_max": 0}, {"mapping_layers": 10 ** 9}, {"z_dim": "512"}, {"z_dim": 512.0},
    {"z_dim": True}, {"resample_filter": ()}, {"resample_filter": (1, -1)}, {"channels": (8, 0)},
    {"channels": (8, "8")}, {"conv_clamp": -1.0}, {"mapping_lr_multiplier": float("nan")}, {"use_noise": "yes"},
])
def test_stylegan2_config_values_are_checked(change):
    with pytest.raises(GeneratorError):
        StyleGAN2(**dict(dict(z_dim=8, w_dim=8, img_resolution=8, channel_base=64, channel_max=8), **change))


def test_converted_configs_are_checked_on_load(tmp_path):
    gen, params, _ = convert_file(PGGAN_PTH)
    good = str(tmp_path / "good")
    save_checkpoint(good, gen, params)
    assert load_checkpoint(good)[0] == gen
    with open(os.path.join(good, "generator.json")) as f:
        meta = json.load(f)
    bad_configs = [{"resolution": 2 ** 40}, {"z_dim": -5}, {"fmaps_base": 0}, {"z_dim": [[512]]},
                   {"resolution": "32"}, {"final_tanh": None}]
    bad_metas = [dict(meta, config=dict(meta["config"], **c)) for c in bad_configs]
    bad_metas += [dict(meta, version="1"), dict(meta, family=["pggan"]), dict(meta, config=[1, 2]), [meta]]
    for i, bad in enumerate(bad_metas):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        os.link(os.path.join(good, "params.npz"), d / "params.npz")
        (d / "generator.json").write_text(json.dumps(bad))
        with pytest.raises(GeneratorError, match=str(d)):
            load_checkpoint(str(d))
    (d / "generator.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(GeneratorError, match="cannot read"):
        load_checkpoint(str(d))
    with pytest.raises(GeneratorError):
        PGGAN(resolution=32, fmaps_base=2 ** 40)


def test_parameter_headers_checked_before_reading(tmp_path):
    """A params.npz array whose header declares 4 GB (data absent) is refused from its header alone."""
    gen, params, _ = convert_file(PGGAN_PTH)
    d = str(tmp_path / "ck")
    save_checkpoint(d, gen, params)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 30,)})
    for name in ("params/layer0/kernel.npy", "params/junk.npy"):
        with zipfile.ZipFile(os.path.join(d, "params.npz"), "a") as zf:
            with pytest.warns(UserWarning, match="Duplicate name") if "layer0" in name else contextlib.nullcontext():
                zf.writestr(name, header.getvalue())
        with pytest.raises(GeneratorError, match="do not match"):
            load_checkpoint(d)


def test_nvidia_config_without_tensors_is_not_described(tmp_path):
    path = _write(tmp_path, "empty.pkl", _nvidia_file(_net("Generator", init_kwargs=_SG2_KWARGS)))
    for action in (inspect_file, convert_file):
        with pytest.raises(CheckpointError, match=f"{path}.*has no tensor 'mapping"):
            action(path)


def test_biggan_config_without_its_tensors_is_not_described():
    from weights_port import biggan

    kind, obj = load_any(BIGGAN)
    with open(os.path.join(os.path.dirname(BIGGAN), "config.json")) as f:
        config = json.load(f)
    assert biggan.describe(kind, obj, config)["num_parameters"] > 0
    partial = {k: obj[k] for k in ("embeddings.weight", "generator.gen_z.weight_orig")}
    with pytest.raises(CheckpointError, match="missing tensor"):
        biggan.describe(kind, partial, config)


# ----------------------------------------------------------------------- (4) clear errors, not tracebacks


@pytest.mark.parametrize("state,fragment", [
    ({"_parameters": {"w": 5}}, "w is of type int, not a tensor"),
    ({"_modules": [1]}, "Generator._modules is not a dict with string keys"),
    ({"_buffers": {3: None}}, "Generator._buffers is not a dict with string keys"),
])
def test_nvidia_module_state_is_checked(tmp_path, state, fragment):
    g_ema = _net("Generator", init_kwargs=_SG2_KWARGS)
    g_ema.args[0]["state"].update(state)
    path = _write(tmp_path, "state.pkl", _nvidia_file(g_ema))
    for action in (lambda p: load_nvidia_pickle(p)["G_ema"].named_tensors(), inspect_file, convert_file):
        with pytest.raises(CheckpointError, match=f"{path}: {fragment}"):
            action(path)


def test_genforce_file_with_integer_keys(tmp_path, capsys):
    sd = load_torch_file(PGGAN_PTH)["generator_smooth"]
    storages = {str(i): v.reshape(-1) for i, v in enumerate(sd.values())}
    obj = {k: _tensor(_zip_pid(str(i), v.size), v.shape, tuple(s // v.itemsize for s in v.strides))
           for i, (k, v) in enumerate(sd.items())}
    obj[7] = _tensor(_zip_pid("0", storages["0"].size), (), ())
    path = _write(tmp_path, "intkeys.pth", _torch_zip({"generator_smooth": obj}, storages))
    for command in ("inspect", "convert"):
        code, err = _run_cli(capsys, command, path, *([str(tmp_path / "out")] if command == "convert" else []))
        assert code == 2 and err.startswith("error: ") and path in err and "key 7 is not a string" in err, err


@pytest.mark.parametrize("key", ["main.x.weight", "foo.bar.weight", "main.0.weight.extra", "main." + "9" * 5000])
def test_dcgan_unexpected_keys(key):
    sd = {"main.0.weight": np.zeros((4, 8, 4, 4), np.float32), "main.1.running_mean": np.zeros(8, np.float32),
          key: np.zeros((2, 2, 2, 2), np.float32)}
    from weights_port import dcgan

    assert dcgan.matches("torch-zip", sd)
    for action in (dcgan.describe, dcgan.convert):
        with pytest.raises(CheckpointError, match="unexpected key"):
            action("torch-zip", sd)


@pytest.mark.parametrize("where,key,value,fragment", [
    ("", "z_dim", "32", "z_dim = '32' is not an integer"),
    ("", "img_resolution", 16.5, "img_resolution = 16.5 is not an integer"),
    ("", "img_resolution", 2 ** 40, "img_resolution must be a power of two"),
    ("", "c_dim", None, "c_dim = None is not an integer"),
    ("", "mapping_kwargs", 5, "mapping_kwargs is 5, expected a dict"),
    ("synthesis_kwargs", "resample_filter", "1331", "resample_filter '1331' is not a list"),
    ("synthesis_kwargs", "resample_filter", [1, [3], 3, 1], "resample_filter = <list of length 1>"),
    ("synthesis_kwargs", "conv_clamp", "256", "conv_clamp = '256' is not a finite number"),
    ("synthesis_kwargs", "channel_max", 2 ** 5000, "channel_max must be in [1, 65536], got <5001-bit integer>"),
    ("synthesis_kwargs", "architecture", ["skip"], "architecture <list of length 1> is not supported"),
    ("mapping_kwargs", "activation", {"lrelu": 1}, "activation <dict of length 1> is not supported"),
    ("mapping_kwargs", "num_layers", 3.0, "num_layers = 3.0 is not an integer"),
    ("synthesis_kwargs", "num_fp16_res", [4], "num_fp16_res = <list of length 1> is not a scalar"),
])
def test_wrong_typed_nvidia_config_values(where, key, value, fragment):
    kind, obj = load_any(COND16)
    g = obj["G_ema"]
    kwargs = dict(g.init_kwargs)
    if where:
        kwargs[where] = dict(kwargs[where], **{key: value})
    else:
        kwargs[key] = value
    bad = PersistentObject(g.class_name, g.module_src, dict(g.state, _init_kwargs=kwargs), g.version)
    for action in (sg2_port.describe, sg2_port.convert):
        with pytest.raises(CheckpointError) as info:
            action(kind, {"G_ema": bad})
        assert fragment in str(info.value)


def test_cli_convert_to_an_existing_file(tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.write_text("not a directory")
    code, err = _run_cli(capsys, "convert", PGGAN_PTH, str(dst))
    assert code == 2 and err.startswith("error: ") and "not a directory" in err, err
    assert dst.read_text() == "not a directory"
    code, err = _run_cli(capsys, "convert", PGGAN_PTH, str(dst / "sub"))
    assert code == 2 and err.startswith("error: "), err


# ---------------------------------------------------------------------------- (8) zip CRC-32


def _member_offset(data: bytes, name: str) -> tuple[int, int]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(name)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_flipped_weight_byte_is_caught_by_crc(tmp_path, compress):
    data = bytearray(_torch_zip({"w": _tensor(_zip_pid("0", 4096), (64, 64), (64, 1))},
                                {"0": np.random.default_rng(0).standard_normal(4096)}, compress))
    offset, size = _member_offset(bytes(data), "archive/data/0")
    data[offset + size // 2] ^= 0x10
    path = _write(tmp_path, "flipped.pt", bytes(data))
    with pytest.raises(CheckpointError, match="zip member archive/data/0 (fails its CRC-32|cannot be read)"):
        load_torch_file(path)


def test_flipped_byte_in_fixture_weights_is_refused(tmp_path):
    data = bytearray(open(ROS, "rb").read())
    with zipfile.ZipFile(ROS) as zf:
        name = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename
    offset, size = _member_offset(bytes(data), name)
    data[offset + size // 3] ^= 0x01
    path = _write(tmp_path, "flipped.pt", bytes(data))
    for action in (load_any, inspect_file, convert_file):
        with pytest.raises(CheckpointError, match=f"{path}: zip member {name} fails its CRC-32 check"):
            action(path)


# ------------------------------------------------------------------------------------------- fuzzing

_PAYLOAD = b"cos\nsystem\n(S'touch {marker}'\ntR"
_FUZZ_FIXTURES = [ROS, PGGAN_PTH, COND16, BIGGAN]
_FIXTURE_BYTES = {p: open(p, "rb").read() for p in _FUZZ_FIXTURES}


def _mutations():
    """(fixture, mutation) pairs: byte flips, truncation, inserted payload, or edits of one zip member."""
    flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8)
    file_edit = st.one_of(
        st.tuples(st.just("flip"), flips),
        st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
        st.tuples(st.just("insert"), st.floats(0, 1)),
    )
    member_edit = st.tuples(st.just("member"), st.sampled_from(["data.pkl", "byteorder", "data/0", "data/1"]),
                            file_edit | st.just(("drop", None)) | st.just(("deflate", None)))
    return st.tuples(st.sampled_from(_FUZZ_FIXTURES), file_edit | member_edit)


def _apply(data: bytes, edit, marker: str) -> bytes:
    kind, arg = edit
    if kind == "flip":
        out = bytearray(data)
        for where, mask in arg:
            out[int(where * len(out))] ^= mask
        return bytes(out)
    if kind == "truncate":
        return data[: int(arg * len(data))]
    if kind == "insert":
        cut = int(arg * len(data))
        return data[:cut] + _PAYLOAD.replace(b"{marker}", marker.encode()) + data[cut:]
    return data


def _apply_member(data: bytes, name: str, edit, marker: str) -> bytes:
    """Rewrites a torch zip with member ``<root>/name`` edited, dropped or deflated (other members as they were)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            content, method = src.read(info.filename), info.compress_type
            if info.filename.split("/", 1)[-1] == name:
                if edit[0] == "drop":
                    continue
                if edit[0] == "deflate":
                    method = zipfile.ZIP_DEFLATED
                else:
                    content = _apply(content, edit, marker)
            dst.writestr(info.filename, content, compress_type=method)
    return buf.getvalue()


@contextlib.contextmanager
def _peak_rss_growth_below(mb):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB on Linux
    assert grown < mb, f"peak RSS grew by {grown:.0f} MB"


def test_fuzzed_fixtures_fail_only_with_checkpoint_errors(tmp_path_factory):
    """Mutated fixtures: inspect and convert either succeed or raise CheckpointError; nothing from the file runs,
    memory stays bounded and each example is quick."""
    work = tmp_path_factory.mktemp("fuzz")
    marker = str(work / "ran")

    @settings(max_examples=80, deadline=3000, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_mutations())
    def check(case):
        fixture, edit = case
        data = _FIXTURE_BYTES[fixture]
        if edit[0] == "member":
            if not zipfile.is_zipfile(io.BytesIO(data)):
                return
            data = _apply_member(data, edit[1], edit[2], marker)
        else:
            data = _apply(data, edit, marker)
        path = str(work / "mutated.bin")
        with open(path, "wb") as f:
            f.write(data)
        for action in (inspect_file, convert_file):
            try:
                action(path)
            except UnsafeCheckpointError as e:
                assert "os.system" in str(e) or "allow-list" in str(e) or "non-allow-listed" in str(e), e
            except CheckpointError as e:
                assert path in str(e) and "\n" not in str(e), e
        assert not os.path.exists(marker)

    t = time.time()
    with _peak_rss_growth_below(400):
        check()
    assert time.time() - t < 30
