"""One fresh process, measured: shared by the benchmarks."""

import os
import subprocess
import tempfile
import time
from pathlib import Path


def run_process(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Wall time, exit code, output and peak RSS (``wait4``: that process's own) of ``argv``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return {"wall": wall, "code": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(), "stderr": err.read().decode(),
                "rss": usage.ru_maxrss * 1024}
