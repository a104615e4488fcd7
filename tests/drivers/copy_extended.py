"""COPY FROM STDIN by the extended protocol (libpq's PQexecParams, which
sends Parse/Bind/Describe/Execute/Sync and, after CopyDone, another Sync),
three times, each followed by a statement prepared and run on the server;
through psycopg 3's libpq binding. Prints "ok <rows>" at the end.

Usage: copy_extended.py <uri>
"""

import sys

from psycopg import pq

E = pq.ExecStatus


def main(uri: str) -> None:
    conn = pq.PGconn.connect(uri.encode())
    assert conn.status == pq.ConnStatus.OK, conn.get_error_message()
    for round_ in range(3):
        r = conn.exec_params(b"COPY copied (n) FROM STDIN", [])
        assert r.status == E.COPY_IN, (r.status, r.error_message)
        assert conn.put_copy_data(b"".join(b"%d\n" % i for i in range(100))) == 1
        assert conn.put_copy_end() == 1
        r = conn.get_result()
        assert r.status == E.COMMAND_OK, (r.status, r.error_message)
        assert conn.get_result() is None
        name = b"s%d" % round_
        r = conn.prepare(name, b"SELECT count(*) FROM copied WHERE n >= $1::int")
        assert r.status == E.COMMAND_OK, (r.status, r.error_message)
        r = conn.exec_prepared(name, [b"0"])
        assert r.status == E.TUPLES_OK, (r.status, r.error_message)
        assert int(r.get_value(0, 0)) == 100 * (round_ + 1), r.get_value(0, 0)
    r = conn.exec_(b"SELECT count(*) FROM copied")
    assert r.status == E.TUPLES_OK, (r.status, r.error_message)
    print("ok", int(r.get_value(0, 0)))
    conn.finish()


if __name__ == "__main__":
    main(sys.argv[1])
