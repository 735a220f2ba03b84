"""The size limits of an ingest request, shared by relayq-ingest and the producer library.

One place, so a client checks an event against the very numbers the server will apply, and
the two cannot drift apart. The batch and byte limits are ingest's defaults: an operator can
change them (RELAYQ_INGEST_MAX_*), and a producer talking to such a server is given the same
values as options. The id and name lengths are fixed: they are part of the protocol.

It lives in the producer's distribution (relayq-client), which the server's depends on, so
the producer has it without the server and the server imports it from here.
"""

from __future__ import annotations

# Events in one IngestRequest (RELAYQ_INGEST_MAX_BATCH_EVENTS).
MAX_BATCH_EVENTS = 1000
# One event's stored document: envelope, properties and context (RELAYQ_INGEST_MAX_EVENT_BYTES).
MAX_EVENT_BYTES = 64 * 1024
# One serialised IngestRequest (RELAYQ_INGEST_MAX_REQUEST_BYTES).
MAX_REQUEST_BYTES = 16 * 1024 * 1024

# Characters, not bytes: what a person would count in an id.
MAX_MESSAGE_ID = 128
MAX_USER_ID = 256
# The type and event names.
MAX_NAME = 256
