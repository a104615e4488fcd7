//! The console's pages (maud): what each reads, and how it is shown.
//! Semantic HTML: a landmark per part, a heading per section, a label on
//! every control, tables with header cells; status in words, never colour
//! alone. A control is shown only when the signed-in key's role may use it.

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, Utc};
use maud::{html, Markup, DOCTYPE};
use serde_json::Value;
use uuid::Uuid;

use super::session::Signed;
use super::{
    seg, AuditParams, Console, Failure, TenantsParams, CSS_PATH, HTMX_PATH, MAX_PAGE, MAX_SEARCH,
};
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::domain::{AdminRole, OperationKind};
use crate::registry::{
    AuditEntry, AuditFilter, Backup, DbServer, FailedBackup, Operation, OperationStatus,
    TenantListed, TenantQuery, TenantRecord, TenantSort, TenantStatus,
};

/// Which part of the site a page belongs to (for `aria-current`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Fleet,
    Tenants,
    Servers,
    Plans,
    Migrations,
    Audit,
    Keys,
    None,
}

const PARTS: [(Part, &str, &str); 7] = [
    (Part::Fleet, "/console", "Fleet"),
    (Part::Tenants, "/console/tenants", "Tenants"),
    (Part::Servers, "/console/servers", "Servers"),
    (Part::Plans, "/console/plans", "Plans"),
    (Part::Migrations, "/console/migrations", "Migrations"),
    (Part::Audit, "/console/audit", "Audit"),
    (Part::Keys, "/console/keys", "Keys"),
];

fn head(title: &str, refresh: bool) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · silo console" }
            link rel="stylesheet" href=(CSS_PATH);
            // No inline styles from htmx (the CSP forbids them), no eval.
            meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false}"#;
            script src=(HTMX_PATH) defer {}
            @if refresh {
                // Without JavaScript, a page of work in progress reloads itself.
                noscript { meta http-equiv="refresh" content="2"; }
            }
        }
    }
}

/// A whole page for a signed-in session.
pub fn page(signed: &Signed, part: Part, title: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, refresh))
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    nav aria-label="Console" {
                        ul {
                            @for (p, href, label) in PARTS {
                                // Keys are the admin role's alone.
                                @if p != Part::Keys || signed.actor.may(&Method::GET, "/keys") {
                                    li { a href=(href) aria-current=[(p == part).then_some("page")] { (label) } }
                                }
                            }
                        }
                    }
                    p.who {
                        "Signed in as " strong { (signed.actor.name()) } " (" (signed.actor.role()) ")"
                        span.muted { ", until " (signed.session.expires_at.format("%H:%M UTC")) }
                    }
                    form method="post" action="/console/sign-out" {
                        (csrf(signed))
                        button type="submit" { "Sign out" }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page with no session: sign-in, refusals.
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, false))
            body {
                header { p.who { "silo console" } }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field every form of a session carries.
pub fn csrf(signed: &Signed) -> Markup {
    html! { input type="hidden" name="csrf" value=(signed.session.csrf); }
}

/// A refusal or failure as a page, with its status.
pub fn refusal(status: StatusCode, title: &str, detail: &str) -> Response {
    let body = html! {
        div.error role="alert" {
            p { strong { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) } }
            p { (detail) }
        }
        p { a href="/console" { "Back to the fleet" } }
    };
    (status, bare(title, body)).into_response()
}

/// An error of silo's own (a registry read): an internal one is logged in
/// full once, here, and shown as a generic failure.
pub fn api_failure(e: ApiError) -> Response {
    let status = e.status_code();
    let detail = match &e {
        ApiError::Internal(err) => {
            tracing::error!("failed to {err:#}");
            "The server could not complete the request; it has been logged.".to_owned()
        }
        other => other.to_string(),
    };
    refusal(status, "Could not show this page", &detail)
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn when_opt(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "never".to_owned(), when)
}

fn status_word(s: &str) -> Markup {
    html! { span class=(format!("status-{s}")) { (s) } }
}

fn op_status(s: OperationStatus) -> &'static str {
    match s {
        OperationStatus::Queued => "queued",
        OperationStatus::Pending => "pending",
        OperationStatus::Running => "running",
        OperationStatus::Succeeded => "succeeded",
        OperationStatus::Failed => "failed",
    }
}

fn op_kind(k: OperationKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{k:?}"))
}

/// A small line of `values` (oldest first) as inline SVG, named by `label`
/// for assistive technology, with the range beside it in words (readable
/// without colour, or without the picture).
fn sparkline(label: &str, values: &[f64], unit: impl Fn(f64) -> String) -> Markup {
    let (w, h) = (160.0_f64, 28.0_f64);
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.is_empty() {
        return html! { span { "no data yet" } };
    }
    let span = (hi - lo).max(f64::EPSILON);
    let step = if values.len() > 1 {
        w / (values.len() - 1) as f64
    } else {
        0.0
    };
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let y = h - 2.0 - (v - lo) / span * (h - 4.0);
            format!("{:.1},{:.1}", i as f64 * step, y)
        })
        .collect();
    let words = format!(
        "{label}: {} to {} over {} days",
        unit(lo),
        unit(hi),
        values.len()
    );
    html! {
        svg.spark role="img" aria-label=(words) width="160" height="28" viewBox="0 0 160 28" {
            polyline fill="none" stroke="currentColor" stroke-width="1.5" points=(points.join(" ")) {}
        }
        " " span { (unit(lo)) " – " (unit(hi)) " (" (values.len()) " days)" }
    }
}

fn bytes(n: Option<i64>) -> String {
    match n {
        None => "–".into(),
        Some(n) if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        Some(n) => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
    }
}

// ---------------------------------------------------------------- fleet

/// What the fleet page shows.
pub struct FleetData {
    servers: Vec<DbServer>,
    /// This process's budget and open connections per server id.
    budgets: Vec<(Uuid, usize, usize)>,
    by_status: Vec<(String, i64)>,
    running: Vec<Operation>,
    failed_backups: Vec<FailedBackup>,
    /// The largest tenants, as the usage collector measured them.
    top: Vec<crate::registry::TenantUsageRow>,
    migration: Option<Operation>,
}

impl FleetData {
    pub async fn read(state: &AppState) -> Result<Self, crate::registry::Error> {
        let reg = state.registry();
        let budgets = state
            .router
            .stats()
            .servers
            .iter()
            .map(|s| (s.server_id, s.budget, s.open))
            .collect();
        let mut by_status = reg.count_by_status().await?;
        by_status.sort();
        Ok(Self {
            servers: reg.servers().await?,
            budgets,
            by_status,
            running: reg.running_operations(50).await?,
            failed_backups: reg
                .failed_backups_since(Utc::now() - Duration::days(1), 50)
                .await?,
            migration: reg.latest_operation(OperationKind::MigrateTenants).await?,
            top: reg.top_usage(crate::registry::UsageSort::Size, 10).await?,
        })
    }
}

pub fn fleet(signed: &Signed, d: &FleetData) -> Markup {
    let body = html! {
        section aria-labelledby="servers" {
            h2 id="servers" { "Servers" }
            table {
                thead { tr {
                    th scope="col" { "Server" } th scope="col" { "Status" }
                    th scope="col" { "Last health check" }
                    th scope="col" class="num" { "Tenants" }
                    th scope="col" class="num" { "Connections open / budget (this replica)" }
                } }
                tbody {
                    @for s in &d.servers {
                        @let (budget, open) = d.budgets.iter().find(|b| b.0 == s.id).map_or((0, 0), |b| (b.1, b.2));
                        tr {
                            th scope="row" { (s.name) }
                            td { (status_word(&s.status))
                                @if let Some(e) = &s.health_error { br; span.bad { (e) } } }
                            td { (when_opt(s.last_ok_at)) }
                            td.num { (s.tenant_count) " of " (s.max_tenants) }
                            td.num { (open) " / " (budget) }
                        }
                    }
                }
            }
        }
        section aria-labelledby="by-status" {
            h2 id="by-status" { "Tenants by status" }
            @if d.by_status.is_empty() { p { "No tenants yet." } }
            ul {
                @for (status, n) in &d.by_status {
                    li { a href=(format!("/console/tenants?status={status}")) { (status) } ": " (n) }
                }
            }
        }
        section aria-labelledby="running" {
            h2 id="running" { "Operations running" }
            (operations_table(&d.running, "No operation is running."))
        }
        section aria-labelledby="failed-backups" {
            h2 id="failed-backups" { "Backups failed in the last day" }
            @if d.failed_backups.is_empty() { p { "None." } } @else {
                table {
                    thead { tr { th scope="col" { "Tenant" } th scope="col" { "Kind" } th scope="col" { "Started" } th scope="col" { "Error" } } }
                    tbody {
                        @for b in &d.failed_backups {
                            tr {
                                td { a href=(format!("/console/tenants/{}", seg(&b.slug))) { (b.slug) } }
                                td { (b.kind) } td { (when(b.started_at)) }
                                td { (b.error.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="largest" {
            h2 id="largest" { "Largest tenants" }
            @if d.top.is_empty() { p { "Not measured yet (the usage collector runs every SILO_USAGE_INTERVAL)." } } @else {
                table {
                    thead { tr {
                        th scope="col" { "Tenant" } th scope="col" { "Plan" }
                        th scope="col" class="num" { "Size" } th scope="col" class="num" { "Quota" }
                    } }
                    tbody {
                        @for u in &d.top {
                            tr {
                                td { a href=(format!("/console/tenants/{}", seg(&u.slug))) { (u.slug) } }
                                td { (u.plan) }
                                td.num { (bytes(u.size_bytes)) }
                                td.num { (bytes(u.storage_quota_bytes)) }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="migration" {
            h2 id="migration" { "Fleet migration" }
            @match &d.migration {
                None => p { "No fleet migration has run. " a href="/console/migrations" { "Migrations" } },
                Some(op) => p {
                    "Latest: " a href=(format!("/console/operations/{}", op.id)) { (op_status(op.status)) }
                    ", started " (when(op.created_at)) ". " (fleet_counts(&op.progress))
                },
            }
        }
    };
    page(signed, Part::Fleet, "Fleet", false, body)
}

fn fleet_counts(progress: &Value) -> String {
    let n = |k: &str| progress[k].as_u64().unwrap_or(0);
    format!(
        "{} of {} tenants done, {} failed",
        n("done"),
        n("total"),
        n("failed")
    )
}

fn operations_table(ops: &[Operation], none: &str) -> Markup {
    html! {
        @if ops.is_empty() { p { (none) } } @else {
            table {
                thead { tr { th scope="col" { "Operation" } th scope="col" { "Kind" } th scope="col" { "Status" } th scope="col" { "Started" } th scope="col" { "Error" } } }
                tbody {
                    @for op in ops {
                        tr {
                            td { a href=(format!("/console/operations/{}", op.id)) { code { (op.id) } } }
                            td { (op_kind(op.kind)) }
                            td { (status_word(op_status(op.status))) }
                            td { (when(op.created_at)) }
                            td { (op.error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

// -------------------------------------------------------------- tenants

/// One page of the tenants listing, and the filters' choices.
pub struct Listing {
    rows: Vec<TenantListed>,
    next_cursor: Option<String>,
    plans: Vec<String>,
    servers: Vec<String>,
}

fn param(s: &str) -> Option<&str> {
    Some(s.trim()).filter(|s| !s.is_empty())
}

impl Listing {
    pub async fn read(state: &AppState, p: &TenantsParams) -> Result<Self, Response> {
        let invalid =
            |d: String| refusal(StatusCode::UNPROCESSABLE_ENTITY, "Cannot list tenants", &d);
        let status = param(&p.status)
            .map(|s| {
                TenantStatus::parse(s).ok_or_else(|| invalid(format!("There is no status '{s}'.")))
            })
            .transpose()?;
        let sort = param(&p.sort)
            .map(|s| {
                TenantSort::parse(s)
                    .ok_or_else(|| invalid(format!("Tenants cannot be sorted by '{s}'.")))
            })
            .transpose()?
            .unwrap_or_default();
        let search = param(&p.q);
        if search.is_some_and(|q| q.chars().count() > MAX_SEARCH) {
            return Err(invalid(format!(
                "Search for at most {MAX_SEARCH} characters."
            )));
        }
        let (plan, server) = (param(&p.plan), param(&p.server));
        if plan.is_some_and(|s| s.len() > 64) || server.is_some_and(|s| s.len() > 64) {
            return Err(invalid(
                "A plan or server name is at most 64 characters.".into(),
            ));
        }
        let (limit, after) =
            crate::api::paging::page(p.limit, param(&p.cursor), MAX_PAGE).map_err(api_failure)?;
        let reg = state.registry();
        let q = TenantQuery {
            search,
            status,
            plan,
            server,
            sort,
            after,
            limit,
        };
        let rows = reg
            .search_tenants(&q)
            .await
            .map_err(|e| api_failure(e.into()))?;
        let next_cursor = crate::api::paging::next_cursor(&rows, limit, |t| t.id);
        let plans = reg
            .plans_in_use()
            .await
            .map_err(|e| api_failure(e.into()))?;
        let servers = reg
            .servers()
            .await
            .map_err(|e| api_failure(e.into()))?
            .into_iter()
            .map(|s| s.name)
            .collect();
        Ok(Self {
            rows,
            next_cursor,
            plans,
            servers,
        })
    }
}

fn select(name: &str, label: &str, current: &str, choices: &[&str]) -> Markup {
    html! {
        label {
            (label) " "
            select name=(name) {
                option value="" selected[current.is_empty()] { "any" }
                @for c in choices {
                    option value=(c) selected[*c == current] { (c) }
                }
            }
        }
    }
}

pub fn tenants(signed: &Signed, p: &TenantsParams, l: &Listing) -> Markup {
    let statuses: Vec<&str> = TenantStatus::ALL.iter().map(|s| s.as_str()).collect();
    let plans: Vec<&str> = l.plans.iter().map(String::as_str).collect();
    let servers: Vec<&str> = l.servers.iter().map(String::as_str).collect();
    let next = l.next_cursor.as_ref().map(|c| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("q", &p.q),
            ("status", &p.status),
            ("plan", &p.plan),
            ("server", &p.server),
            ("sort", &p.sort),
        ] {
            if !v.is_empty() {
                q.append_pair(k, v);
            }
        }
        q.append_pair("cursor", c);
        format!("/console/tenants?{}", q.finish())
    });
    let body = html! {
        @if signed.actor.may(&Method::POST, "/tenants") {
            p { a href="/console/tenants/new" { "New tenant" } }
        }
        form.filters method="get" action="/console/tenants" role="search" aria-label="Find tenants" {
            label { "Slug or name " input type="search" name="q" value=(p.q) maxlength=(MAX_SEARCH); }
            (select("status", "Status", &p.status, &statuses))
            (select("plan", "Plan", &p.plan, &plans))
            (select("server", "Server", &p.server, &servers))
            label { "Sort by "
                select name="sort" {
                    @for s in TenantSort::ALL {
                        option value=(s.as_str()) selected[p.sort == s.as_str() || (p.sort.is_empty() && s == TenantSort::Created)] { (s.as_str()) }
                    }
                }
            }
            button type="submit" { "Find" }
        }
        @if l.rows.is_empty() { p { "No tenant matches." } } @else {
            table {
                caption.muted { (l.rows.len()) " tenants on this page" }
                thead { tr {
                    th scope="col" { "Slug" } th scope="col" { "Name" } th scope="col" { "Status" }
                    th scope="col" { "Plan" } th scope="col" { "Server" } th scope="col" { "Created" }
                    th scope="col" { "Last backup" }
                } }
                tbody {
                    @for t in &l.rows {
                        tr {
                            th scope="row" { a href=(format!("/console/tenants/{}", seg(&t.slug))) { (t.slug) } }
                            td { (t.name) } td { (status_word(t.status.as_str())) }
                            td { (t.plan) } td { (t.server) } td { (when(t.created_at)) }
                            td { (when_opt(t.last_backup_at)) }
                        }
                    }
                }
            }
        }
        @if let Some(href) = next { p { a href=(href) rel="next" { "Next page" } } }
    };
    page(signed, Part::Tenants, "Tenants", false, body)
}

pub fn new_tenant(signed: &Signed, servers: &[DbServer]) -> Markup {
    let body = html! {
        form method="post" action="/console/tenants" {
            (csrf(signed))
            p { label { "Slug " input type="text" name="slug" required pattern="[a-z][a-z0-9\\-]{1,38}[a-z0-9]" aria-describedby="slug-help"; } }
            p.muted id="slug-help" { "3 to 40 characters: lower-case letters, digits and dashes, starting with a letter." }
            p { label { "Name " input type="text" name="name" required maxlength="200"; } }
            p { label { "Plan " input type="text" name="plan" placeholder="standard" aria-describedby="plan-help"; } }
            p.muted id="plan-help" { "Empty for the default plan." }
            p { label { "Server "
                select name="server" {
                    option value="" { "the one with most headroom" }
                    @for s in servers { option value=(s.name) { (s.name) } }
                }
            } }
            button type="submit" { "Create tenant" }
        }
    };
    page(signed, Part::Tenants, "New tenant", false, body)
}

// --------------------------------------------------------------- tenant

/// Backups on one page of a tenant's.
const BACKUPS_SHOWN: i64 = 20;

/// What the tenant page shows.
pub struct TenantData {
    t: TenantRecord,
    /// A page of its backups, newest first: after `cursor` when paged.
    backups: Vec<Backup>,
    cursor: Option<Uuid>,
    /// The cursor of the next (older) page, when there is one.
    older: Option<String>,
    operations: Vec<Operation>,
    audit: Vec<AuditEntry>,
    credentials: Vec<Value>,
    /// The front door's URI (no secret), when it is on.
    connection: Option<String>,
    /// This replica's pool of the tenant: open, in use, cap.
    pool: Option<(usize, usize, usize)>,
    servers: Vec<String>,
    /// What the usage collector measured last, and the last 30 days.
    usage: Option<crate::registry::CurrentUsage>,
    daily: Vec<crate::registry::DailyUsage>,
    /// Every plan's name, for the edit form.
    plans: Vec<String>,
}

impl TenantData {
    pub async fn read(
        state: &AppState,
        console: &Console,
        signed: &Signed,
        slug_or_id: &str,
        cursor: &str,
    ) -> Result<Self, Response> {
        let reg = state.registry();
        let db = |e: crate::registry::Error| api_failure(e.into());
        let (shown, cursor) =
            crate::api::paging::page(Some(BACKUPS_SHOWN), param(cursor), BACKUPS_SHOWN)
                .map_err(api_failure)?;
        let t = match slug_or_id.len() <= 64 {
            true => reg.find_tenant(slug_or_id).await.map_err(db)?,
            false => None,
        }
        .ok_or_else(|| {
            refusal(
                StatusCode::NOT_FOUND,
                "No such tenant",
                "No tenant has this slug or id.",
            )
        })?;
        let filter = AuditFilter {
            tenant: Some(t.id),
            ..Default::default()
        };
        // The API lists a live tenant's credentials (none once deleted).
        let credentials = console
            .call(
                &signed.actor,
                Method::GET,
                &format!("/tenants/{}/app-credentials", t.id),
                None,
            )
            .await
            .ok()
            .and_then(|v| v["items"].as_array().cloned())
            .unwrap_or_default();
        let connection = console
            .call(
                &signed.actor,
                Method::GET,
                &format!("/tenants/{}/connection", t.id),
                None,
            )
            .await
            .ok()
            .and_then(|v| v["uri"].as_str().map(str::to_owned));
        let pool = state
            .router
            .stats()
            .tenants
            .iter()
            .find(|p| p.tenant_id == t.id)
            .map(|p| (p.open, p.in_use, p.cap));
        let backups = reg.backups_of(t.id, cursor, shown).await.map_err(db)?;
        let older = crate::api::paging::next_cursor(&backups, shown, |b| b.id);
        let mut daily = reg.daily_usage(t.id, 30).await.map_err(db)?;
        daily.sort_by_key(|d| d.day);
        Ok(Self {
            connection,
            pool,
            usage: reg.current_usage(t.id).await.map_err(db)?,
            plans: reg
                .plans()
                .await
                .map_err(db)?
                .into_iter()
                .map(|p| p.name.to_string())
                .collect(),
            daily,
            backups,
            cursor,
            older,
            operations: reg.operations_of(t.id, 20).await.map_err(db)?,
            audit: reg.audit_entries(&filter, 20).await.map_err(db)?,
            servers: reg
                .servers()
                .await
                .map_err(db)?
                .into_iter()
                .map(|s| s.name)
                .filter(|n| *n != t.server_name)
                .collect(),
            credentials,
            t,
        })
    }

    fn busy(&self) -> bool {
        self.backups
            .iter()
            .any(|b| b.status == "queued" || b.status == "running")
    }
}

/// The tenant page showing the backups after `cursor` (the newest without).
fn backups_page(t: &TenantRecord, cursor: Option<String>) -> String {
    let base = format!("/console/tenants/{}", seg(&t.slug));
    match cursor {
        Some(c) => format!("{base}?cursor={c}"),
        None => base,
    }
}

/// A form posting one tenant action, with a typed confirmation when
/// `confirm` (the tenant's slug must be typed to go ahead).
fn action(
    signed: &Signed,
    t: &TenantRecord,
    action: &str,
    label: &str,
    confirm: bool,
    danger: bool,
    extra: Markup,
) -> Markup {
    let id = format!("confirm-{action}");
    html! {
        form method="post" action=(format!("/console/tenants/{}/{action}", t.id)) {
            (csrf(signed))
            (extra)
            @if confirm {
                label for=(id) { "Type " code { (t.slug) } " to " (label.to_lowercase()) }
                br;
                input id=(id) type="text" name="confirm" required autocomplete="off";
                " "
            }
            button type="submit" class=[danger.then_some("danger")] { (label) }
        }
    }
}

pub fn tenant(signed: &Signed, d: &TenantData) -> Markup {
    let t = &d.t;
    let may = |m: Method, route: &str| signed.actor.may(&m, route);
    let change = may(Method::POST, "/tenants/{tenant}/suspend");
    let delete = may(Method::DELETE, "/tenants/{tenant}");
    let overwrite = signed.actor.role() >= AdminRole::Admin;
    let live = !matches!(t.status, TenantStatus::Deleted | TenantStatus::Deleting);
    let body = html! {
        section aria-labelledby="facts" {
            h2 id="facts" { "Tenant" }
            dl.facts {
                dt { "Slug" } dd { (t.slug) }
                dt { "Name" } dd { (t.name) }
                dt { "Status" } dd { (status_word(t.status.as_str())) }
                dt { "Plan" } dd { (t.plan) }
                dt { "Server" } dd { (t.server_name) }
                dt { "Database" } dd { code { (t.database_name) } }
                dt { "Connections (this replica)" }
                dd { @match d.pool {
                    Some((open, in_use, cap)) => { (open) " open, " (in_use) " in use, at most " (cap) }
                    None => "no pool open",
                } }
                @if let Some(uri) = &d.connection {
                    dt { "Front door" } dd { code { (uri) } " (with an app credential's user and password)" }
                }
                dt { "Schema version" } dd { (t.schema_version.map_or("–".into(), |v| v.to_string())) }
                dt { "Created" } dd { (when(t.created_at)) }
                dt { "Last backup" } dd { (when_opt(t.last_backup_at)) }
                @if let Some(e) = &t.last_error { dt { "Last error" } dd.bad { (e) } }
                dt { "Id" } dd { code { (t.id) } }
            }
        }
        section aria-labelledby="usage" {
            h2 id="usage" { "Usage" }
            @match &d.usage {
                None => p { "Not measured yet: the usage collector measures every tenant once an interval (SILO_USAGE_INTERVAL)." }
                Some(u) => dl.facts {
                    dt { "Database size" }
                    dd {
                        (bytes(u.size_bytes))
                        @if let Some(q) = t.limits.storage_quota_bytes { " of a " (bytes(Some(q))) " quota" }
                        @if let Some(at) = t.over_quota_at { strong.bad { " — over quota since " (when(at)) ": read-only" } }
                    }
                    dt { "Connections" } dd { (u.connections.map_or("–".into(), |c| c.to_string())) }
                    dt { "App requests" } dd { (u.requests) " (" (u.errors) " errors)" }
                    dt { "Commits, rollbacks" } dd { (u.commits) ", " (u.rollbacks) }
                    dt { "Rows written" } dd { (u.rows_written) }
                    dt { "Measured" } dd { (when_opt(u.sampled_at)) }
                    dt { "Size, daily" }
                    dd { (sparkline("database size", &d.daily.iter().filter_map(|x| x.max_size_bytes).map(|b| b as f64).collect::<Vec<_>>(), |v| bytes(Some(v as i64)))) }
                    dt { "Requests, daily" }
                    dd { (sparkline("app requests a day", &d.daily.iter().map(|x| x.requests as f64).collect::<Vec<_>>(), |v| format!("{v:.0}"))) }
                }
            }
        }
        @if change && live {
            section aria-labelledby="actions" {
                h2 id="actions" { "Actions" }
                div.actions {
                    @if t.status == TenantStatus::Active {
                        (action(signed, t, "suspend", "Suspend", false, false, html!{}))
                    }
                    @if t.status == TenantStatus::Suspended {
                        (action(signed, t, "resume", "Resume", false, false, html!{}))
                    }
                    (action(signed, t, "rotate", "Rotate credentials", true, false, html!{}))
                    @if !d.servers.is_empty() {
                        (action(signed, t, "move", "Move", true, false, html! {
                            label { "To server " select name="server" { @for s in &d.servers { option value=(s) { (s) } } } }
                            br;
                        }))
                    }
                    @if matches!(t.status, TenantStatus::Active | TenantStatus::Suspended) {
                        (action(signed, t, "archive", "Archive", true, true, html!{}))
                    }
                    @if t.status == TenantStatus::Archived {
                        (action(signed, t, "unarchive", "Bring back from the archive", false, false, html!{}))
                    }
                    @if delete {
                        (action(signed, t, "delete", "Delete", true, true, html!{}))
                    }
                }
                details {
                    summary { "Edit name, plan or backup schedule" }
                    (action(signed, t, "edit", "Save", false, false, html! {
                        p { label { "Name " input type="text" name="name" value=(t.name) required maxlength="200"; } }
                        p { label { "Plan "
                            select name="plan" {
                                @for plan in &d.plans {
                                    option value=(plan) selected[plan.as_str() == t.plan.as_str()] { (plan) }
                                }
                            }
                        } }
                        p { label { "Backup schedule (cron, UTC) " input type="text" name="backup_schedule" value=(t.backup_schedule.as_deref().unwrap_or("")) placeholder="the default"; } }
                    }))
                }
            }
        }
        @if delete && t.status == TenantStatus::Deleted {
            section aria-labelledby="erase" {
                h2 id="erase" { "Erase backups" }
                p { "The tenant is deleted; its backups are kept until erased." }
                (action(signed, t, "erase-backups", "Erase every backup", true, true, html!{}))
            }
        }
        section aria-labelledby="tokens" {
            h2 id="tokens" { "App tokens and credentials" }
            @if change && live {
                div.actions {
                    (action(signed, t, "mint-token", "Mint an app token", false, false, html! {
                        label { "Valid for "
                            select name="ttl" {
                                option value="3600" { "1 hour" }
                                option value="86400" { "1 day" }
                                option value="604800" { "7 days" }
                            }
                        }
                        " "
                    }))
                    (action(signed, t, "revoke-tokens", "Revoke every app token", false, true, html!{}))
                    // A direct URI holds the role's password: the admin role's alone.
                    @if signed.actor.role() >= AdminRole::Admin {
                        (action(signed, t, "direct-uri", "Show the direct URI (with the role's password; audited)", false, false, html!{}))
                    }
                    (action(signed, t, "app-credentials", "Create an app credential", false, false, html! {
                        label { "Name " input type="text" name="name" required pattern="[a-z][a-z0-9_\\-]{0,62}"; }
                        label { "Pool mode " select name="pool_mode" { option value="session" { "session" } option value="transaction" { "transaction" } } }
                        label { input type="checkbox" name="read_only" value="true"; " read-only (SELECT only)" }
                        " "
                    }))
                }
            }
            @if d.credentials.is_empty() { p { "No app credential." } } @else {
                table {
                    thead { tr { th scope="col" { "Credential" } th scope="col" { "Pool mode" } th scope="col" { "Created" } th scope="col" { "Rotate or revoke" } } }
                    tbody {
                        @for c in &d.credentials {
                            tr {
                                th scope="row" { (c["name"].as_str().unwrap_or("")) }
                                td { (c["pool_mode"].as_str().unwrap_or("")) }
                                td { (c["created_at"].as_str().unwrap_or("")) }
                                td {
                                    @if change {
                                        form.inline method="post" action=(format!("/console/tenants/{}/app-credentials/{}/rotate", t.id, seg(c["id"].as_str().unwrap_or("")))) {
                                            (csrf(signed))
                                            button type="submit" aria-label=(format!("Rotate the password of {}", c["name"].as_str().unwrap_or(""))) { "Rotate" }
                                        }
                                        " "
                                    }
                                    @if may(Method::DELETE, "/tenants/{tenant}/app-credentials/{id}") {
                                        form.inline method="post" action=(format!("/console/tenants/{}/app-credentials/{}/revoke", t.id, seg(c["id"].as_str().unwrap_or("")))) {
                                            (csrf(signed))
                                            button.danger type="submit" aria-label=(format!("Revoke {}", c["name"].as_str().unwrap_or(""))) { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="backups" {
            h2 id="backups" { "Backups" }
            @if change && live {
                (action(signed, t, "backup", "Run a backup now", false, false, html!{}))
            }
            div id="backup-list" hx-get=[d.busy().then(|| backups_page(t, d.cursor.map(|c| c.to_string())))]
                hx-trigger=[d.busy().then_some("every 1s")] hx-select="#backup-list" hx-swap="outerHTML"
                aria-live="polite" {
                @if d.backups.is_empty() {
                    p { @if d.cursor.is_some() { "No older backup." } @else { "No backup yet." } }
                } @else {
                    table {
                        thead { tr {
                            th scope="col" { "Started" } th scope="col" { "Kind" } th scope="col" { "Status" }
                            th scope="col" class="num" { "Size" } th scope="col" { "Verified" }
                            @if change { th scope="col" { "Verify or restore" } }
                        } }
                        tbody {
                            @for b in &d.backups {
                                tr {
                                    th scope="row" { (when(b.started_at)) }
                                    td { (b.kind) }
                                    td { (status_word(&b.status)) @if let Some(e) = &b.error { br; span.bad { (e) } } }
                                    td.num { (bytes(b.size_bytes)) }
                                    td { (when_opt(b.verified_at)) @if let Some(e) = &b.verify_error { br; span.bad { (e) } } }
                                    @if change {
                                        td {
                                            @if b.status == "succeeded" {
                                                (backup_forms(signed, t, b, overwrite))
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                @if d.cursor.is_some() || d.older.is_some() {
                    nav.pages aria-label="Backup pages" {
                        @if d.cursor.is_some() { a href=(backups_page(t, None) + "#backups") { "Newest backups" } " " }
                        @if let Some(c) = &d.older { a href=(backups_page(t, Some(c.clone())) + "#backups") rel="next" { "Older backups" } }
                    }
                }
            }
        }
        section aria-labelledby="operations" {
            h2 id="operations" { "Operations" }
            (operations_table(&d.operations, "No operation yet."))
        }
        section aria-labelledby="audit" {
            h2 id="audit" { "Audit" }
            (audit_table(&d.audit))
            p { a href=(format!("/console/audit?tenant={}", seg(&t.slug))) { "The whole audit log of " (t.slug) } }
        }
    };
    page(signed, Part::Tenants, &t.slug, d.busy(), body)
}

fn backup_forms(signed: &Signed, t: &TenantRecord, b: &Backup, overwrite: bool) -> Markup {
    let id = format!("restore-{}", b.id);
    let holds_data = matches!(t.status, TenantStatus::Active | TenantStatus::Suspended);
    html! {
        form.inline method="post" action=(format!("/console/backups/{}/verify", b.id)) {
            (csrf(signed))
            button type="submit" aria-label=(format!("Verify the backup of {}", when(b.started_at))) { "Verify" }
        }
        // Restoring over a tenant that holds data takes the admin role.
        @if !holds_data || overwrite {
            details {
                summary { "Restore…" }
                form method="post" action=(format!("/console/backups/{}/restore", b.id)) {
                    (csrf(signed))
                    @if holds_data {
                        p { "This replaces the data of " strong { (t.slug) } " with this backup; its current database is kept aside." }
                        input type="hidden" name="overwrite" value="true";
                    }
                    label for=(id) { "Type " code { (t.slug) } " to restore it" }
                    br;
                    input id=(id) type="text" name="confirm" required autocomplete="off";
                    " "
                    button.danger type="submit" { "Restore " (t.slug) }
                }
            }
        }
        details {
            summary { "Restore into a new tenant…" }
            form method="post" action=(format!("/console/backups/{}/restore", b.id)) {
                (csrf(signed))
                label { "New tenant's slug " input type="text" name="into" required pattern="[a-z][a-z0-9\\-]{1,38}[a-z0-9]"; }
                " "
                button type="submit" { "Restore into it" }
            }
        }
    }
}

fn audit_table(entries: &[AuditEntry]) -> Markup {
    html! {
        @if entries.is_empty() { p { "No entry." } } @else {
            table {
                thead { tr { th scope="col" { "When" } th scope="col" { "Key" } th scope="col" { "Action" } th scope="col" { "Tenant" } th scope="col" { "Detail" } } }
                tbody {
                    @for e in entries {
                        tr {
                            td { (when(e.at)) } td { (e.actor) } td { (e.action) }
                            td { @if let Some(id) = e.tenant_id { a href=(format!("/console/tenants/{id}")) { code { (id.to_string()[..8]) } } } }
                            td { code { (e.detail) } }
                        }
                    }
                }
            }
        }
    }
}

/// A freshly minted secret, shown once (never again, never in a URL).
pub fn secret(
    signed: &Signed,
    what: &str,
    subject: &str,
    back: &str,
    lines: &[(&str, String)],
) -> Markup {
    let body = html! {
        div.notice role="status" {
            p { strong { (what) } " for " (subject) ". It is shown only now: copy it before leaving this page." }
            dl.facts {
                @for (k, v) in lines { dt { (k) } dd.secret { (v) } }
            }
        }
        p { a href=(back) { "Back to " (subject) } }
    };
    page(signed, Part::None, what, false, body)
}

// -------------------------------------------------------------- servers

pub fn servers(signed: &Signed, servers: &[DbServer]) -> Markup {
    let change = signed.actor.may(&Method::PATCH, "/servers/{name}");
    let body = html! {
        table {
            thead { tr {
                th scope="col" { "Server" } th scope="col" { "Status" } th scope="col" { "Last health check" }
                th scope="col" class="num" { "Tenants" } th scope="col" class="num" { "Most connections" }
                th scope="col" { "Template version" }
            } }
            tbody {
                @for s in servers {
                    tr {
                        th scope="row" { (s.name) }
                        td { (status_word(&s.status)) @if let Some(e) = &s.health_error { br; span.bad { (e) } } }
                        td { (when_opt(s.checked_at)) }
                        td.num { (s.tenant_count) " of " (s.max_tenants) }
                        td.num { (s.max_connections) }
                        td { (s.template_version.map_or("–".into(), |v| v.to_string())) }
                    }
                }
            }
        }
        @if change {
            h2 { "Change a server" }
            div.actions {
                @for s in servers {
                    form method="post" action=(format!("/console/servers/{}", seg(&s.name))) {
                        (csrf(signed))
                        fieldset {
                            legend { (s.name) }
                            label { "Status "
                                select name="status" {
                                    option value="active" selected[s.status == "active"] { "active" }
                                    option value="draining" selected[s.status == "draining"] { "draining (no new tenants)" }
                                }
                            }
                            br;
                            label { "Most connections " input type="number" name="max_connections" min="1" value=(s.max_connections); }
                            br;
                            label { "Most tenants " input type="number" name="max_tenants" min="1" value=(s.max_tenants); }
                            br;
                            button type="submit" { "Save " (s.name) }
                        }
                    }
                }
            }
        }
        @if signed.actor.may(&Method::POST, "/servers") {
            h2 { "Register a server" }
            form method="post" action="/console/servers" {
                (csrf(signed))
                p { label { "Name " input type="text" name="name" required; } }
                p { label { "Admin URL (a role with CREATEDB and CREATEROLE; stored encrypted, never shown) "
                    input type="password" name="admin_url" required autocomplete="off" size="60"; } }
                p { label { "Most connections " input type="number" name="max_connections" min="1" placeholder="default"; } }
                p { label { "Most tenants " input type="number" name="max_tenants" min="1" placeholder="default"; } }
                button type="submit" { "Register" }
            }
        }
    };
    page(signed, Part::Servers, "Servers", false, body)
}

// ---------------------------------------------------------------- plans

/// A plan's limits as the page shows and edits them: (field, label).
pub const PLAN_FIELDS: [(&str, &str); 12] = [
    ("connection_limit", "Connection limit"),
    ("storage_quota_bytes", "Storage quota (bytes)"),
    ("requests_per_second", "App requests per second"),
    ("wire_clients", "Front-door clients"),
    ("max_staff", "Most staff"),
    ("max_patients", "Most patients"),
    ("trial_days", "Trial days"),
    ("backup_schedule", "Backup schedule (cron, UTC)"),
    ("backup_keep_last", "Backups kept: last"),
    ("backup_keep_daily", "daily"),
    ("backup_keep_weekly", "weekly"),
    ("backup_keep_monthly", "monthly"),
];

fn plan_value(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn plans(signed: &Signed, plans: &Value) -> Markup {
    let change = signed.actor.may(&Method::PATCH, "/plans/{plan}");
    let delete = signed.actor.may(&Method::DELETE, "/plans/{plan}");
    let items: Vec<&Value> = plans["items"].as_array().into_iter().flatten().collect();
    let body = html! {
        p.muted { "What a tenant of each plan may use. An empty limit is silo's setting, or no limit; a change applies to every tenant of the plan at once." }
        table {
            thead { tr {
                th scope="col" { "Plan" } th scope="col" class="num" { "Tenants" }
                @for (_, label) in &PLAN_FIELDS[..7] { th scope="col" { (label) } }
            } }
            tbody {
                @for p in &items {
                    tr {
                        th scope="row" { (p["name"].as_str().unwrap_or("")) }
                        td.num { (plan_value(&p["tenants"])) }
                        @for (field, _) in &PLAN_FIELDS[..7] {
                            td { @match plan_value(&p[*field]) { v if v.is_empty() => "–", v => (v) } }
                        }
                    }
                }
            }
        }
        @if change {
            h2 { "Change a plan" }
            div.actions {
                @for p in &items {
                    @let name = p["name"].as_str().unwrap_or("");
                    form method="post" action=(format!("/console/plans/{}", seg(name))) {
                        (csrf(signed))
                        fieldset {
                            legend { (name) }
                            @for (field, label) in &PLAN_FIELDS {
                                label { (label) " " input type="text" name=(field) value=(plan_value(&p[*field])) size="12"; }
                                br;
                            }
                            button type="submit" { "Save " (name) }
                        }
                    }
                    @if delete && p["tenants"].as_i64() == Some(0) {
                        form method="post" action=(format!("/console/plans/{}/delete", seg(name))) {
                            (csrf(signed))
                            label { "Type " (name) " to delete it " input type="text" name="confirm" required autocomplete="off"; }
                            " " button type="submit" { "Delete " (name) }
                        }
                    }
                }
            }
        }
        @if signed.actor.may(&Method::POST, "/plans") {
            h2 { "Add a plan" }
            form method="post" action="/console/plans" {
                (csrf(signed))
                p { label { "Name " input type="text" name="name" required maxlength="40"; } }
                @for (field, label) in &PLAN_FIELDS {
                    p { label { (label) " " input type="text" name=(field) required[*field == "connection_limit"]; } }
                }
                button type="submit" { "Add the plan" }
            }
        }
    };
    page(signed, Part::Plans, "Plans", false, body)
}

// ----------------------------------------------------------------- keys

pub fn keys(signed: &Signed, keys: &Value) -> Markup {
    let body = html! {
        table {
            thead { tr {
                th scope="col" { "Key" } th scope="col" { "Role" } th scope="col" { "Created" }
                th scope="col" { "Created by" } th scope="col" { "Last used" } th scope="col" { "Expires" }
                th scope="col" { "Revoke" }
            } }
            tbody {
                @for k in keys["items"].as_array().into_iter().flatten() {
                    @let name = k["name"].as_str().unwrap_or("");
                    tr {
                        th scope="row" { (name) }
                        td { (k["role"].as_str().unwrap_or("")) }
                        td { (k["created_at"].as_str().unwrap_or("")) }
                        td { (k["created_by"].as_str().unwrap_or("")) }
                        td { (k["last_used_at"].as_str().unwrap_or("never")) }
                        td {
                            (expiry(&k["expires_at"]))
                            @if !expired(&k["expires_at"]) {
                                form method="post" action=(format!("/console/keys/{}/expiry", seg(name))) {
                                    (csrf(signed))
                                    label { "New expiry, in days from now (empty: never) "
                                        input type="number" name="expires_in_days" min="1" max="3650" inputmode="numeric";
                                    }
                                    " "
                                    button type="submit" { "Change expiry" }
                                }
                            }
                        }
                        td {
                            form method="post" action=(format!("/console/keys/{}/revoke", seg(name))) {
                                (csrf(signed))
                                label { "Type " code { (name) } " to revoke it " input type="text" name="confirm" required autocomplete="off"; }
                                " "
                                button.danger type="submit" { "Revoke" }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Create a key" }
        form method="post" action="/console/keys" {
            (csrf(signed))
            label { "Name " input type="text" name="name" required pattern="[a-z][a-z0-9_\\-]{0,62}"; }
            label { "Role "
                select name="role" {
                    option value="viewer" { "viewer (reads)" }
                    option value="operator" { "operator (lifecycle, backups, moves)" }
                    option value="admin" { "admin (everything)" }
                }
            }
            label { "Expires in days (empty: never) "
                input type="number" name="expires_in_days" min="1" max="3650" inputmode="numeric";
            }
            " "
            button type="submit" { "Create key" }
        }
    };
    page(signed, Part::Keys, "Admin keys", false, body)
}

/// A key's expiry: `never`, the time, or that it has passed (such a key
/// is refused until revoked and made again).
fn expiry(at: &Value) -> Markup {
    let Some(text) = at.as_str() else {
        return html! { "never" };
    };
    html! {
        @if expired(at) { strong { "expired" } " " (text) } @else { (text) }
    }
}

/// Whether a key's `expires_at` has passed (it stays refused: no new
/// expiry is offered for it).
fn expired(at: &Value) -> bool {
    at.as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .is_some_and(|t| t <= chrono::Utc::now())
}

// ------------------------------------------------------------ operation

/// An operation and the slug of its tenant, if any.
pub struct OperationData {
    op: Operation,
    slug: Option<String>,
}

impl OperationData {
    pub async fn read(state: &AppState, id: &str) -> Result<Self, Response> {
        let missing = || {
            refusal(
                StatusCode::NOT_FOUND,
                "No such operation",
                "No operation has this id.",
            )
        };
        let id = Uuid::parse_str(id).map_err(|_| missing())?;
        let reg = state.registry();
        let op = reg
            .operation(id)
            .await
            .map_err(|e| api_failure(e.into()))?
            .ok_or_else(missing)?;
        let slug = match op.tenant_id {
            Some(t) => reg
                .tenant(t)
                .await
                .map_err(|e| api_failure(e.into()))?
                .map(|t| t.slug),
            None => None,
        };
        Ok(Self { op, slug })
    }

    fn ended(&self) -> bool {
        matches!(
            self.op.status,
            OperationStatus::Succeeded | OperationStatus::Failed
        )
    }
}

pub fn operation(signed: &Signed, d: &OperationData) -> Markup {
    let op = &d.op;
    let body = html! {
        dl.facts {
            dt { "Kind" } dd { (op_kind(op.kind)) }
            @if let Some(slug) = &d.slug { dt { "Tenant" } dd { a href=(format!("/console/tenants/{}", seg(slug))) { (slug) } } }
            dt { "Started" } dd { (when(op.created_at)) }
            dt { "Id" } dd { code { (op.id) } }
        }
        (progress(d))
    };
    page(
        signed,
        Part::None,
        &format!("Operation {}", op_kind(op.kind)),
        !d.ended(),
        body,
    )
}

/// The live part of an operation's page: it asks for itself again each
/// second (htmx) until the operation ends.
pub fn progress(d: &OperationData) -> Markup {
    let op = &d.op;
    let fleet = op.progress.get("total").and_then(Value::as_u64);
    let failures: Vec<&Value> = op
        .result
        .as_ref()
        .and_then(|r| r["failed"].as_array())
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    html! {
        section id="progress" aria-labelledby="progress-h" aria-live="polite"
            hx-get=[(!d.ended()).then(|| format!("/console/operations/{}/progress", op.id))]
            hx-trigger=[(!d.ended()).then_some("every 1s")] hx-swap="outerHTML" {
            h2 id="progress-h" { "Progress" }
            p { "Status: " strong data-status=(op_status(op.status)) { (status_word(op_status(op.status))) }
                " (updated " (when(op.updated_at)) ")" }
            @if let Some(total) = fleet {
                @let done = op.progress["done"].as_u64().unwrap_or(0);
                p {
                    label for="fleet-progress" { (fleet_counts(&op.progress)) }
                    " "
                    progress id="fleet-progress" max=(total.max(1)) value=(done) { (done) " of " (total) }
                }
            } @else if op.progress.as_object().is_some_and(|o| !o.is_empty()) {
                dl.facts {
                    @for (k, v) in op.progress.as_object().into_iter().flatten() {
                        dt { (k) } dd { (v.as_str().map_or_else(|| v.to_string(), str::to_owned)) }
                    }
                }
            }
            @if let Some(e) = &op.error { div.error role="alert" { p { "Error: " (e) } } }
            @if !failures.is_empty() {
                h3 { "Tenants that failed" }
                table {
                    thead { tr { th scope="col" { "Tenant" } th scope="col" { "Error" } } }
                    tbody {
                        @for f in &failures {
                            tr {
                                th scope="row" { (f["slug"].as_str().unwrap_or("")) }
                                td { (f["error"].as_str().map_or_else(|| f.to_string(), str::to_owned)) }
                            }
                        }
                    }
                }
            }
            @if let Some(r) = op.result.as_ref().filter(|_| failures.is_empty()) {
                details { summary { "Result" } pre { code { (serde_json::to_string_pretty(r).unwrap_or_default()) } } }
            }
        }
    }
}

// ----------------------------------------------------------- migrations

pub fn migrations(signed: &Signed, status: &Value, latest: Option<&Operation>) -> Markup {
    let behind = status["behind"].as_array().map_or(0, Vec::len);
    let body = html! {
        p { "Latest tenant schema version: " strong { (status["latest_version"]) } }
        table {
            caption { "Tenants per schema version" }
            thead { tr { th scope="col" { "Version" } th scope="col" class="num" { "Tenants" } } }
            tbody {
                @for v in status["versions"].as_array().into_iter().flatten() {
                    tr { th scope="row" { (v["schema_version"].as_i64().map_or("none".into(), |v| v.to_string())) } td.num { (v["tenants"]) } }
                }
            }
        }
        p { (behind) " tenants behind." }
        @if let Some(op) = latest {
            p { "Latest fleet migration: " a href=(format!("/console/operations/{}", op.id)) { (op_status(op.status)) ", " (fleet_counts(&op.progress)) } }
        }
        @if signed.actor.may(&Method::POST, "/migrations/tenants") {
            h2 { "Start a fleet migration" }
            form method="post" action="/console/migrations" {
                (csrf(signed))
                label { "Concurrency " input type="number" name="concurrency" min="1" max="32" placeholder="default"; }
                label { "Only the tenant " input type="text" name="tenant" placeholder="every tenant"; }
                label { input type="checkbox" name="dry_run" value="true"; " Dry run (change nothing)" }
                " "
                button type="submit" { "Migrate every tenant" }
            }
        }
    };
    page(signed, Part::Migrations, "Migrations", false, body)
}

// ---------------------------------------------------------------- audit

pub fn audit(signed: &Signed, p: &AuditParams, entries: Result<Value, Failure>) -> Markup {
    let body = html! {
        form.filters method="get" action="/console/audit" role="search" aria-label="Filter the audit log" {
            label { "Key " input type="text" name="key" value=(p.key); }
            label { "Action " input type="text" name="action" value=(p.action) placeholder="tenant.suspend"; }
            label { "Tenant " input type="text" name="tenant" value=(p.tenant) placeholder="slug or id"; }
            button type="submit" { "Filter" }
        }
        @match entries {
            Err(f) => div.error role="alert" { p { (f.detail) } },
            Ok(v) => {
                @let list: Vec<AuditEntry> = v.as_array().into_iter().flatten().filter_map(audit_entry).collect();
                (audit_table(&list))
            }
        }
    };
    page(signed, Part::Audit, "Audit", false, body)
}

fn audit_entry(v: &Value) -> Option<AuditEntry> {
    Some(AuditEntry {
        id: v["id"].as_i64()?,
        at: v["at"].as_str()?.parse().ok()?,
        actor: v["actor"].as_str()?.to_owned(),
        action: v["action"].as_str()?.to_owned(),
        tenant_id: v["tenant_id"].as_str().and_then(|s| s.parse().ok()),
        detail: v["detail"].clone(),
    })
}

// -------------------------------------------------------------- sign-in

pub fn sign_in(nonce: &str, problem: Option<&str>) -> Markup {
    let body = html! {
        @if let Some(p) = problem { div.error role="alert" { p { (p) } } }
        form method="post" action="/console/sign-in" {
            input type="hidden" name="csrf" value=(nonce);
            p {
                label for="token" { "Admin key or bootstrap token" }
                br;
                input id="token" type="password" name="token" required autocomplete="current-password" size="50";
            }
            button type="submit" { "Sign in" }
        }
        p.muted { "Sign in with a named admin key (" code { "silo keys create NAME --role viewer|operator|admin" } ") or the bootstrap token, " code { "SILO_ADMIN_TOKEN" } ". The key's role decides what you may do." }
    };
    bare("Sign in", body)
}
