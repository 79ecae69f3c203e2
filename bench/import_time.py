"""`import hy3d_pipeline` and its `defs`, against `python -c pass`; also checks no heavy library is imported.

    python3 bench/import_time.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "hy3dgen", "diffusers", "transformers")
PROBE = ("import sys, hy3d_pipeline; hy3d_pipeline.defs.resolve_asset_graph(); "
         "print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,))


def timed(code: str, n: int = 7) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(n):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        times.append(time.perf_counter() - t)
    return statistics.median(times), out.strip()


def main() -> None:
    base, _ = timed("pass")
    ours, heavy = timed(PROBE)
    print(f"python -c pass: {base:.3f} s; import hy3d_pipeline + defs: {ours:.3f} s "
          f"(+{ours - base:.3f} s); heavy modules imported: {heavy or 'none'}")
    print(f"ratio = {ours / base:.1f}x; target: <= 1.5 s -> {'met' if ours <= 1.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
