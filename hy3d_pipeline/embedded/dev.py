"""`hy3d-pipeline dev`: the embedded default plus the Dagster UI and daemon on 127.0.0.1, and a warm generation
worker of its own (the same Celery worker a fleet runs, on a broker folder under HY3D_HOME) unless HY3D_BROKER_URL
names a fleet's broker: then runs wait for `hy3d-pipeline worker` processes, which may run anywhere.

`dagster dev` started from a non-interactive shell ignores SIGINT and SIGTERM, so it is launched with SIGINT's
default handler restored and in its own session; on exit we signal it by pid, then stop SeaweedFS.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys

from hy3d_pipeline.embedded import setup
from hy3d_pipeline.settings import current


def _restore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# flushed: the endpoint and upload lines must reach a log file (or a test reading it) while dev runs
_say = functools.partial(print, flush=True)


def run_dev(host: str = "127.0.0.1", port: int = 3000, out=_say) -> int:
    with contextlib.ExitStack() as stack:
        home = setup.enter_embedded_default(stack, out, drop_in=True)
        out(f"Dagster UI: http://{host}:{port}  (DAGSTER_HOME={home}); Ctrl-C stops everything")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-m", "hy3d_pipeline", "-h", host, "-p", str(port)],
            preexec_fn=_restore_sigint, start_new_session=True,
        )
        stack.callback(stop_process, proc)
        children = [proc]
        if not current().broker_url:
            log = open(home.parent / "worker.log", "ab")
            worker = subprocess.Popen([sys.executable, "-m", "hy3d_pipeline.cli", "worker", "--concurrency", "1"],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            stack.callback(stop_process, worker, 30.0)
            children.append(worker)
            out(f"generation worker started (pid {worker.pid}, log {home.parent / 'worker.log'}); it keeps the "
                "model warm across runs")
        else:
            out("HY3D_BROKER_URL is set: runs wait for `hy3d-pipeline worker` processes on queue "
                f"{current().worker_queue}")
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        escalation = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]

        def _forward(signum, _frame):
            # only signal here: waiting inside a handler that interrupted proc.wait() deadlocks on Popen's lock.
            # Each further Ctrl-C escalates, for a child that does not stop.
            sig = escalation.pop(0) if len(escalation) > 1 else escalation[0]
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, sig) if sig == signal.SIGKILL else child.send_signal(sig)

        for s in previous:
            signal.signal(s, _forward)
        try:
            return proc.wait() or 0
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
