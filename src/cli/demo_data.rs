//! `silo dev`'s sample data: a demo clinic group gets a few locations,
//! staff, patients and appointments on first start, so the console and the
//! app API show something at once. Written as the tenant's own role.

use anyhow::Context;
use sqlx::{Connection, PgConnection};

/// Rows of one demo clinic group, in one transaction as its role; nothing
/// when it already has a clinic (a later start, or data of the user's own).
pub(super) async fn seed(database_url: &str, role: &str, group: &str) -> anyhow::Result<bool> {
    let mut conn = PgConnection::connect(database_url)
        .await
        .context("connect to the demo clinic's database")?;
    let mut tx = conn.begin().await?;
    sqlx::raw_sql(&format!("SET LOCAL ROLE \"{}\"", role.replace('"', "\"\"")))
        .execute(&mut *tx)
        .await
        .context("act as the demo clinic's role")?;
    let clinics: i64 = sqlx::query_scalar("SELECT count(*) FROM clinics")
        .fetch_one(&mut *tx)
        .await?;
    if clinics > 0 {
        return Ok(false);
    }
    sqlx::query(SAMPLE)
        .bind(format!("{group} – Old Town"))
        .bind(format!("{group} – Riverside"))
        .execute(&mut *tx)
        .await
        .context("insert the demo clinic's sample data")?;
    tx.commit().await?;
    conn.close().await.ok();
    Ok(true)
}

/// Two locations, four staff, eight patients and a fortnight of
/// appointments around now (`$1`, `$2`: the locations' names).
const SAMPLE: &str = "
WITH c AS (
    INSERT INTO clinics (name, address, phone, timezone) VALUES
        ($1, '1 Market Square', '+49 30 1000 001', 'Europe/Berlin'),
        ($2, '22 Quay Street', '+49 30 1000 002', 'Europe/Berlin')
    RETURNING id, CASE WHEN name = $1 THEN 1 ELSE 2 END AS n
), s AS (
    INSERT INTO staff (clinic_id, full_name, role, email)
    SELECT c.id, v.full_name, v.role, v.email FROM c JOIN (VALUES
        (1, 'Dr. Amira Haddad', 'doctor', 'amira.haddad@example.org'),
        (1, 'Jonas Becker', 'nurse', 'jonas.becker@example.org'),
        (2, 'Dr. Lena Fischer', 'doctor', 'lena.fischer@example.org'),
        (2, 'Sofia Rossi', 'receptionist', 'sofia.rossi@example.org')
    ) AS v (n, full_name, role, email) ON v.n = c.n
    RETURNING id, clinic_id, role
), p AS (
    INSERT INTO patients (full_name, date_of_birth, email, phone) VALUES
        ('Maria Schmidt', '1984-03-12', 'maria.schmidt@example.net', '+49 151 000 0001'),
        ('Ahmet Yilmaz', '1972-11-02', NULL, '+49 151 000 0002'),
        ('Chloé Martin', '1995-06-23', 'chloe.martin@example.net', NULL),
        ('Piotr Nowak', '1960-01-30', NULL, '+49 151 000 0004'),
        ('Emma Johansson', '2001-09-09', 'emma.j@example.net', NULL),
        ('Luca Bianchi', '1988-12-17', NULL, '+49 151 000 0006'),
        ('Hana Kobayashi', '1979-04-05', 'hana.k@example.net', NULL),
        ('Noah Weber', '2015-07-21', NULL, '+49 151 000 0008')
    RETURNING id, full_name
), pn AS (
    SELECT id, row_number() OVER (ORDER BY full_name)::int AS n FROM p
)
INSERT INTO appointments (clinic_id, patient_id, staff_id, starts_at, ends_at, status, reason)
SELECT s.clinic_id, p.id, s.id,
       date_trunc('day', now()) + make_interval(days => p.n * 2 - 7, hours => 9),
       date_trunc('day', now()) + make_interval(days => p.n * 2 - 7, hours => 9, mins => 30),
       CASE WHEN p.n <= 3 THEN 'completed' ELSE 'scheduled' END,
       (ARRAY['check-up', 'vaccination', 'follow-up', 'consultation'])[1 + p.n % 4]
  FROM pn p JOIN s ON s.role = 'doctor'
   AND s.clinic_id = (SELECT id FROM c WHERE c.n = 1 + p.n % 2)
";
