"""The image routes' batching worker, driven directly from asyncio (the server tests cover it over HTTP)."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import BatchWorker, Overloaded

pytestmark = pytest.mark.fast  # the fast tier: pytest -m 'not slow'


class SlowModel:
    """Row sums, after a pause long enough for other requests to queue; remembers each call's batch size."""

    def __init__(self, pause: float = 0.02, fail_first: bool = False):
        self.pause, self.fail_first, self.calls = pause, fail_first, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.pause)
        self.calls.append(len(batch))
        if self.fail_first and len(self.calls) == 1:
            raise ValueError("model failed")
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)


def _requests(sizes: list[int]) -> list[np.ndarray]:
    return [np.full((n, 2), float(i)) for i, n in enumerate(sizes)]


async def _gather(worker: BatchWorker, requests: list[np.ndarray]) -> list:
    return await asyncio.gather(*(worker(r) for r in requests), return_exceptions=True)


def test_each_caller_gets_its_own_rows_and_waiting_requests_share_a_call():
    model, calls_seen = SlowModel(), []
    worker = BatchWorker(model, max_batch=8, max_wait_s=5, on_call=calls_seen.append)
    requests = _requests([1, 2, 1, 3, 1, 1, 2, 1])
    try:
        answers = asyncio.run(_gather(worker, requests))
    finally:
        worker.close()
    for request, answer in zip(requests, answers):
        np.testing.assert_array_equal(answer, request.sum(axis=1, keepdims=True))
    assert sum(model.calls) == 12 and len(model.calls) < len(requests)  # the first call runs alone, the rest batch
    assert max(model.calls) <= 8 and sum(calls_seen) == len(requests)


def test_a_request_larger_than_the_batch_runs_alone():
    model = SlowModel(pause=0)
    worker = BatchWorker(model, max_batch=4, max_wait_s=5)
    try:
        (answer,) = asyncio.run(_gather(worker, [np.ones((6, 2))]))
    finally:
        worker.close()
    assert model.calls == [6] and answer.shape == (6, 1)


def test_a_failed_call_fails_only_its_callers_and_the_worker_goes_on():
    model = SlowModel(fail_first=True)
    worker = BatchWorker(model, max_batch=8, max_wait_s=5)
    try:
        first = asyncio.run(_gather(worker, _requests([1])))
        second = asyncio.run(_gather(worker, _requests([1, 1])))
    finally:
        worker.close()
    assert isinstance(first[0], ValueError)
    assert [a.tolist() for a in second] == [[[0.0]], [[2.0]]]


def test_requests_that_waited_past_the_bound_are_refused_not_run():
    gate = threading.Event()

    def blocked(batch: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return batch[:, :1]

    worker = BatchWorker(blocked, max_batch=1, max_wait_s=0.05)

    async def scenario() -> list:
        tasks = [asyncio.create_task(worker(r)) for r in _requests([1, 1, 1])]
        await asyncio.sleep(0.2)  # the first call holds the model; the other two outwait the bound
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        first, *late = asyncio.run(scenario())
    finally:
        worker.close()
    assert first.tolist() == [[0.0]]
    assert all(isinstance(a, Overloaded) for a in late)


def test_closing_refuses_queued_and_new_requests():
    gate = threading.Event()
    worker = BatchWorker(lambda b: (gate.wait(5), b)[1], max_batch=1, max_wait_s=5)

    async def scenario() -> list:
        tasks = [asyncio.create_task(worker(r)) for r in _requests([1, 1])]
        await asyncio.sleep(0.05)
        closing = threading.Thread(target=worker.close)
        closing.start()
        await asyncio.sleep(0.05)
        gate.set()
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        closing.join()
        return answers

    running, queued = asyncio.run(scenario())
    assert running.shape == (1, 2) and isinstance(queued, Overloaded)
    with pytest.raises(Overloaded):
        asyncio.run(worker(np.ones((1, 2))))


def test_a_lone_request_on_a_quiet_server_goes_to_the_lone_model():
    """The lone model answers only a call holding the one request in flight; batches and busy
    times stay on the main model."""
    model, lone, busy = SlowModel(), SlowModel(), threading.Event()
    worker = BatchWorker(model, max_batch=8, max_wait_s=5, lone_predict=lone, quiet=lambda: not busy.is_set())

    async def scenario():
        first = await worker(np.ones((1, 2)))  # nothing else queued or in flight
        batch = await _gather(worker, _requests([1, 1, 1, 1]))  # at least three wait together
        busy.set()  # another request is being served (decoded, say), so even a lone call is not alone
        third = await worker(np.ones((1, 2)))
        return first, batch, third

    try:
        first, batch, third = asyncio.run(scenario())
    finally:
        worker.close()
    np.testing.assert_array_equal(first, [[2.0]])
    np.testing.assert_array_equal(third, [[2.0]])
    for i, answer in enumerate(batch):
        np.testing.assert_array_equal(answer, [[2.0 * i]])
    assert lone.calls[0] == 1 and set(lone.calls) == {1}
    assert max(model.calls[:-1]) >= 3  # the requests that queued together
    assert model.calls[-1] == 1 and len(lone.calls) + sum(model.calls) == 6  # the request while busy
