"""What every command's orchestration shares (synth, segment, explain, eval): the progress protocol the CLI's
progress bars follow, and :class:`InOrder`, the background worker that encodes ``synth``'s support images (paper 3.2)
and writes ``segment``'s outputs (paper 3.4) while the device works on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from ..timing import Timings


class Progress(Protocol):
    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...


class _Silent:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


class InOrder:
    """Jobs run on one worker thread, or in line (``background=False``), and handed back in submission order, each
    with a tag; ``timings[phase]`` gets the time the calling thread spends waiting for them (and running them, in
    line). Used to encode support images and to write segment's outputs while the device works on. Use it as a
    context manager: leaving it waits for the worker."""

    def __init__(self, timings: Timings, phase: str, background: bool = True) -> None:
        self.timings, self.phase = timings, phase
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"ovdiff-{phase}") if background else None
        self._pending: deque[tuple[object, Future]] = deque()

    def __enter__(self) -> InOrder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def submit(self, tag: object, fn: Callable, *args: object) -> None:
        if self._pool is not None:
            future = self._pool.submit(fn, *args)
        else:
            future = Future()
            with self.timings(self.phase):
                try:
                    future.set_result(fn(*args))
                except Exception as exc:  # handed back like a worker's error, in order
                    future.set_exception(exc)
        self._pending.append((tag, future))

    def finished(self, keep: int = 0, wait: bool = True) -> Iterator[tuple[object, Future]]:
        """(tag, done future), oldest first, until at most ``keep`` jobs are pending; ``wait=False``: only those
        already done."""
        while len(self._pending) > keep and (wait or self._pending[0][1].done()):
            tag, future = self._pending.popleft()
            with self.timings(self.phase):
                future.exception()  # waits
            yield tag, future
