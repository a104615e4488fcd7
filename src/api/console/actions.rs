//! What the console's forms do: sign in and out, and every change, each a
//! request to the admin API in-process ([`Console::call`]) as the signed-in
//! actor. A form's CSRF token is checked before any of these run
//! ([`Posted`]); destructive acts also need the tenant's slug typed.

use std::time::Duration;

use axum::extract::State;
use axum::http::header::{RETRY_AFTER, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;
use serde_json::{json, Value};

use super::pages;
use super::session::{self, cookie, random_token, set_cookie, Posted, SIGN_IN_COOKIE};
use super::{seg, Console, Failure, Path};
use crate::api::auth::{self, Actor, Peer};
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::crypto::secret_eq;
use crate::registry::TenantRecord;

/// How long a sign-in form stays usable.
const SIGN_IN_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest token accepted at sign-in (admin keys and the bootstrap token
/// are far shorter).
const MAX_TOKEN: usize = 512;

/// The sign-in form, bound to this browser by a cookie holding its nonce.
pub async fn sign_in_page(headers: HeaderMap) -> Response {
    sign_in_form(&headers, StatusCode::OK, None)
}

fn sign_in_form(headers: &HeaderMap, status: StatusCode, problem: Option<&str>) -> Response {
    let nonce = random_token();
    let mut res = (status, pages::sign_in(&nonce, problem)).into_response();
    res.headers_mut().append(
        SET_COOKIE,
        set_cookie(headers, SIGN_IN_COOKIE, &nonce, SIGN_IN_TTL),
    );
    res
}

#[derive(Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
}

/// Sign in with a named admin key's token or the bootstrap token: a new
/// session. The token itself is kept nowhere.
pub async fn sign_in(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    form: Result<Form<SignInForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return sign_in_form(
            &headers,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("The sign-in form was not understood."),
        );
    };
    let bound = cookie(&headers, SIGN_IN_COOKIE)
        .is_some_and(|n| !form.csrf.is_empty() && secret_eq(n.as_bytes(), form.csrf.as_bytes()));
    if !bound {
        return pages::refusal(
            StatusCode::FORBIDDEN,
            "Sign-in refused",
            "This sign-in form did not come from this browser's sign-in page (or it expired). \
             Open the sign-in page again.",
        );
    }
    let token = form.token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN {
        return sign_in_form(
            &headers,
            StatusCode::UNAUTHORIZED,
            Some("That is not an admin key or the bootstrap token."),
        );
    }
    match auth::sign_in(&state, peer, token).await {
        Ok((actor, holder)) => {
            tracing::info!(key = actor.name(), role = %actor.role(), "console sign-in");
            match session::open(&state, &holder).await {
                Ok(cookie) => session::signed_in(&headers, &cookie),
                Err(e) => pages::api_failure(e),
            }
        }
        Err(ApiError::Unauthorized) => sign_in_form(
            &headers,
            StatusCode::UNAUTHORIZED,
            Some("That is not a live admin key or the bootstrap token."),
        ),
        Err(ApiError::TooManyRequests(_, seconds, _)) => {
            let mut res = sign_in_form(
                &headers,
                StatusCode::TOO_MANY_REQUESTS,
                Some(&format!(
                    "Too many failed sign-ins from this address. Try again in {seconds} s."
                )),
            );
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
            res
        }
        Err(e) => pages::api_failure(e),
    }
}

/// A form with no fields but its CSRF token.
#[derive(Deserialize)]
pub struct Empty {}

pub async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
    posted: Posted<Empty>,
) -> Response {
    match session::close(&state, &posted.signed.cookie).await {
        Ok(()) => session::signed_out(&headers),
        Err(e) => pages::api_failure(e),
    }
}

#[derive(Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    slug: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    plan: String,
    #[serde(default)]
    server: String,
}

/// Create a tenant (as `POST /admin/v1/tenants`), then show it.
pub async fn create_tenant(
    Extension(console): Extension<Console>,
    posted: Posted<CreateForm>,
) -> Response {
    let f = &posted.form;
    let mut body = json!({"slug": f.slug.trim(), "name": f.name.trim()});
    if !f.plan.trim().is_empty() {
        body["plan"] = json!(f.plan.trim());
    }
    if !f.server.trim().is_empty() {
        body["server"] = json!(f.server.trim());
    }
    match console
        .call(&posted.signed.actor, Method::POST, "/tenants", Some(body))
        .await
    {
        Ok(t) => see(&format!(
            "/console/tenants/{}",
            seg(t["slug"].as_str().unwrap_or_default())
        )),
        Err(f) => f.into_response(),
    }
}

/// The fields any tenant action's form may carry.
#[derive(Deserialize)]
pub struct ActionForm {
    /// The tenant's slug, typed, for a destructive act.
    #[serde(default)]
    confirm: String,
    /// A token's lifetime in seconds.
    #[serde(default)]
    ttl: String,
    /// A move's target server.
    #[serde(default)]
    server: String,
    /// An app credential's name and pool mode; a tenant's new name.
    #[serde(default)]
    name: String,
    #[serde(default)]
    pool_mode: String,
    /// An app credential that may only read (a checked box sends `true`).
    #[serde(default)]
    read_only: String,
    /// A tenant's new plan and backup schedule.
    #[serde(default)]
    plan: String,
    #[serde(default)]
    backup_schedule: String,
}

/// The tenant a form names (slug or id), or a 404 page.
async fn find(state: &AppState, slug_or_id: &str) -> Result<TenantRecord, Response> {
    let found = match slug_or_id.len() <= 64 {
        true => state
            .registry()
            .find_tenant(slug_or_id)
            .await
            .map_err(|e| pages::api_failure(e.into()))?,
        false => None,
    };
    found.ok_or_else(|| {
        pages::refusal(
            StatusCode::NOT_FOUND,
            "No such tenant",
            "No tenant has this slug or id.",
        )
    })
}

/// A typed confirmation that does not name `slug`: 422, nothing done.
fn unconfirmed(typed: &str, slug: &str) -> Option<Response> {
    (typed.trim() != slug).then(|| {
        pages::refusal(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not confirmed",
            &format!("Type the tenant's slug, {slug}, to confirm; nothing was done."),
        )
    })
}

/// 303 to a page.
fn see(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// Send a change to the admin API as `actor`; once done, 303 to `to`,
/// else the API's refusal as a page.
async fn change_then_see(
    console: &Console,
    actor: &Actor,
    method: Method,
    path: &str,
    body: Option<Value>,
    to: &str,
) -> Response {
    match console.call(actor, method, path, body).await {
        Ok(_) => see(to),
        Err(f) => f.into_response(),
    }
}

/// 303 to the page of the operation an answer names.
fn to_operation(op: &Value) -> Response {
    see(&format!(
        "/console/operations/{}",
        seg(op["id"].as_str().unwrap_or_default())
    ))
}

/// One action on one tenant, as the admin API route it maps to.
pub async fn tenant_action(
    State(state): State<AppState>,
    Extension(console): Extension<Console>,
    Path((tenant, action)): Path<(String, String)>,
    posted: Posted<ActionForm>,
) -> Response {
    let t = match find(&state, &tenant).await {
        Ok(t) => t,
        Err(res) => return res,
    };
    let (actor, f) = (&posted.signed.actor, &posted.form);
    let base = format!("/tenants/{}", t.id);
    let page = format!("/console/tenants/{}", t.id);
    let call = |method: Method, path: String, body: Option<Value>| async move {
        console.call(actor, method, &path, body).await
    };
    let needs_confirm = matches!(
        action.as_str(),
        "rotate" | "move" | "archive" | "delete" | "erase-backups"
    );
    if needs_confirm {
        if let Some(refused) = unconfirmed(&f.confirm, &t.slug) {
            return refused;
        }
    }
    let answer: Result<Response, Failure> = match action.as_str() {
        "suspend" | "resume" => call(Method::POST, format!("{base}/{action}"), None)
            .await
            .map(|_| see(&page)),
        "rotate" => call(Method::POST, format!("{base}/credentials/rotate"), None)
            .await
            .map(|_| see(&page)),
        "revoke-tokens" => call(Method::POST, format!("{base}/tokens/revoke"), None)
            .await
            .map(|_| see(&page)),
        "backup" => call(Method::POST, format!("{base}/backups"), None)
            .await
            .map(|_| see(&page)),
        "move" => call(
            Method::POST,
            format!("{base}/move"),
            Some(json!({"server": f.server})),
        )
        .await
        .map(|op| to_operation(&op)),
        "edit" => {
            let mut patch = json!({});
            for (field, value) in [
                ("name", &f.name),
                ("plan", &f.plan),
                ("backup_schedule", &f.backup_schedule),
            ] {
                if !value.trim().is_empty() {
                    patch[field] = json!(value.trim());
                }
            }
            call(Method::PATCH, base.clone(), Some(patch))
                .await
                .map(|_| see(&page))
        }
        "direct-uri" => call(Method::GET, format!("{base}/connection?direct=true"), None)
            .await
            .map(|v| {
                let lines = [
                    ("User", v["user"].as_str().unwrap_or_default().to_owned()),
                    ("URI", v["uri"].as_str().unwrap_or_default().to_owned()),
                ];
                pages::secret(
                    &posted.signed,
                    "Direct connection URI",
                    &t.slug,
                    &page,
                    &lines,
                )
                .into_response()
            }),
        "unarchive" => call(Method::POST, format!("{base}/restore"), Some(json!({})))
            .await
            .map(|op| to_operation(&op)),
        "erase-backups" => call(Method::DELETE, format!("{base}/backups"), None)
            .await
            .map(|_| see(&page)),
        "archive" => call(Method::POST, format!("{base}/archive"), None)
            .await
            .map(|op| to_operation(&op)),
        "delete" => call(Method::DELETE, base.clone(), None)
            .await
            .map(|op| to_operation(&op)),
        "mint-token" => {
            let Ok(ttl) = f.ttl.trim().parse::<i64>() else {
                return pages::refusal(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Not minted",
                    "A token's lifetime is a number of seconds.",
                );
            };
            call(
                Method::POST,
                format!("{base}/tokens"),
                Some(json!({"ttl_seconds": ttl})),
            )
            .await
            .map(|v| {
                let lines = [
                    ("Token", v["token"].as_str().unwrap_or_default().to_owned()),
                    (
                        "Expires",
                        v["expires_at"].as_str().unwrap_or_default().to_owned(),
                    ),
                ];
                pages::secret(&posted.signed, "App token minted", &t.slug, &page, &lines)
                    .into_response()
            })
        }
        "app-credentials" => {
            let mode = Some(f.pool_mode.trim()).filter(|m| !m.is_empty());
            call(
                Method::POST,
                format!("{base}/app-credentials"),
                Some(json!({
                    "name": f.name.trim(),
                    "pool_mode": mode.unwrap_or("session"),
                    "read_only": f.read_only == "true",
                })),
            )
            .await
            .map(|v| {
                let mut lines = vec![
                    ("User", v["user"].as_str().unwrap_or_default().to_owned()),
                    (
                        "Password",
                        v["password"].as_str().unwrap_or_default().to_owned(),
                    ),
                ];
                if let Some(uri) = v["uri"].as_str() {
                    lines.push(("Connection URI", uri.to_owned()));
                }
                pages::secret(
                    &posted.signed,
                    "App credential created",
                    &t.slug,
                    &page,
                    &lines,
                )
                .into_response()
            })
        }
        _ => {
            return pages::refusal(
                StatusCode::NOT_FOUND,
                "No such action",
                "The console offers no such action on a tenant.",
            )
        }
    };
    answer.unwrap_or_else(IntoResponse::into_response)
}

/// Revoke one app credential (`DELETE .../app-credentials/{id}`).
pub async fn revoke_app_credential(
    State(state): State<AppState>,
    Extension(console): Extension<Console>,
    Path((tenant, id)): Path<(String, String)>,
    posted: Posted<Empty>,
) -> Response {
    let t = match find(&state, &tenant).await {
        Ok(t) => t,
        Err(res) => return res,
    };
    change_then_see(
        &console,
        &posted.signed.actor,
        Method::DELETE,
        &format!("/tenants/{}/app-credentials/{}", t.id, seg(&id)),
        None,
        &format!("/console/tenants/{}", t.id),
    )
    .await
}

/// Rotate one app credential's password (shown once).
pub async fn rotate_app_credential(
    State(state): State<AppState>,
    Extension(console): Extension<Console>,
    Path((tenant, id)): Path<(String, String)>,
    posted: Posted<Empty>,
) -> Response {
    let t = match find(&state, &tenant).await {
        Ok(t) => t,
        Err(res) => return res,
    };
    let page = format!("/console/tenants/{}", t.id);
    match console
        .call(
            &posted.signed.actor,
            Method::POST,
            &format!("/tenants/{}/app-credentials/{}/rotate", t.id, seg(&id)),
            None,
        )
        .await
    {
        Ok(v) => {
            let lines = [
                ("User", v["user"].as_str().unwrap_or_default().to_owned()),
                (
                    "Password",
                    v["password"].as_str().unwrap_or_default().to_owned(),
                ),
            ];
            pages::secret(
                &posted.signed,
                "App credential rotated",
                &t.slug,
                &page,
                &lines,
            )
            .into_response()
        }
        Err(f) => f.into_response(),
    }
}

#[derive(Deserialize)]
pub struct BackupForm {
    /// The slug of the tenant restored into, typed.
    #[serde(default)]
    confirm: String,
    /// `true` to replace a tenant that holds data.
    #[serde(default)]
    overwrite: String,
    /// Restore into a new tenant of this slug instead.
    #[serde(default)]
    into: String,
}

/// Verify a backup, or restore it into its tenant (typed confirmation).
pub async fn backup_action(
    State(state): State<AppState>,
    Extension(console): Extension<Console>,
    Path((id, action)): Path<(String, String)>,
    posted: Posted<BackupForm>,
) -> Response {
    let missing = || {
        pages::refusal(
            StatusCode::NOT_FOUND,
            "No such backup",
            "No backup has this id.",
        )
    };
    let Ok(backup_id) = uuid::Uuid::parse_str(&id) else {
        return missing();
    };
    let actor = &posted.signed.actor;
    let answer = match action.as_str() {
        "verify" => {
            console
                .call(
                    actor,
                    Method::POST,
                    &format!("/backups/{backup_id}/verify"),
                    None,
                )
                .await
        }
        "restore" if !posted.form.into.trim().is_empty() => {
            let into = posted.form.into.trim();
            console
                .call(
                    actor,
                    Method::POST,
                    &format!("/backups/{backup_id}/restore"),
                    Some(json!({"into_slug": into})),
                )
                .await
        }
        "restore" => {
            let reg = state.registry();
            let backup = match reg.backup(backup_id).await {
                Ok(Some(b)) => b,
                Ok(None) => return missing(),
                Err(e) => return pages::api_failure(e.into()),
            };
            let slug = match reg.tenant(backup.tenant_id).await {
                Ok(Some(t)) => t.slug,
                Ok(None) => return missing(),
                Err(e) => return pages::api_failure(e.into()),
            };
            if let Some(refused) = unconfirmed(&posted.form.confirm, &slug) {
                return refused;
            }
            let overwrite = posted.form.overwrite == "true";
            console
                .call(
                    actor,
                    Method::POST,
                    &format!("/backups/{backup_id}/restore"),
                    Some(json!({"overwrite": overwrite})),
                )
                .await
        }
        _ => return missing(),
    };
    match answer {
        Ok(op) => to_operation(&op),
        Err(f) => f.into_response(),
    }
}

#[derive(Deserialize)]
pub struct MigrationForm {
    #[serde(default)]
    concurrency: String,
    #[serde(default)]
    dry_run: String,
    /// One tenant (slug or id) instead of every one.
    #[serde(default)]
    tenant: String,
}

/// Start a fleet migration (`POST /migrations/tenants`), then watch it.
pub async fn start_migration(
    Extension(console): Extension<Console>,
    posted: Posted<MigrationForm>,
) -> Response {
    let f = &posted.form;
    let mut body = json!({"dry_run": f.dry_run == "true"});
    if !f.tenant.trim().is_empty() {
        body["tenant"] = json!(f.tenant.trim());
    }
    if !f.concurrency.trim().is_empty() {
        let Ok(n) = f.concurrency.trim().parse::<usize>() else {
            return pages::refusal(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Not started",
                "Concurrency is a whole number.",
            );
        };
        body["concurrency"] = json!(n);
    }
    match console
        .call(
            &posted.signed.actor,
            Method::POST,
            "/migrations/tenants",
            Some(body),
        )
        .await
    {
        Ok(op) => to_operation(&op),
        Err(f) => f.into_response(),
    }
}

#[derive(Deserialize)]
pub struct ServerForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    admin_url: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    max_connections: String,
    #[serde(default)]
    max_tenants: String,
}

/// `max_connections` and `max_tenants` of a server form, when given.
fn limits(f: &ServerForm, body: &mut Value) -> Result<(), Response> {
    for (field, value) in [
        ("max_connections", &f.max_connections),
        ("max_tenants", &f.max_tenants),
    ] {
        if value.trim().is_empty() {
            continue;
        }
        let n: i32 = value.trim().parse().map_err(|_| {
            pages::refusal(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Not saved",
                &format!("{field} is a whole number."),
            )
        })?;
        body[field] = json!(n);
    }
    Ok(())
}

/// Register a tenant server (`POST /servers`); its admin URL is sent on
/// and never shown again.
pub async fn create_server(
    Extension(console): Extension<Console>,
    posted: Posted<ServerForm>,
) -> Response {
    let f = &posted.form;
    let mut body = json!({"name": f.name.trim(), "admin_url": f.admin_url.trim()});
    if let Err(res) = limits(f, &mut body) {
        return res;
    }
    change_then_see(
        &console,
        &posted.signed.actor,
        Method::POST,
        "/servers",
        Some(body),
        "/console/servers",
    )
    .await
}

/// Drain a server or make it active, or change its limits.
pub async fn update_server(
    Extension(console): Extension<Console>,
    Path(name): Path<String>,
    posted: Posted<ServerForm>,
) -> Response {
    let f = &posted.form;
    let mut body = json!({});
    if !f.status.trim().is_empty() {
        body["status"] = json!(f.status.trim());
    }
    if let Err(res) = limits(f, &mut body) {
        return res;
    }
    change_then_see(
        &console,
        &posted.signed.actor,
        Method::PATCH,
        &format!("/servers/{}", seg(&name)),
        Some(body),
        "/console/servers",
    )
    .await
}

/// A plan's form: every limit as typed (empty: cleared), and a delete's
/// confirmation.
#[derive(Deserialize)]
pub struct PlanForm {
    #[serde(flatten)]
    fields: std::collections::HashMap<String, String>,
}

/// The API's body for a plan's form: the known fields, numbers parsed,
/// empty ones `null` (the connection limit is left out when empty).
fn plan_body(f: &PlanForm) -> Result<Value, Response> {
    let mut body = json!({});
    for (field, label) in pages::PLAN_FIELDS {
        let v = f.fields.get(field).map(|s| s.trim()).unwrap_or("");
        body[field] = match (field, v) {
            ("connection_limit", "") => continue,
            (_, "") => Value::Null,
            ("backup_schedule", v) => json!(v),
            (_, v) => json!(v.parse::<i64>().map_err(|_| {
                pages::refusal(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Not saved",
                    &format!("{label} is a whole number, or empty; nothing was saved."),
                )
            })?),
        };
    }
    Ok(body)
}

/// Add a plan (`POST /plans`).
pub async fn create_plan(
    Extension(console): Extension<Console>,
    posted: Posted<PlanForm>,
) -> Response {
    let mut body = match plan_body(&posted.form) {
        Ok(b) => b,
        Err(res) => return res,
    };
    let name = posted.form.fields.get("name").map_or("", |s| s.trim());
    body["name"] = json!(name);
    change_then_see(
        &console,
        &posted.signed.actor,
        Method::POST,
        "/plans",
        Some(body),
        "/console/plans",
    )
    .await
}

/// Change a plan (`PATCH /plans/{plan}`): it applies to its tenants at once.
pub async fn update_plan(
    Extension(console): Extension<Console>,
    Path(name): Path<String>,
    posted: Posted<PlanForm>,
) -> Response {
    let body = match plan_body(&posted.form) {
        Ok(b) => b,
        Err(res) => return res,
    };
    change_then_see(
        &console,
        &posted.signed.actor,
        Method::PATCH,
        &format!("/plans/{}", seg(&name)),
        Some(body),
        "/console/plans",
    )
    .await
}

/// Delete a plan no tenant is on (`DELETE /plans/{plan}`), its name typed.
pub async fn delete_plan(
    Extension(console): Extension<Console>,
    Path(name): Path<String>,
    posted: Posted<PlanForm>,
) -> Response {
    if posted.form.fields.get("confirm").map(|s| s.trim()) != Some(name.as_str()) {
        return pages::refusal(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not confirmed",
            &format!("Type the plan's name, {name}, to delete it; nothing was done."),
        );
    }
    change_then_see(
        &console,
        &posted.signed.actor,
        Method::DELETE,
        &format!("/plans/{}", seg(&name)),
        None,
        "/console/plans",
    )
    .await
}

#[derive(Deserialize)]
pub struct KeyForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    expires_in_days: String,
    #[serde(default)]
    confirm: String,
}

/// `expires_in_days` as a form gives it: empty is none (`null`), a number
/// a number, anything else as typed (for the API to refuse).
fn days_field(typed: &str) -> Value {
    match typed.trim() {
        "" => Value::Null,
        days => days
            .parse::<i64>()
            .map_or_else(|_| json!(days), |d| json!(d)),
    }
}

/// Make an admin key (`POST /keys`); its token is shown once.
pub async fn create_key(
    Extension(console): Extension<Console>,
    posted: Posted<KeyForm>,
) -> Response {
    let f = &posted.form;
    let mut body = json!({"name": f.name.trim(), "role": f.role.trim()});
    let days = days_field(&f.expires_in_days);
    if !days.is_null() {
        body["expires_in_days"] = days;
    }
    match console
        .call(&posted.signed.actor, Method::POST, "/keys", Some(body))
        .await
    {
        Ok(v) => {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            let lines = [
                ("Role", v["role"].as_str().unwrap_or_default().to_owned()),
                (
                    "Expires",
                    v["expires_at"].as_str().unwrap_or("never").to_owned(),
                ),
                ("Token", v["token"].as_str().unwrap_or_default().to_owned()),
            ];
            let subject = format!("the key {name}");
            pages::secret(
                &posted.signed,
                "Admin key created",
                &subject,
                "/console/keys",
                &lines,
            )
            .into_response()
        }
        Err(f) => f.into_response(),
    }
}

/// Change a live admin key's expiry (`PATCH /keys/{name}`): so many days
/// from now, or never when the field is left empty.
pub async fn change_key_expiry(
    Extension(console): Extension<Console>,
    Path(name): Path<String>,
    posted: Posted<KeyForm>,
) -> Response {
    change_then_see(
        &console,
        &posted.signed.actor,
        Method::PATCH,
        &format!("/keys/{}", seg(&name)),
        Some(json!({"expires_in_days": days_field(&posted.form.expires_in_days)})),
        "/console/keys",
    )
    .await
}

/// Revoke an admin key (`DELETE /keys/{name}`), its name typed.
pub async fn revoke_key(
    Extension(console): Extension<Console>,
    Path(name): Path<String>,
    posted: Posted<KeyForm>,
) -> Response {
    if posted.form.confirm.trim() != name {
        return pages::refusal(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not confirmed",
            &format!("Type the key's name, {name}, to revoke it; nothing was done."),
        );
    }
    change_then_see(
        &console,
        &posted.signed.actor,
        Method::DELETE,
        &format!("/keys/{}", seg(&name)),
        None,
        "/console/keys",
    )
    .await
}
