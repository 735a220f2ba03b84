"""The filter language as operators' job queries need it over the event log.

A job without a row exists only if its connection's filter takes its event, so the queries
that list, count or change jobs ask each connection's filter in SQL: a connection filter (over
the event: `event`, `properties.x`, ...) is the same condition as a job filter over the
delivered document (`payload.event`, `payload.properties.x`, ...), which jobsdb.filters
compiles; tests/integration/test_subscriptions.py holds the two evaluations equal on random events.

And which states a job filter can match at all: a filter that wants only failed, waiting or
aborted jobs needs only the rows, never a scan of the log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row

from filterlang.errors import FilterError
from filterlang.events import DOCUMENT_FIELDS, EVENTS, TEXT_FIELDS
from filterlang.nodes import And, Compare, Field, InList, Node, Not, Or
from filterlang.parser import parse
from jobsdb.filters import Params, compile_node
from jobsdb.sqlfile import query

STATES: Final = frozenset({"pending", "failed", "waiting", "succeeded", "aborted"})
# What a job without a row can be.
LOG_STATES: Final = frozenset({"pending", "succeeded"})


class Subscription(NamedTuple):
    """An enabled connection that has a filter (sql/jobs.sql `subscriptions`)."""

    source_key: int
    destination_key: int
    event_filter: str


async def filtered(conn: AsyncConnection[Any]) -> list[Subscription]:
    """The enabled connections that have a filter (the others take every event)."""
    cur = conn.cursor(row_factory=class_row(Subscription))
    await cur.execute(query("jobs.sql", "subscriptions"))
    return await cur.fetchall()


def condition(connections: Iterable[Subscription], params: Params) -> sql.Composable:
    """`true` for every job whose connection takes it: for each (source, destination, filter)
    given, that filter over `j.payload`; other connections take every event. A filter that no
    longer compiles takes nothing, as routers treat it."""
    branches: list[sql.Composable] = []
    for subscription in connections:
        source_key, destination_key = subscription.source_key, subscription.destination_key
        try:
            node: Node | None = _as_job_filter(parse(subscription.event_filter, EVENTS))
        except FilterError:
            node = None
        source = params.add(source_key, "integer")
        destination = params.add(destination_key, "integer")
        test = (sql.SQL("coalesce({}, false)").format(compile_node(node, params))
                if node is not None else sql.SQL("false"))
        branches.append(sql.SQL("WHEN j.source_key = {} AND j.destination_key = {} THEN {}")
                        .format(source, destination, test))
    if not branches:
        return sql.SQL("true")
    return sql.SQL("(CASE {} ELSE true END)").format(sql.SQL(" ").join(branches))


def job_filter(node: Node, params: Params) -> sql.Composable:
    """A parsed connection filter (the events language) as a condition over `j.payload`,
    its values added to `params`: the replay worker's selection (jobsdb.replays)."""
    return compile_node(_as_job_filter(node), params)


def _as_job_filter(node: Node) -> Node:
    """A connection filter's tree, its fields made paths into the delivered document."""
    if isinstance(node, And | Or):
        return type(node)(tuple(_as_job_filter(n) for n in node.operands))
    if isinstance(node, Not):
        return Not(_as_job_filter(node.operand))
    name = node.field.name
    if name in TEXT_FIELDS:
        path: tuple[str, ...] = (TEXT_FIELDS[name],)
    else:
        assert name in DOCUMENT_FIELDS
        path = (name, *node.field.path)
    return dataclasses.replace(node, field=Field("payload", path, node.field.position))


def states(node: Node | None) -> frozenset[str]:
    """The job states a filter can be true for (every state when it does not say)."""
    if node is None:
        return STATES
    if isinstance(node, And):
        found = STATES
        for operand in node.operands:
            found &= states(operand)
        return found
    if isinstance(node, Or):
        union: frozenset[str] = frozenset()
        for operand in node.operands:
            union |= states(operand)
        return union
    if isinstance(node, Not) or node.field.name != "state":
        return STATES
    if isinstance(node, Compare):
        value = str(node.value.value)
        if node.op == "=":
            return frozenset({value}) & STATES
        if node.op in ("!=", "<>"):
            return STATES - {value}
        return STATES
    if isinstance(node, InList):
        values = frozenset(str(v.value) for v in node.values)
        return STATES - values if node.negated else values & STATES
    return STATES
