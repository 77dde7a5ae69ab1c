"""One run per output directory: `<output_dir>/.lock`, held for the run's lifetime.

A second run into the same directory would resume the first one's checkpoints and write over its files. The
lock is an flock on the file (the kernel drops it when the holder dies, however it dies), and the file names
the holder (host and pid) for the message a second run stops with. A file still naming a holder although
nobody holds the flock was left by a killed run: taken over with a warning.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("mmdit.train")


class RunLocked(RuntimeError):
    """Another live run holds the output directory."""


class RunLock:
    def __init__(self, directory: str | Path, what: str = "train.output_dir"):
        self.path, self.what, self.fd = Path(directory) / ".lock", what, None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"{self.what}={self.path.parent} is in use by a running training ({holder}; lock "
                            f"{self.path}); accepted: another {self.what}, or wait for that run to end") from None
        left = os.read(fd, 200).decode(errors="replace").strip()
        if left:
            log.warning(f"{self.what}: took over the lock of {left}, which is no longer running (killed?)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean end leaves nobody named
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
