"""A bench-only generator backend: the extrude backend behind a simulated accelerator.

On a GPU worker most of an image's generation time is the GPU's: the worker's CPU waits on it (a CUDA sync
releases the GIL) and the workers of a fleet do not share it. On a CPU-only bench machine every worker's
generation runs on the same few cores, so adding a worker measures the cores, not the engine. This backend holds
each image for `HY3D_BENCH_DEVICE_SECONDS` with the CPU idle (a sleep, standing for the accelerator's share) and
then does the extrude backend's real CPU work, so `bench/fleet.py --device-seconds S` can show how the engines
scale when each worker owns its compute. It is declared only by the dist-info `bench/fleet.py` writes into its
temporary folder; the product never sees it.
"""

from __future__ import annotations

import os
import time

from hy3d_pipeline.models.generators.base import GenerationSettings
from hy3d_pipeline.models.generators.extrude import ExtrudeGenerator

NAME = "simulated-device"


class SimulatedDeviceGenerator(ExtrudeGenerator):
    name = NAME

    def generate(self, image, *, seed: int):
        time.sleep(float(os.environ.get("HY3D_BENCH_DEVICE_SECONDS", "0")))  # the accelerator's share, CPU idle
        return super().generate(image, seed=seed)


def build(settings: GenerationSettings) -> SimulatedDeviceGenerator:
    return SimulatedDeviceGenerator(settings)


GENERATOR = SimulatedDeviceGenerator


def declare(folder) -> list[str]:
    """Write a dist-info under `folder` that declares this backend, and return the path entries (folder, bench/)
    a process needs to find it."""
    from pathlib import Path

    info = Path(folder) / "hy3d_bench_simulated_device-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hy3d-bench-simulated-device\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f'[hy3d_pipeline.generators]\n{NAME} = simulated_device:build\n')
    return [str(folder), str(Path(__file__).resolve().parent)]
