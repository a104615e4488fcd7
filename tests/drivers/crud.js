// CRUD, prepared statements and transactions through node-postgres (`pg`),
// unmodified.
//
// Run by tests/it/wire_drivers.rs with the `pg` scripts/install-deps puts in
// ./.tools/node (found through NODE_PATH):
//
//     node crud.js URI TAG
//
// URI is a PostgreSQL connection URI (silo's front door); TAG marks this
// run's rows in the table `notes` the test made:
//
//     notes (id bigint identity, tag text, worker int, n int, body text)
//
// WORKERS clients, all at once (Promise.all), insert, read, update and
// delete their rows, commit one transaction and roll back two (one by
// choice, one after an error). Named queries ({name, text, values}) are
// parsed once per connection and then only bound and executed; queries
// without values go over the simple protocol. Every result is checked; the
// last line is `ok <rows of TAG left>`. Any failure exits non-zero.
'use strict';

const { Client } = require('pg');

const WORKERS = 4;
const ROWS = 20;
const DELETED = Math.ceil(ROWS / 5); // n % 5 == 0
// What each worker leaves: ROWS inserted, DELETED deleted, two committed.
const KEPT = ROWS - DELETED + 2;

const INSERT = 'INSERT INTO notes (tag, worker, n, body) VALUES ($1, $2, $3, $4)';

function expect(what, got, want) {
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    throw new Error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
}

async function count(c, tag, worker) {
  const r = await c.query({
    name: 'count',
    text: 'SELECT count(*)::int AS n FROM notes WHERE tag = $1 AND worker = $2',
    values: [tag, worker],
  });
  return r.rows[0].n;
}

function insert(c, tag, worker, n, body) {
  return c.query({ name: 'insert', text: INSERT, values: [tag, worker, n, body] });
}

async function work(uri, tag, worker) {
  const c = new Client({ connectionString: uri });
  await c.connect();
  try {
    // Create: a named insert, parsed once, then bound and executed.
    for (let n = 0; n < ROWS; n++) {
      const r = await insert(c, tag, worker, n, `note ${n}`);
      expect('rows inserted by one insert', r.rowCount, 1);
    }
    expect('rows inserted', await count(c, tag, worker), ROWS);

    // Read: every row by id, with a named query; the ids with an unnamed
    // one (extended protocol, parsed each time).
    const ids = (
      await c.query('SELECT id FROM notes WHERE tag = $1 AND worker = $2 ORDER BY n', [
        tag,
        worker,
      ])
    ).rows.map((r) => r.id);
    expect('ids read', ids.length, ROWS);
    for (let n = 0; n < ids.length; n++) {
      const r = await c.query({
        name: 'get-one',
        text: 'SELECT n, body FROM notes WHERE id = $1',
        values: [ids[n]],
      });
      expect(`row ${ids[n]}`, r.rows, [{ n, body: `note ${n}` }]);
    }

    // Update: the even rows, one named statement each.
    let updated = 0;
    for (let i = 0; i < ids.length; i += 2) {
      const r = await c.query({
        name: 'shout',
        text: 'UPDATE notes SET body = upper(body) WHERE id = $1',
        values: [ids[i]],
      });
      updated += r.rowCount;
    }
    expect('rows updated', updated, ROWS / 2);
    const upper = await c.query(
      "SELECT count(*)::int AS n FROM notes WHERE tag = $1 AND worker = $2 AND body LIKE 'NOTE %'",
      [tag, worker],
    );
    expect('upper-case rows', upper.rows[0].n, ROWS / 2);

    // Delete: n % 5 == 0.
    const del = await c.query('DELETE FROM notes WHERE tag = $1 AND worker = $2 AND n % 5 = 0', [
      tag,
      worker,
    ]);
    expect('rows deleted', del.rowCount, DELETED);

    // A transaction committed.
    await c.query('BEGIN');
    await insert(c, tag, worker, 100, 'committed');
    await insert(c, tag, worker, 101, 'committed');
    await c.query('COMMIT');
    const before = await count(c, tag, worker);
    expect('after the commit', before, KEPT);

    // A transaction rolled back by choice: nothing of it stays.
    await c.query('BEGIN');
    await insert(c, tag, worker, 200, 'rolled back');
    await insert(c, tag, worker, 201, 'rolled back');
    expect('inside the transaction', await count(c, tag, worker), before + 2);
    await c.query('ROLLBACK');
    expect('after the rollback', await count(c, tag, worker), before);

    // A transaction that fails halfway (in a named statement): its first
    // insert goes too, and the connection is usable afterwards.
    await c.query('BEGIN');
    await insert(c, tag, worker, 300, 'rolled back');
    let failed = null;
    try {
      await c.query({ name: 'divide', text: 'SELECT 1 / ($1::int - $2::int)', values: [worker, worker] });
    } catch (e) {
      failed = e;
    }
    if (!failed || failed.code !== '22012') {
      throw new Error(`division by zero: got ${failed}`);
    }
    await c.query('ROLLBACK');
    expect('after the failed transaction', await count(c, tag, worker), before);
    // The statement that failed is still prepared, and works.
    const ok = await c.query({ name: 'divide', text: 'SELECT 1 / ($1::int - $2::int)', values: [worker + 1, worker] });
    expect('divide again', ok.rows[0]['?column?'], 1);

    // Simple protocol, several statements in one query string.
    const multi = await c.query(
      `UPDATE notes SET body = body || '!' WHERE tag = '${tag}' AND worker = ${worker} AND n = 1; SELECT body FROM notes WHERE tag = '${tag}' AND worker = ${worker} AND n = 1`,
    );
    expect('multi-statement query', multi[1].rows, [{ body: 'note 1!' }]);
  } finally {
    await c.end();
  }
}

async function main() {
  const [uri, tag] = process.argv.slice(2);
  if (!uri || !/^\w+$/.test(tag || '')) {
    throw new Error('usage: node crud.js URI TAG (TAG: letters, digits, _)');
  }
  const results = await Promise.allSettled(
    Array.from({ length: WORKERS }, (_, w) => work(uri, tag, w)),
  );
  const errors = results
    .map((r, w) => (r.status === 'rejected' ? `worker ${w}: ${r.reason.stack || r.reason}` : null))
    .filter((e) => e);
  if (errors.length > 0) {
    throw new Error(errors.join('\n'));
  }

  const c = new Client({ connectionString: uri });
  await c.connect();
  try {
    const r = await c.query('SELECT count(*)::int AS n FROM notes WHERE tag = $1', [tag]);
    expect('rows left', r.rows[0].n, WORKERS * KEPT);
    console.log(`ok ${r.rows[0].n}`);
  } finally {
    await c.end();
  }
}

main().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
