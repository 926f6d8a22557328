"""The parts a reconstruction is built from, beside :mod:`geometry` (window corners) and the
initial guesses: the exit-wave store and the batch scheduler. DM (:class:`dm_iteration.DMIteration`),
ML (:class:`ml.MLIteration`) and position refinement (:class:`positions.PositionRefiner`) are
short iteration objects over the same parts.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable



class ExitWaveStore:
    """ψ of this process's views, ``(N, L, K, n, n)`` — the only full-size state of DM (no F(ψ) is
    kept: ``dm.dm_step``); ML keeps F(Φ) there between its two passes. Resident on the device, or in
    (pinned) host memory and moved batch by batch through each worker's device buffer."""

    NAMES = ("psi",)

    def __init__(self, be: Any, shape: tuple, cdtype: Any, streaming: bool) -> None:
        self.be, self.cdtype, self.streaming = be, cdtype, bool(streaming)
        self.base = self._alloc(shape)          # the allocation; ψ is its first rows (room to grow)
        self.psi = self.base

    def grow(self, n_views: int, rows: int) -> None:
        """Hold ``n_views`` views, keeping the ψ of those held now: a longer view of the allocation
        where it has room, else a new allocation of ``rows`` (≥ ``n_views``) rows with them copied."""
        if self.base.shape[0] < n_views:
            base = self._alloc((rows,) + self.shape[1:])
            base[:self.psi.shape[0]] = self.psi
            self.base = base
        self.psi = self.base[:n_views]

    def _alloc(self, shape: tuple) -> Any:
        if self.streaming:
            return self.be.pinned_empty(shape, self.cdtype)
        return self.be.empty(shape, self.cdtype)

    @property
    def shape(self) -> tuple:
        return tuple(self.psi.shape)

    def load(self, w: Any, name: str, b: slice) -> Any:
        """The batch ``b`` of ``psi``, on the device (``w``'s buffer when streamed)."""
        if not self.streaming:
            return getattr(self, name)[b]
        buf = getattr(w, name)[:b.stop - b.start]
        return self.be.to_device(getattr(self, name)[b], buf)

    def store(self, w: Any, name: str, b: slice, dev: Any) -> None:
        """Write a batch loaded with :meth:`load` back to host memory (nothing to do otherwise)."""
        if self.streaming:
            host = getattr(self, name)[b]
            self.be.to_host(dev, host)

    def resize_modes(self, K: int) -> None:
        """Room for ``K`` probe modes; the first min(K, old) are kept."""
        N, L, k_old, n, _ = self.shape
        keep = min(K, k_old)
        for name in self.NAMES:
            old = getattr(self, name)
            new = self._alloc((N, L, K, n, n))
            new[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, new)
            del old


class BatchScheduler:
    """Batches of views, split statically over worker threads (batch i on worker i mod T, so results
    are reproducible), each worker with its own buffers and accumulators."""

    def __init__(self, n_views: int, batch: int, workers: list) -> None:
        self.rebatch(n_views, batch)
        self.workers = workers
        self._pool = ThreadPoolExecutor(len(workers)) if len(workers) > 1 else None

    def rebatch(self, n_views: int, batch: int) -> None:
        """Split the views into batches of ``batch`` (the workers' buffers must hold that many)."""
        self.batches = [slice(i, min(i + batch, n_views)) for i in range(0, n_views, batch)]

    def each(self, fn: Callable[[Any, slice], None]) -> None:
        """Run ``fn(worker, batch)`` over all batches."""
        T = len(self.workers)

        def run(w: int) -> None:
            for b in self.batches[w::T]:
                fn(self.workers[w], b)
        if self._pool is None:
            for w in range(T):
                run(w)
        else:
            for f in [self._pool.submit(run, w) for w in range(T)]:
                f.result()

    def split(self, fn: Callable[[int, int], None]) -> None:
        """Run ``fn(part, parts)`` for every part, one part a worker thread (work shared by rows)."""
        T = len(self.workers)
        if self._pool is None:
            for i in range(T):
                fn(i, T)
        else:
            for f in [self._pool.submit(fn, i, T) for i in range(T)]:
                f.result()

    def sum(self, name: str, fresh: bool = False) -> Any:
        """The workers' accumulators ``name`` summed in a fixed order; ``fresh``: always a new array
        (one worker's own accumulator is copied), for a caller that overwrites it."""
        first, *rest = (getattr(w, name) for w in self.workers)
        if not rest:
            return first.copy() if fresh else first
        total = first + rest[0]             # a new array, this scheduler's own: the rest added in place
        for more in rest[1:]:
            total += more
        return total

    def reset(self, *names: str) -> None:
        for w in self.workers:
            for name in names:
                if name == "err":
                    w.err = 0.0
                else:
                    getattr(w, name)[...] = 0

    def close(self) -> None:
        """Stop the worker threads."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
