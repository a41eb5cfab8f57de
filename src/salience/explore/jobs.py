"""Jobs and the worker that runs them: one thread per model, one computation at a time.

A :class:`Job` is submitted to a model's :class:`Worker`; it waits in the worker's queue (its
position is known), runs, and ends ``done`` (with a result), ``error`` (with a message) or
``cancelled``. The computation reports progress and checks for cancellation through the
:class:`Ticker` it is given: :meth:`Ticker.tick` raises :class:`Cancelled` once the job is
cancelled, so a long computation stops at its next forward pass. The queue is bounded
(:class:`QueueFull` past ``max_queue``), so a flood of requests cannot grow memory without end.
"""
from __future__ import annotations

import collections
import contextvars
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["Job", "Worker", "Ticker", "Cancelled", "QueueFull", "Refused", "STATES"]

STATES = ("queued", "running", "done", "error", "cancelled")


class Cancelled(Exception):
    """Raised inside a computation whose job was cancelled."""


class QueueFull(Exception):
    """The worker's queue holds ``max_queue`` jobs already."""


class Refused(Exception):
    """Raised by a computation that cannot go on for a reason with an HTTP status of its own (404:
    the image is gone from storage; 502: the storage does not answer): the job ends in ``error``
    with this message and ``status_code``, not as an internal error."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = int(status_code)


class Ticker:
    """What a computation sees of its job: ``tick(n)`` adds ``n`` units of work done (and raises
    :class:`Cancelled` if the job was cancelled); ``total`` is the work expected (0: unknown)."""

    def __init__(self, job: "Job") -> None:
        self._job = job

    @property
    def total(self) -> int:
        return self._job.total

    @total.setter
    def total(self, value: int) -> None:
        self._job.total = max(0, int(value))

    @property
    def note(self) -> str:
        return self._job.note

    @note.setter
    def note(self, value: str) -> None:
        """Why the progress is not a fraction (``total`` unknown), shown with the images done."""
        self._job.note = str(value)

    def tick(self, n: int = 1) -> None:
        if self._job.cancel_requested.is_set():
            raise Cancelled()
        self._job.done_units += int(n)


_ids = itertools.count(1)


@dataclass
class Job:
    """One computation: ``run(ticker) -> result``; its state, progress, result or error."""

    kind: str
    run: Callable[[Ticker], Any]
    meta: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: f"j{next(_ids)}")
    state: str = "queued"
    total: int = 0
    done_units: int = 0
    note: str = ""
    result: Any = None
    error: Optional[str] = None
    status_code: int = 400
    holders: int = 1  # the requests waiting for it (the same request again joins the job): cancelled when none is left
    created: float = field(default_factory=time.monotonic)
    finished: Optional[float] = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    def progress(self) -> Optional[float]:
        """Fraction done in ``[0, 1]``, or ``None`` when the amount of work is unknown."""
        if self.state == "done":
            return 1.0
        return min(0.99, self.done_units / self.total) if self.total else None

    def finish(self, state: str, result: Any = None, error: Optional[str] = None) -> None:
        """End the job. Its computation is let go: the server keeps ended jobs for polling, and what
        ``run`` holds (the decoded image, the model's input) must not stay in memory with them."""
        self.state, self.result, self.error = state, result, error
        self.run = _ended
        self.finished = time.monotonic()
        self.ended.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the job has ended (or ``timeout`` seconds); whether it has."""
        return self.ended.wait(timeout)


def _ended(ticker: Ticker) -> Any:
    raise RuntimeError("this job has ended; submit a new one")


class Worker:
    """A thread that runs one model's jobs one at a time, in the order submitted.

    ``errors``: exception types whose message is the user's fault (a 4xx): they end the job in
    ``error`` with that message (400; :class:`Refused` with its own status); any other exception
    ends it in ``error`` as an internal error (500). ``max_queue`` jobs may wait at most.
    """

    def __init__(self, name: str, *, max_queue: int = 256, errors: tuple[type, ...] = ()) -> None:
        self.name = name
        self.max_queue = max_queue
        self.errors = errors
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self.current: Optional[Job] = None
        # the jobs run in the context the worker was made in: salience.performance(...) (the command's
        # --memory-format / --compile / --precision) holds in the worker's thread as where it was set
        self._context = contextvars.copy_context()
        self._thread = threading.Thread(target=self._loop, name=f"salience-explore-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stop:
                raise QueueFull(f"the worker of {self.name} has stopped")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} computations are waiting for {self.name}; try again later")
            self._queue.append(job)
            self._cond.notify()
        return job

    def position(self, job: Job) -> Optional[int]:
        """1 for the next job to run, 2 for the one after ...; ``None`` when not waiting."""
        with self._cond:
            for i, j in enumerate(self._queue):
                if j is job:
                    return i + 1
        return None

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: a waiting job leaves the queue at once; a running one stops at its next tick."""
        job.cancel_requested.set()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job.finish("cancelled")

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything and end the thread (waiting at most ``timeout`` seconds for it)."""
        self.halt()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the thread still runs (after :meth:`stop`: inside a forward pass that did not end in time)."""
        return self._thread.is_alive()

    def halt(self) -> None:
        """Cancel everything and tell the thread to end, without waiting for it."""
        with self._cond:
            self._stop = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.finish("cancelled")
        if self.current is not None:
            self.current.cancel_requested.set()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._queue.popleft()
                self.current = job
                job.state = "running"
            try:
                self._context.run(self._run, job)
            finally:
                self.current = None

    def _run(self, job: Job) -> None:
        try:
            result = job.run(Ticker(job))
        except Cancelled:
            job.finish("cancelled")
        except Refused as e:
            job.status_code = e.status_code
            job.finish("error", error=str(e))
        except self.errors as e:
            job.finish("error", error=str(e))
        except MemoryError:
            job.status_code = 507
            job.finish("error", error="out of memory; use a smaller image or fewer samples / steps")
        except Exception as e:  # noqa: BLE001 - the server keeps running; the job says what happened
            job.status_code = 500
            first = (str(e).strip().splitlines() or [""])[0]
            job.finish("error", error=f"unexpected {type(e).__name__}: {first}")
        else:
            if job.cancel_requested.is_set():
                job.finish("cancelled")
            else:
                job.finish("done", result=result)
