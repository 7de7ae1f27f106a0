"""Kill a running process once it has saved its first checkpoint (for the kill-then-resume tests)."""

import os
import signal
import time


def has_checkpoint(ckdir: str) -> bool:
    """Whether the Orbax checkpoint directory ``ckdir`` holds a step (a folder named by its number)."""
    return os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir))


def kill_at_first_checkpoint(proc, ckdir: str, timeout: float, settle: float = 0.0, poll: float = 0.05) -> None:
    """SIGKILL ``proc`` once ``ckdir`` holds a step (``settle`` seconds later), or after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline and not has_checkpoint(ckdir):
        time.sleep(poll)
    time.sleep(settle)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
