"""The router's engine: destinations, their lanes, and what wakes them.

Work is found three ways, cheapest first: ingest's `NOTIFY relayq_jobs` names the destinations
that just got jobs; a lane knows when the retries it recorded come due; and a poll every few
seconds (two loose index scans, one probe per destination with work) catches anything a lost
notification or another router left behind. An idle cluster costs Postgres those two scans.
Lanes exist only for destinations that had work, and are closed after a while without any, so
ten thousand quiet destinations cost next to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from jobsdb import catalog, queue
from jobsdb import destinations as destinations_db
from jobsdb.catalog import Destination
from jobsdb.errors import JobsDBError
from jobsdb.pool import transaction
from jobsdb.queue import RESPONSE_LIMIT
from relayq.netpolicy import NetworkPolicy
from relayq.tasks import cancel_and_wait
from router_service import metrics, senders
from router_service.channels import GrpcChannels
from router_service.fairness import FairScheduler
from router_service.httpclient import HttpPool
from router_service.identity import Identity
from router_service.lane import Lane, LaneContext, LaneSettings
from router_service.membership import Membership
from router_service.outcomes import OutcomeFlusher
from router_service.reads import Reader
from router_service.resolver import Resolver
from router_service.senders import Sender, SenderContext
from router_service.trust import Trust

log = logging.getLogger(__name__)

# The longest a missed configuration notification can leave a router with stale settings.
CONFIG_RELOAD_SECONDS = 30.0


@dataclass(frozen=True)
class EngineSettings:
    router_id: str
    lease: timedelta
    # Jobs read per pickup, and held in memory per destination at most.
    batch: int
    max_held: int
    # Requests in flight at once over all destinations (shared fairly).
    permits: int
    grpc_batch: int
    poll_seconds: float
    flush_delay: float
    # Outcomes and parkings per transaction at most, and such transactions in flight at once.
    flush_max: int
    flush_concurrency: int = 2
    # A lane holding more jobs than this reads alone; the others' reads are grouped.
    read_alone_above: int = 100
    # Rows one grouped read may return at most, and grouped reads in flight at once.
    read_max_rows: int = 50000
    read_concurrency: int = 2
    # A lane with nothing to do for this long is closed.
    lane_idle_seconds: float = 60.0
    # Extra certificate authorities for https:// and grpcs:// destinations (router_service.trust).
    destination_ca_file: Path | None = None
    # Where destinations may connect (relayq.netpolicy): public addresses and these networks.
    destination_policy: NetworkPolicy = field(default_factory=NetworkPolicy)


class Engine:
    def __init__(self, pool: AsyncConnectionPool, settings: EngineSettings, *,
                 lease_pool: AsyncConnectionPool, identity: Identity | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.trust = Trust(settings.destination_ca_file)
        self.scheduler = FairScheduler(settings.permits)
        self.flusher = OutcomeFlusher(pool, settings.router_id,
                                      delay=settings.flush_delay, max_batch=settings.flush_max,
                                      concurrency=settings.flush_concurrency)
        self.reader = Reader(pool, alone_above=settings.read_alone_above,
                             max_rows=settings.read_max_rows,
                             concurrency=settings.read_concurrency)
        self.membership = Membership(lease_pool, settings.router_id, settings.lease,
                                     on_change=self._partitions_changed, busy=self._busy,
                                     on_fenced=self._fenced, identity=identity)
        self.lane_context = LaneContext(
            settings=LaneSettings(batch=settings.batch, max_held=settings.max_held),
            reader=self.reader, flusher=self.flusher, scheduler=self.scheduler,
            membership=self.membership, stopping=lambda: self.stopping,
            settled=self._settled, circuit_changed=self._circuit_changed)
        self.destinations: dict[int, Destination] = {}
        self.lanes: dict[int, Lane] = {}
        self._idle_since: dict[int, float] = {}
        self.stopping = False
        # Set whenever a delivery finishes (shutdown waits on it).
        self.settled = asyncio.Event()
        self._senders: SenderContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._discoveries: set[asyncio.Task[None]] = set()
        self._reload = asyncio.Event()
        # Of the destinations last loaded (jobsdb.destinations.load_if_changed).
        self._destinations_digest: str | None = None
        # Destinations of a type this router has no sender for (logged once each).
        self._unknown_types: set[int] = set()

    async def start(self) -> None:
        # Idle connections per origin: as many as deliveries can be in flight to it at once,
        # so a receiver taking every permit does not have its connections closed and opened
        # again as the requests come and go.
        resolver = Resolver(self.settings.destination_policy)
        http = HttpPool(self.trust.ssl_context, body_limit=RESPONSE_LIMIT, resolver=resolver,
                        max_idle_per_origin=self.settings.permits)
        self._senders = SenderContext(
            http=http, trust=self.trust, grpc_batch=self.settings.grpc_batch,
            grpc_channels=GrpcChannels(self.trust.grpc_credentials, resolver), resolver=resolver)
        await self._load_destinations()
        self.flusher.start()
        self.reader.start()
        await self._first_beat()
        for coro, name in ((self.membership.run(), "membership"), (self._poll(), "poll"),
                           (self._watch_config(), "config"), (self._watch_loop(), "loop-lag")):
            self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self, grace: float) -> None:
        """Stop reading, let deliveries in flight finish (up to `grace`), record, let go."""
        self.stopping = True
        deadline = time.monotonic() + grace
        while any(lane.in_flight for lane in self.lanes.values()):
            self.settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.settled.wait(), deadline - time.monotonic())
            if time.monotonic() >= deadline:
                break
        await cancel_and_wait(self._tasks)
        for lane in list(self.lanes.values()):
            await lane.close()  # cancels what is still in flight: those jobs stay pending
        await self.reader.close()
        await self.flusher.close()
        await self.membership.leave()
        if self._senders is not None:
            await self._senders.http.close()
            await self._senders.grpc_channels.close()

    # --- wake-ups ------------------------------------------------------------------------

    def on_jobs_notification(self, payload: str) -> None:
        """ingest (or admin) committed jobs for these destinations ('*': possibly any)."""
        keys = self.destinations.keys() if payload == "*" else _keys(payload)
        for key in keys:
            lane = self.lane(key)
            if lane is not None:
                lane.notify()

    def on_reorder_notification(self, payload: str) -> None:
        """An operator retried aborted jobs of these destinations: re-read in job order."""
        keys = self.destinations.keys() if payload == "*" else _keys(payload)
        for key in keys:
            lane = self.lanes.get(key)
            if lane is not None:
                lane.reconsider()

    def on_config_notification(self, _payload: str = "") -> None:
        self._reload.set()

    def lane(self, destination_key: int) -> Lane | None:
        lane = self.lanes.get(destination_key)
        if lane is None and not self.stopping:
            destination = self.destinations.get(destination_key)
            if destination is None:
                self._reload.set()  # created after our last load: read the config again
                return None
            sender = self._sender(destination)
            if sender is None:
                return None
            lane = self.lanes[destination_key] = Lane(self.lane_context, destination, sender)
        self._idle_since.pop(destination_key, None)
        return lane

    # --- loops ---------------------------------------------------------------------------

    async def _first_beat(self) -> None:
        try:
            await self.membership.beat_within(self.membership.interval)
        except JobsDBError as exc:
            log.warning("first heartbeat failed: %s", exc)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            try:
                async with transaction(self.pool) as conn:
                    pending = await queue.destinations_with_pending(conn)
                    retries = await queue.earliest_retries(conn)
                    await queue.release_orphans(conn)
            except JobsDBError as exc:
                log.warning("poll failed: %s", exc)
                continue
            # A safety net for lost notifications. A lane that read since the last poll has
            # seen what was committed before its read; one that is reading, or still holds
            # jobs of its last read, has them in hand (their rows are still pending until
            # recorded). Either reads again by itself or is caught by a later poll once it
            # has delivered what it holds. With ten thousand busy destinations, notifying
            # every one would be ten thousand reads a poll that find nothing new (measured:
            # 6,700 of them in a run of 100,000 jobs).
            recently = time.monotonic() - self.settings.poll_seconds
            for key in pending:
                known = self.lanes.get(key)
                if known is not None and (known.busy or known.read_at > recently):
                    continue
                lane = self.lane(key)
                if lane is not None:
                    lane.notify()
            for key, when in retries.items():
                lane = self.lane(key)
                if lane is not None:
                    lane.due_at(when)
            await self._close_idle_lanes()

    async def _watch_loop(self) -> None:
        """How late the event loop runs: ten timers a second, each measured against its time;
        once a second the second-latest of them (one GC pause is not congestion) goes to the
        fair scheduler, which holds back the heaviest tenant while the loop runs late."""
        loop = asyncio.get_running_loop()
        samples: list[float] = []
        while True:
            planned = loop.time() + 0.1
            await asyncio.sleep(0.1)
            lag = max(0.0, loop.time() - planned)
            metrics.LOOP_LAG.observe(lag)
            samples.append(lag)
            if len(samples) >= 10:
                self.scheduler.loop_lag(sorted(samples)[-2])
                samples.clear()

    async def _watch_config(self) -> None:
        while True:
            # Notifications are hints: reload now and then even without one.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload.wait(), CONFIG_RELOAD_SECONDS)
            await asyncio.sleep(0.2)  # one reload for a burst of changes
            self._reload.clear()
            try:
                await self._load_destinations()
            except JobsDBError as exc:
                log.warning("reloading destinations failed: %s", exc)
                self._reload.set()
                await asyncio.sleep(1)

    async def _load_destinations(self) -> None:
        async with transaction(self.pool) as conn:
            found = await destinations_db.load_if_changed(conn, self._destinations_digest)
        if found is None:
            return
        self._destinations_digest, loaded = found
        for key, row in loaded.items():
            lane = self.lanes.get(key)
            old = self.destinations.get(key)
            if lane is not None and old is not None and row != old:
                if senders.needs_new_sender(old, row):
                    sender = self._sender(row)
                    if sender is None:  # no longer deliverable: its jobs wait in Postgres
                        del self.lanes[key]
                        await lane.close()
                        continue
                    lane.configure(row, sender)
                else:
                    lane.configure(row, None)
        self.destinations = loaded
        metrics.DESTINATIONS.set(len(loaded))
        metrics.CIRCUITS_OPEN.set(sum(d.circuit_opened_at is not None for d in loaded.values()))

    async def _close_idle_lanes(self) -> None:
        now = time.monotonic()
        for key, lane in list(self.lanes.items()):
            if not lane.idle:
                self._idle_since.pop(key, None)
                continue
            since = self._idle_since.setdefault(key, now)
            if now - since > self.settings.lane_idle_seconds:
                del self.lanes[key]
                del self._idle_since[key]
                await lane.close()

    # --- membership callbacks ------------------------------------------------------------

    def discover(self) -> None:
        """Look for work at every destination now: what has pending jobs gets its lane
        notified, and due retries their timers (at start, after a lost connection, when
        partitions change hands). One query, not a read per destination."""
        task = asyncio.create_task(self._discover_now(), name="discover")
        self._discoveries.add(task)
        task.add_done_callback(self._discoveries.discard)

    def _partitions_changed(self, gained: set[int], lost: set[int]) -> None:
        for lane in self.lanes.values():
            if lost:
                lane.drop_partitions(lost)
            lane.wake.set()  # what it holds may be sendable again (after a fence)
        # Jobs of newly owned partitions (or of partitions usable again) may wait at any
        # destination: look for them at once.
        self.discover()

    async def _discover_now(self) -> None:
        with contextlib.suppress(JobsDBError):
            async with transaction(self.pool) as conn:
                pending = await queue.destinations_with_pending(conn)
                retries = await queue.earliest_retries(conn)
            for key in pending:
                if (lane := self.lane(key)) is not None:
                    lane.notify()
            for key, when in retries.items():
                if (lane := self.lane(key)) is not None:
                    lane.due_at(when)

    def _fenced(self) -> None:
        for lane in self.lanes.values():
            lane.abandon_in_flight()

    def _busy(self, partition: int) -> bool:
        return any(lane.held_by_partition.get(partition, 0) > 0 for lane in self.lanes.values())

    def _settled(self) -> None:
        self.settled.set()

    def _circuit_changed(self, destination: Destination, opened: bool, reason: str) -> None:
        task = asyncio.create_task(self._write_circuit(destination, opened, reason),
                                   name="circuit")
        self._discoveries.add(task)
        task.add_done_callback(self._discoveries.discard)

    async def _write_circuit(self, destination: Destination, opened: bool, reason: str) -> None:
        """Every router, admin and the operator see the circuit through the destination's row
        (the write's NOTIFY makes routers reload). Until it is written, this router acts on it
        alone."""
        for attempt in range(6):
            try:
                async with transaction(self.pool) as conn:
                    await catalog.set_circuit(conn, destination, open_=opened, reason=reason)
                return
            except JobsDBError as exc:
                log.warning("recording the circuit failed: %s", exc,
                            extra={"destination": destination.id})
                await asyncio.sleep(min(30.0, 0.5 * 2 ** attempt))

    def _sender(self, destination: Destination) -> Sender | None:
        assert self._senders is not None, "the engine is not started"
        try:
            return senders.make(destination, self._senders)
        except senders.UnknownType as exc:
            if destination.destination_key not in self._unknown_types:
                self._unknown_types.add(destination.destination_key)
                log.error("%s; its jobs wait", exc, extra={"destination": destination.id})
            return None


def _keys(payload: str) -> list[int]:
    keys = []
    for part in payload.split(","):
        with contextlib.suppress(ValueError):
            keys.append(int(part))
    return keys
