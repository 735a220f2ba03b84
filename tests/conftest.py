"""Shared fixtures: a real Postgres, a migrated template database, per-test databases.

The template is built once per session from the migrations; each test that needs a database
gets its own copy (CREATE DATABASE ... TEMPLATE, about 0.1 s), so tests never see each other's
rows or depend on what an earlier run left behind. Names carry the pid and a random suffix:
several sessions may share the server at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from jobsdb import migrate, sealing
from tests.databases import create_database, drop_database, dsn_for
from tests.helpers import TEST_SECRET_KEY

pytest_plugins = ["tests.pipeline"]

@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Tests that run the CLI in-process let it configure logging, which replaces the root
    handlers with one bound to that test's captured stderr; later tests would log into the
    closed stream ("Logging error ... I/O operation on closed file"). Put the root back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _keyring_installed() -> None:
    """Catalog reads and writes in-process seal and open secrets with the process's keyring,
    which a router or admin service installs at start; tests that call the catalog directly
    get the one the test services use."""
    sealing.install(sealing.Keyring.parse(TEST_SECRET_KEY))


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    name = create_database()

    async def build() -> None:
        async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as conn:
            await migrate.migrate(conn)

    asyncio.run(build())
    yield name
    drop_database(name)


@pytest.fixture
def database(template_database: str) -> Iterator[str]:
    """A fresh, migrated database for one test; yields its DSN."""
    name = create_database(template_database)
    yield dsn_for(name)
    drop_database(name)


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database with no schema at all (for migration tests)."""
    name = create_database()
    yield dsn_for(name)
    drop_database(name)


@pytest.fixture
async def conn(database: str) -> AsyncIterator[psycopg.AsyncConnection[object]]:
    """An autocommit connection to the test's database, for setup and assertions."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="session")
def store_database(template_database: str) -> Iterator[str]:
    """One migrated database for the whole session, which `tx` tests share: each leaves it as
    it found it (its transaction is rolled back)."""
    name = create_database(template_database)
    yield dsn_for(name)
    drop_database(name)


@pytest.fixture
async def tx(store_database: str) -> AsyncIterator[psycopg.AsyncConnection[object]]:
    """A connection inside a transaction that is rolled back after the test, as River's store
    tests do: for tests of SQL that need no commit and no second session, a clean database
    costs a BEGIN rather than a copy (~0.1 s). Inside it now() stands still and sequences
    still move; code that opens `conn.transaction()` gets a savepoint (and one that commits
    fails); notifications are never sent. A test that needs another session to see its rows,
    or commits, takes `database` and `conn`."""
    # The transaction is opened here, not by the test's first statement: a
    # `conn.transaction()` the code under test opened first would be the outer one, and commit.
    connection = await psycopg.AsyncConnection.connect(store_database)
    async with connection, connection.transaction(force_rollback=True):
        yield connection
