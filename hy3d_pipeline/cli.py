"""The `hy3d-pipeline` command: `demo`, `dev`, and `generate` for one image."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hy3d-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="process every image in the bucket once (embedded S3 when none is configured)")
    dev = sub.add_parser("dev", help="embedded default + Dagster UI and daemon on 127.0.0.1")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    gen = sub.add_parser("generate", help="generate one model from a local path or S3 URL")
    gen.add_argument("image")
    gen.add_argument("--format", default="glb", choices=["glb", "obj", "ply", "stl"])
    gen.add_argument("--texture", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from hy3d_pipeline.embedded.demo import run_demo

        return run_demo()
    if args.command == "dev":
        from hy3d_pipeline.embedded.dev import run_dev

        return run_dev(args.host, args.port)
    if args.command == "generate":
        from hy3d_pipeline.core import generate_3d_from_image_core

        result = generate_3d_from_image_core(args.image, with_texture=args.texture, output_format=args.format)
        print(json.dumps(result, indent=2))
        return 0 if result["status"] == "success" else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
