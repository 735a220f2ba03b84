"""The admin service layer: every operation of relayq.v1.Admin, done for a caller.

The gRPC servicer (admin_service.service) and the console (admin_service.console) both call
these and nothing else, so authorization (the caller's scope), validation, filters, dry runs
and the audit line have one implementation whichever door an operator came through. Each
operation takes the caller and the request message and answers the response message; errors
are relayq.rpc and jobsdb error types, which each door maps to its own statuses.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from admin_service.ops.connections import Connections
from admin_service.ops.destinations import Destinations
from admin_service.ops.events import Events
from admin_service.ops.jobs import Jobs
from admin_service.ops.replays import Replays
from admin_service.ops.sources import Sources
from admin_service.ops.stats import Stats
from admin_service.ops.tenants import AdminTokens, Tenants
from relayq.netpolicy import NetworkPolicy


class Operations:
    def __init__(self, pool: AsyncConnectionPool, policy: NetworkPolicy | None = None) -> None:
        self.tenants = Tenants(pool)
        self.tokens = AdminTokens(pool)
        self.sources = Sources(pool)
        # Where destinations may connect: endpoints written as refused addresses are refused.
        self.destinations = Destinations(pool, policy or NetworkPolicy())
        self.connections = Connections(pool)
        self.jobs = Jobs(pool)
        self.stats = Stats(pool)
        self.events = Events(pool)
        self.replays = Replays(pool)
