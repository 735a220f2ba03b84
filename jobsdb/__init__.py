"""jobsdb: relayq's Postgres layer.

Every query relayq runs lives here, in named SQL files (jobsdb/sql/) or migrations
(jobsdb/migrations/). Store functions take a connection and never commit: the caller owns the
transaction (see `jobsdb.pool.transaction`). Driver errors become `jobsdb.errors` types in
exactly one place. Nothing here imports gRPC or the services.
"""
