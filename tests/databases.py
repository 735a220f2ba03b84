"""The test Postgres: where it is, and making and dropping databases on it.

Fixtures that use these are in tests/conftest.py; modules that need a database of their own
(a template, a second cluster) import these from here, never from a conftest.
"""

from __future__ import annotations

import os
import secrets

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SERVER_DSN = os.environ.get(
    "RELAYQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def dsn_for(database: str) -> str:
    params = conninfo_to_dict(SERVER_DSN)
    params["dbname"] = database
    return make_conninfo(**params)


def _admin(statement: sql.Composable) -> None:
    with psycopg.connect(SERVER_DSN, autocommit=True) as conn:
        conn.execute(statement)


def create_database(template: str | None = None) -> str:
    name = f"relayq_t{os.getpid()}_{secrets.token_hex(4)}"
    if template is None:
        _admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    else:
        _admin(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)))
    return name


def drop_database(name: str) -> None:
    _admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
