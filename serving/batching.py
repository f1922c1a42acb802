"""Adaptive batching for the image routes: one inference thread that takes every request waiting.

Written here rather than taken from BentoML because BentoML's dispatcher starts the next model
call from the event loop, which a CPU-bound server keeps busy: onnxruntime sat idle a median 9.4 ms
per 8.7 ms call (docs/decisions.md, "Our own batching thread"). Here the inference thread starts
the next call the moment the last one returns, with everything that queued meanwhile (up to
`max_batch` images): batches grow with load and a lone request runs at once.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class Overloaded(RuntimeError):
    """The request waited longer than the latency bound before the model could take it."""


@dataclass
class _Job:
    pixels: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float


class BatchWorker:
    """`await worker(pixels)` → that request's rows of `predict(concatenated pixels)` (of each array
    when predict returns a tuple).

    `lone_predict`, when given, answers a call that holds the only request in the queue while
    `quiet()` says no other request is being served: a model call that may use the whole machine
    (the service gives it a session whose threads busy-wait during the call) because nothing else
    wants the cores."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], *, max_batch: int, max_wait_s: float,
                 on_call: Callable[[int], None] | None = None,
                 lone_predict: Callable[[np.ndarray], np.ndarray] | None = None,
                 quiet: Callable[[], bool] = lambda: True) -> None:
        self._predict, self._on_call = predict, on_call
        self._lone_predict, self._quiet = lone_predict, quiet
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="tlserve-inference", daemon=True)
        self._thread.start()

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        job = _Job(pixels, loop.create_future(), loop, time.monotonic())
        with self._wake:
            if self._closed:
                raise Overloaded("the server is shutting down")
            self._jobs.append(job)
            self._wake.notify()
        return await job.future

    def close(self, timeout: float = 10.0) -> None:
        """Finish the call in progress, refuse what is still queued, stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    def _take(self) -> list[_Job]:
        """Block until work is queued; then everything waiting, up to max_batch images (one job
        larger than that still runs, alone). Empty once closed."""
        with self._wake:
            while not self._jobs and not self._closed:
                self._wake.wait()
            if self._closed:
                jobs = list(self._jobs)
                self._jobs.clear()
                _settle(jobs, [Overloaded("the server is shutting down")] * len(jobs))
                return []
            taken, images = [], 0
            while self._jobs and (not taken or images + len(self._jobs[0].pixels) <= self.max_batch):
                taken.append(self._jobs.popleft())
                images += len(taken[-1].pixels)
            return taken

    def _serve(self) -> None:
        while taken := self._take():
            jobs, late, now = [], [], time.monotonic()
            for job in taken:
                if now - job.queued_at > self.max_wait_s:
                    late.append(job)
                elif not job.future.cancelled():
                    jobs.append(job)
            _settle(late, [Overloaded("the server is overloaded; retry shortly")] * len(late))
            if not jobs:
                continue
            predict = self._predict
            if self._lone_predict is not None and len(jobs) == 1 and not self._jobs and self._quiet():
                predict = self._lone_predict
            try:
                answers: list = _split(predict(np.concatenate([job.pixels for job in jobs])),
                                       np.cumsum([len(job.pixels) for job in jobs])[:-1])
            except Exception as exc:  # noqa: BLE001 (handed to the callers, whose handlers report it)
                answers = [exc] * len(jobs)
            if self._on_call is not None:
                self._on_call(len(jobs))
            _settle(jobs, answers)


def _split(outputs, at: np.ndarray) -> list:
    """Each job's rows of the call's output: one array, or a tuple of them (probabilities and the OOD
    score, None when the model has none) split alike."""
    if not isinstance(outputs, tuple):
        return np.split(outputs, at)
    parts = [np.split(o, at) if o is not None else [None] * (len(at) + 1) for o in outputs]
    return list(zip(*parts))


def _settle(jobs: list[_Job], answers: list) -> None:
    """Hand answers back on each job's event loop: one wake-up per loop, not one per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, answer in zip(jobs, answers):
        by_loop.setdefault(job.loop, []).append((job.future, answer))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, pairs)
        except RuntimeError:  # that loop has closed; nobody is waiting
            pass


def _resolve(pairs: list[tuple[asyncio.Future, object]]) -> None:
    for future, answer in pairs:
        if future.done():  # the client went away and its handler was cancelled
            continue
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)
