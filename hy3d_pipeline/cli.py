"""The `hy3d-pipeline` command: `demo`, `dev`, `worker`, `upload`, `generate` for one image, `report`,
`fetch-weights`, and `generators` (the installed generator backends)."""

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
    worker = sub.add_parser("worker", help="a long-lived generation worker (Celery) on HY3D_WORKER_QUEUE")
    worker.add_argument("--concurrency", "-c", type=int, default=1,
                        help="pool processes, each with its own warm generator (one per GPU): default %(default)s")
    worker.add_argument("--loglevel", default="INFO")
    upload = sub.add_parser("upload", help="put image files and folders into the images bucket (embedded or configured)")
    upload.add_argument("paths", nargs="+", metavar="PATH", help="image files, and folders to walk")
    upload.add_argument("--prefix", default="", help="key prefix under S3_IMAGES_PREFIX (default: none)")
    gen = sub.add_parser("generate", help="generate one model from a local path or S3 URL")
    gen.add_argument("image")
    gen.add_argument("--format", default="glb", choices=["glb", "obj", "ply", "stl"])
    gen.add_argument("--texture", nargs="?", const="paint", default=None, choices=["none", "projected", "paint"],
                     help="texture mode (alone: paint; default: HY3D_TEXTURE, else none); extrude ignores it, "
                          "its front always shows the image")
    gen.add_argument("--out", default=None, help="folder for the model file(s) (default: HY3D_OUTPUT_DIR or ./hy3d-output)")
    report = sub.add_parser("report", help="write a static HTML gallery of the models, checks and failures")
    report.add_argument("--out", default="hy3d-report", help="folder for index.html and thumbs/ (default: %(default)s)")
    scope = report.add_mutually_exclusive_group()
    scope.add_argument("--prefix", default="", help="only images whose key (relative to S3_IMAGES_PREFIX) starts so")
    scope.add_argument("--backfill", default=None, help="only the images a Dagster backfill targeted (its id)")
    fetch = sub.add_parser("fetch-weights", help="download the configured Hunyuan3D weights into HY3DGEN_MODELS "
                                                    "(none with HY3D_GENERATOR=extrude) and rembg's model")
    fetch.add_argument("--no-rembg", action="store_true", help="skip the background-removal model")
    sub.add_parser("generators", help="list the installed generator backends (HY3D_GENERATOR) and whether each "
                                      "can be used here")
    args = parser.parse_args(argv)

    if args.command in ("demo", "dev", "report"):
        from hy3d_pipeline.embedded.seaweedfs import EmbeddedS3Error

        try:
            return _embedded_command(args)
        except EmbeddedS3Error as exc:  # the embedded S3 would not start, or another command runs it
            print(f"{args.command} failed: {exc}", file=sys.stderr)
            return 1
    if args.command == "upload":
        from hy3d_pipeline.upload import run_upload

        return run_upload(args.paths, args.prefix)
    if args.command == "worker":
        from hy3d_pipeline.fleet.workers import run_worker

        return run_worker(args.concurrency, args.loglevel)
    if args.command == "generate":
        import logging

        from hy3d_pipeline.core import RESULT_MESSAGE, generate_3d_from_image_core

        # the failure is in the printed result already; its log record would say it all a second time
        logging.getLogger("hy3d_pipeline").addFilter(lambda record: not getattr(record, RESULT_MESSAGE, False))
        result = generate_3d_from_image_core(args.image, texture=args.texture, output_format=args.format,
                                             output_dir=args.out)
        print(json.dumps(result, indent=2))
        return 0 if result["status"] == "success" else 1
    if args.command == "fetch-weights":
        from hy3d_pipeline.models.resources import GeneratorResource
        from hy3d_pipeline.models.weights import WeightsError, fetch_weights

        try:
            fetch_weights(GeneratorResource.from_env().settings(), rembg=not args.no_rembg)
        except WeightsError as exc:
            print(f"fetch-weights failed: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "generators":
        return list_generators()
    return 2


def _embedded_command(args) -> int:
    if args.command == "demo":
        from hy3d_pipeline.embedded.demo import run_demo

        return run_demo()
    if args.command == "dev":
        from hy3d_pipeline.embedded.dev import run_dev

        return run_dev(args.host, args.port)
    from hy3d_pipeline.report import run_report

    return run_report(args.out, prefix=args.prefix, backfill_id=args.backfill)


def list_generators(out=print) -> int:
    """`hy3d-pipeline generators`: one line per installed backend; exit 1 when the selected one is not usable."""
    from hy3d_pipeline.models.generators import registry
    from hy3d_pipeline.models.resources import GeneratorResource

    settings = GeneratorResource.from_env().settings()
    selected = settings.generator
    rows = registry.listing(settings)
    width = max([len(r["name"]) for r in rows] + [4])
    for row in rows:
        mark = "*" if row["selected"] else " "
        out(f"{mark} {row['name']:<{width}}  {row['status']}")
        out(f"  {'':<{width}}  from {row['package']}: {row['target']}")
    chosen = next((r for r in rows if r["selected"]), None)
    if chosen is None:
        out(f"HY3D_GENERATOR={selected!r} is not installed")
        return 1
    out(f"* = selected by HY3D_GENERATOR ({selected})")
    return 0 if chosen["status"] == "available" else 1


if __name__ == "__main__":
    sys.exit(main())
