"""psycopg 3 evicting its prepared statements through the front door.

Run by tests/it/wire_drivers.rs with the venv scripts/install-deps makes,
under PSYCOPG_IMPL=python: the pure-Python psycopg on the system's libpq
(before 17), which drops statements it evicts with SQL `DEALLOCATE name`
and, after a rollback, all of them with `DEALLOCATE ALL` (as Rails does):

    evict.py URI

Every query is prepared at once (prepare_threshold 0) and psycopg keeps 5
(prepared_max): QUERIES distinct queries, each run twice (the second run
uses the statement), and a rollback every 10. Every result is checked; the
last line is `ok <queries run>`. Any failure raises, and the exit status is
non-zero.
"""

import sys

import psycopg
from psycopg import capabilities

QUERIES = 60
# About 2 kB of text each.
PAD = "x" * 2000


def main(uri):
    if capabilities.has_send_close_prepared():
        raise AssertionError("this libpq closes statements by the protocol: run under PSYCOPG_IMPL=python")
    runs = 0
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.prepare_threshold = 0
        conn.prepared_max = 5
        for i in range(QUERIES):
            for _ in range(2):
                got = conn.execute(f"SELECT %s::int + {i} /* {PAD} */", (1,)).fetchone()[0]
                if got != i + 1:
                    raise AssertionError(f"query {i}: got {got}, want {i + 1}")
                runs += 1
            if i % 10 == 9:
                # A rollback run by a cursor makes psycopg drop all its
                # statements (`DEALLOCATE ALL`) and prepare under new names.
                conn.execute("BEGIN")
                conn.execute("SELECT 1")
                conn.execute("ROLLBACK")
    print(f"ok {runs}")


if __name__ == "__main__":
    main(sys.argv[1])
