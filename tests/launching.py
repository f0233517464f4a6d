"""Multi-process launches for the tests: each runs in its own process group with a timeout, so a deadlock fails the
test (and kills every rank) instead of hanging CI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 300  # a healthy launch takes 10-30 s here; a deadlock never ends


def launch(command: list[str], cwd: Path, timeout_s: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a new session with one torch thread and no ``MASTER_PORT`` (each launcher picks a free
    one); on timeout kill every process of it (all ranks) and fail. ``stdout`` holds stdout and stderr together."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(
                f"{' '.join(command)} did not finish in {timeout_s} s (deadlock?); last output:\n{output[-3000:]}"
            )
    return subprocess.CompletedProcess(command, proc.returncode, output, "")


def torchrun(*args: str) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS...``: two ranks on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
