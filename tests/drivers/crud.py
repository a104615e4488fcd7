"""CRUD, prepared statements and transactions through psycopg 3, unmodified.

Run by tests/it/wire_drivers.rs with the venv scripts/install-deps makes
(./.tools/pydrivers):

    crud.py URI TAG

URI is a PostgreSQL connection URI (silo's front door); TAG marks this run's
rows in the table `notes` the test made:

    notes (id bigint identity, tag text, worker int, n int, body text)

WORKERS threads, each on its own connection and all at once, insert, read,
update and delete their rows, commit one transaction and roll back two (one
by choice, one after an error), pipeline prepared reads, COPY in and out and
walk a server-side cursor. Statements run often enough to be prepared on the
server (psycopg's prepare_threshold), and some with prepare=True.
Every result is checked; the last line is `ok <rows of TAG left>`. Any
failure raises, and the exit status is non-zero.
"""

import sys
import threading

import psycopg

WORKERS = 4
# Rows each worker inserts one statement at a time, then as many again with
# executemany (a pipeline: many Parse/Bind/Execute, one Sync).
ROWS = 10
# What each worker leaves: 2 * ROWS inserted, those with n % 5 == 0 deleted,
# two more committed in a transaction.
KEPT = 2 * ROWS - len(range(0, 2 * ROWS, 5)) + 2

INSERT = "INSERT INTO notes (tag, worker, n, body) VALUES (%s, %s, %s, %s)"


def expect(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def count(conn, tag, worker):
    return conn.execute(
        "SELECT count(*) FROM notes WHERE tag = %s AND worker = %s", (tag, worker)
    ).fetchone()[0]


def work(uri, tag, worker):
    # prepare_threshold is psycopg's default, said out loud: a statement is
    # prepared on the server from its sixth run.
    with psycopg.connect(uri, autocommit=True, prepare_threshold=5) as conn:
        # Create: one row per statement (auto-prepared after 5), then a batch.
        for n in range(ROWS):
            conn.execute(INSERT, (tag, worker, n, f"note {n}"))
        with conn.cursor() as cur:
            cur.executemany(
                INSERT, [(tag, worker, n, f"note {n}") for n in range(ROWS, 2 * ROWS)]
            )
        expect("rows inserted", count(conn, tag, worker), 2 * ROWS)

        # Read: every row by id, with a statement prepared up front.
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM notes WHERE tag = %s AND worker = %s ORDER BY n",
                (tag, worker),
            )
        ]
        expect("ids read", len(ids), 2 * ROWS)
        for n, id_ in enumerate(ids):
            row = conn.execute(
                "SELECT n, body FROM notes WHERE id = %s", (id_,), prepare=True
            ).fetchone()
            expect(f"row {id_}", row, (n, f"note {n}"))

        # Update: the even rows, one statement each (prepared from the sixth).
        updated = 0
        for id_ in ids[::2]:
            cur = conn.execute(
                "UPDATE notes SET body = upper(body) WHERE id = %s", (id_,)
            )
            updated += cur.rowcount
        expect("rows updated", updated, ROWS)
        upper = conn.execute(
            "SELECT count(*) FROM notes WHERE tag = %s AND worker = %s AND body LIKE 'NOTE %%'",
            (tag, worker),
        ).fetchone()[0]
        expect("upper-case rows", upper, ROWS)

        # Delete: n % 5 == 0.
        cur = conn.execute(
            "DELETE FROM notes WHERE tag = %s AND worker = %s AND n %% 5 = 0",
            (tag, worker),
        )
        expect("rows deleted", cur.rowcount, len(range(0, 2 * ROWS, 5)))

        # A transaction committed.
        with conn.transaction():
            for n in (100, 101):
                conn.execute(INSERT, (tag, worker, n, "committed"))
        before = count(conn, tag, worker)
        expect("after the commit", before, KEPT)

        # A transaction rolled back by choice: nothing of it stays.
        with conn.transaction() as tx:
            for n in (200, 201):
                conn.execute(INSERT, (tag, worker, n, "rolled back"))
            expect("inside the transaction", count(conn, tag, worker), before + 2)
            raise psycopg.Rollback(tx)
        expect("after the rollback", count(conn, tag, worker), before)

        # A transaction that fails halfway: its first insert goes too, and
        # the connection is usable afterwards.
        try:
            with conn.transaction():
                conn.execute(INSERT, (tag, worker, 300, "rolled back"))
                conn.execute("SELECT 1 / (%s - %s)", (worker, worker))
            raise AssertionError("division by zero succeeded")
        except psycopg.errors.DivisionByZero:
            pass
        expect("after the failed transaction", count(conn, tag, worker), before)

        # A pipeline: several prepared statements sent before any result
        # (rows neither updated nor deleted).
        kept = (1, 3, 7)
        with conn.pipeline():
            curs = [
                conn.execute(
                    "SELECT n, body FROM notes WHERE id = %s", (ids[n],), prepare=True
                )
                for n in kept
            ]
        expect(
            "pipelined reads",
            [c.fetchone() for c in curs],
            [(n, f"note {n}") for n in kept],
        )

        # COPY in and out (then the copied rows deleted).
        with conn.cursor() as cur:
            with cur.copy("COPY notes (tag, worker, n, body) FROM STDIN") as copy:
                for n in range(400, 405):
                    copy.write_row((tag, worker, n, "copied"))
            with cur.copy(
                "COPY (SELECT n FROM notes WHERE tag = %s AND worker = %s AND n >= 400"
                " ORDER BY n) TO STDOUT",
                (tag, worker),
            ) as copy:
                copied = [int(row[0]) for row in copy.rows()]
            expect("rows copied out", copied, list(range(400, 405)))
            cur.execute(
                "DELETE FROM notes WHERE tag = %s AND worker = %s AND n >= 400",
                (tag, worker),
            )
            expect("copied rows deleted", cur.rowcount, 5)

        # A server-side cursor (DECLARE, FETCH) in a transaction.
        with conn.transaction():
            with conn.cursor(name=f"walk_{worker}") as cur:
                cur.itersize = 3
                cur.execute(
                    "SELECT n FROM notes WHERE tag = %s AND worker = %s ORDER BY n",
                    (tag, worker),
                )
                walked = [r[0] for r in cur]
        expect("rows walked", len(walked), before)

        # Default (non-autocommit) use: psycopg opens the transaction itself.
        conn.autocommit = False
        conn.execute(
            "UPDATE notes SET body = body || '!' WHERE tag = %s AND worker = %s AND n = 1",
            (tag, worker),
        )
        conn.commit()
        bang = conn.execute(
            "SELECT body FROM notes WHERE tag = %s AND worker = %s AND n = 1", (tag, worker)
        ).fetchone()[0]
        conn.rollback()
        expect("committed by conn.commit()", bang, "note 1!")


def main():
    uri, tag = sys.argv[1], sys.argv[2]
    errors = []

    def run(worker):
        try:
            work(uri, tag, worker)
        except BaseException as e:  # reported below, with its worker
            errors.append(f"worker {worker}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        sys.exit(1)

    with psycopg.connect(uri) as conn:
        total = conn.execute(
            "SELECT count(*) FROM notes WHERE tag = %s", (tag,)
        ).fetchone()[0]
    expect("rows left", total, WORKERS * KEPT)
    print(f"ok {total}")


if __name__ == "__main__":
    main()
