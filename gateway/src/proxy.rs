//! The per-request path: route, request phase, upstream, response phase.
//!
//! ```text
//!  client ──► route ──► plugin 1 ─► plugin 2 ─► … ─► upstream
//!                          on-request (chain order)     │
//!  client ◄────────────── plugin 1 ◄─ plugin 2 ◄─ … ◄──┘
//!                          on-response (reverse order)
//! ```
//!
//! A plugin that answers in its request phase ends it there: later plugins and the upstream are
//! skipped, and the response phase runs for the plugins before it, which continued. A failing
//! plugin is handled the same way with a 500 in place of its answer; gateway errors (502, 504)
//! also pass through the response phase, so a logging plugin sees every outcome.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body::{ProxyBody, full, streamed};
use crate::router::RouteMatch;
use crate::runtime::{Decision, Exchange, PluginInstance};
use crate::snapshot::{Route, Snapshot};

/// Answers one client request with the given snapshot.
pub async fn handle(
    snapshot: Arc<Snapshot>,
    request: Request<Incoming>,
    client_addr: SocketAddr,
) -> Response<ProxyBody> {
    let host = request_host(&request);
    let route = match snapshot.route(host, request.uri().path(), request.method()) {
        Ok(route) => route,
        Err(RouteMatch::MethodNotAllowed) => {
            return gateway_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        Err(_) => return gateway_error(StatusCode::NOT_FOUND, "no route"),
    };

    let (mut parts, body) = request.into_parts();
    // Done before any plugin runs, so that `Connection` can only ever name the client's own
    // hop-by-hop headers, never one a plugin or the gateway adds later.
    strip_hop_by_hop(&mut parts.headers);

    if route.chain.is_empty() {
        let upstream_request = upstream_request(route, &parts, streamed(body));
        return forward(route, upstream_request).await;
    }
    run_chain(route, snapshot.max_body, parts, body, client_addr).await
}

async fn run_chain(
    route: &Route,
    max_body: u64,
    parts: http::request::Parts,
    body: Incoming,
    client_addr: SocketAddr,
) -> Response<ProxyBody> {
    let mut exchange = Box::new(Exchange::new(parts, client_addr, route.name.clone()));
    let mut body = Some(body);
    if route.buffer_body {
        match buffer_body(
            &exchange.request.headers,
            body.take().expect("body not taken yet"),
            max_body,
        )
        .await
        {
            Ok(bytes) => exchange.body = Some(bytes),
            Err(response) => return response,
        }
    }

    // Request phase. `ran` keeps the instances whose request phase continued: they, and only
    // they, get a response phase.
    let mut ran: Vec<PluginInstance> = Vec::with_capacity(route.chain.len());
    let mut answer = None;
    for link in &route.chain {
        let mut instance = match link.plugin.instantiate(&link.config) {
            Ok(instance) => instance,
            Err(err) => {
                answer = Some(plugin_failure(route, link.plugin.name(), &err));
                break;
            }
        };
        let (returned, decision) = instance.on_request(exchange);
        exchange = returned;
        match decision {
            Ok(Decision::Continue) => ran.push(instance),
            Ok(Decision::Respond(response)) => {
                answer = Some(response.map(full));
                break;
            }
            Err(err) => {
                answer = Some(plugin_failure(route, link.plugin.name(), &err));
                break;
            }
        }
    }

    let response = match answer {
        Some(response) => response,
        None => {
            let upstream_body = match exchange.body.clone() {
                Some(buffered) => full(buffered),
                None => streamed(body.take().expect("a streamed body is forwarded once")),
            };
            let mut upstream_request = upstream_request(route, &exchange.request, upstream_body);
            if exchange.body.is_some() {
                // A plugin may have replaced the body: let hyper frame the one we send.
                upstream_request.headers_mut().remove(CONTENT_LENGTH);
            }
            forward(route, upstream_request).await
        }
    };

    // Response phase, in reverse chain order.
    let (parts, response_body) = response.into_parts();
    exchange.response = Some(parts);
    for instance in ran.iter_mut().rev() {
        let (returned, outcome) = instance.on_response(exchange);
        exchange = returned;
        if let Err(err) = outcome {
            return plugin_failure(route, instance.plugin_name(), &err);
        }
    }
    let parts = exchange
        .response
        .take()
        .expect("the response stays in the exchange");
    Response::from_parts(parts, response_body)
}

/// Reads a whole request body for the plugins that asked for it, up to `max` bytes.
async fn buffer_body(
    headers: &HeaderMap,
    body: Incoming,
    max: u64,
) -> Result<Bytes, Response<ProxyBody>> {
    let too_large = || gateway_error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large());
    }
    match Limited::new(body, max as usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(err) => {
            tracing::debug!(error = %err, "client body read failed");
            Err(gateway_error(
                StatusCode::BAD_REQUEST,
                "request body could not be read",
            ))
        }
    }
}

/// The host the client addressed: the URI's authority (HTTP/2, absolute-form) or `Host`,
/// without a port.
fn request_host<B>(request: &Request<B>) -> Option<&str> {
    let raw = match request.uri().host() {
        Some(host) => host,
        None => request.headers().get(HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop `:port` after them.
        return host
            .split_once(']')
            .map_or(host, |(addr, _)| &host[..=addr.len()]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Builds the request sent upstream from the request as routed and as plugins left it.
fn upstream_request(
    route: &Route,
    parts: &http::request::Parts,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let target = route.upstream.pick();
    let path = forwarded_path(route.strip_prefix.as_deref(), parts.uri.path());
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    let uri = Uri::builder()
        .scheme("http")
        .authority(target.clone())
        .path_and_query(path_and_query)
        .build()
        .expect("scheme, checked authority and a path from a parsed URI form a valid URI");

    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    // Upstream connections are HTTP/1.1 whatever the client spoke.
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = parts.headers.clone();
    if !request.headers().contains_key(HOST) {
        // HTTP/2 clients send `:authority`, not `Host`: keep the name the client used.
        if let Some(value) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            request.headers_mut().insert(HOST, value);
        }
    }
    request
}

/// The path sent upstream: `strip_prefix` removed on a segment boundary, never empty.
fn forwarded_path<'a>(strip_prefix: Option<&str>, path: &'a str) -> std::borrow::Cow<'a, str> {
    let Some(prefix) = strip_prefix.map(|p| p.trim_end_matches('/')) else {
        return path.into();
    };
    match path.strip_prefix(prefix) {
        Some("") => "/".into(),
        Some(rest) if rest.starts_with('/') => rest.into(),
        _ => path.into(),
    }
}

/// Sends a request upstream and maps failures to 502 and 504.
async fn forward(route: &Route, request: Request<ProxyBody>) -> Response<ProxyBody> {
    let upstream = &route.upstream;
    let target = request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    match tokio::time::timeout(route.timeout, upstream.client().request(request)).await {
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, streamed(body))
        }
        Ok(Err(err)) => {
            tracing::warn!(route = &*route.name, upstream = %upstream.name, target, error = %error_chain(&err), "upstream request failed");
            gateway_error(StatusCode::BAD_GATEWAY, "upstream unavailable")
        }
        Err(_) => {
            tracing::warn!(route = &*route.name, upstream = %upstream.name, target, timeout = ?route.timeout, "upstream timed out");
            gateway_error(StatusCode::GATEWAY_TIMEOUT, "upstream timed out")
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Logs a plugin failure for the operator and gives the client a bare 500.
fn plugin_failure(
    route: &Route,
    plugin: &str,
    err: &crate::runtime::PluginError,
) -> Response<ProxyBody> {
    tracing::error!(route = &*route.name, plugin, error = %err, "plugin failed; request refused");
    gateway_error(StatusCode::INTERNAL_SERVER_ERROR, "plugin failure")
}

/// A short plain-text response produced by the gateway itself.
pub fn gateway_error(status: StatusCode, reason: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from_static(reason.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1): those named in `Connection`, and the fixed set.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Removes hop-by-hop headers. `Upgrade` goes too until upgrades are proxied.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(http::header::UPGRADE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("api.example.com:8080"), "api.example.com");
        assert_eq!(strip_port("api.example.com"), "api.example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn prefixes_are_stripped_on_segment_boundaries() {
        assert_eq!(forwarded_path(Some("/api"), "/api/users"), "/users");
        assert_eq!(forwarded_path(Some("/api/"), "/api/users"), "/users");
        assert_eq!(forwarded_path(Some("/api"), "/api"), "/");
        assert_eq!(forwarded_path(Some("/api"), "/apix"), "/apix");
        assert_eq!(forwarded_path(None, "/api/users"), "/api/users");
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_named_in_connection() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("close, x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }
}
