"""Many statements prepared in one pipeline through the front door.

Run by tests/it/wire_drivers.rs with the venv scripts/install-deps makes
(./.tools/pydrivers):

    pipeline.py URI CAP

psycopg 3's pipeline mode prepares STATEMENTS statements (prepare=True) and
runs each before one Sync, more than the CAP statements silo keeps on one
server connection; then checks what that connection holds (at most CAP)
and runs them all again, by their names (silo prepares the ones it closed
again). Then it runs one more pipeline, prints `idle` and waits, connected,
for a line on stdin. Every result is checked; the last line is
`ok <statements held>`.
"""

import sys

import psycopg

STATEMENTS = 40


def main(uri, cap):
    with psycopg.connect(uri, autocommit=True) as conn:
        for round_ in range(2):
            with conn.pipeline():
                curs = [
                    conn.execute(f"SELECT %s::int + {i}", (round_,), prepare=True)
                    for i in range(STATEMENTS)
                ]
            for i, cur in enumerate(curs):
                got = cur.fetchone()[0]
                if got != round_ + i:
                    raise AssertionError(f"round {round_}, statement {i}: got {got}")
            held = conn.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'silo\\_%'"
            ).fetchone()[0]
            if held > cap:
                raise AssertionError(f"round {round_}: {held} statements held, more than {cap}")
        # A last pipeline, then idle between transactions (still connected)
        # until told to go: the test looks at the pool meanwhile.
        with conn.pipeline():
            cur = conn.execute("SELECT 1", prepare=True)
        if cur.fetchone()[0] != 1:
            raise AssertionError("the last pipeline")
        print("idle", flush=True)
        sys.stdin.readline()
    print(f"ok {held}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
