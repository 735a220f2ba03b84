"""Events as JSON lines, the input of `relayq send`: one JSON object per line.

Fields (snake_case, or the camelCase of Segment and RudderStack exports):

| field | type | |
|---|---|---|
| `user_id` / `userId` | string | the ordering key; this or anonymous_id is required |
| `anonymous_id` / `anonymousId` | string | |
| `event` | string | e.g. "Order Completed" |
| `type` | string | e.g. "track" |
| `properties` | object | the event's own data |
| `context` | object | about the sender (library, app, device) |
| `message_id` / `messageId` | string | de-duplication key; generated (UUIDv7) when absent |
| `timestamp` | string | ISO 8601 with a time zone; now when absent |
| `destination_ids` / `destinationIds` | list of strings | only to these connected destinations |
| `traceparent` | string | the sender's W3C traceparent, sent on with every delivery |

Any other field is refused: a typo would otherwise be dropped without a word. Blank lines
are skipped.
"""

from __future__ import annotations

from typing import Any

import orjson

FIELDS = {
    "user_id": "user_id", "userId": "user_id",
    "anonymous_id": "anonymous_id", "anonymousId": "anonymous_id",
    "event": "event", "type": "type", "properties": "properties", "context": "context",
    "message_id": "message_id", "messageId": "message_id", "timestamp": "timestamp",
    "destination_ids": "destination_ids", "destinationIds": "destination_ids",
    "traceparent": "traceparent",
}
_EXPECTED = ", ".join(sorted(set(FIELDS.values())))


class BadLine(ValueError):
    """The line is not an event; the message says why."""


def parse(text: bytes) -> dict[str, Any]:
    """One line -> the keyword arguments of Producer.send()."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadLine(f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadLine(f"expected a JSON object, got {type(value).__name__}")
    fields: dict[str, Any] = {}
    for name, field_value in value.items():
        field = FIELDS.get(name)
        if field is None:
            raise BadLine(f"unknown field {name!r} (expected {_EXPECTED})")
        if field in fields:
            raise BadLine(f"{field} is given twice")
        fields[field] = field_value
    return fields
