"""Ending the child processes the tools start: brokers, virtual boards."""

from __future__ import annotations

import signal
import subprocess


def end_process(process: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    """Signal a child and wait for it; kill it if it has not ended in 10 s."""
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
