//! `/docs`: the OpenAPI document as a page to read and try requests from,
//! rendered by Scalar, vendored in `assets/vendor` and served from the
//! binary without its web fonts, so the page loads nothing from anywhere
//! but silo. Its Content-Security-Policy says so to the browser too.
//!
//! (Redoc was tried first: its standalone bundle asks a CDN for its logo,
//! which the policy refuses but the browser still attempts.)

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::Router;

/// Scalar's standalone bundle (see `assets/vendor/README.md`).
const SCALAR_JS: &[u8] =
    include_bytes!("../../assets/vendor/scalar-api-reference-1.25.0/standalone.js");

/// Where the page gets its script.
pub const SCALAR_PATH: &str = "/docs/scalar-1.25.0.js";

/// Scripts from silo only (the document rides in a `application/json`
/// script element, which runs nothing), styles from silo and inline
/// (Scalar sets inline styles), requests to silo only, no frames, no forms.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; \
form-action 'none'; frame-ancestors 'none'";

/// The page, with the document (`json`) in it.
pub fn html(json: &str) -> String {
    // Inside a script element, "</" could end it: JSON may say "<\/".
    let json = json.replace("</", "<\\/");
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<title>silo API reference</title>\n\
<meta charset=\"utf-8\"/>\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n\
</head>\n<body>\n<noscript>This page needs JavaScript; the document itself is \
<a href=\"/openapi.json\">/openapi.json</a>.</noscript>\n\
<script id=\"api-reference\" type=\"application/json\" \
data-configuration='{{\"withDefaultFonts\":false}}'>\n{json}\n</script>\n\
<script src=\"{SCALAR_PATH}\"></script>\n</body>\n</html>\n"
    )
}

/// The page as an answer.
pub fn page(html: String) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CONTENT_SECURITY_POLICY, CSP),
        ],
        html,
    )
}

/// The page's script (not in the document: it is not API).
pub fn assets<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(
        SCALAR_PATH,
        axum::routing::get(|| async {
            (
                [
                    (CONTENT_TYPE, "text/javascript; charset=utf-8"),
                    (CACHE_CONTROL, "public, max-age=86400"),
                ],
                SCALAR_JS,
            )
        }),
    )
}
