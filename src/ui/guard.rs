//! Who may talk to the UI: the token, the `Host` and the `Origin` of every request.
//!
//! The server binds 127.0.0.1 only, but any page the browser opens can send requests there,
//! and a DNS-rebinding page can even read the answers. So every request must:
//! - name this server in `Host` (`127.0.0.1:PORT` or `localhost:PORT`): a rebound name is refused;
//! - carry no `Origin` but this server's: another site's page is refused (CSRF);
//! - carry the token: in `?token=` (the URL printed at start; the answer sets a cookie and
//!   redirects to the same page without it), in that cookie, or in `X-Imba-Token`.
//!
//! An action (a `POST`) needs the token in `X-Imba-Token`, which only the app's own script
//! sends, and is refused with `--read-only`. Anything else gets 403.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use super::App;

/// A new random token: 24 bytes from the operating system, in hex.
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| format!("cannot draw a random token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The header the app's own script sends the token in.
const TOKEN_HEADER: header::HeaderName = header::HeaderName::from_static("x-imba-token");

/// The cookie's name: one per port, since cookies do not tell ports apart.
pub fn cookie_name(port: u16) -> String {
    format!("imba-ui-{port}")
}

/// Equal, in a time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn forbidden(why: &str) -> Response {
    (StatusCode::FORBIDDEN, format!("403 forbidden: {why}\n")).into_response()
}

/// The addresses this server answers as.
fn is_own_host(host: &str, port: u16) -> bool {
    host == format!("127.0.0.1:{port}") || host == format!("localhost:{port}")
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The token in the cookie of this port, if any.
fn cookie_token(headers: &HeaderMap, port: u16) -> Option<&str> {
    let name = cookie_name(port);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `token` query parameter, and the query without it.
fn query_token(query: &str) -> (Option<String>, String) {
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("token", value)) => token = Some(value.to_owned()),
            _ => rest.push(pair),
        }
    }
    (token, rest.join("&"))
}

/// The middleware: refuses what it must, lets the rest through.
pub async fn check(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = header_text(headers, header::HOST).unwrap_or_default();
    if !is_own_host(host, app.port) {
        return forbidden("the Host header does not name this server");
    }
    if let Some(origin) = header_text(headers, header::ORIGIN) {
        let own = origin
            .strip_prefix("http://")
            .is_some_and(|o| is_own_host(o, app.port));
        if !own {
            return forbidden("a request from another site");
        }
    }
    let token = app.token.as_bytes();
    let from_header = header_text(headers, TOKEN_HEADER);
    let action = request.method() != Method::GET && request.method() != Method::HEAD;
    if action {
        if app.read_only {
            return forbidden("this UI is read-only (--read-only)");
        }
        return match from_header {
            Some(given) if same(given.as_bytes(), token) => next.run(request).await,
            _ => forbidden("an action needs the token in X-Imba-Token"),
        };
    }
    let (in_query, rest) = query_token(request.uri().query().unwrap_or_default());
    if let Some(given) = in_query {
        if !same(given.as_bytes(), token) {
            return forbidden("a wrong token");
        }
        // The token goes into a cookie and out of the address bar (and the history).
        let path = request.uri().path();
        let target = if rest.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{rest}")
        };
        let mut response = Redirect::to(&target).into_response();
        let cookie = format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict",
            cookie_name(app.port),
            app.token
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return response;
    }
    let given = from_header.or_else(|| cookie_token(headers, app.port));
    match given {
        Some(given) if same(given.as_bytes(), token) => {
            let mut response = next.run(request).await;
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'self'",
                ),
            );
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            headers.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            response
        }
        _ => forbidden("no token (open the URL imba ui printed)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_leaves_the_query() {
        assert_eq!(
            query_token("a=1&token=xyz&b=2"),
            (Some("xyz".into()), "a=1&b=2".into())
        );
        assert_eq!(query_token(""), (None, String::new()));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
        let token = new_token().unwrap();
        assert_eq!(token.len(), 48);
        assert_ne!(token, new_token().unwrap());
    }

    #[test]
    fn hosts_are_this_servers_only() {
        assert!(is_own_host("127.0.0.1:8080", 8080));
        assert!(is_own_host("localhost:8080", 8080));
        assert!(!is_own_host("evil.example:8080", 8080));
        assert!(!is_own_host("127.0.0.1:8081", 8080));
        assert!(!is_own_host("127.0.0.1", 8080));
    }
}
