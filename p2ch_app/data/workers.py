"""Process pools whose workers leave Ctrl-C to the parent.

A terminal sends Ctrl-C (SIGINT) to every process of the command. Left to themselves, pool workers
would each print a KeyboardInterrupt traceback; here only the parent hears it, stops the workers
and reports the interruption in one line.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from multiprocessing import get_context
from multiprocessing.pool import Pool
from typing import Iterator


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def worker_pool(processes: int) -> Iterator[Pool]:
    """A spawn pool of `processes` workers that ignore SIGINT, terminated (not drained) on leaving,
    so an error or Ctrl-C in the parent stops them at once.

    The workers are started while the parent ignores SIGINT: spawned processes inherit that from
    birth, before they import anything, where an initializer would come too late. (A Ctrl-C in the
    few milliseconds of starting them is lost.) The initializer covers workers the pool replaces.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        pool = get_context("spawn").Pool(processes, initializer=_ignore_interrupts)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    with pool:
        yield pool
