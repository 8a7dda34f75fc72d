//! The web dashboard (`GET /`, `/ui/...`; SPEC §5): three static files compiled into the
//! binary. They need no token; every data call the page makes does (it sends the API token it
//! keeps in session storage as a Bearer header). The page follows the event stream for live
//! changes and reads logs page by page.

use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::body::{full, Body};

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// Scripts and styles only from the daemon itself, no inline script or style element, data
/// only through `fetch` to the daemon, never framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// The dashboard file at `path` (the segments after `/ui`, or none for `/`): the script, the
/// style sheet, or the page itself for any other path (the page routes by its `#` part).
pub(super) fn serve(path: &[&str]) -> Response<Body> {
    let (body, content_type) = match path {
        ["app.js"] => (APP_JS, "text/javascript; charset=utf-8"),
        ["app.css"] => (APP_CSS, "text/css; charset=utf-8"),
        _ => (INDEX_HTML, "text/html; charset=utf-8"),
    };
    let mut response = Response::new(full(body.as_bytes().to_vec()));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files change with the daemon: revalidate instead of trusting a cached copy.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(response: &Response<Body>, name: &str) -> String {
        response.headers()[name].to_str().unwrap().to_owned()
    }

    #[test]
    fn each_file_has_its_type_and_every_one_the_security_headers() {
        for (path, content_type) in [
            (&[][..], "text/html"),
            (&["app.js"][..], "text/javascript"),
            (&["app.css"][..], "text/css"),
            (&["deployments", "dep-1"][..], "text/html"),
        ] {
            let response = serve(path);
            assert!(
                header(&response, "content-type").starts_with(content_type),
                "{path:?}"
            );
            assert_eq!(header(&response, "cache-control"), "no-cache");
            let policy = header(&response, "content-security-policy");
            assert!(policy.contains("script-src 'self';"), "{policy}");
            assert!(!policy.contains("unsafe-inline"), "{policy}");
        }
    }

    #[test]
    fn the_page_has_no_inline_script_and_loads_nothing_from_elsewhere() {
        assert!(!INDEX_HTML.contains("<script>"));
        assert!(!INDEX_HTML.contains(" style="));
        for file in [INDEX_HTML, APP_JS, APP_CSS] {
            assert!(!file.contains("http://") && !file.contains("https://"));
        }
        // The token only ever travels in a header.
        assert!(!APP_JS.contains("?token") && !APP_JS.contains("&token"));
    }
}
