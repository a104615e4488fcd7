//! The console's tenants page at 10,000 tenants: time and bytes per page.
//!
//! `cargo bench --bench console` (tenants: `SILO_BENCH_TENANTS`, default
//! 10000; requests per kind of page: `SILO_BENCH_N`, default 200).
//!
//! silo serves on a fsync-off private cluster whose registry holds the
//! tenants (rows written at once, after the start-up reconcile: the page
//! reads the registry only, never a tenant database). A client signed in to
//! the console asks, one request at a time, for four kinds of page: the
//! first pages in creation order (following each page's "Next page" link,
//! 50 tenants a page), a search by part of a slug, a status and plan
//! filter sorted by name, and a sort by slug from a cursor deep in the list.
//! Time is measured at the client on loopback (request sent to the whole
//! body read), an upper bound of the server's time; bytes are the body
//! plus the response headers as sent. Percentiles are nearest-rank.

mod support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use silo::embedded::postgres::Durability;
use silo::embedded::EmbeddedPostgres;
use support::{
    control, control_plane, env_number, init_logging, load_average, ms, nearest_rank, SiloServer,
    ADMIN_TOKEN,
};

/// The targets of issue 17.
const P95_TARGET: Duration = Duration::from_millis(50);
const BYTES_TARGET: usize = 60 * 1024;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    init_logging();
    let tenants: i32 = env_number("SILO_BENCH_TENANTS", 10_000)?;
    let n: usize = env_number("SILO_BENCH_N", 200)?;
    ensure!(tenants > 0 && n > 0, "the sizes must be at least 1");
    let pg = tokio::task::spawn_blocking(|| EmbeddedPostgres::start_temp(Durability::Throwaway))
        .await?
        .context("start a private PostgreSQL")?;
    let outcome = run(&pg, tenants, n).await;
    let mut pg = pg;
    tokio::task::spawn_blocking(move || pg.stop())
        .await?
        .context("stop PostgreSQL")?;
    outcome
}

async fn run(pg: &EmbeddedPostgres, tenants: i32, n: usize) -> Result<()> {
    let (keyring, registry) = control_plane(pg).await?;
    let cp = control(&registry, &keyring, 0, None);
    cp.register_server("default", &pg.url("postgres"), 100, 100_000)
        .await?;
    let silo = SiloServer::start(cp, 0).await?;
    seed(&registry, tenants).await?;
    let base = silo.base();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let cookie = sign_in(&http, &base).await?;
    println!(
        "console tenants page: {tenants} tenants, {n} requests per kind; load average {}",
        load_average()
    );
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "page", "p50 ms", "p95 ms", "p99 ms", "max ms", "max bytes"
    );
    let deep = registry_cursor(&registry, tenants / 2).await?;
    let kinds: [(&str, Vec<String>); 4] = [
        (
            "first pages, creation order",
            vec!["/console/tenants".into()],
        ),
        (
            "search 'clinic-07' (slug part)",
            vec!["/console/tenants?q=clinic-07".into()],
        ),
        (
            "status+plan filter, by name",
            vec!["/console/tenants?status=active&plan=premium&sort=name".into()],
        ),
        (
            "by slug from a deep cursor",
            vec![format!("/console/tenants?sort=slug&cursor={deep}")],
        ),
    ];
    let mut all_ok = true;
    for (label, start) in kinds {
        let mut times = Vec::with_capacity(n);
        let mut most = 0usize;
        let mut next = start[0].clone();
        for _ in 0..n {
            let began = Instant::now();
            let res = http
                .get(format!("{base}{next}"))
                .header("cookie", &cookie)
                .send()
                .await?;
            ensure!(res.status() == 200, "{next}: {}", res.status());
            let header_bytes: usize = res
                .headers()
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum();
            let body = res.text().await?;
            times.push(began.elapsed());
            most = most.max(body.len() + header_bytes);
            // Follow the pages in order; start over at the end.
            next = next_link(&body).unwrap_or_else(|| start[0].clone());
        }
        times.sort();
        let p95 = nearest_rank(&times, 95);
        all_ok &= p95 <= P95_TARGET && most <= BYTES_TARGET;
        println!(
            "{label:<34} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>10}",
            ms(nearest_rank(&times, 50)),
            ms(p95),
            ms(nearest_rank(&times, 99)),
            ms(*times.last().unwrap()),
            most
        );
    }
    println!(
        "targets: p95 <= {} ms and <= {} bytes per page: {}",
        P95_TARGET.as_millis(),
        BYTES_TARGET,
        if all_ok { "met" } else { "NOT met" }
    );
    silo.stop().await
}

/// `tenants` registry rows: a mix of statuses and plans on one server,
/// written in one statement (no database behind them: the page never
/// opens one).
async fn seed(registry: &silo::registry::Registry, tenants: i32) -> Result<()> {
    sqlx::query(
        "INSERT INTO tenants (id, slug, name, plan, status, server_id, database_name,
                              role_name, password_enc, key_id, schema_version, created_at)
         SELECT gen_random_uuid(), 'clinic-' || lpad(i::text, 5, '0'),
                (ARRAY['North', 'South', 'East', 'West', 'Central'])[1 + i % 5]
                    || ' Family Clinic ' || i,
                (ARRAY['free', 'standard', 'premium'])[1 + i % 3],
                (ARRAY['active', 'active', 'active', 'suspended', 'archived'])[1 + i % 5],
                (SELECT id FROM db_servers WHERE name = 'default'),
                'silo_bench_' || i, 'silo_bench_' || i, '\\x00'::bytea, 'bench', 1,
                now() - make_interval(secs => $1 - i)
           FROM generate_series(1, $1) AS i",
    )
    .bind(tenants)
    .execute(registry.pool())
    .await
    .context("seed the tenants")?;
    sqlx::query("ANALYZE tenants")
        .execute(registry.pool())
        .await?;
    Ok(())
}

/// The id of the `nth` tenant by slug: a cursor halfway down the list.
async fn registry_cursor(registry: &silo::registry::Registry, nth: i32) -> Result<String> {
    let id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM tenants ORDER BY slug, id OFFSET $1 LIMIT 1")
            .bind(i64::from(nth))
            .fetch_one(registry.pool())
            .await?;
    Ok(id.to_string())
}

/// Sign in with the bootstrap token; the session cookie (`name=value`).
async fn sign_in(http: &reqwest::Client, base: &str) -> Result<String> {
    let page = http.get(format!("{base}/console/sign-in")).send().await?;
    let nonce_cookie = first_cookie(page.headers()).context("a sign-in cookie")?;
    let html = page.text().await?;
    let nonce = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .context("the sign-in form's token")?
        .to_owned();
    let res = http
        .post(format!("{base}/console/sign-in"))
        .header("cookie", nonce_cookie)
        .form(&[("csrf", nonce.as_str()), ("token", ADMIN_TOKEN)])
        .send()
        .await?;
    ensure!(res.status() == 303, "sign-in answered {}", res.status());
    first_cookie(res.headers()).context("a session cookie")
}

fn first_cookie(headers: &reqwest::header::HeaderMap) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
        .find(|c| !c.ends_with('='))
}

/// The "Next page" link of a tenants page, if it has one.
fn next_link(html: &str) -> Option<String> {
    let before = html.split(" rel=\"next\"").next()?;
    if before.len() == html.len() {
        return None;
    }
    let href = before.rsplit("href=\"").next()?.split('"').next()?;
    Some(href.replace("&amp;", "&"))
}
