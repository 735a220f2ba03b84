"""relayq.client: send events to relayq-ingest from Python services.

    from relayq.client import Producer

    with Producer(address="127.0.0.1:50051", write_key=key) as producer:
        producer.send(user_id="alice", event="Order Completed", properties={"total": 42})

Producer (threads) and AsyncProducer (asyncio) batch events per lane, retry with backoff
what is worth retrying, keep each event's message id through every retry (so ingest
de-duplicates), keep each user's events in send() order, and flush on close. See
docs/client.md.
"""

from relayq.client._sync import Producer
from relayq.client.aio import AsyncProducer
from relayq.client.errors import (
    BufferFull,
    ClientError,
    DeliveryFailed,
    InvalidEvent,
    InvalidOption,
    ProducerClosed,
)
from relayq.client.options import Options
from relayq.client.results import Counters, SendResult, Status

__all__ = [
    "AsyncProducer",
    "BufferFull",
    "ClientError",
    "Counters",
    "DeliveryFailed",
    "InvalidEvent",
    "InvalidOption",
    "Options",
    "Producer",
    "ProducerClosed",
    "SendResult",
    "Status",
]
