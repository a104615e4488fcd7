//! `/docs`: the OpenAPI document as a page to read, rendered by Redoc,
//! vendored in `assets/vendor` and served from the binary, so the page
//! loads nothing from anywhere but silo. Its Content-Security-Policy says
//! so to the browser too.

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::Router;

/// Redoc's standalone bundle (see `assets/vendor/README.md`).
const REDOC_JS: &[u8] = include_bytes!("../../assets/vendor/redoc-2.5.1/redoc.standalone.js");

/// Where the page gets its scripts.
pub const REDOC_PATH: &str = "/docs/assets/redoc-2.5.1.js";
const INIT_PATH: &str = "/docs/assets/init.js";

/// Scripts from silo only (Redoc's search runs in a worker made from a
/// `blob:`), styles from silo and inline (Redoc styles its components
/// inline), data from silo only, no frames, no forms.
pub const CSP: &str = "default-src 'none'; script-src 'self' blob:; worker-src 'self' blob:; \
style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const PAGE: &str = concat!(
    "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
    "<title>silo API reference</title>\n</head>\n<body>\n",
    "<noscript>This page needs JavaScript; the document itself is <a href=\"/openapi.json\">/openapi.json</a>.</noscript>\n",
    "<div id=\"redoc\"></div>\n",
    "<script src=\"/docs/assets/redoc-2.5.1.js\"></script>\n",
    "<script src=\"/docs/assets/init.js\"></script>\n</body>\n</html>\n"
);

const INIT: &str = "Redoc.init('/openapi.json', {}, document.getElementById('redoc'));\n";

/// The page (its route is in the document, see `api::docs_page`).
pub fn page() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CONTENT_SECURITY_POLICY, CSP),
        ],
        PAGE,
    )
}

fn script(body: &'static [u8]) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
}

/// The page's scripts (not in the document: they are not API).
pub fn assets<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            REDOC_PATH,
            axum::routing::get(|| async { script(REDOC_JS) }),
        )
        .route(
            INIT_PATH,
            axum::routing::get(|| async { script(INIT.as_bytes()) }),
        )
}
