//! The page at `/`: a small HTML, CSS and JavaScript client of the public API, embedded in the binary so it
//! works offline. `/` serves the HTML; its assets live under [`PREFIX`]. Both are public (the page asks for
//! the API key itself and sends it as a bearer header).

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::AppState;

/// Where the page's assets are served.
pub const PREFIX: &str = "/page/";

/// One embedded file: its name under [`PREFIX`], its content type and its bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every asset of the page, compiled in.
const ASSETS: &[Asset] = &[
    Asset { name: "style.css", content_type: "text/css; charset=utf-8", body: include_str!("../page/style.css") },
    Asset { name: "app.js", content_type: JS, body: include_str!("../page/app.js") },
    Asset { name: "api.js", content_type: JS, body: include_str!("../page/api.js") },
    Asset { name: "sse.js", content_type: JS, body: include_str!("../page/sse.js") },
    Asset { name: "generate.js", content_type: JS, body: include_str!("../page/generate.js") },
    Asset { name: "edit.js", content_type: JS, body: include_str!("../page/edit.js") },
    Asset { name: "mask.js", content_type: JS, body: include_str!("../page/mask.js") },
    Asset { name: "gallery.js", content_type: JS, body: include_str!("../page/gallery.js") },
    Asset { name: "fields.js", content_type: JS, body: include_str!("../page/fields.js") },
    Asset { name: "job.js", content_type: JS, body: include_str!("../page/job.js") },
];

const INDEX: &str = include_str!("../page/index.html");

/// The page's own content security policy: everything from this server, nothing from elsewhere.
const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// `/` and the assets under [`PREFIX`] (not part of the OpenAPI document: they are not API).
pub fn router() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/page/{name}", get(asset))
}

async fn index() -> Response {
    respond("text/html; charset=utf-8", INDEX)
}

async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|asset| asset.name == name)
        .map(|asset| respond(asset.content_type, asset.body))
        .ok_or_else(|| ApiError::NotFound("no such page asset".into()))
}

fn respond(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_the_html_and_modules_import_is_embedded() {
        let sources = std::iter::once(INDEX).chain(ASSETS.iter().map(|asset| asset.body));
        for source in sources {
            for piece in source.split(['"', '\'']).filter(|piece| piece.ends_with(".js") || piece.ends_with(".css")) {
                let name = piece.trim_start_matches("./").trim_start_matches(PREFIX);
                assert!(ASSETS.iter().any(|asset| asset.name == name), "{piece} is not embedded");
            }
        }
    }

    #[test]
    fn nothing_is_loaded_from_elsewhere() {
        for source in std::iter::once(INDEX).chain(ASSETS.iter().map(|asset| asset.body)) {
            assert!(!source.contains("http://") && !source.contains("https://"), "an external address");
        }
    }
}
