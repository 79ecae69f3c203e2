"""`hy3d-pipeline upload PATH... [--prefix P]`: local images into the images bucket, where the sensor finds them.

The bucket is the configured one (S3_IMAGES_BUCKET, S3_ENDPOINT_URL and the rest, as for the pipeline) or, with
none configured, the embedded S3 of the `hy3d-pipeline dev` running from this folder (found through its HY3D_HOME,
default `./.hy3d`), so putting a folder of photos in needs no keys exported and no endpoint typed.

Each file is checked as the pipeline will check it (by content, see `images.validation`) before it is sent: a
non-image is named and skipped instead of failing later as a run, and so is an image the sensor would never pick
up because its name has no image extension. Folders are walked (hidden entries left out) and their files sent
several at a time.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_WORKERS = 8


@dataclass
class Item:
    path: Path
    shown: str  # the path as the user knows it, for messages
    relative_key: str  # under S3_IMAGES_PREFIX


def _key_prefix(prefix: str) -> str:
    prefix = prefix.strip().strip("/")
    return prefix + "/" if prefix else ""


def collect_items(paths: list[str], prefix: str = "") -> tuple[list[Item], list[str]]:
    """What to send, and a message for each path that cannot be (missing, a duplicate key). A file goes under
    its own name; a folder's files keep their path below the folder's parent (`upload shoes` -> `shoes/...`),
    so two folders never overwrite each other's files."""
    base = _key_prefix(prefix)
    items: list[Item] = []
    problems: list[str] = []
    seen: dict[str, str] = {}

    def add(path: Path, shown: str, relative: str) -> None:
        key = base + relative
        if key in seen:
            problems.append(f"skipped {shown}: {seen[key]} goes to the same key {key!r}; upload one of them with "
                            "another --prefix")
            return
        seen[key] = shown
        items.append(Item(path, shown, key))

    for given in paths:
        path = Path(given)
        if path.is_file():
            add(path, given, path.name)
        elif path.is_dir():
            top = path.resolve().name
            found = False
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    found = True
                    file = Path(folder) / name
                    relative = file.relative_to(path).as_posix()
                    add(file, str(file), f"{top}/{relative}" if top else relative)
            if not found:
                problems.append(f"skipped {given}: the folder has no files")
        elif path.exists():
            problems.append(f"skipped {given}: not a regular file or folder")
        else:
            problems.append(f"skipped {given}: no such file or folder")
    return items, problems


def check_image(item: Item) -> tuple[str | None, str | None]:
    """(Content-Type, None) for an image the pipeline will accept and the sensor will pick up, else
    (None, why not)."""
    from hy3d_pipeline.images.formats import CONTENT_TYPES, IMAGE_EXTENSIONS, has_image_extension
    from hy3d_pipeline.images.validation import ImageRejected, verify_image

    try:
        fmt = verify_image(item.path, item.shown)["format"]
    except ImageRejected as exc:
        return None, f"skipped {exc}"
    except OSError as exc:
        return None, f"skipped {item.shown}: cannot be read ({exc.strerror or exc})"
    if not has_image_extension(item.relative_key):
        return None, (f"skipped {item.shown}: a {fmt} image, but the sensor only picks up names ending in "
                      f"{' '.join(IMAGE_EXTENSIONS)} (any case); rename it, e.g. to {item.path.name}."
                      f"{'jpg' if fmt == 'JPEG' else fmt.lower()}")
    return CONTENT_TYPES[fmt], None


def _target():
    """(storage, whether it is a running dev's embedded S3, where it is) for the configured S3, else the running
    dev's embedded S3; (None, False, why not) when there is neither."""
    from hy3d_pipeline.embedded import setup
    from hy3d_pipeline.storage.resources import NO_BUCKET, ImageStorage

    if setup.s3_configured():
        storage = ImageStorage.from_env()
        if not storage.images_bucket:
            return None, False, NO_BUCKET
        return storage, False, storage.endpoint_url or "AWS S3"
    running = setup.use_running_s3()
    if running is None:
        return None, False, (
            f"no S3 is configured (S3_IMAGES_BUCKET / S3_ENDPOINT_URL) and no `hy3d-pipeline dev` is running with "
            f"its embedded S3 in {setup.hy3d_home()}: start `hy3d-pipeline dev` in this folder and run upload from "
            "the same folder (or set HY3D_HOME to that dev's .hy3d folder), or configure S3")
    return ImageStorage.from_env(), True, f"the running dev's embedded S3 at {running.endpoint_url}"


def _send(storage, item: Item, content_type: str, key: str) -> None:
    """One file, through the pipeline's own store (any ObjectStore, not only S3). Read whole: photos are a few
    MB and `_WORKERS` of them are in flight at most."""
    from hy3d_pipeline.storage.base import StorageError

    data = item.path.read_bytes()
    try:
        storage.upload(storage.images_bucket, key, data, content_type=content_type)
    except StorageError as exc:
        if exc.code in ("AccessDenied", "403", "Forbidden"):  # the store's message is about reading
            raise StorageError(f"access denied writing s3://{storage.images_bucket}/{key}: the credentials need "
                               "s3:PutObject on that bucket", code=exc.code) from exc
        raise


def run_upload(paths: list[str], prefix: str = "") -> int:
    """The command. 0 when at least one image was sent and nothing failed; skipped non-images are not failures.
    Messages go to stdout; the bar (on a terminal) to stderr, with the per-file lines left out under it."""
    from hy3d_pipeline.progress import Bar, on_terminal
    from hy3d_pipeline.storage.base import StorageError

    storage, embedded, where = _target()
    if storage is None:
        print(f"upload failed: {where}", flush=True)
        return 1
    items, problems = collect_items(paths, prefix)
    for line in problems:
        print(line, flush=True)
    terminal = on_terminal()
    bar = Bar(len(items), "uploading", unit="file")

    def one(item: Item) -> str:
        content_type, why = check_image(item)
        key = storage.image_key(item.relative_key)
        if why:
            bar.advance()
            bar.write(why)
            return "skipped"
        try:
            _send(storage, item, content_type, key)
        except (StorageError, OSError) as exc:
            bar.advance()
            bar.write(f"FAILED {item.shown}: {exc}")
            return "failed"
        bar.advance()
        if not terminal:
            bar.write(f"uploaded {item.shown} -> s3://{storage.images_bucket}/{key}")
        return "sent"

    with bar, ThreadPoolExecutor(_WORKERS) as pool:
        outcomes = list(pool.map(one, items))
    sent, failed = outcomes.count("sent"), outcomes.count("failed")
    summary = (f"{sent} image(s) uploaded to s3://{storage.images_bucket}/{storage.image_key(_key_prefix(prefix))} "
               f"on {where}; {outcomes.count('skipped') + len(problems)} skipped")
    print(summary + (f", {failed} failed" if failed else ""), flush=True)
    if sent and embedded:
        print("the running dev's sensor picks them up on its next tick", flush=True)
    return 0 if sent and not failed else 1
