"""The ordering-key space: which partition a user's events belong to, and job ids.

An event's ordering partition depends on its user alone, so an event has one partition for
every destination, and a router reads each partition it leases once for all of them. The
ordering key is still (destination, user): the partition only says which router delivers it.
"""

from __future__ import annotations

from hashlib import md5

# A job is an (event, destination) pair: its id is the event's id shifted left by this many
# bits, or'ed with the connection's slot (its number within the event's source).
SLOT_BITS = 16
SLOT_MASK = (1 << SLOT_BITS) - 1


def partition_of(user_id: str, partitions: int) -> int:
    """Stable across processes, releases and languages: ordering_partition_of() in SQL
    (migration 0012) computes the same (the first four bytes of the MD5 of the user id, as
    an unsigned number, modulo the partitions), which the migration of old jobs needs."""
    return int.from_bytes(md5(user_id.encode(), usedforsecurity=False).digest()[:4],
                          "big") % partitions


def job_id(event_id: int, slot: int) -> int:
    return (event_id << SLOT_BITS) | slot


def event_of(job_id: int) -> int:
    return job_id >> SLOT_BITS


def slot_of(job_id: int) -> int:
    return job_id & SLOT_MASK
