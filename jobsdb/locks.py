"""Advisory lock keys, in one place so no two uses collide (the numbers spell 'relayq' + a tag)."""

from typing import Final

MIGRATIONS: Final = 0x72656C6179710001
PARTITIONS: Final = 0x72656C6179710002
# Held shared by every ingest transaction that claims message ids, exclusively by rotation.
DEDUP_GENERATIONS: Final = 0x72656C6179710003
MAINTENANCE: Final = 0x72656C6179710004
# Two-key advisory locks (int4 namespace, hashtext(name)): a running router's identity,
# held by its session for as long as it runs (router_service.identity).
ROUTER_IDENTITY: Final = 0x72710005
