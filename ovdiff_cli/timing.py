"""Wall-time accounting per pipeline phase, for ``--verbose``/``--json`` summaries and ``make bench``."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Timings:
    """Seconds spent per named phase, summed over calls.

    On CUDA, pass ``sync=torch.cuda.synchronize``: kernels run asynchronously, so without a sync a phase's
    time would land in whichever later phase first waits for the GPU.
    """

    def __init__(self, sync=None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = sync

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self._sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.seconds[phase] += time.perf_counter() - t0

    def fractions(self, wall: float) -> dict[str, float]:
        """Each phase's share of ``wall`` seconds, plus ``other`` for the rest (rounded to 3 places)."""
        out = {k: round(v / wall, 3) for k, v in sorted(self.seconds.items())} if wall > 0 else {}
        if wall > 0:
            out["other"] = round(max(0.0, 1 - sum(self.seconds.values()) / wall), 3)
        return out
