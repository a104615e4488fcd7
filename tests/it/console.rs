//! The admin console in a real browser: Debian's headless Chromium, driven
//! over WebDriver (`chromedriver`), against a real `silo serve` on a real
//! PostgreSQL cluster and S3 store. Each page visited is also checked with
//! axe-core (no serious or critical accessibility violation), for requests
//! that leave silo's origin (none may), and kept as a screenshot under
//! `target/console-screenshots/`. `scripts/install-deps` installs Chromium,
//! chromedriver and the pinned axe-core.

mod webdriver;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use webdriver::{Browser, WAIT};

use crate::common::{second_server, Silo, TestEnv, ADMIN_TOKEN};

/// axe-core, as `scripts/install-deps` installs it (pinned in scripts/node-drivers).
const AXE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.tools/node/node_modules/axe-core/axe.min.js"
);

/// Where the screenshots of the main pages are kept.
fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("console-screenshots")
}

/// A browser on one silo, checking every page it is asked to.
struct Console {
    browser: Browser,
    base: String,
    axe: String,
    /// Screenshots are named `{prefix}-{page}.png`.
    prefix: &'static str,
}

impl Console {
    async fn open(base: &str, prefix: &'static str) -> Self {
        let axe = std::fs::read_to_string(AXE).unwrap_or_else(|_| {
            panic!("axe-core is not installed at {AXE}: run scripts/install-deps")
        });
        Self {
            browser: Browser::start().await,
            base: base.to_owned(),
            axe,
            prefix,
        }
    }

    async fn goto(&self, path: &str) {
        self.browser.goto(&format!("{}{path}", self.base)).await;
    }

    /// Sign in with `token` from the sign-in page; lands on the fleet.
    async fn sign_in(&self, token: &str) {
        self.goto("/console/sign-in").await;
        self.check("sign-in").await;
        self.browser.fill("#token", token).await;
        self.browser.click("main form button[type=submit]").await;
        let base = self.base.clone();
        self.browser
            .wait_url(move |u| u == format!("{base}/console"), "the fleet page")
            .await;
        self.browser.find("#servers").await;
    }

    /// Check the page now shown: no serious or critical axe violation, no
    /// request that left silo's origin; keep its screenshot.
    async fn check(&self, page: &str) {
        self.same_origin(page).await;
        // No script error, and nothing the page tried was refused by its
        // CSP (an inline style or script, a request elsewhere).
        let problems: Vec<(String, String)> = self
            .browser
            .console_log()
            .await
            .into_iter()
            .filter(|(level, message)| {
                level == "SEVERE" || message.contains("Content Security Policy")
            })
            // A page answered 4xx on purpose is logged as a failed load.
            .filter(|(_, message)| !message.contains("the server responded with a status of 4"))
            .collect();
        assert!(problems.is_empty(), "{page}: browser console: {problems:?}");
        assert_eq!(
            self.violations().await,
            json!([]),
            "{page}: accessibility violations (axe-core)"
        );
    }

    /// Keep the page's screenshot; fail if it made a request that left
    /// silo's origin.
    async fn same_origin(&self, page: &str) {
        let b = &self.browser;
        b.screenshot(&screenshots().join(format!("{}-{page}.png", self.prefix)))
            .await;
        let resources = b
            .exec(
                "return performance.getEntriesByType('resource').map(e => e.name)\
                   .concat([location.href]);",
                json!([]),
            )
            .await;
        let foreign: Vec<&str> = resources
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .filter(|u| !u.starts_with(&format!("{}/", self.base)))
            .collect();
        assert!(
            foreign.is_empty(),
            "{page}: requests left silo's origin: {foreign:?}"
        );
    }

    /// axe-core's serious and critical violations on the page now.
    async fn violations(&self) -> Value {
        let b = &self.browser;
        if b.exec("return typeof window.axe;", json!([])).await != "object" {
            b.exec(&format!("{}\nreturn true;", self.axe), json!([]))
                .await;
        }
        b.exec_async(
            "const done = arguments[arguments.length - 1];
                 axe.run(document, {resultTypes: ['violations']})
                   .then(r => done(r.violations
                       .filter(v => v.impact === 'serious' || v.impact === 'critical')
                       .map(v => v.impact + ' ' + v.id + ': ' + v.help + ' at '
                            + v.nodes.map(n => n.target.join(' ')).join(', '))))
                   .catch(e => done(['axe did not run: ' + e]));",
            json!([]),
        )
        .await
    }

    /// Wait on an operation's page until it ends; its final status.
    async fn wait_operation(&self) -> String {
        let b = &self.browser;
        b.wait_url(
            |u| u.contains("/console/operations/"),
            "an operation's page",
        )
        .await;
        let deadline = Instant::now() + WAIT;
        loop {
            let status = b.text("#progress [data-status]").await;
            if status == "succeeded" || status == "failed" {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the operation never ended: {}",
                b.text("#progress").await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Post the tenant page's form whose action ends with `/{action}`,
    /// typing the slug first where it asks for it.
    async fn act(&self, action: &str, confirm: Option<&str>) {
        let form = format!("form[action$='/{action}']");
        if let Some(slug) = confirm {
            self.browser
                .fill(&format!("{form} input[name=confirm]"), slug)
                .await;
        }
        self.browser
            .click(&format!("{form} button[type=submit]"))
            .await;
    }
}

/// `count` registry rows of archived tenants (no database behind them),
/// written at once, so a listing has a crowd to search.
async fn seed_archived(env: &TestEnv, count: i32) {
    sqlx::query(
        "INSERT INTO tenants (id, slug, name, plan, status, server_id, database_name,
                              role_name, password_enc, key_id, schema_version)
         SELECT gen_random_uuid(), 'seeded-' || lpad(i::text, 5, '0'), 'Seeded Clinic ' || i,
                'standard', 'archived', (SELECT id FROM db_servers WHERE name = 'default'),
                'silo_seeded_' || i, 'silo_seeded_' || i, '\\x00'::bytea, 'seed', 1
           FROM generate_series(1, $1) AS i",
    )
    .bind(count)
    .execute(env.registry().pool())
    .await
    .unwrap();
    sqlx::query("UPDATE db_servers SET max_tenants = 100000 WHERE name = 'default'")
        .execute(env.registry().pool())
        .await
        .unwrap();
}

/// A tenant schema directory for `silo serve`: the embedded clinic schema
/// and a version 2 adding a column, which fails on a tenant that has one.
fn schema_v2() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let v1 = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/migrations/tenant/0001_clinic.sql"
    );
    std::fs::copy(v1, dir.path().join("0001_clinic.sql")).unwrap();
    std::fs::write(
        dir.path().join("0002_preferred_language.sql"),
        "ALTER TABLE patients ADD COLUMN preferred_language text;\n",
    )
    .unwrap();
    dir
}

async fn superuser_exec(env: &TestEnv, slug: &str, sql: &str) {
    let t = env.record(slug).await;
    let pool = sqlx::PgPool::connect(&env.pg.url(&t.database_name))
        .await
        .unwrap();
    sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_runs_tenants_backups_moves_and_a_fleet_migration_from_the_console() {
    let env = TestEnv::setup().storage().start().await;
    // Two tenants at schema version 1 for the fleet migration; one of
    // them already has the column version 2 adds, so it fails there.
    env.create("fleet-ok").await;
    env.create("fleet-bad").await;
    superuser_exec(
        &env,
        "fleet-bad",
        "ALTER TABLE patients ADD COLUMN preferred_language int",
    )
    .await;
    let _second = second_server(&env).await;
    seed_archived(&env, 1000).await;
    let schema = schema_v2();
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-admin.log");
    let silo = Silo::start_with(
        &env,
        None,
        0,
        &log,
        &[("SILO_TENANT_MIGRATIONS", schema.path().to_str().unwrap())],
    )
    .await;
    let c = Console::open(&silo.base, "admin").await;
    let b = &c.browser;

    // Sign in with the bootstrap token: an HttpOnly, SameSite=Strict cookie.
    c.sign_in(ADMIN_TOKEN).await;
    let cookie = b
        .cookie_record("silo_console")
        .await
        .expect("a session cookie");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert!(cookie["expiry"].is_u64(), "the session expires: {cookie}");
    let servers = b.text("#servers + table").await;
    assert!(
        servers.contains("default") && servers.contains("second"),
        "{servers}"
    );
    c.check("fleet").await;

    // The API reference, Scalar served by silo, loads nothing from elsewhere.
    c.goto("/docs").await;
    b.wait_text("body", "Database-per-tenant control plane")
        .await;
    c.same_origin("api-docs").await;
    // (What Scalar logs is its own; the console's pages are checked below.)
    b.console_log().await;

    // Create a tenant from the form; its page shows it active.
    c.goto("/console/tenants/new").await;
    c.check("new-tenant").await;
    b.fill("input[name=slug]", "console-made").await;
    b.fill("input[name=name]", "Made In The Console").await;
    b.click("select[name=server] option[value=default]").await;
    b.click("main form button[type=submit]").await;
    b.wait_url(
        |u| u.ends_with("/console/tenants/console-made"),
        "the new tenant's page",
    )
    .await;
    let facts = b.wait_text("#facts + dl", "active").await;
    assert!(facts.contains("default"), "{facts}");
    c.check("tenant").await;

    // Find it among the 1,000 seeded tenants.
    c.goto("/console/tenants").await;
    assert_eq!(
        b.count("a[rel=next]").await,
        1,
        "more than a page of tenants"
    );
    c.check("tenants").await;
    b.fill("input[name=q]", "console-m").await;
    b.click("form.filters button[type=submit]").await;
    b.wait_url(|u| u.contains("q=console-m"), "the search's results")
        .await;
    assert_eq!(b.count("tbody tr").await, 1, "{}", b.text("main").await);
    assert!(b.text("tbody").await.contains("Made In The Console"));
    c.goto("/console/tenants?q=seeded-0099&status=archived&sort=slug")
        .await;
    assert_eq!(b.count("tbody tr").await, 10, "seeded-00990 … seeded-00999");

    // Its usage, once the collector has measured it: the size, and a
    // daily line named for assistive technology.
    // (A pass the served replica runs meanwhile holds the lock: try again.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while env.control.collect_usage_once().await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "no usage pass ran");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    c.goto("/console/tenants/console-made").await;
    let usage = b.text("#usage + dl").await;
    assert!(usage.contains("MiB") && usage.contains("1 days"), "{usage}");
    assert_eq!(b.count("#usage + dl svg[role=img][aria-label]").await, 2);
    c.check("tenant-usage").await;
    // A read-only app credential made from the page: its password shown
    // once, and the credential is the reader's.
    let cred = "form[action$='/app-credentials']";
    b.fill(&format!("{cred} input[name=name]"), "reports").await;
    b.click(&format!("{cred} input[name=read_only]")).await;
    b.click(&format!("{cred} button[type=submit]")).await;
    b.wait_text("[role=status]", "reports").await;
    let t = env.record("console-made").await;
    let creds = env.registry().app_credentials(t.id).await.unwrap();
    assert!(
        creds.iter().any(|c| c.name == "reports" && c.read_only),
        "{creds:?}"
    );
    // The fleet lists the largest tenants the collector measured.
    c.goto("/console").await;
    let largest = b.text("#largest + table").await;
    assert!(largest.contains("console-made"), "{largest}");

    // Suspend, then resume.
    c.goto("/console/tenants/console-made").await;
    c.act("suspend", None).await;
    b.wait_text("#facts + dl", "suspended").await;
    c.act("resume", None).await;
    b.wait_text("#facts + dl", "active").await;

    // Run a backup and watch it finish on the page (htmx polling).
    c.act("backup", None).await;
    b.wait_text("#backup-list", "succeeded").await;
    c.check("tenant-backed-up").await;

    // Restore it over the tenant: the slug typed in the confirmation.
    b.click("#backup-list details summary").await;
    b.fill(
        "#backup-list form[action$='/restore'] input[name=confirm]",
        "console-made",
    )
    .await;
    b.click("#backup-list form[action$='/restore'] button[type=submit]")
        .await;
    assert_eq!(c.wait_operation().await, "succeeded");
    c.check("operation").await;

    // A typed confirmation that does not name the tenant does nothing.
    c.goto("/console/tenants/console-made").await;
    c.act("move", Some("console-mad")).await;
    b.wait_text("main", "Type the tenant's slug, console-made")
        .await;

    // Move it to the second server and see it complete.
    c.goto("/console/tenants/console-made").await;
    c.act("move", Some("console-made")).await;
    assert_eq!(c.wait_operation().await, "succeeded");
    c.goto("/console/tenants/console-made").await;
    b.wait_text("#facts + dl", "second").await;

    // A fleet migration: one tenant fails, and the page names it.
    c.goto("/console/migrations").await;
    c.check("migrations").await;
    b.click("main form[action='/console/migrations'] button[type=submit]")
        .await;
    assert_eq!(c.wait_operation().await, "failed");
    let failures = b.wait_text("#progress table", "fleet-bad").await;
    assert!(failures.contains("preferred_language"), "{failures}");
    assert!(!failures.contains("fleet-ok"), "{failures}");
    c.check("fleet-migration").await;

    // Rename it from the edit form.
    c.goto("/console/tenants/console-made").await;
    b.click("details:has(form[action$='/edit']) summary").await;
    b.fill(
        "form[action$='/edit'] input[name=name]",
        "Renamed In The Console",
    )
    .await;
    b.click("form[action$='/edit'] button[type=submit]").await;
    b.wait_text("#facts + dl", "Renamed In The Console").await;

    // An admin may see the direct URI, once, with the role's password.
    c.act("direct-uri", None).await;
    let shown = b.wait_text("[role=status]", "Direct connection URI").await;
    assert!(shown.contains("postgres"), "{shown}");

    // Servers: both listed, each with its form.
    c.goto("/console/servers").await;
    assert_eq!(b.count("form[action^='/console/servers/']").await, 2);
    c.check("servers").await;

    // Plans: one added, changed (an emptied limit is cleared), deleted by
    // typing its name.
    c.goto("/console/plans").await;
    c.check("plans").await;
    let add = "form[action='/console/plans']";
    b.fill(&format!("{add} input[name=name]"), "console-plan")
        .await;
    b.fill(&format!("{add} input[name=connection_limit]"), "7")
        .await;
    b.fill(&format!("{add} input[name=max_staff]"), "3").await;
    b.click(&format!("{add} button[type=submit]")).await;
    b.wait_text("main table", "console-plan").await;
    let name: silo::domain::Plan = "console-plan".parse().unwrap();
    let made = env.registry().plan(&name).await.unwrap().unwrap();
    assert_eq!((made.connection_limit, made.max_staff), (7, Some(3)));
    let edit = "form[action='/console/plans/console-plan']";
    b.fill(&format!("{edit} input[name=max_staff]"), "").await;
    b.fill(&format!("{edit} input[name=connection_limit]"), "9")
        .await;
    b.click(&format!("{edit} button[type=submit]")).await;
    // The page's address does not change (the post redirects back to it):
    // wait for the change itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let changed = env.registry().plan(&name).await.unwrap().unwrap();
        if (changed.connection_limit, changed.max_staff) == (9, None) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the plan was not changed: {changed:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let gone = "form[action='/console/plans/console-plan/delete']";
    b.fill(&format!("{gone} input[name=confirm]"), "console-plan")
        .await;
    b.click(&format!("{gone} button[type=submit]")).await;
    b.wait_gone(gone).await;
    assert!(env.registry().plan(&name).await.unwrap().is_none());

    // Keys: one made (its token shown once), then revoked by typing its name.
    c.goto("/console/keys").await;
    b.fill(
        "form[action='/console/keys'] input[name=name]",
        "night-shift",
    )
    .await;
    b.click("form[action='/console/keys'] select[name=role] option[value=operator]")
        .await;
    b.fill(
        "form[action='/console/keys'] input[name=expires_in_days]",
        "90",
    )
    .await;
    b.click("form[action='/console/keys'] button[type=submit]")
        .await;
    let shown = b.wait_text("[role=status]", "Admin key created").await;
    assert!(shown.contains("operator"), "{shown}");
    assert_eq!(b.count(".secret").await, 3, "its role, expiry and token");
    let (_, keys) = env
        .call(axum::http::Method::GET, "/admin/v1/keys", None)
        .await;
    let made = keys["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "night-shift")
        .expect("the key made");
    let expires: chrono::DateTime<chrono::Utc> =
        made["expires_at"].as_str().unwrap().parse().unwrap();
    let days = (expires - chrono::Utc::now()).num_hours() / 24;
    assert!((89..=90).contains(&days), "expires in {days} days");
    c.check("key-created").await;
    c.goto("/console/keys").await;
    c.check("keys").await;
    // Its expiry changed to a week from now, then taken away.
    let expiry_form = "form[action='/console/keys/night-shift/expiry']";
    let night_shift = || async {
        let (_, keys) = env
            .call(axum::http::Method::GET, "/admin/v1/keys", None)
            .await;
        keys["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == "night-shift")
            .cloned()
            .expect("the key")
    };
    b.fill(&format!("{expiry_form} input[name=expires_in_days]"), "7")
        .await;
    b.click(&format!("{expiry_form} button")).await;
    let deadline = std::time::Instant::now() + WAIT;
    let expires = loop {
        let key = night_shift().await;
        let at: chrono::DateTime<chrono::Utc> =
            key["expires_at"].as_str().unwrap().parse().unwrap();
        if at < expires {
            break at;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the expiry did not change: {key}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let days = (expires - chrono::Utc::now()).num_hours() / 24;
    assert!((6..=7).contains(&days), "expires in {days} days");
    b.wait_url(|u| u.ends_with("/console/keys"), "the keys page")
        .await;
    b.find(expiry_form).await;
    b.click(&format!("{expiry_form} button")).await;
    let deadline = std::time::Instant::now() + WAIT;
    while !night_shift().await["expires_at"].is_null() {
        assert!(
            std::time::Instant::now() < deadline,
            "the expiry was not taken away"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.wait_url(|u| u.ends_with("/console/keys"), "the keys page")
        .await;
    b.find(expiry_form).await;
    b.fill(
        "form[action='/console/keys/night-shift/revoke'] input[name=confirm]",
        "night-shift",
    )
    .await;
    b.click("form[action='/console/keys/night-shift/revoke'] button")
        .await;
    // The page comes back without the key.
    b.wait_gone("form[action='/console/keys/night-shift/revoke']")
        .await;
    assert!(b.url().await.ends_with("/console/keys"));
    let live = env.registry().admin_keys().await.unwrap();
    assert!(live.iter().all(|k| k.name != "night-shift"), "{live:?}");

    // The audit log names the console's actions, filtered by action.
    c.goto("/console/audit?action=tenant.suspend").await;
    let audit = b.wait_text("main table", "tenant.suspend").await;
    assert!(audit.contains("admin"), "{audit}");
    c.check("audit").await;

    // Sign out: the session ends, and the console asks to sign in again.
    c.goto("/console").await;
    b.click("header form[action='/console/sign-out'] button")
        .await;
    b.wait_url(|u| u.ends_with("/console/sign-in"), "the sign-in page")
        .await;
    c.goto("/console/tenants").await;
    b.wait_url(|u| u.ends_with("/console/sign-in"), "the sign-in page")
        .await;
    assert_eq!(env.record("console-made").await.server_name, "second");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_sees_no_control_it_cannot_use_and_forged_or_forbidden_posts_change_nothing() {
    let env = TestEnv::start().await;
    env.create("watched").await;
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-viewer.log");
    let silo = Silo::start(&env, None, 0, &log).await;
    let (status, key) = silo
        .request(
            reqwest::Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": "looker", "role": "viewer"})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{key}");
    let token = key["token"].as_str().unwrap().to_owned();

    let c = Console::open(&silo.base, "viewer").await;
    let b = &c.browser;
    // A wrong token is refused on the sign-in page.
    c.goto("/console/sign-in").await;
    b.fill("#token", "not-a-key").await;
    b.click("main form button[type=submit]").await;
    b.wait_text("[role=alert]", "not a live admin key").await;

    c.sign_in(&token).await;
    assert!(b.text("header").await.contains("looker (viewer)"));
    // No page offers a viewer a form that changes anything.
    let mutating = "form[method=post]:not([action='/console/sign-out'])";
    for (path, page) in [
        ("/console", "fleet"),
        ("/console/tenants", "tenants"),
        ("/console/tenants/watched", "tenant"),
        ("/console/servers", "servers"),
        ("/console/plans", "plans"),
        ("/console/migrations", "migrations"),
        ("/console/audit", "audit"),
    ] {
        c.goto(path).await;
        b.find("main h1").await;
        assert_eq!(
            b.count(mutating).await,
            0,
            "{page} offers a viewer a change"
        );
        assert_eq!(b.count("button.danger").await, 0, "{page}");
        c.check(page).await;
    }

    // Keys are not even listed to a viewer; asked for, the API refuses.
    assert_eq!(b.count("header a[href='/console/keys']").await, 0);
    c.goto("/console/keys").await;
    b.wait_text("main", "403").await;

    // Reading needs no JavaScript: the page as served holds the tenant, and
    // every console answer carries the strict CSP.
    let session = b.cookie("silo_console").await.expect("a session cookie");
    let page = reqwest::Client::new()
        .get(format!("{}/console/tenants?q=watch", silo.base))
        .header("cookie", format!("silo_console={session}"))
        .send()
        .await
        .unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(page.text().await.unwrap().contains(">watched</a>"));

    // The accessibility check does find what it looks for: a control
    // with no label, added to the page, is reported.
    b.exec(
        "document.querySelector('main').appendChild(document.createElement('input')); \
         return true;",
        json!([]),
    )
    .await;
    let found = c.violations().await.to_string();
    assert!(
        found.contains("label"),
        "axe-core missed an unlabelled input: {found}"
    );

    // A forged form (another site's page cannot know the CSRF token): 403.
    let forge = "const f = document.createElement('form');
                 f.method = 'post'; f.action = arguments[0];
                 const i = document.createElement('input');
                 i.name = 'csrf'; i.value = arguments[1]; f.appendChild(i);
                 document.body.appendChild(f); f.submit(); return true;";
    b.exec(forge, json!(["/console/tenants/watched/suspend", "forged"]))
        .await;
    b.wait_text("main", "CSRF token is missing or wrong").await;
    assert!(b.text("main").await.contains("403"));
    // The right token, but the viewer's role: the admin API refuses (403).
    c.goto("/console/tenants/watched").await;
    let csrf = b
        .exec(
            "return document.querySelector('input[name=csrf]').value;",
            json!([]),
        )
        .await;
    b.exec(forge, json!(["/console/tenants/watched/suspend", csrf]))
        .await;
    b.wait_text("main", "has the role viewer").await;
    assert!(b.text("main").await.contains("403"));
    assert_eq!(
        env.record("watched").await.status,
        silo::registry::TenantStatus::Active,
        "nothing was suspended"
    );
    // Without the session cookie (as from another site), a post is refused.
    let answer = reqwest::Client::new()
        .post(format!("{}/console/tenants/watched/suspend", silo.base))
        .form(&[("csrf", csrf.as_str().unwrap())])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);

    // Revoking the key ends its session at once.
    let (status, _) = silo
        .request(reqwest::Method::DELETE, "/admin/v1/keys/looker", None, None)
        .await
        .unwrap();
    assert_eq!(status, 204);
    c.goto("/console/tenants").await;
    b.wait_url(|u| u.ends_with("/console/sign-in"), "the sign-in page")
        .await;
}

/// A `silo serve` of `env` (logging to `{log}.log`), a client that does not
/// follow redirects, and the cookie of an admin's console session on it.
async fn signed_in_silo(env: &TestEnv, log: &str) -> (Silo, reqwest::Client, String) {
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{log}.log"));
    let silo = Silo::start(env, None, 0, &log).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = sign_in_http(&http, &silo.base, ADMIN_TOKEN).await;
    (silo, http, cookie)
}

/// Sign in to the console of `base` with `token` over plain HTTP; the
/// session cookie's value.
async fn sign_in_http(http: &reqwest::Client, base: &str, token: &str) -> String {
    let page = http
        .get(format!("{base}/console/sign-in"))
        .send()
        .await
        .unwrap();
    let nonce_cookie = set_cookie(&page, "silo_console_sign_in").expect("a sign-in cookie");
    let html = page.text().await.unwrap();
    let nonce = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the sign-in form's token")
        .to_owned();
    let res = http
        .post(format!("{base}/console/sign-in"))
        .header("cookie", format!("silo_console_sign_in={nonce_cookie}"))
        .form(&[("csrf", nonce.as_str()), ("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    set_cookie(&res, "silo_console").expect("a session cookie")
}

/// The value a response's `Set-Cookie` gives the cookie `name`, unless it
/// removes it.
pub fn set_cookie(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next()?.split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_opened_on_one_replica_works_on_another_and_ends_on_both_with_nothing_secret_kept(
) {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let a = Silo::start(&env, None, 0, &log_a).await;
    let b = Silo::start(&env, None, 0, &log_b).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = sign_in_http(&http, &a.base, ADMIN_TOKEN).await;
    let get = |base: &str| {
        http.get(format!("{base}/console"))
            .header("cookie", format!("silo_console={cookie}"))
            .send()
    };
    // Signed in on A, and so on B.
    let page = get(&b.base).await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("Signed in as"), "{html}");
    // Only hashes are kept: neither the cookie nor the token is stored.
    let stored: Vec<(Vec<u8>, String, Vec<u8>)> =
        sqlx::query_as("SELECT id_hash, kind, token_hash FROM console_sessions")
            .fetch_all(env.registry().pool())
            .await
            .unwrap();
    assert_eq!(stored.len(), 1);
    let (id_hash, kind, token_hash) = &stored[0];
    assert_eq!(kind, "bootstrap");
    assert_eq!(id_hash.as_slice(), silo::crypto::admin_key_hash(&cookie));
    assert_eq!(
        token_hash.as_slice(),
        silo::crypto::admin_key_hash(ADMIN_TOKEN)
    );
    // Signing out on B ends the session on A too.
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    let out = http
        .post(format!("{}/console/sign-out", b.base))
        .header("cookie", format!("silo_console={cookie}"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    let after = get(&a.base).await.unwrap();
    assert_eq!(after.status(), 303, "A still knew the session");
    assert_eq!(after.headers()["location"], "/console/sign-in");
    // Neither replica logged the token, the cookie or the form token
    // (they log at debug level here).
    drop((a, b));
    for log in [&log_a, &log_b] {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(text.contains("console"), "{} is not the log", log.display());
        for secret in [ADMIN_TOKEN, cookie.as_str(), csrf.as_str()] {
            assert!(
                !text.contains(secret),
                "{} holds a secret of the console",
                log.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_is_offered_lifecycle_but_not_delete_or_keys_and_is_refused_them() {
    let env = TestEnv::start().await;
    let t = env.create("operated").await;
    let id = t["id"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let silo = Silo::start(&env, None, 0, &dir.path().join("silo.log")).await;
    let (status, key) = silo
        .request(
            reqwest::Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": "day-shift", "role": "operator"})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{key}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = sign_in_http(&http, &silo.base, key["token"].as_str().unwrap()).await;
    let cookie = format!("silo_console={cookie}");
    let html = http
        .get(format!("{}/console/tenants/operated", silo.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Offered: lifecycle. Not offered: delete, keys.
    for offered in ["/suspend\"", "/rotate\"", "/archive\"", "/backup\""] {
        assert!(
            html.contains(offered),
            "an operator is not offered {offered}"
        );
    }
    for withheld in ["/delete\"", "/direct-uri\"", "href=\"/console/keys\""] {
        assert!(
            !html.contains(withheld),
            "an operator is offered {withheld}"
        );
    }
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    // Asked anyway, with a valid form token: the admin API refuses.
    let post = |path: String, form: Vec<(&'static str, String)>| {
        http.post(format!("{}{path}", silo.base))
            .header("cookie", &cookie)
            .form(&form)
            .send()
    };
    let delete = post(
        format!("/console/tenants/{id}/delete"),
        vec![("csrf", csrf.clone()), ("confirm", "operated".into())],
    )
    .await
    .unwrap();
    assert_eq!(delete.status(), 403);
    assert!(delete.text().await.unwrap().contains("role operator"));
    let keys = post(
        "/console/keys".into(),
        vec![
            ("csrf", csrf.clone()),
            ("name", "sneaky".into()),
            ("role", "admin".into()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(keys.status(), 403);
    let plan = post(
        "/console/plans/standard".into(),
        vec![("csrf", csrf.clone()), ("connection_limit", "1".into())],
    )
    .await
    .unwrap();
    assert_eq!(plan.status(), 403, "plans are the admin role's");
    let standard = env
        .registry()
        .plan(&silo::domain::Plan::default_plan())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(standard.connection_limit, 20);
    assert_eq!(
        env.record("operated").await.status,
        silo::registry::TenantStatus::Active
    );
    assert!(env
        .registry()
        .admin_keys()
        .await
        .unwrap()
        .iter()
        .all(|k| k.name != "sneaky"));
    // What an operator may do, it does.
    let suspend = post(
        format!("/console/tenants/{id}/suspend"),
        vec![("csrf", csrf)],
    )
    .await
    .unwrap();
    assert_eq!(suspend.status(), 303);
    assert_eq!(
        env.record("operated").await.status,
        silo::registry::TenantStatus::Suspended
    );
}

/// PostgreSQL text cannot hold U+0000: a `%00` in any query parameter of a
/// console page or of the admin API is refused up front with a clear 4xx
/// (the tenants listing answered 500), and the same pages still answer
/// without it.
#[tokio::test(flavor = "multi_thread")]
async fn a_nul_byte_in_a_query_parameter_is_refused_with_a_clear_4xx_never_a_500() {
    let env = TestEnv::start().await;
    env.create("plain").await;
    let (silo, http, cookie) = signed_in_silo(&env, "console-nul").await;
    let get = |path: String| {
        http.get(format!("{}{path}", silo.base))
            .header("cookie", format!("silo_console={cookie}"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send()
    };
    let mut failures = Vec::new();
    #[rustfmt::skip]
    let rows = [
        ("/console/tenants", "q", 400), ("/console/tenants", "plan", 400),
        ("/console/tenants", "server", 400), ("/console/tenants", "status", 400),
        ("/console/tenants", "sort", 400), ("/console/tenants", "cursor", 400),
        ("/console/audit", "key", 400), ("/console/audit", "action", 400),
        ("/console/audit", "tenant", 400),
        ("/admin/v1/tenants", "status", 422), ("/admin/v1/tenants", "cursor", 422),
        ("/admin/v1/audit", "tenant", 422), ("/admin/v1/audit", "key", 422),
        ("/admin/v1/audit", "action", 422), ("/admin/v1/usage", "sort", 422),
        ("/admin/v1/tenants/plain/backups", "cursor", 422),
        ("/console/tenants/plain", "cursor", 400),
    ];
    for (path, param, want) in rows {
        for value in ["%00", "a%00b"] {
            let url = format!("{path}?{param}={value}");
            let answer = get(url.clone()).await.unwrap();
            let status = answer.status().as_u16();
            let body = answer.text().await.unwrap();
            if status != want || !body.contains("U+0000") || !body.contains(param) {
                failures.push(format!("{url}: {status} {body:.300}"));
            }
        }
    }
    // A NUL in a parameter's name, or in one a page does not read, too.
    for (url, want) in [
        ("/console/tenants?q%00=a", 400),
        ("/console/tenants?q=a&x=%00", 400),
        ("/admin/v1/tenants?%00=a", 422),
    ] {
        let answer = get(url.to_owned()).await.unwrap();
        let status = answer.status().as_u16();
        let body = answer.text().await.unwrap();
        if status != want || !body.contains("U+0000") {
            failures.push(format!("{url}: {status} {body:.300}"));
        }
    }
    // A path segment that is not UTF-8 once decoded: a console page too
    // (it was axum's plain text), as the API's is problem+json.
    for (url, html) in [
        ("/console/tenants/%ff", true),
        ("/console/operations/%ff", true),
        ("/console/operations/%ff/progress", true),
        ("/admin/v1/tenants/%ff", false),
    ] {
        let answer = get(url.to_owned()).await.unwrap();
        let status = answer.status().as_u16();
        let kind = answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = answer.text().await.unwrap();
        let shaped = if html {
            kind.starts_with("text/html") && body.contains("Bad request")
        } else {
            kind == "application/problem+json"
        };
        if !(400..500).contains(&status) || !shaped {
            failures.push(format!("{url}: {status} {kind} {body:.300}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Without it, the same pages answer.
    for url in [
        "/console/tenants?q=pla&plan=&server=default",
        "/console/audit?action=tenant.create",
        "/admin/v1/tenants?status=active",
    ] {
        let answer = get(url.to_owned()).await.unwrap();
        assert_eq!(answer.status(), 200, "{url}");
        assert!(answer.text().await.unwrap().contains("plain"), "{url}");
    }
}

/// A tenant's page shows its 20 newest backups and pages to the older ones
/// (the rows are seeded: only the page's listing is under test), and a
/// cursor that is not one is refused with a clear 4xx.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_s_older_backups_are_reached_page_by_page() {
    let env = TestEnv::start().await;
    env.create("paged").await;
    // 45 failed backups, ids in the order they were taken (as UUIDv7's are).
    sqlx::query(
        "INSERT INTO backups (id, tenant_id, kind, status, bucket, object_key, manifest_key,
                              error, started_at, finished_at)
         SELECT ('01900000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
                (SELECT id FROM tenants WHERE slug = 'paged'), 'scheduled', 'failed', 'b', 'k', 'm',
                'seeded backup ' || lpad(i::text, 2, '0') || '.', now() - make_interval(mins => 50 - i), now()
           FROM generate_series(1, 45) AS i",
    )
    .execute(env.registry().pool())
    .await
    .unwrap();
    let (silo, http, cookie) = signed_in_silo(&env, "console-backup-pages").await;
    let get = |path: String| {
        let request = http
            .get(format!("{}{path}", silo.base))
            .header("cookie", format!("silo_console={cookie}"));
        async move {
            let res = request.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    let shown = |html: &str| -> Vec<u32> {
        html.split("seeded backup ")
            .skip(1)
            .map(|s| s[..2].parse().unwrap())
            .collect()
    };
    let link = |html: &str, text: &str| -> Option<String> {
        let at = html.find(&format!(">{text}</a>"))?;
        let start = html[..at].rfind("href=\"")? + 6;
        let href = &html[start..];
        Some(href[..href.find('"').unwrap()].replace("&amp;", "&"))
    };

    let (status, first) = get("/console/tenants/paged".into()).await;
    assert_eq!(status, 200);
    assert_eq!(shown(&first), (26..=45).rev().collect::<Vec<_>>());
    assert_eq!(link(&first, "Newest backups"), None);
    let older = link(&first, "Older backups").expect("a link to older backups");
    let (status, second) = get(older).await;
    assert_eq!(status, 200);
    assert_eq!(shown(&second), (6..=25).rev().collect::<Vec<_>>());
    assert_eq!(
        link(&second, "Newest backups").as_deref(),
        Some("/console/tenants/paged#backups")
    );
    let older = link(&second, "Older backups").expect("a link to the oldest backups");
    // In a browser too: the paged page passes the same checks as the others.
    let console = Console::open(&silo.base, "paged").await;
    console.sign_in(ADMIN_TOKEN).await;
    console.goto("/console/tenants/paged").await;
    console.browser.click("a[rel=next]").await;
    console
        .browser
        .wait_url(|u| u.contains("?cursor="), "the older backups")
        .await;
    console
        .browser
        .wait_text("#backup-list", "seeded backup 25.")
        .await;
    console.check("tenant-older-backups").await;
    let (_, third) = get(older).await;
    assert_eq!(shown(&third), (1..=5).rev().collect::<Vec<_>>());
    assert_eq!(
        link(&third, "Older backups"),
        None,
        "the oldest page is the last"
    );
    // Past the oldest: none, said so.
    let (status, past) =
        get("/console/tenants/paged?cursor=01900000-0000-7000-8000-000000000001".into()).await;
    assert_eq!(status, 200);
    assert!(past.contains("No older backup."), "{past:.300}");
    for bad in ["not-a-cursor", "01900000-0000-7000-8000-00000000000g"] {
        let (status, page) = get(format!("/console/tenants/paged?cursor={bad}")).await;
        assert_eq!(status, 422, "{bad}: {page:.300}");
        assert!(page.contains("cursor"), "{bad}: {page:.300}");
    }
}
