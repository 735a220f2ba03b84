"""The router's engine: destinations, their lanes, the event log's reading, what wakes them.

New events come from the log: ingest's `NOTIFY relayq_events` wakes the shared read
(router_service.logread), which reads each partition this router leases once and fans each
event out to the destinations its source is connected to (router_service.fanout): a job per
destination that takes it, handed to that destination's lane. Jobs with rows (retries,
released waiters, operators' retries, replays) are found as before: `NOTIFY relayq_jobs` names
the destinations, a lane knows when the retries it recorded come due, and a poll every few
seconds (two loose index scans) catches anything a lost notification or another router left
behind. Lanes exist only
for destinations that had work, and are closed after a while without any, so ten thousand
quiet destinations cost next to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

from psycopg_pool import AsyncConnectionPool

from jobsdb import catalog, eventlog, partitions, queue
from jobsdb import destinations as destinations_db
from jobsdb.catalog import Destination
from jobsdb.errors import JobsDBError
from jobsdb.keyspace import partition_of
from jobsdb.pool import transaction
from jobsdb.queue import RESPONSE_LIMIT
from relayq.tasks import cancel_and_wait
from router_service import metrics, senders
from router_service.channels import GrpcChannels
from router_service.fairness import FairScheduler
from router_service.fanout import FanOut
from router_service.httpclient import HttpPool
from router_service.identity import Identity
from router_service.lane import Lane, LaneContext, LaneSettings
from router_service.logread import CursorWriter, LogReader
from router_service.membership import Membership
from router_service.outcomes import OutcomeFlusher, Roots
from router_service.reads import Reader
from router_service.replays import ReplayWorker
from router_service.resolver import Resolver
from router_service.routing import Routing
from router_service.senders import Sender, SenderContext
from router_service.settings import EngineSettings
from router_service.tracks import Positions
from router_service.trust import Trust

log = logging.getLogger(__name__)

# The longest a missed configuration notification can leave a router with stale settings.
CONFIG_RELOAD_SECONDS = 30.0


class Engine:
    def __init__(self, pool: AsyncConnectionPool, settings: EngineSettings, *,
                 lease_pool: AsyncConnectionPool, identity: Identity | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.trust = Trust(settings.destination_ca_file)
        self.scheduler = FairScheduler(settings.permits)
        self.flusher = OutcomeFlusher(pool, settings.router_id,
                                      delay=settings.flush_delay, max_batch=settings.flush_max,
                                      concurrency=settings.flush_concurrency,
                                      on_roots=self._roots, kind_of=self._kind_of)
        self.positions = Positions()
        self.routing = Routing()
        # (destination, user) -> the job row that user's next events there wait behind.
        self.blocked: dict[tuple[int, str], int] = {}
        self.log = LogReader(pool, self.positions, batch=settings.batch,
                             window=settings.log_window or settings.batch,
                             window_bytes=settings.log_window_bytes,
                             poll_seconds=settings.poll_seconds,
                             usable=lambda: self.membership.usable(),
                             fan_out=lambda events: self.fan_out(events),
                             on_stalled=lambda p, holders: self.fan_out.stalled(p, holders),
                             full=lambda holders: self.fan_out.full(holders),
                             ensure_config=self.ensure_config)
        self.cursors = CursorWriter(pool, self.positions, settings.router_id)
        self.fan_out = FanOut(positions=self.positions, cursors=self.cursors,
                              blocked=self.blocked, routing=lambda: self.routing,
                              destinations=lambda: self.destinations, lanes=lambda: self.lanes,
                              lane=self.lane)
        self.replays = ReplayWorker(pool)
        self._taking: set[int] = set()
        # The connections' version this router's routing was loaded at, and one load at a
        # time.
        self.config_version = 0
        self._loading = asyncio.Lock()
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
            settled=self._settled, circuit_changed=self._circuit_changed,
            positions=self.positions, log=self.log, cursors=self.cursors,
            routing=lambda: self.routing, blocked=self.blocked)
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
        async with transaction(self.pool) as conn:
            self.flusher.partition_size = (await partitions.settings(conn)).event_partition_size
        await self._load_destinations()
        self.flusher.start()
        self.reader.start()
        self.log.start()
        self.cursors.start()
        self.replays.start()
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
        await self.replays.close()
        await self.log.close()
        for lane in list(self.lanes.values()):
            await lane.close()  # cancels what is still in flight: those jobs stay pending
        await self.reader.close()
        await self.flusher.close()
        await cancel_and_wait(self._discoveries)
        await self.cursors.close()  # where reading stands, before the leases go
        await self.membership.leave()
        if self._senders is not None:
            await self._senders.http.close()
            await self._senders.grpc_channels.close()

    # --- wake-ups ------------------------------------------------------------------------

    def on_events_notification(self, payload: str = "") -> None:
        """ingest committed events (payload: their ordering partitions)."""
        self.log.wake(payload)

    def on_jobs_notification(self, payload: str) -> None:
        """ingest (or admin) committed jobs for these destinations ('*': possibly any)."""
        keys = self.destinations.keys() if payload == "*" else _keys(payload)
        for key in keys:
            lane = self.lane(key)
            if lane is not None:
                lane.notify()

    def on_reorder_notification(self, payload: str) -> None:
        """An operator changed rows of these destinations (retried aborted or delivered
        jobs, aborted jobs not yet read): learn again who waits behind which row and what is
        settled, and re-read in job order what the lanes only queued."""
        keys = list(self.destinations.keys()) if payload == "*" else _keys(payload)
        task = asyncio.create_task(self._reorder(keys), name="reorder")
        self._discoveries.add(task)
        task.add_done_callback(self._discoveries.discard)

    async def _reorder(self, keys: list[int]) -> None:
        owned = sorted(self.membership.owned)
        for attempt in range(6):
            try:
                async with transaction(self.pool) as conn:
                    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    taken = await eventlog.take_over(conn, owned)
                break
            except JobsDBError as exc:
                log.warning("reloading after an operator's change failed: %s", exc)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt))
        else:
            return
        # Only added to: the snapshot may predate a flush that has told us more since (who
        # is held now), and a user wrongly thought free would be delivered ahead of their
        # failed job, while one wrongly thought held costs a parking that finds nothing to
        # wait behind. Users are let go by flushes only (their roots, in their transaction).
        wanted = set(keys)
        self.blocked.update({pair: root for pair, root in taken.blocked.items()
                             if pair[0] in wanted})
        for (destination, partition), events in taken.settled.items():
            if destination in wanted and self.positions.reading(partition):
                self.positions.track(destination, partition).settle(events)
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

    # --- the event log ---------------------------------------------------------------------

    def _roots(self, roots: Roots) -> None:
        """Who waits behind which row now, after a flush that changed rows."""
        for pair, root in roots.items():
            if root is None:
                self.blocked.pop(pair, None)
            else:
                self.blocked[pair] = root

    def _kind_of(self, destination_key: int) -> str:
        destination = self.destinations.get(destination_key)
        return destination.type if destination is not None else ""

    async def _take(self, partitions: list[int]) -> None:
        """Partitions just leased: where reading starts in them (frontier, destinations'
        cursors, what is settled above them, who waits behind which row), then read."""
        for attempt in itertools.count():
            if self.stopping:
                return
            try:
                async with transaction(self.pool) as conn:
                    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    taken = await eventlog.take_over(conn, partitions)
                break
            except JobsDBError as exc:
                log.warning("taking partitions over failed: %s", exc)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt))
        owned = self.membership.owned
        for partition in partitions:
            self._taking.discard(partition)
            if partition not in owned or self.positions.reading(partition):
                continue
            cursors = {d: c for (d, p), c in taken.cursors.items() if p == partition}
            settled = {d: e for (d, p), e in taken.settled.items() if p == partition}
            self.positions.take(partition, taken.frontiers.get(partition, 0), cursors, settled)
        for pair, root in taken.blocked.items():
            self.blocked[pair] = root
        self.fan_out.lag_readers()
        self.log.wake()
        for lane in self.lanes.values():
            lane.wake.set()

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
            self.fan_out.lag_readers()
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
                async with self._loading:
                    await self._load_destinations()
            except JobsDBError as exc:
                log.warning("reloading destinations failed: %s", exc)
                self._reload.set()
                await asyncio.sleep(1)

    async def ensure_config(self, version: int) -> None:
        """Events were read in a snapshot where the connections' version is `version`: load
        the connections again first if ours are older, or an event sent after a connection
        was made would be handed out without it (and never again: the cursors move on)."""
        while self.config_version < version:
            async with self._loading:
                if self.config_version >= version:
                    return
                await self._load_destinations()

    async def _load_destinations(self) -> None:
        released: dict[tuple[int, str], int] = {}
        async with transaction(self.pool) as conn:
            version, found = await destinations_db.load_if_changed(
                conn, self._destinations_digest)
            if found is not None:
                # Destinations whose backfill's rows are all written now, or that this
                # router sees backfilled for the first time (its backfill may be done
                # already): who waits behind which of those rows, read in the same
                # snapshot, before they take anything from the log.
                holding = {c.destination_key for c in found.connections if c.backfilling}
                backfilled = {c.destination_key for c in found.connections
                              if c.backfill_after and _after(self.routing, c) != c.backfill_after}
                for key in sorted((self.routing.holding - holding) | backfilled):
                    released.update(await eventlog.blocked_users(
                        conn, sorted(self.positions.position), destination_key=key))
        if found is None:
            self.config_version = max(self.config_version, version)
            return
        self._destinations_digest, loaded, connections = found
        old_routing, self.routing = self.routing, Routing(connections)
        self.fan_out.backfills_changed(old_routing, released)
        self.config_version = max(self.config_version, version)
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
        owned = self.membership.owned
        # A partition lost and taken back in one heartbeat (another router held it meanwhile:
        # a lease that merely ran out while nobody took it is renewed, not lost) is read again
        # from what Postgres has: the other router may have moved it on, and what this router
        # did meanwhile was fenced and is not on record, whatever its memory says.
        regained = gained & lost
        gone = [p for p in self.positions.position if p not in owned or p in regained]
        for partition in gone:
            self.positions.drop(partition)
        if gone:
            dropped = set(gone)
            partitions = self.membership.partition_count or 64
            for pair in [pair for pair in self.blocked
                         if partition_of(pair[1], partitions) in dropped]:
                del self.blocked[pair]
        new = sorted(p for p in owned
                     if not self.positions.reading(p) and p not in self._taking)
        if new:
            self._taking.update(new)
            task = asyncio.create_task(self._take(new), name="take-partitions")
            self._discoveries.add(task)
            task.add_done_callback(self._discoveries.discard)
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


def _after(routing: Routing, connection: destinations_db.Connection) -> int | None:
    """Where `routing` has the connection take the log from (None: not connected there)."""
    route = routing.by_pair.get((connection.source_key, connection.destination_key))
    return route.after if route is not None else None


def _keys(payload: str) -> list[int]:
    keys = []
    for part in payload.split(","):
        with contextlib.suppress(ValueError):
            keys.append(int(part))
    return keys
