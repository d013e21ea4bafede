"""The data methods of a test node: what each does with its arguments (docs/protocol.md 10).

``ping``, ``execute``, ``query``, ``batch`` and ``executemany``; ``begin``,
``commit`` and ``rollback`` (transactions, section 10.2, see
:mod:`.transactions`); ``prepare`` and ``unprepare`` (section 10.3, see
:mod:`.prepared`). :mod:`.methods` dispatches to them after the node's faults.

- A write with REQUEST ``idem_key`` runs at most once per key
  (:mod:`.idempotency`); its repeat is answered with the stored result and
  ``replayed``. Reads ignore the key, and so do statements inside a
  transaction (the commit is the transaction's keyed write).
- ``execute`` and ``query`` take ``stmt`` (an id of the session's prepared
  statements) instead of ``sql``, and ``prepare: true`` beside ``sql`` to
  prepare it as well (the result then carries ``stmt``). A statement sent by
  id is the same request, for its idempotency key, as its text.
- ``tx`` runs the request in the session's transaction of that id, in its
  turn; a read-only transaction runs every statement as ``query`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..protocol import ErrorCode
from ._failure import RequestFailed
from .arguments import (
    arg,
    expect_rows_arg,
    non_negative,
    params_arg,
    rows_arg,
    sql_args,
    statements_arg,
)
from .context import Call, MethodContext, Outcome
from .decltypes import named
from .idempotency import IdempotencyKey, KeyedOutcome, KeyedResult, check_key, request_hash
from .prepared import PreparedStatement
from .statements import Control, Params, execute_one, query_one
from .transactions import NodeTransaction, aborted
from .txsql import COMMITTED, NOT_COMMITTED, begin, commit, in_savepoint
from .writes import run_rows, run_statements

__all__ = ["DATA_METHODS", "DataHandler"]

logger = logging.getLogger("qdb_client.testing")

DataHandler = Callable[[MethodContext, Call], Awaitable[Outcome]]


# ------------------------------------------------------------------ helpers


def _key(call: Call) -> str | None:
    return None if call.idem_key is None else check_key(call.idem_key)


def _blank(text: str) -> bool:
    """Whether ``text`` holds only whitespace, comments and semicolons."""
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace() or text[i] == ";":
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i + 2)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            return False
    return True


def _statement(ctx: MethodContext, args: Mapping[str, Any]) -> tuple[str, Params]:
    """``(sql, params)`` from ``sql`` or from the session's ``stmt`` (checked against it)."""
    if args.get("stmt") is None:
        return sql_args(args)
    if args.get("sql") is not None:
        raise RequestFailed(ErrorCode.INVALID_REQUEST, "give 'sql' or 'stmt', not both")
    statement = ctx.session.prepared.get(non_negative(args, "stmt"))
    params = params_arg(args.get("params"))
    statement.check(params)
    return statement.sql, params


async def _prepared(ctx: MethodContext, sql: str) -> PreparedStatement | None:
    """Prepare ``sql`` in the session (``prepare: true``); None if it mixes named
    and positional parameters, which a statement id can't be called with."""
    try:
        description = await ctx.storage.describe(sql)
    except RequestFailed:  # it ran, so it is valid: only the probe can't see it
        return None
    names = named(description.param_names)
    if names is None:
        return None
    columns = description.columns or None
    return ctx.session.prepared.add(sql, description.param_count, names, columns)


async def _with_stmt(
    ctx: MethodContext, args: Mapping[str, Any], sql: str, outcome: Outcome
) -> Outcome:
    """``outcome`` with ``stmt`` added to its result when the call asked ``prepare``."""
    if args.get("stmt") is not None or not arg(args, "prepare", bool, False):
        return outcome
    statement = await _prepared(ctx, sql)
    if statement is None:
        return outcome
    result = {**outcome.result, "stmt": statement.id}
    return Outcome(result, replayed=outcome.replayed, applied=outcome.applied)


def _keyed_outcome(ctx: MethodContext, call: Call, keyed: KeyedResult) -> Outcome:
    stats = ctx.stats
    if keyed.outcome is KeyedOutcome.STORED:
        if call.counted:
            stats.idempotent_stored += 1
        return Outcome(keyed.result, applied=True)
    if keyed.outcome is KeyedOutcome.REPLAYED:
        if call.counted:
            stats.idempotent_hits += 1
        logger.debug("%s: replayed the stored result of key %r", ctx.node_id, call.idem_key)
        return Outcome(keyed.result, replayed=True, applied=True)
    if call.counted:
        stats.idempotent_conflicts += 1
    raise RequestFailed(ErrorCode.CONFLICT, "idempotency key reused for a different request")


def _transaction(ctx: MethodContext, args: Mapping[str, Any]) -> NodeTransaction | None:
    """The session's transaction named by ``tx`` (None without ``tx``); TX_ABORTED if
    the session does not have it open."""
    tx_id = arg(args, "tx", str, None)
    if tx_id is None:
        return None
    tx = ctx.session.transactions.get(tx_id)
    if tx is None:
        raise aborted(tx_id, ctx.session.transactions.why_not(tx_id))
    return tx


async def _in(
    ctx: MethodContext,
    call: Call,
    tx: NodeTransaction,
    work: Callable[[Any], Any],
    control: Control,
    *,
    writes: bool,
) -> Any:
    """Run ``work`` (thread side) in transaction ``tx``, in the request's turn."""

    async def run() -> Any:
        try:
            return await ctx.storage.run_on(tx.conn, work, call.deadline, control)
        except RequestFailed as exc:
            if exc.code is ErrorCode.WRITE_CONFLICT and call.counted:
                ctx.stats.write_conflicts += 1
            raise
        finally:
            tx.wrote |= writes and not tx.read_only

    return await ctx.session.transactions.run(tx, call.request_id, call.deadline, run)


def _read_only_execute(conn: Any, sql: str, params: Params, control: Control) -> dict[str, Any]:
    """A statement of a read-only transaction, with the result ``execute`` gives."""
    rows = query_one(conn, sql, params, control, stay_read_only=True)
    result: dict[str, Any] = {"rows_affected": 0, "last_insert_id": None}
    if rows["columns"]:
        result.update(rows)
    return result


# ------------------------------------------------------------- data methods


async def _ping(ctx: MethodContext, call: Call) -> Outcome:
    return Outcome({"node_id": ctx.node_id})


async def _execute(ctx: MethodContext, call: Call) -> Outcome:
    args = call.args
    tx = _transaction(ctx, args)
    key = _key(call) if tx is None else None
    sql, params = _statement(ctx, args)
    expect = expect_rows_arg(args)
    storage, deadline, limit = ctx.storage, call.deadline, ctx.max_frame
    if tx is not None:
        control = storage.control(limit, writes=True)
        if tx.read_only:
            work: Callable[[Any], Any] = lambda c: _read_only_execute(c, sql, params, control)  # noqa: E731
        else:
            work = lambda c: in_savepoint(  # noqa: E731
                c, lambda c: execute_one(c, sql, params, control, expect_rows=expect)
            )
        result = await _in(ctx, call, tx, work, control, writes=True)
        outcome = Outcome(result)
    elif key is None:
        result = await storage.execute(
            sql, params, deadline=deadline, result_limit=limit, expect_rows=expect
        )
        outcome = Outcome(result, applied=True)
    else:
        identity: list[Any] = [sql, params] if expect is None else [sql, params, expect]
        idem = IdempotencyKey(key, request_hash("execute", identity), call.scope)
        keyed = await storage.execute_keyed(
            sql, params, idem, deadline=deadline, result_limit=limit, expect_rows=expect
        )
        outcome = _keyed_outcome(ctx, call, keyed)
    return await _with_stmt(ctx, args, sql, outcome)


async def _query(ctx: MethodContext, call: Call) -> Outcome:
    args = call.args  # a read: any idem_key is ignored
    tx = _transaction(ctx, args)
    sql, params = _statement(ctx, args)
    if tx is not None:
        control = ctx.storage.control(ctx.max_frame)
        read_only = tx.read_only
        result = await _in(
            ctx,
            call,
            tx,
            lambda c: query_one(c, sql, params, control, stay_read_only=read_only),
            control,
            writes=False,
        )
    else:
        result = await ctx.storage.query(
            sql, params, deadline=call.deadline, result_limit=ctx.max_frame
        )
    return await _with_stmt(ctx, args, sql, Outcome(result))


async def _batch(ctx: MethodContext, call: Call) -> Outcome:
    tx = _transaction(ctx, call.args)
    key = _key(call) if tx is None else None
    statements, expects = statements_arg(call.args)
    storage, deadline, limit = ctx.storage, call.deadline, ctx.max_frame
    if tx is not None:
        control = storage.control(limit, writes=True)
        if tx.read_only:

            def work(conn: Any) -> dict[str, Any]:
                results = []
                for index, (sql, params) in enumerate(statements):
                    try:
                        results.append(_read_only_execute(conn, sql, params, control))
                    except RequestFailed as exc:
                        exc.details["statement_index"] = index
                        raise
                return {"results": results}

        else:

            def work(conn: Any) -> dict[str, Any]:
                return in_savepoint(conn, lambda c: run_statements(c, statements, control, expects))

        return Outcome(await _in(ctx, call, tx, work, control, writes=True))
    if key is None:
        result = await storage.batch(
            statements, deadline=deadline, result_limit=limit, expects=expects
        )
        return Outcome(result, applied=True)
    payload: Any = statements if expects is None else [statements, expects]
    idem = IdempotencyKey(key, request_hash("batch", payload), call.scope)
    keyed = await storage.batch_keyed(
        statements, idem, deadline=deadline, result_limit=limit, expects=expects
    )
    return _keyed_outcome(ctx, call, keyed)


async def _executemany(ctx: MethodContext, call: Call) -> Outcome:
    args = call.args
    tx = _transaction(ctx, args)
    key = _key(call) if tx is None else None
    sql, _ = sql_args({"sql": args.get("sql")})
    rows = rows_arg(args)
    storage, deadline = ctx.storage, call.deadline
    if tx is not None:
        if tx.read_only:
            raise RequestFailed(
                ErrorCode.READ_ONLY,
                "the transaction is read-only and executemany writes; nothing was executed",
                details={"executed": False},
            )
        control = storage.control(writes=True)
        work = lambda c: in_savepoint(c, lambda c: run_rows(c, sql, rows, control))  # noqa: E731
        return Outcome(await _in(ctx, call, tx, work, control, writes=True))
    if key is None:
        return Outcome(await storage.executemany(sql, rows, deadline=deadline), applied=True)
    idem = IdempotencyKey(key, request_hash("executemany", [sql, rows]), call.scope)
    keyed = await storage.executemany_keyed(sql, rows, idem, deadline=deadline)
    return _keyed_outcome(ctx, call, keyed)


# ------------------------------------------------------------- transactions


async def _begin(ctx: MethodContext, call: Call) -> Outcome:
    args = call.args
    read_only = arg(args, "read_only", bool, False)
    limit = ctx.session.transaction_idle_timeout
    timeout_ms = non_negative(args, "timeout_ms", None)
    idle = limit if timeout_ms is None else max(min(timeout_ms / 1000, limit), 0.001)
    transactions = ctx.session.transactions
    if transactions.current is not None:
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST,
            f"transaction {transactions.current.id!r} is open on this connection already;"
            " commit or roll it back first",
        )
    storage = ctx.storage
    transactions.node.reserve()
    try:
        conn = await storage.open_connection()
        try:
            control = storage.control()
            await storage.run_on(
                conn, lambda c: begin(c, read_only=read_only), call.deadline, control
            )
        except BaseException:
            storage.close_connection(conn)
            raise
    except BaseException:
        transactions.node.release()
        raise
    tx = NodeTransaction(
        transactions.node.new_id(),
        conn,
        read_only=read_only,
        idle_timeout=idle,
        close=storage.close_connection,
    )
    transactions.opened(tx)
    return Outcome({"tx": tx.id})


def _commit_answer(ctx: MethodContext, call: Call, tx_id: str, keyed: KeyedResult) -> Outcome:
    """The reply to a commit from what its key holds: committed (RESPONSE, replayed
    if it was stored before), not committed (TX_ABORTED), or another request's."""
    if keyed.outcome is KeyedOutcome.CONFLICT:
        return _keyed_outcome(ctx, call, keyed)  # raises CONFLICT
    if isinstance(keyed.result, Mapping) and keyed.result.get("committed") is True:
        return _keyed_outcome(ctx, call, KeyedResult(keyed.outcome, dict(COMMITTED)))
    if call.counted:
        if keyed.outcome is KeyedOutcome.STORED:
            ctx.stats.idempotent_stored += 1
            ctx.stats.commit_fences += 1
        else:
            ctx.stats.idempotent_hits += 1
    raise aborted(
        tx_id,
        "not committed",
        f"transaction {tx_id!r} did not commit: its key {call.idem_key!r} now holds"
        " 'not committed', so no commit of it can apply later; nothing was applied",
    )


async def _commit(ctx: MethodContext, call: Call) -> Outcome:
    tx_id = arg(call.args, "tx", str)
    if call.idem_key is None:
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST,
            "commit needs an idempotency key (REQUEST idem_key); nothing was committed",
        )
    idem = IdempotencyKey(check_key(call.idem_key), request_hash("commit", [tx_id]), call.scope)
    storage, transactions = ctx.storage, ctx.session.transactions
    tx = transactions.get(tx_id)
    keyed: KeyedResult | None = None
    if tx is not None:
        control = storage.control(writes=True)
        clock, ttl = storage.clock, storage.idempotency_ttl

        async def run() -> KeyedResult:
            return await storage.run_on(
                tx.conn,
                lambda c: commit(c, idem, wrote=tx.wrote, clock=clock, ttl=ttl, control=control),
                call.deadline,
                control,
            )

        try:
            keyed = await transactions.run(tx, call.request_id, call.deadline, run)
        except RequestFailed as exc:
            if exc.code is not ErrorCode.TX_ABORTED:
                exc.details.setdefault("executed", False)
                raise
            keyed = None  # it ended meanwhile (idle timeout): fence it like an unknown one
        finally:
            if keyed is not None and keyed.outcome is KeyedOutcome.STORED:
                transactions.end(tx, "committed", outcome="committed")
            else:
                transactions.end(tx, "its commit did not apply")
    if keyed is None:
        # Asking again (docs/protocol.md 10.2): wait for the write lock, then the
        # stored outcome answers; an absent key is fenced with "not committed".
        keyed = await storage.store_outcome(idem, dict(NOT_COMMITTED), deadline=call.deadline)
    return _commit_answer(ctx, call, tx_id, keyed)


async def _rollback(ctx: MethodContext, call: Call) -> Outcome:
    tx_id = arg(call.args, "tx", str)
    transactions = ctx.session.transactions
    tx = transactions.get(tx_id)
    if tx is not None:

        async def nothing() -> None:
            return None

        try:
            await transactions.run(tx, call.request_id, call.deadline, nothing)
        except RequestFailed:
            pass  # rolled back anyway
        finally:
            transactions.end(tx, "rolled back", outcome="rolled_back")
    return Outcome({"rolled_back": True})


# ------------------------------------------------------- prepared statements


async def _prepare(ctx: MethodContext, call: Call) -> Outcome:
    sql = arg(call.args, "sql", str)
    if not sql.strip():
        raise RequestFailed(ErrorCode.INVALID_REQUEST, "'sql' must be non-empty text")
    description = await ctx.storage.describe(sql)
    if not _blank(description.rest):
        raise RequestFailed(
            ErrorCode.SQL_ERROR,
            "only one statement can be prepared at a time",
            details={"executed": False},
        )
    names = named(description.param_names)
    if names is None:
        raise RequestFailed(
            ErrorCode.SQL_ERROR,
            "the statement mixes named (:name) and positional (?) parameters;"
            " a prepared statement takes one kind",
            details={"executed": False},
        )
    statement = ctx.session.prepared.add(
        sql, description.param_count, names, description.columns or None
    )
    if call.counted:
        ctx.stats.statements_prepared += 1
    return Outcome(statement.describe())


async def _unprepare(ctx: MethodContext, call: Call) -> Outcome:
    ctx.session.prepared.remove(non_negative(call.args, "stmt"))
    return Outcome({})


#: Method name -> handler, for methods every node answers.
DATA_METHODS: dict[str, DataHandler] = {
    "ping": _ping,
    "execute": _execute,
    "query": _query,
    "batch": _batch,
    "executemany": _executemany,
    "begin": _begin,
    "commit": _commit,
    "rollback": _rollback,
    "prepare": _prepare,
    "unprepare": _unprepare,
}
