//! The error answers in the OpenAPI document.
//!
//! Every error silo answers is an [`ApiError`](super::error::ApiError), so
//! every 4xx and 5xx response in the document is `application/problem+json`
//! with the `Problem` schema: [`problem_json`] makes it so once, for the
//! whole document, and a route's annotation only names a status and says
//! when it happens, `(status = 404, description = "no such tenant")`.
//!
//! The answers many routes share, each for one reason, are sets to name in
//! `responses(...)`:
//!
//! - [`AdminErrors`]: every admin route that reads the control database
//!   (the admin token and role check, the database being down, a bug);
//! - [`AdminAuth`]: an admin route that can fail no other way;
//! - [`AppErrors`]: every app route (what [`TenantDb`](super::app) answers);
//! - [`JsonBody`]: a route that reads a required JSON body;
//! - [`OptionalJsonBody`]: a route that reads an optional JSON body;
//! - [`QueryErrors`]: a route that reads query parameters (a list).
//!
//! A route lists a set first and its own answers after, so its own
//! description of a status the set also names is the one kept.

use std::collections::BTreeMap;

use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, Response, ResponseBuilder};
use utoipa::IntoResponses;

use super::error::MAX_BODY_BYTES;

/// The media type of every error answer.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Makes every 4xx and 5xx response of every operation `application/problem+json`
/// with the `Problem` schema (and nothing else).
pub fn problem_json(openapi: &mut OpenApi) {
    for operation in operations_mut(openapi) {
        for (status, response) in &mut operation.responses.responses {
            if let (true, RefOr::T(response)) = (is_error(status), response) {
                response.content.clear();
                response.content.insert(PROBLEM_JSON.to_owned(), problem());
            }
        }
    }
}

/// Every route is under an in-flight limit and a deadline (see
/// `api::limits`): each documents a 503 for them, unless it has its own.
pub fn overload(openapi: &mut OpenApi) {
    for operation in operations_mut(openapi) {
        operation
            .responses
            .responses
            .entry("503".to_owned())
            .or_insert_with(|| {
                RefOr::T(
                    unavailable(
                        "as many requests of this kind are in flight as silo serves at \
                         once, or the request took too long",
                    )
                    .build(),
                )
            });
    }
}

/// Every operation of every path of the document.
fn operations_mut(openapi: &mut OpenApi) -> impl Iterator<Item = &mut Operation> {
    openapi.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
    })
}

fn is_error(status: &str) -> bool {
    status.starts_with('4') || status.starts_with('5')
}

fn problem() -> Content {
    Content::new(Some(Ref::from_schema_name("Problem")))
}

/// A problem response with `description`.
fn problem_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new()
        .description(description)
        .content(PROBLEM_JSON, problem())
}

fn header(ty: Type, description: &str) -> Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(ty))
        .description(Some(description))
        .build()
}

fn responses(list: Vec<(u16, ResponseBuilder)>) -> BTreeMap<String, RefOr<Response>> {
    list.into_iter()
        .map(|(status, r)| (status.to_string(), RefOr::T(r.build())))
        .collect()
}

fn unauthorized(what: &str) -> ResponseBuilder {
    problem_response(what).header(
        "WWW-Authenticate",
        header(Type::String, "`Bearer`: the scheme to authenticate with"),
    )
}

fn internal() -> ResponseBuilder {
    problem_response("an internal error; it is logged, the answer shows nothing of it")
}

fn unavailable(what: &str) -> ResponseBuilder {
    problem_response(what).header(
        "Retry-After",
        header(Type::Integer, "seconds to wait before retrying"),
    )
}

/// The admin token check (`Authorization: Bearer` with `SILO_ADMIN_TOKEN`
/// or a live admin key), the key's role (`api::auth`), the admin in-flight
/// limit and the admin request deadline.
pub struct AdminAuth;

impl IntoResponses for AdminAuth {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![
            (
                401,
                unauthorized(
                    "no `Authorization: Bearer` header with the admin token or a live admin \
                     key (a revoked key is refused at once)",
                ),
            ),
            (
                403,
                problem_response(
                    "the admin key's role may not do this: a `viewer` only reads (and not the \
                     keys, nor a direct connection URI); an `operator` may not delete, manage \
                     keys, restore with `\"overwrite\": true` or read a direct connection URI",
                ),
            ),
            (
                429,
                problem_response(
                    "tokens from this client address failed more than \
                     `SILO_ADMIN_AUTH_FAILURES` times in a minute: no token is looked at \
                     until `Retry-After` has passed",
                )
                .header(
                    "Retry-After",
                    header(Type::Integer, "seconds to wait before retrying"),
                ),
            ),
            // An admin key is looked up in the control database.
            (500, internal()),
            (
                503,
                unavailable(
                    "the control database is unreachable (an admin key is checked there), \
                     `SILO_ADMIN_MAX_IN_FLIGHT` admin requests are in flight already, or the \
                     request took longer than `SILO_ADMIN_REQUEST_TIMEOUT` and was stopped",
                ),
            ),
        ])
    }
}

/// What every admin route reading the control database may answer: the
/// token check's 401 and the role check's 403, 503 while a database silo
/// needs is unreachable (or, creating a tenant, no server has room), and 500.
pub struct AdminErrors;

impl IntoResponses for AdminErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut all = AdminAuth::responses();
        all.extend(responses(vec![
            (500, internal()),
            (
                503,
                unavailable(
                    "the control database or a tenant server is unreachable (nothing was changed), `SILO_ADMIN_MAX_IN_FLIGHT` admin requests are in flight already, or the request took longer than `SILO_ADMIN_REQUEST_TIMEOUT` and was stopped",
                ),
            ),
        ]));
        all
    }
}

/// What every app route may answer before it runs: the tenant named, its
/// token checked, a connection to its database taken.
pub struct AppErrors;

impl IntoResponses for AppErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![
            (
                400,
                problem_response(
                    "no tenant named (neither `X-Tenant-ID` nor a host name under the app \
                     domain), `X-Tenant-ID` is not a slug or id, or it names another \
                     tenant than the host name",
                ),
            ),
            (
                401,
                unauthorized(
                    "no `Authorization: Bearer` header with a valid tenant token (an admin \
                     token is not one)",
                ),
            ),
            (
                403,
                problem_response(
                    "a write (any method but GET or HEAD) of a tenant over its plan's storage \
                     quota: writes are refused until it is under it or its plan grows; reads \
                     still work",
                ),
            ),
            (
                404,
                problem_response("no such tenant, or the token is another tenant's"),
            ),
            (423, problem_response("the tenant is suspended or archived")),
            (
                429,
                problem_response(
                    "the tenant (the one its token names) sends more requests per second \
                     than `SILO_APP_RATE_LIMIT` allows; `Retry-After` says when to retry",
                )
                .header(
                    "Retry-After",
                    header(Type::Integer, "seconds to wait before retrying"),
                ),
            ),
            (500, internal()),
            (
                503,
                unavailable(
                    "the tenant is not ready (being created, restored or moved), its \
                     database or the control database is unreachable, no connection is \
                     free, the query took too long, `SILO_APP_MAX_IN_FLIGHT` app requests \
                     are in flight already, or the request took longer than \
                     `SILO_APP_REQUEST_TIMEOUT`",
                ),
            ),
        ])
    }
}

fn body_errors(json_content_type: bool) -> BTreeMap<String, RefOr<Response>> {
    let mut list = vec![
        (400, problem_response("the body is not well-formed JSON")),
        (
            413,
            problem_response(&format!(
                "the body is larger than the limit: {MAX_BODY_BYTES} bytes on `/admin/v1`, \
                 `SILO_APP_MAX_BODY_BYTES` on `/api/v1`"
            )),
        ),
        (
            422,
            problem_response("the body does not fit the schema, or a value is out of range"),
        ),
    ];
    if json_content_type {
        list.push((
            415,
            problem_response("the body is not sent as `Content-Type: application/json`"),
        ));
    }
    responses(list)
}

/// What reading a required JSON body may answer.
pub struct JsonBody;

impl IntoResponses for JsonBody {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        body_errors(true)
    }
}

/// What reading an optional JSON body may answer (an empty body is none;
/// the content type is not checked).
pub struct OptionalJsonBody;

impl IntoResponses for OptionalJsonBody {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        body_errors(false)
    }
}

/// What reading query parameters may answer (every list pages with `limit`
/// and `cursor`).
pub struct QueryErrors;

impl IntoResponses for QueryErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![(
            422,
            problem_response(
                "a query parameter is malformed, unknown or out of range (such as a `limit` \
                 out of bounds, or a `cursor` this API did not return)",
            ),
        )])
    }
}
