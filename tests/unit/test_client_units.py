"""relayq.client's pure parts: message ids, lanes, backoff waits, handles, options, JSON."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import gc
import json
import random
import threading
import time
import uuid
from datetime import UTC, date, datetime
from datetime import time as clock
from decimal import Decimal
from typing import Any

import grpc
import orjson
import pytest

from relayq.client import InvalidOption, Producer, jsontext
from relayq.client.handles import Handle
from relayq.client.ids import MessageIds
from relayq.client.lanes import Item, Lanes, Offer
from relayq.client.retry import Retryable, retry_after, waits
from relayq.rpc import to_status


def test_message_ids_are_uuidv7_unique_and_sorted_in_the_order_made() -> None:
    ids = MessageIds()
    made = [ids.new() for _ in range(20_000)]  # many per millisecond
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    parsed = uuid.UUID(made[0])
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    millis = int(made[-1].replace("-", "")[:12], 16)
    assert abs(millis - time.time() * 1000) < 60_000


def test_waits_grow_with_full_jitter_and_never_undercut_retry_info() -> None:
    gen = waits(0.1, 2.0, random.Random(7))
    gen.send(None)  # as the engine primes it
    plain = Retryable(grpc.StatusCode.UNAVAILABLE, "down", None)
    seen = [gen.send(plain) for _ in range(12)]
    assert all(0.1 <= w <= 2.0 for w in seen)
    assert max(seen[:2]) <= 0.2  # the first ceilings are 0.1 and 0.2
    limited = Retryable(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", 1.5)
    assert all(gen.send(limited) >= 1.5 for _ in range(20))


def test_retry_info_is_read_from_the_status_details() -> None:
    status = to_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit", (), 0.25)
    error = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                 grpc.aio.Metadata(*status.trailing_metadata),
                                 details="over the limit")
    assert retry_after(error) == pytest.approx(0.25)
    bare = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                grpc.aio.Metadata())
    assert retry_after(bare) is None


def item(message_id: str, size: int = 10, at: float = 0.0) -> Item:
    return Item(b"x" * size, message_id, "user", None, at)


def test_a_lane_wakes_its_worker_only_when_it_must() -> None:
    lanes = Lanes(2, batch_events=3, batch_bytes=1000, buffer_events=100, buffer_bytes=10_000)
    assert lanes.offer(0, item("a")) is Offer.WAKE  # the worker was idle
    assert lanes.offer(0, item("b")) is Offer.ADDED
    assert lanes.next_batch(0, now=0.0, linger=1.0, force=False) == 1.0  # lingers
    assert lanes.offer(0, item("c")) is Offer.WAKE  # the batch just filled
    batch = lanes.next_batch(0, now=0.0, linger=1.0, force=False)
    assert isinstance(batch, list)
    assert [i.message_id for i in batch] == ["a", "b", "c"]
    assert lanes.next_batch(0, now=0.0, linger=1.0, force=False) is None  # idle again
    assert lanes.offer(0, item("d")) is Offer.WAKE


def test_a_batch_stops_at_its_limits_and_before_a_repeated_message_id() -> None:
    lanes = Lanes(1, batch_events=10, batch_bytes=100, buffer_events=100, buffer_bytes=10_000)
    for message_id in ("a", "b", "a", "c"):
        lanes.offer(0, item(message_id))
    first = lanes.next_batch(0, now=9.0, linger=1.0, force=False)
    assert isinstance(first, list)
    assert [i.message_id for i in first] == ["a", "b"]
    for n in range(5):
        lanes.offer(0, item(f"big{n}", size=40))
    second = lanes.next_batch(0, now=9.0, linger=1.0, force=True)
    assert isinstance(second, list)
    assert [i.message_id for i in second] == ["a", "c", "big0", "big1"]  # 100 bytes at most


def test_the_buffer_counts_events_until_they_are_answered() -> None:
    lanes = Lanes(1, batch_events=2, batch_bytes=100, buffer_events=2, buffer_bytes=1000)
    assert lanes.offer(0, item("a")) is not Offer.FULL
    assert lanes.offer(0, item("b")) is not Offer.FULL
    assert lanes.offer(0, item("c")) is Offer.FULL
    marks = lanes.marks()
    batch = lanes.next_batch(0, now=0.0, linger=0.0, force=False)
    assert isinstance(batch, list)
    assert lanes.offer(0, item("c")) is Offer.FULL  # in flight still counts
    assert not lanes.reached(marks)
    lanes.resolved(0, batch)
    assert lanes.reached(marks)
    assert lanes.offer(0, item("c")) is not Offer.FULL


def test_one_user_always_takes_the_same_lane() -> None:
    lanes = Lanes(8, batch_events=1, batch_bytes=100, buffer_events=10, buffer_bytes=1000)
    assert len({lanes.lane_of("alice") for _ in range(100)}) == 1
    assert len({lanes.lane_of(f"user-{n}") for n in range(1000)}) == 8


def test_a_pending_handle_is_one_object_for_the_collector_with_a_futures_fields() -> None:
    handle: Handle[int] = Handle(b"frame", "m1", "user")
    assert [r for r in gc.get_referents(handle)
            if gc.is_tracked(r) and not isinstance(r, type)] == []
    plain: concurrent.futures.Future[int] = concurrent.futures.Future()
    for name, value in vars(plain).items():  # every field Future's methods read is there
        if name != "_condition":
            assert getattr(handle, name) == value, name


def test_a_handle_resolved_while_threads_wait_on_it_wakes_every_one() -> None:
    """The condition is made on first use by whichever thread comes first: the resolving
    one or a waiting one. Both must get the same one, or a waiter sleeps forever."""
    for _ in range(300):
        handle: Handle[int] = Handle()
        got: list[int] = []

        def wait(handle: Handle[int] = handle, got: list[int] = got) -> None:
            got.append(handle.result(timeout=10))

        waiters = [threading.Thread(target=wait) for _ in range(3)]
        for waiter in waiters:
            waiter.start()
        handle.set_result(7)
        for waiter in waiters:
            waiter.join(10)
        assert got == [7, 7, 7]


def test_a_handle_behaves_as_a_future_to_its_waiters() -> None:
    waiting: Handle[int] = Handle()
    with pytest.raises(concurrent.futures.TimeoutError):
        waiting.result(timeout=0.05)
    threading.Timer(0.05, waiting.set_result, (42,)).start()
    assert waiting.result(timeout=5) == 42

    handles: list[Handle[int]] = [Handle() for _ in range(5)]
    for n, handle in enumerate(handles):
        threading.Timer(0.01 * n, handle.set_result, (n,)).start()
    assert sorted(f.result() for f in concurrent.futures.as_completed(handles, timeout=5)) == [
        0, 1, 2, 3, 4]
    done, _ = concurrent.futures.wait(handles, timeout=5)
    assert len(done) == 5

    called: list[int] = []
    failed: Handle[int] = Handle()
    failed.add_done_callback(lambda f: called.append(1))
    failed.set_exception(ValueError("no"))
    with pytest.raises(ValueError, match="no"):
        failed.result()
    assert called == [1]
    cancelled: Handle[int] = Handle()
    assert cancelled.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        cancelled.result()


@pytest.mark.parametrize(("options", "message"), [
    ({"write_key": ""}, "write_key: required"),
    ({"address": "nowhere"}, "address: expected host:port"),
    ({"batch_events": 1001}, "batch_events: 1001 is outside 1..1000"),
    ({"in_flight": 0}, "in_flight: 0 is outside"),
    ({"when_full": "drop"}, "when_full: expected 'block' or 'raise'"),
    ({"buffer_events": 10}, "buffer_events: 10 is outside 500.."),
    ({"backoff_min": 2.0, "backoff_max": 1.0}, "backoff_max: 1.0 is outside 2.0.."),
    ({"ca_file": "/nonexistent.pem"}, "ca_file: cannot read /nonexistent.pem"),
    ({"linger_ms": "10"}, "linger_ms: expected a number"),
])
def test_bad_options_fail_when_the_producer_is_made(options: dict[str, object],
                                                    message: str) -> None:
    with pytest.raises(InvalidOption) as caught:
        Producer(**{"write_key": "rq_wk_x", **options})
    assert message in str(caught.value)


class _Plan(enum.Enum):
    PRO = "pro"


class _Tier(enum.IntEnum):
    GOLD = 3


@dataclasses.dataclass
class _Order:
    id: str
    total: float
    placed: date
    lines: list[Any]


# What send() may be given as properties: JSON, and what orjson writes of its own accord.
JSON_VALUES: list[dict[Any, Any]] = [
    {"order_id": "1001", "revenue": 42.5, "items": [1, 2.0, "three", None, True, False]},
    {"é": "naïve ☃ \u2028", "big": 1e16, "small": 1e-7, "zero": -0.0, "ints": (1, -2)},
    {"nan": float("nan"), "inf": float("inf"), "deep": [{"x": float("-inf")}]},
    {"at": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "naive": datetime(2026, 1, 2),
     "day": date(2026, 1, 2), "clock": clock(1, 2, 3, 4), "id": uuid.UUID(int=5)},
    {"plan": _Plan.PRO, "tier": _Tier.GOLD},
    {"order": _Order("o1", float("nan"), date(2020, 1, 1), [_Plan.PRO, {"n": 1}])},
    # orjson refuses these; the standard library takes them, with either.
    {"huge": 2**70, 1: "a key that is not text"},
]


@pytest.mark.parametrize("value", JSON_VALUES)
def test_properties_without_orjson_are_what_orjson_writes(value: dict[Any, Any]) -> None:
    """relayq-client depends on grpcio and protobuf only; orjson is an extra. The standard
    library's path must give the same JSON, so an event means the same either way."""
    assert jsontext.orjson is not None  # this suite's environment has the extra
    assert json.loads(jsontext.standard_dumps(value)) == json.loads(jsontext.dumps(value))
    assert jsontext.standard_dumps({"x": value}).startswith('{"x":{')  # compact, as orjson


@pytest.mark.parametrize("value", [{"s": {1}}, {"b": b"x"}, {"d": Decimal("1.5")},
                                   {"t": clock(1, tzinfo=UTC)}])
def test_what_is_not_json_is_refused_without_orjson_too(value: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        orjson.dumps(value)
    with pytest.raises(TypeError):
        jsontext.standard_dumps(value)


def test_a_circular_structure_is_refused_without_orjson_too() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):
        jsontext.standard_dumps(loop)
