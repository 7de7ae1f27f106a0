"""``python -m weights_port convert SRC DST [--family auto]`` and ``python -m weights_port inspect SRC``."""

import argparse
import json
import os
import sys

from gansem.generators.base import GeneratorError, save_checkpoint

from .convert import convert_file, inspect_file, sha256
from .dcgan import bundled_weights_path
from .errors import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m weights_port",
        description="Convert published GAN checkpoints (NVIDIA StyleGAN2/ADA .pkl, rosinality .pt, genforce "
                    "StyleGAN/PGGAN .pth, BigGAN-deep pytorch_model.bin, gan-face-generate DCGAN) into gansem "
                    "checkpoint directories, without PyTorch and without executing anything stored in the file.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert SRC into the gansem checkpoint directory DST")
    c.add_argument("src", help="checkpoint file (or BigGAN directory with pytorch_model.bin + config.json), "
                               "or 'dcgan-digiface' for the weights bundled in gan-face-generate")
    c.add_argument("dst", help="output directory (generator.json + params.npz)")
    c.add_argument("--family", default="auto", help="family to convert as (auto: detect from the contents)")
    c.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    i = sub.add_parser("inspect", help="print what SRC is (family, resolution, conditioning, parameters)")
    i.add_argument("src")
    i.add_argument("--family", default="auto")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)



    src = args.src
    if src == "dcgan-digiface":
        try:
            src = bundled_weights_path()
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        if args.cmd == "inspect":
            info = inspect_file(src, args.family)
            if args.json:
                print(json.dumps(info, indent=2, default=str))
            else:
                for k, v in info.items():
                    print(f"{k:>16}: {v}")
            return 0
        if os.path.exists(args.dst) and not os.path.isdir(args.dst):
            print(f"error: {args.dst} exists and is not a directory; give a new or existing directory as DST",
                  file=sys.stderr)
            return 2
        if os.path.exists(os.path.join(args.dst, "generator.json")) and not args.force:
            print(f"error: {args.dst} already holds a gansem checkpoint (use --force to overwrite)", file=sys.stderr)
            return 2
        gen, params, info = convert_file(src, args.family)
        hashed = os.path.join(src, "pytorch_model.bin") if os.path.isdir(src) else src
        info["sha256"] = sha256(hashed) if os.path.isfile(hashed) else None
    except (CheckpointError, GeneratorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        save_checkpoint(args.dst, gen, params, name=os.path.basename(os.path.normpath(args.src)), source=info)
    except OSError as e:
        print(f"error: cannot write the checkpoint to {args.dst} ({e}); choose a writable DST", file=sys.stderr)
        return 2
    print(f"converted {args.src} ({gen.family}, {gen.resolution}px) -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
