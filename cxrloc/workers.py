"""Worker processes that die with their parent (``prepare``'s decoding pool, ``train``'s DataLoader)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal a process receives when its parent dies."""


def exit_with_parent(parent: int, *_: object) -> None:
    """Worker initializer: make this worker process die with its parent ``parent`` (a process id).

    Used by ``prepare``'s decoding pool and ``train``'s DataLoader workers (``worker_init_fn``: the
    extra arguments, e.g. the worker id, are ignored). A ``kill -9`` of ``prepare`` would otherwise
    leave every worker blocked for ever on the task queue (each worker holds a writing end of it,
    so it never sees end-of-file). On Linux the kernel delivers SIGKILL when the parent dies
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere, and as a fallback, a daemon thread polls the
    parent's process id once a second.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    first_parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != first_parent or not alive(parent):
                os._exit(1)

    threading.Thread(target=watch, name="cxrloc-parent-watchdog", daemon=True).start()
    if not alive(parent):  # the parent died before the watch started
        os._exit(1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
