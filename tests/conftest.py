"""Fixtures shared by every test folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def _kill_after_checkpoint(proc: subprocess.Popen, marker: Path, min_step: int, timeout: float = 90.0) -> int:
    """SIGKILL ``proc``'s process group once ``marker`` (a checkpoint's ``last.json``) reaches ``min_step``.

    Fails the test if the process ends first (its stderr shown when it was piped). Returns the
    step of the last checkpoint written before the kill. ``proc`` must have been started with
    ``start_new_session=True`` so that DataLoader workers die with it.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marker.exists() and json.loads(marker.read_text())["step"] >= min_step:
            break
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-3000:] if proc.stderr is not None else ""
            pytest.fail(f"the process ended (rc={proc.returncode}) before checkpoint step {min_step}: {err}")
        time.sleep(0.02)
    else:
        pytest.fail(f"no checkpoint at step >= {min_step} within {timeout} s ({marker})")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return int(json.loads(marker.read_text())["step"])


@pytest.fixture
def kill_after_checkpoint():
    """The function :func:`_kill_after_checkpoint` (kill-and-resume tests)."""
    return _kill_after_checkpoint
