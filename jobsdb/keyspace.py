"""The ordering-key space: which partition a (destination, user) pair belongs to."""

from __future__ import annotations

import zlib


def partition_of(destination_key: int, user_id: str, partitions: int) -> int:
    """Stable across processes and releases (crc32, not Python's salted hash())."""
    return zlib.crc32(f"{destination_key}:{user_id}".encode()) % partitions
