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
//! plugin set to fail closed is handled the same way with a 500 in place of its answer (503 when
//! its instance cap is reached); one set to fail open is skipped, its edits undone. Gateway
//! errors (502, 504) also pass through the response phase, so a logging plugin sees every
//! outcome.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body::{
    AfterBody, BodyError, BoxError, OnEnd, ProxyBody, RequestBody, ResponseBody, UpstreamBody,
    full, pinned, streamed, streamed_until,
};
use crate::forwarded::ClientAddr;
use crate::h1::RawFields;
use crate::manifest::FailurePolicy;
use crate::request_id::{self, X_REQUEST_ID};
use crate::router::RouteMatch;
use crate::runtime::exchange::Properties;
use crate::runtime::fixed;
use crate::runtime::{Decision, Exchange, FailureKind, Lease, Phase, PluginError};
use crate::snapshot::{ChainLink, Route, Snapshot};
use crate::trace::{ChildSpan, RequestTrace};
use crate::upstream::{Target, Tried};

/// The client end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address, with its forwarding texts.
    pub client: Arc<ClientAddr>,
    /// Whether the connection is TLS: `X-Forwarded-Proto` and `Forwarded` say `https`.
    pub secure: bool,
    /// Whether the response is written by wasmgate's own server side, which takes an upstream
    /// head's fields as bytes ([`crate::h1::RawFields`]); hyper's takes a map only.
    pub raw_heads: bool,
}

/// Answers one client request with the given snapshot.
///
/// Routing, the request's preparation and the response's accounting are written out here
/// rather than in `async fn`s of their own: each level of `async fn` is a future that is built
/// and then moved whole into its caller's, once per request, and a bare request's future is a
/// few kilobytes (the upstream call's, mostly). What does not wait is in plain functions
/// ([`route_request`], [`prepare_upstream`]); the chain, larger still, is boxed. The request
/// comes boxed too: unboxed, its few hundred bytes were copied at each move from the parser
/// into this future.
pub async fn handle(
    snapshot: Arc<Snapshot>,
    mut request: Box<Request<RequestBody>>,
    peer: Peer,
) -> Response<ResponseBody> {
    let _in_progress = crate::h1::InProgress::enter();
    let received = Instant::now();
    let ids = RequestIds {
        request_id: request_id::for_request(request.headers()),
        trace: RequestTrace::begin(
            snapshot.services.telemetry.as_deref(),
            request.headers(),
            request.method(),
        ),
    };
    let route = match route_request(&snapshot, &mut request, &ids) {
        Ok(route) => route,
        Err((status, reason)) => {
            let mut response = gateway_error(status, reason).map(Into::into);
            ids.finish(&mut response);
            return response;
        }
    };
    let method = request.method().clone();
    ids.trace.routed(&method, &route.name, ids.request_id());
    let (mut parts, body) = (*request).into_parts();
    let (upgrade, mut forwarding) = prepare_upstream(&mut parts, &snapshot, &peer, &ids);
    // A chain of fixed edits only is made on the way, without the chain's bookkeeping, when
    // no edit can meet a plugin's header cap.
    let bare = route.chain.is_empty()
        || route.fixed_only
            && fixed_request(route, &mut parts.headers, &mut forwarding, &peer.client);
    let mut response = if bare {
        let limit = snapshot.http.max_request_body.0;
        let response = match OutgoingBody::read_client(body, &parts.headers, None, limit).await {
            Ok(body) => {
                let mut outgoing = Outgoing::new(
                    route,
                    &parts.method,
                    &parts.uri,
                    Cow::Owned(parts.headers),
                    body,
                );
                // No plugin reads the request: its forwarding headers are written as it is sent.
                outgoing.forwarding = forwarding.as_ref().map(|f| f.fields(&peer.client));
                // No plugin reads the response: its head may pass through as it came.
                forward(route, &mut outgoing, upgrade, &ids, peer.raw_heads).await
            }
            Err(refusal) => *refusal,
        };
        match route.fixed_only {
            true => fixed_response(route, response.map(Into::into), &ids),
            false => response.map(Into::into),
        }
    } else {
        // Made in its box (the box first, as `body::pinned` does): it is half a kilobyte.
        let mut exchange = Box::write(
            Box::new_uninit(),
            Exchange::new(
                parts,
                peer.client.clone(),
                route.name.clone(),
                ids.request_id.clone(),
            ),
        );
        // Plugins see the forwarding headers the upstream will, inserted into the request's
        // map only if one of them reads or edits one.
        exchange.forwarding = forwarding;
        if !ids.trace.trace_id.is_empty() {
            exchange.trace_id = ids.trace.trace_id.clone();
        }
        let request = ClientRequest {
            exchange,
            body,
            upgrade,
            received,
            raw_heads: peer.raw_heads,
        };
        // Boxed: a chain's future holds the plugin calls' futures and is several kilobytes
        // more; inline, it would make every request's future that big.
        pinned(|| run_chain(&snapshot, route, request, &ids)).await
    };
    route
        .metrics
        .answered(&method, response.status(), received.elapsed());
    ChainLink::make_ahead(&route.chain);
    ids.finish(&mut response);
    response
}

/// What names a request in logs and traces.
struct RequestIds {
    request_id: HeaderValue,
    trace: RequestTrace,
}

impl RequestIds {
    fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }

    /// Ends the request's trace and names the request in its response (`X-Request-Id`).
    fn finish(self, response: &mut Response<ResponseBody>) {
        self.trace.finish(response.status());
        match response.body_mut().raw_fields_mut() {
            // A head passed through as bytes: the line goes with them, and the map, empty, is
            // never allocated.
            Some(raw) => raw.push(&X_REQUEST_ID, &self.request_id),
            None => {
                response
                    .headers_mut()
                    .insert(X_REQUEST_ID.clone(), self.request_id);
            }
        }
    }
}

/// Admits and routes a request: its route, or the status and reason to answer a request with
/// that is refused before routing (400, 414, 431 ...) or that no route takes (404, 405).
fn route_request<'s>(
    snapshot: &'s Snapshot,
    request: &mut Request<RequestBody>,
    ids: &RequestIds,
) -> Result<&'s Route, (StatusCode, &'static str)> {
    if let Err(refusal) = crate::admission::admit(request, &snapshot.http) {
        tracing::debug!(
            status = refusal.status.as_u16(),
            reason = refusal.reason,
            request_id = ids.request_id(),
            "request refused before routing"
        );
        snapshot
            .services
            .metrics
            .unrouted(request.method(), refusal.status);
        return Err((refusal.status, refusal.reason));
    }
    let host = request_host(request);
    match snapshot.route(host, request.uri().path(), request.method()) {
        Ok(route) => Ok(route),
        Err(unrouted) => {
            let (status, reason) = match unrouted {
                RouteMatch::MethodNotAllowed => {
                    (StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
                }
                _ => (StatusCode::NOT_FOUND, "no route"),
            };
            snapshot.services.metrics.unrouted(request.method(), status);
            Err((status, reason))
        }
    }
}

/// Prepares a routed request's head for the upstream: takes out an upgrade it asks for, strips
/// its hop-by-hop fields, adds `X-Request-Id`, and returns the forwarding fields to add (those
/// the client sent are kept only from a trusted proxy).
fn prepare_upstream(
    parts: &mut http::request::Parts,
    snapshot: &Snapshot,
    peer: &Peer,
    ids: &RequestIds,
) -> (Option<Upgrade>, Option<crate::forwarded::Pending>) {
    let upgrade = Upgrade::take(parts);
    // Done before any plugin runs, so that `Connection` can only ever name the client's own
    // hop-by-hop headers, never one a plugin or the gateway adds later.
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(X_REQUEST_ID.clone(), ids.request_id.clone());
    let forwarding = crate::forwarded::prepare(
        &mut parts.headers,
        &parts.uri,
        &peer.client,
        if peer.secure { "https" } else { "http" },
        &snapshot.trusted_proxies,
    );
    (upgrade, forwarding)
}

/// A routed request on its way into the chain.
struct ClientRequest {
    exchange: Box<Exchange>,
    body: RequestBody,
    upgrade: Option<Upgrade>,
    received: Instant,
    /// [`Peer::raw_heads`].
    raw_heads: bool,
}

async fn run_chain(
    snapshot: &Snapshot,
    route: &Route,
    request: ClientRequest,
    ids: &RequestIds,
) -> Response<ResponseBody> {
    let ClientRequest {
        mut exchange,
        body,
        upgrade,
        received,
        raw_heads,
    } = request;
    let mut body = Some(body);
    if route.buffer_body {
        let incoming = body.take().expect("body not taken yet");
        let max = snapshot.max_body.min(snapshot.http.max_request_body.0);
        match buffer_body(&exchange.request.headers, incoming, max).await {
            Ok(bytes) => exchange.body = Some(bytes),
            Err(response) => return (*response).map(Into::into),
        }
    }

    // Request phase. `ran` keeps the links whose request phase continued (or that asked for
    // none): they, and only they, get their later phases. An instance is held only from the
    // first phase its plugin asked for to the last: a plugin with nothing after the request
    // phase gives its instance back at once, and one with nothing before the response or the
    // completion takes it only then. Under load that keeps far fewer instances in use, and
    // their memory hot in the caches; an instance cap counts requests in the plugin's phases,
    // not requests waiting on the upstream.
    // Counts the request body bytes forwarded upstream, only for a completion phase to report.
    let mut bytes_in: Option<Arc<AtomicU64>> = None;
    let mut ran: Vec<(&Arc<ChainLink>, Option<Lease>)> = Vec::with_capacity(route.chain.len());
    let mut answer = None;
    for link in &route.chain {
        if !link.phases.request {
            // Nothing to call now; the plugin's later phases still run.
            if link.phases.after_request() {
                ran.push((link, None));
            }
            continue;
        }
        let mut span = ids.trace.child(|| plugin_span(link, "request"));
        let (lease, saved, decision) = match &link.fixed.request {
            // Made here, in the plugin's place, instead of calling it (contract 0.2.4).
            Some(edits) => {
                let saved = (link.on_failure == FailurePolicy::FailOpen)
                    .then(|| RequestEdits::save(&exchange));
                if fixed::names_any(edits, crate::forwarded::is_forwarding) {
                    exchange.forwarding_into_map();
                }
                // The forwarding headers held aside count, as they would in the map.
                let held_aside = exchange.forwarding_held_aside();
                let cap = link.plugin.budget().headers;
                let applied = fixed::apply(edits, &mut exchange.request.headers, held_aside, cap)
                    .map(|()| Decision::Continue)
                    .map_err(fixed_failure(Phase::Request));
                (None, saved, applied)
            }
            None => {
                // Timed only here: fixed edits are not a call (and their clock reads would be
                // most of what they cost).
                let started = Instant::now();
                let mut instance = match link.acquire().await {
                    Ok(instance) => instance,
                    Err(err) => match on_failure(route, link, names(&exchange), &err, &mut span) {
                        Some(response) => {
                            answer = Some(response);
                            break;
                        }
                        None => continue,
                    },
                };
                let saved = (link.on_failure == FailurePolicy::FailOpen)
                    .then(|| RequestEdits::save(&exchange));
                let (returned, decision) = instance.on_request(exchange).await;
                exchange = returned;
                let metrics = link.plugin.metrics();
                metrics.invoked(Phase::Request, started.elapsed());
                (Some(instance), saved, decision)
            }
        };
        match decision {
            Ok(Decision::Continue) if link.phases.after_request() => {
                ran.push((link, lease));
            }
            // Dropping the lease gives a pooled instance back for the next request.
            Ok(Decision::Continue) => {}
            Ok(Decision::Respond(response)) => {
                answer = Some((*response).map(full));
                break;
            }
            Err(err) => match on_failure(route, link, names(&exchange), &err, &mut span) {
                Some(response) => {
                    answer = Some(response);
                    break;
                }
                None => {
                    if let Some(saved) = saved {
                        saved.restore(&mut exchange);
                    }
                }
            },
        }
    }

    let response = match answer {
        Some(response) => response,
        None => {
            let counter = ran
                .iter()
                .any(|(link, _)| link.phases.complete)
                .then(|| Arc::new(AtomicU64::new(0)));
            bytes_in = counter.clone();
            let upstream_body = match exchange.body.clone() {
                Some(buffered) => Ok(OutgoingBody::Replayable(buffered, counter)),
                None => {
                    OutgoingBody::read_client(
                        body.take().expect("a streamed body is forwarded once"),
                        &exchange.request.headers,
                        counter,
                        snapshot.http.max_request_body.0,
                    )
                    .await
                }
            };
            match upstream_body {
                Ok(upstream_body) => {
                    let head = &exchange.request;
                    // Borrowed: the response phase reads the request as the plugins left it,
                    // and wasmgate's own client only writes the headers out.
                    let mut headers = Cow::Borrowed(&head.headers);
                    if exchange.body.is_some() {
                        // A plugin may have replaced the body: the client frames the one sent.
                        headers.to_mut().remove(CONTENT_LENGTH);
                    }
                    let mut outgoing =
                        Outgoing::new(route, &head.method, &head.uri, headers, upstream_body);
                    // Those no plugin read or edited are written as the request is sent.
                    outgoing.forwarding = (exchange.forwarding.as_ref())
                        .map(|pending| pending.fields(&exchange.client));
                    let sent = Instant::now();
                    // The upstream's fields may come as bytes: the response phase reads and edits
                    // them through `Exchange::response_mut`, which maps them only then.
                    let response = forward(route, &mut outgoing, upgrade, ids, raw_heads).await;
                    exchange
                        .properties
                        .insert(UPSTREAM_MS, millis(sent.elapsed()));
                    response
                }
                // The client's body could not be read: answered like any gateway error, the
                // response phase included.
                Err(refusal) => *refusal,
            }
        }
    };
    exchange
        .properties
        .insert(DURATION_MS, millis(received.elapsed()));

    // Response phase, in reverse chain order. The plugins that ran it and asked for the
    // completion phase are kept, in that order, for when the body has been sent.
    let (parts, mut response_body) = response.into_parts();
    exchange.response = Some(parts);
    exchange.response_raw = response_body.raw_fields().and_then(Option::take);
    let mut completing: Vec<(Arc<ChainLink>, Option<Lease>)> = Vec::new();
    for (link, lease) in ran.into_iter().rev() {
        if !link.phases.response {
            // In `ran` without a response phase: it asked for the completion phase.
            completing.push((link.clone(), lease));
            continue;
        }
        let saved =
            (link.on_failure == FailurePolicy::FailOpen).then(|| ResponseEdits::save(&exchange));
        let mut span = ids.trace.child(|| plugin_span(link, "response"));
        let outcome = match (&link.fixed.response, lease) {
            // Made here, in the plugin's place, instead of calling it (contract 0.2.4).
            (Some(edits), lease) => {
                let cap = link.plugin.budget().headers;
                let count = exchange.response_header_count() + fixed::most_added(edits);
                let made = match exchange.response_raw.as_deref_mut() {
                    // Made on the bytes when no count can pass the cap.
                    Some(raw) if count <= cap as usize => {
                        fixed::make_raw(edits, raw);
                        Ok(())
                    }
                    _ => {
                        let response = exchange
                            .response_mut()
                            .expect("the response is in the exchange");
                        fixed::apply(edits, &mut response.headers, 0, cap)
                    }
                };
                made.map(|()| lease).map_err(fixed_failure(Phase::Response))
            }
            (None, lease) => {
                let started = Instant::now();
                match link.keep_or_acquire(lease).await {
                    Ok(mut instance) => {
                        let (returned, outcome) = instance.on_response(exchange).await;
                        exchange = returned;
                        let metrics = link.plugin.metrics();
                        metrics.invoked(Phase::Response, started.elapsed());
                        outcome.map(|()| Some(instance))
                    }
                    Err(err) => Err(err),
                }
            }
        };
        match outcome {
            Ok(lease) if link.phases.complete => {
                completing.push((link.clone(), lease));
            }
            Ok(_) => {}
            Err(err) => match on_failure(route, link, names(&exchange), &err, &mut span) {
                Some(replacement) => {
                    // The upstream's body is dropped with its response head.
                    let (parts, body) = replacement.into_parts();
                    exchange.response = Some(parts);
                    exchange.response_raw = None;
                    response_body = body;
                    break;
                }
                None => {
                    if let Some(saved) = saved {
                        saved.restore(&mut exchange);
                    }
                }
            },
        }
    }
    let parts = exchange
        .response
        .take()
        .expect("the response stays in the exchange");
    // Fields no plugin mapped go back to the body, for the server side to write as they are.
    let raw = exchange.response_raw.take();
    let give_back = |body: &mut ProxyBody, raw: Option<Box<RawFields>>| {
        if let (Some(slot), Some(raw)) = (body.raw_fields(), raw) {
            *slot = Some(raw);
        }
    };
    if completing.is_empty() {
        give_back(&mut response_body, raw);
        return Response::from_parts(parts, response_body.into());
    }
    // The head goes to the client; the completion phase reads a copy.
    let mut copy = Response::new(()).into_parts().0;
    copy.status = parts.status;
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    exchange.response = Some(copy);
    exchange.response_raw = raw.clone();
    give_back(&mut response_body, raw);
    let route_name = route.name.clone();
    let runtime = tokio::runtime::Handle::current();
    // Tracked, so that a graceful shutdown waits for the completion phase (an access log line).
    let background = snapshot.services.background.clone();
    let on_end: OnEnd = Box::new(move |sent, completed| {
        let bytes = BodyBytes {
            // Only what reached the upstream was read from the client.
            received: bytes_in.map(|counter| counter.load(Ordering::Relaxed)),
            sent,
        };
        let completion = || {
            let completion = complete(route_name, exchange, completing, bytes, completed);
            background.track_future(completion)
        };
        AfterBody::new(completion, runtime)
    });
    Response::from_parts(parts, ResponseBody::with_on_end(response_body, on_end))
}

/// Makes the request edits of a chain that is only fixed edits ([`Route::fixed_only`]), in
/// chain order, when none can take the headers past its plugin's cap (bounded before any is
/// made: every set or add counted as a new header). Otherwise changes nothing and returns
/// `false`: [`run_chain`] then makes them, with the plugins' failure policies.
fn fixed_request(
    route: &Route,
    headers: &mut HeaderMap,
    forwarding: &mut Option<crate::forwarded::Pending>,
    client: &ClientAddr,
) -> bool {
    // The chain would see the forwarding headers in the map: they count.
    let mut count = headers.len()
        + forwarding
            .as_ref()
            .map_or(0, crate::forwarded::Pending::count);
    let mut names_forwarding = false;
    for link in &route.chain {
        if let Some(edits) = &link.fixed.request {
            count += fixed::most_added(edits);
            if count > link.plugin.budget().headers as usize {
                return false;
            }
            names_forwarding |= fixed::names_any(edits, crate::forwarded::is_forwarding);
        }
    }
    // An edit of a forwarding header is made on it, as in the chain; otherwise they are
    // written as the request is sent, as on a route without plugins.
    if names_forwarding && let Some(pending) = forwarding.take() {
        pending.fields(client).insert_into(headers);
    }
    for link in &route.chain {
        if let Some(edits) = &link.fixed.request {
            fixed::make(edits, headers);
        }
    }
    true
}

/// Makes the response edits of a chain that is only fixed edits, in reverse chain order, as
/// [`run_chain`] would: on the upstream's head as it came when no edit can take it past its
/// plugin's cap, on a map otherwise, with the plugins' failure policies.
fn fixed_response(
    route: &Route,
    mut response: Response<ResponseBody>,
    ids: &RequestIds,
) -> Response<ResponseBody> {
    let fits = |mut count: usize| {
        route
            .chain
            .iter()
            .rev()
            .all(|link| match &link.fixed.response {
                Some(edits) => {
                    count += fixed::most_added(edits);
                    count <= link.plugin.budget().headers as usize
                }
                None => true,
            })
    };
    let edits = || {
        route
            .chain
            .iter()
            .rev()
            .filter_map(|link| link.fixed.response.as_deref())
    };
    if let Some(raw) = response.body_mut().raw_fields_mut() {
        if fits(raw.count()) {
            edits().for_each(|edits| fixed::make_raw(edits, raw));
            return response;
        }
        // One edit might pass a cap: made on a map, as the chain makes them.
        if let Some(raw) = response.body_mut().take_raw_fields() {
            raw.into_map(response.headers_mut());
        }
    }
    if fits(response.headers().len()) {
        edits().for_each(|edits| fixed::make(edits, response.headers_mut()));
        return response;
    }
    for link in route.chain.iter().rev() {
        let Some(edits) = &link.fixed.response else {
            continue;
        };
        let saved =
            (link.on_failure == FailurePolicy::FailOpen).then(|| response.headers().clone());
        let cap = link.plugin.budget().headers;
        if let Err(detail) = fixed::apply(edits, response.headers_mut(), 0, cap) {
            let err = fixed_failure(Phase::Response)(detail);
            let names = (ids.request_id(), &*ids.trace.trace_id);
            match on_failure(route, link, names, &err, &mut None) {
                // The upstream's body is dropped with its response head.
                Some(replacement) => return replacement.map(Into::into),
                None => {
                    if let Some(saved) = saved {
                        *response.headers_mut() = saved;
                    }
                }
            }
        }
    }
    response
}

/// What names a request in a plugin failure's log line: its request id and trace id.
fn names(exchange: &Exchange) -> (&str, &str) {
    (exchange.request_id(), &exchange.trace_id)
}

/// The failure of a plugin's fixed edits in `phase`: only the header cap can refuse them (the
/// rest was checked when the manifest loaded).
fn fixed_failure(phase: Phase) -> impl FnOnce(String) -> PluginError {
    move |detail| PluginError {
        kind: FailureKind::Cap,
        phase,
        detail,
    }
}

/// Body bytes of one exchange.
struct BodyBytes {
    /// Read from the client and sent upstream, when the upstream was called.
    received: Option<u64>,
    /// Sent to the client.
    sent: u64,
}

/// The completion phase, run once the response body has ended.
async fn complete(
    route: Arc<str>,
    mut exchange: Box<Exchange>,
    links: Vec<(Arc<ChainLink>, Option<Lease>)>,
    bytes: BodyBytes,
    completed: bool,
) {
    if let Some(received) = bytes.received {
        exchange
            .properties
            .insert(BYTES_IN, itoa::Buffer::new().format(received).to_owned());
    }
    exchange
        .properties
        .insert(BYTES_OUT, itoa::Buffer::new().format(bytes.sent).to_owned());
    let completed = if completed { "true" } else { "false" };
    exchange.properties.insert(COMPLETED, completed.to_owned());
    for (link, lease) in links {
        let plugin = &link.plugin;
        let started = Instant::now();
        // A plugin that asked only for this phase takes its instance now. The response has
        // been sent: a plugin at its instance cap is reported, like any failure here, and
        // cannot refuse the request any more.
        let outcome = match link.keep_or_acquire(lease).await {
            Ok(mut instance) => {
                let (returned, outcome) = instance.on_complete(exchange).await;
                exchange = returned;
                let metrics = plugin.metrics();
                metrics.invoked(Phase::Complete, started.elapsed());
                outcome
            }
            Err(err) => Err(err),
        };
        if let Err(err) = outcome {
            plugin.record_failure(err.kind);
            let (phase, kind, detail) =
                (err.phase.as_str(), err.kind.as_str(), err.detail.as_str());
            tracing::warn!(
                route = &*route,
                plugin = plugin.name(),
                phase,
                kind,
                request_id = exchange.request_id(),
                trace_id = &*exchange.trace_id,
                detail,
                "plugin failed after the response was sent"
            );
        }
    }
}

/// Property set by the gateway for the completion phase, when the upstream was called: request
/// body bytes read from the client and sent upstream.
pub const BYTES_IN: &str = "wasmgate.bytes_in";

/// Property set by the gateway for the completion phase: body bytes sent to the client.
pub const BYTES_OUT: &str = "wasmgate.bytes_out";

/// Property set by the gateway for the completion phase: `true` when the body ended normally.
pub const COMPLETED: &str = "wasmgate.completed";

/// Property set by the gateway for the response phase: milliseconds from the request's arrival to
/// its response head.
pub const DURATION_MS: &str = "wasmgate.duration_ms";

/// Property set by the gateway for the response phase, when the upstream was called: milliseconds
/// from sending the request upstream to its response head.
pub const UPSTREAM_MS: &str = "wasmgate.upstream_ms";

/// Milliseconds with three decimals (`12.345`), from whole microseconds: integer formatting,
/// as a float's `{:.3}` costs a float-to-decimal conversion on every request with a chain.
fn millis(elapsed: std::time::Duration) -> String {
    // Twice per request on a route with plugins: written without `format!`'s machinery.
    let micros = elapsed.as_secs() * 1_000_000 + u64::from(elapsed.subsec_nanos() + 500) / 1000;
    let mut text = String::with_capacity(16);
    text.push_str(itoa::Buffer::new().format(micros / 1000));
    let fraction = (micros % 1000) as u16;
    text.push('.');
    for digit in [fraction / 100, fraction / 10 % 10, fraction % 10] {
        text.push(char::from(b'0' + digit as u8));
    }
    text
}

/// What a plugin's request phase may change, kept before a fail-open plugin runs so that a
/// failure leaves no half-made edit behind.
struct RequestEdits {
    headers: HeaderMap,
    /// The forwarding headers held aside: a plugin that read or edited one put them in the map.
    forwarding: Option<crate::forwarded::Pending>,
    body: Option<Bytes>,
    properties: Properties,
}

impl RequestEdits {
    fn save(exchange: &Exchange) -> Self {
        RequestEdits {
            headers: exchange.request.headers.clone(),
            forwarding: exchange.forwarding.clone(),
            body: exchange.body.clone(),
            properties: exchange.properties.clone(),
        }
    }

    fn restore(self, exchange: &mut Exchange) {
        exchange.request.headers = self.headers;
        exchange.forwarding = self.forwarding;
        exchange.body = self.body;
        exchange.properties = self.properties;
    }
}

/// What a plugin's response phase may change, kept before a fail-open plugin runs.
struct ResponseEdits {
    status: StatusCode,
    headers: HeaderMap,
    raw: Option<Box<RawFields>>,
    properties: Properties,
}

impl ResponseEdits {
    fn save(exchange: &Exchange) -> Self {
        let response = exchange
            .response
            .as_ref()
            .expect("the response phase has a response");
        ResponseEdits {
            status: response.status,
            headers: response.headers.clone(),
            raw: exchange.response_raw.clone(),
            properties: exchange.properties.clone(),
        }
    }

    fn restore(self, exchange: &mut Exchange) {
        let response = exchange
            .response
            .as_mut()
            .expect("the response phase has a response");
        response.status = self.status;
        response.headers = self.headers;
        exchange.response_raw = self.raw;
        exchange.properties = self.properties;
    }
}

/// Reports a plugin failure to the operator and counts it, then applies the plugin's policy:
/// the response that ends the request (fail-closed, or an instance cap reached), or `None` to go
/// on without the plugin (fail-open).
fn on_failure(
    route: &Route,
    link: &ChainLink,
    (request_id, trace_id): (&str, &str),
    err: &PluginError,
    span: &mut Option<ChildSpan>,
) -> Option<Response<ProxyBody>> {
    let plugin = link.plugin.name();
    link.plugin.record_failure(err.kind);
    if let Some(span) = span {
        span.fail(err.kind.as_str());
    }
    let (phase, kind, detail) = (err.phase.as_str(), err.kind.as_str(), err.detail.as_str());
    let status = match (err.kind, link.on_failure) {
        // Shedding load is not the plugin failing: whatever its policy, it is not skipped.
        (FailureKind::Overloaded, _) => StatusCode::SERVICE_UNAVAILABLE,
        (_, FailurePolicy::FailClosed) => StatusCode::INTERNAL_SERVER_ERROR,
        (_, FailurePolicy::FailOpen) => {
            tracing::warn!(
                route = &*route.name,
                plugin,
                phase,
                kind,
                request_id,
                trace_id,
                detail,
                "plugin failed; skipped (fail-open)"
            );
            return None;
        }
    };
    tracing::error!(
        route = &*route.name,
        plugin,
        phase,
        kind,
        request_id,
        trace_id,
        detail,
        "plugin failed; request refused"
    );
    let reason = if status == StatusCode::SERVICE_UNAVAILABLE {
        "overloaded"
    } else {
        "internal error"
    };
    let body = format!("{reason}; request id {request_id}\n");
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Some(response)
}

/// The refusal of a request body over its limit.
fn too_large() -> Refusal {
    Box::new(gateway_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body too large",
    ))
}

/// A client's request answered before it goes upstream (a body too large or unreadable).
/// Boxed: it is the rare outcome, and inline it made every `Result` that carries it a response's
/// size, copied whole at each step of the common path's return.
type Refusal = Box<Response<ProxyBody>>;

/// Reads a whole request body for the plugins that asked for it, up to `max` bytes.
async fn buffer_body(headers: &HeaderMap, body: RequestBody, max: u64) -> Result<Bytes, Refusal> {
    let body = match body {
        RequestBody::Whole(bytes) if bytes.len() as u64 > max => return Err(too_large()),
        RequestBody::Whole(bytes) => return Ok(bytes),
        RequestBody::Hyper(incoming) => incoming,
    };
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
            Err(Box::new(gateway_error(
                StatusCode::BAD_REQUEST,
                "request body could not be read",
            )))
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

/// A request as it will be sent upstream, kept so that a failed attempt can be made again on
/// another target.
struct Outgoing<'h> {
    method: http::Method,
    path_and_query: http::uri::PathAndQuery,
    headers: Cow<'h, HeaderMap>,
    body: OutgoingBody,
    /// Forwarding headers not in `headers` yet, added to each attempt as it is sent.
    forwarding: Option<crate::forwarded::Fields<'h>>,
}

/// A request body on its way upstream.
enum OutgoingBody {
    /// Streamed from the client as it arrives: it can be sent once. Boxed: the body is ~190
    /// bytes and rare (a large or chunked upload), and this enum is held in every request's
    /// future, which is moved whole as it is built.
    Streamed(Option<Box<UpstreamBody>>),
    /// Known whole (empty, or buffered for plugins): it can be sent again. The counter, when
    /// the completion phase wants it, gets the bytes sent.
    Replayable(Bytes, Option<Arc<AtomicU64>>),
}

impl OutgoingBody {
    /// The client's body, within `limit` bytes: known empty, or declared no larger than
    /// [`crate::h1::MAX_BODY`] and then read whole first (as nginx buffers request bodies by
    /// default), so that wasmgate's own client can send it and a failed attempt can be made
    /// again; streamed otherwise. A body that cannot be read whole is answered here (400, 413).
    async fn read_client(
        body: RequestBody,
        headers: &HeaderMap,
        counter: Option<Arc<AtomicU64>>,
        limit: u64,
    ) -> Result<OutgoingBody, Refusal> {
        let incoming = match body {
            RequestBody::Hyper(incoming) => incoming,
            // Read whole already (at most `h1::MAX_BODY`); only the limit is left to check,
            // here rather than in `buffer_body`, whose future would be built and polled for it.
            RequestBody::Whole(bytes) if bytes.len() as u64 > limit => return Err(too_large()),
            RequestBody::Whole(bytes) => return Ok(OutgoingBody::Replayable(bytes, counter)),
        };
        let small = http_body::Body::size_hint(&incoming)
            .exact()
            .is_some_and(|len| len <= crate::h1::MAX_BODY as u64);
        if small && !http_body::Body::is_end_stream(&incoming) {
            let bytes = buffer_body(headers, RequestBody::Hyper(incoming), limit).await?;
            return Ok(OutgoingBody::Replayable(bytes, counter));
        }
        Ok(OutgoingBody::from_client(incoming, counter, limit))
    }

    /// The client's body: replayable when it is known to be empty, streamed otherwise, within
    /// `limit` bytes.
    fn from_client(body: Incoming, counter: Option<Arc<AtomicU64>>, limit: u64) -> OutgoingBody {
        if http_body::Body::is_end_stream(&body) {
            return OutgoingBody::Replayable(Bytes::new(), counter);
        }
        let body = match counter {
            Some(counter) => UpstreamBody::counted(streamed(body), counter),
            None => UpstreamBody::from(streamed(body)),
        };
        OutgoingBody::Streamed(Some(Box::new(body.limited(limit))))
    }

    /// The body for one attempt; `None` once a streamed body has been sent.
    fn for_attempt(&mut self) -> Option<UpstreamBody> {
        match self {
            OutgoingBody::Streamed(body) => body.take().map(|body| *body),
            OutgoingBody::Replayable(bytes, counter) => Some(match counter {
                Some(counter) => {
                    counter.store(0, Ordering::Relaxed);
                    UpstreamBody::counted(full(bytes.clone()), counter.clone())
                }
                None => UpstreamBody::from(full(bytes.clone())),
            }),
        }
    }
}

impl<'h> Outgoing<'h> {
    /// The request as routed and as plugins left it. The fast path (no plugins) moves the
    /// client's headers in; a chain keeps its request for the response phase and lends them,
    /// copied only for an attempt through hyper's client, which takes them by value.
    fn new(
        route: &Route,
        method: &http::Method,
        client_uri: &Uri,
        headers: Cow<'h, HeaderMap>,
        body: OutgoingBody,
    ) -> Outgoing<'h> {
        let path = forwarded_path(route.strip_prefix.as_deref(), client_uri.path());
        let path_and_query = match client_uri.path_and_query() {
            // Nothing stripped: the client's path and query (normalised already), shared rather
            // than copied and parsed again.
            Some(unchanged) if path.len() == client_uri.path().len() => unchanged.clone(),
            _ => match client_uri.query() {
                Some(query) => http::uri::PathAndQuery::try_from(format!("{path}?{query}")),
                None => http::uri::PathAndQuery::try_from(path.as_ref()),
            }
            .expect("a path and query taken from a parsed URI stay valid"),
        };
        Outgoing {
            method: method.clone(),
            path_and_query,
            headers,
            body,
            forwarding: None,
        }
    }

    /// Whether a failed attempt may be made again: an idempotent method whose body can be sent
    /// again.
    fn repeatable(&self) -> bool {
        self.method.is_idempotent() && matches!(self.body, OutgoingBody::Replayable(..))
    }

    /// Whether wasmgate's own client takes the body: known whole and at most
    /// [`crate::h1::MAX_BODY`] bytes.
    fn native_body(&self) -> bool {
        matches!(&self.body, OutgoingBody::Replayable(body, _) if body.len() <= crate::h1::MAX_BODY)
    }

    /// The request for one attempt through wasmgate's own client, for a body it takes
    /// ([`Outgoing::native_body`]). The headers are borrowed: the client only writes them out,
    /// so an attempt that may be followed by another costs no copy.
    /// `raw_fields`: the response's fields may come back as bytes ([`crate::h1::RawFields`]).
    fn native_attempt(&self, raw_fields: bool) -> crate::h1::Request<'_> {
        let body = match &self.body {
            OutgoingBody::Replayable(body, counter) => {
                // The whole body is written before the answer is read.
                if let Some(counter) = counter {
                    counter.store(body.len() as u64, Ordering::Relaxed);
                }
                body.clone()
            }
            OutgoingBody::Streamed(_) => unreachable!("checked by `native_body`"),
        };
        crate::h1::Request {
            method: self.method.clone(),
            path_and_query: self.path_and_query.clone(),
            headers: Cow::Borrowed(&*self.headers),
            forwarded: self.forwarding.as_ref(),
            body,
            raw_fields,
        }
    }

    /// The request for one attempt on `target`; `None` when the body cannot be sent again.
    /// `last` says no attempt follows, so the headers can be moved rather than copied.
    fn attempt(
        &mut self,
        target: &Target,
        version: Version,
        last: bool,
    ) -> Option<Request<UpstreamBody>> {
        let body = self.body.for_attempt()?;
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(target.scheme.clone());
        parts.authority = Some(target.authority.clone());
        parts.path_and_query = Some(self.path_and_query.clone());
        let uri = Uri::from_parts(parts)
            .expect("scheme, checked authority and a checked path form a valid URI");
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        // Upstream connections use the upstream's version whatever the client spoke.
        *request.version_mut() = version;
        *request.headers_mut() = if last {
            std::mem::take(&mut self.headers).into_owned()
        } else {
            self.headers.clone().into_owned()
        };
        if let Some(fields) = &self.forwarding {
            fields.insert_into(request.headers_mut());
        }
        Some(request)
    }
}

/// One attempt's request, for the client that sends it.
enum Attempt<'a> {
    /// Through wasmgate's own HTTP/1.1 client.
    Native(crate::h1::Request<'a>),
    /// Through hyper's client. Boxed: twice the size of the common native request, and held in
    /// every request's future, which is moved whole as it is built.
    Hyper(Box<Request<UpstreamBody>>),
}

impl Attempt<'_> {
    /// The headers to edit for this attempt alone (a native attempt copies them first).
    fn headers_mut(&mut self) -> &mut HeaderMap {
        match self {
            Attempt::Native(request) => request.headers.to_mut(),
            Attempt::Hyper(request) => request.headers_mut(),
        }
    }
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

/// How one attempt upstream went wrong.
enum AttemptFailure {
    /// The client's request body failed (400) or passed its limit (413): not the upstream's
    /// fault, never retried.
    Client(StatusCode, &'static str),
    /// Refused, reset or closed before the response head: may be retried.
    Transport,
    /// No response head in time: 504, not retried (the upstream may still be working on it).
    TimedOut,
}

/// Sends a request upstream, trying other targets as the upstream's `retries` allow, and maps
/// failures: no target in rotation 503, refused or reset 502, timed out 504. `raw_fields`: the
/// response is passed on unread by wasmgate's own server side, so wasmgate's own client may
/// hand its fields back as bytes ([`crate::h1::RawFields`]).
///
/// `outgoing` is borrowed, not moved in: it is a few hundred bytes, and the future of an `async
/// fn` holds its arguments, so it would be copied as the future is built, again as it is
/// awaited, and once more into the future's own state.
async fn forward(
    route: &Route,
    outgoing: &mut Outgoing<'_>,
    mut upgrade: Option<Upgrade>,
    ids: &RequestIds,
    raw_fields: bool,
) -> Response<ProxyBody> {
    let upstream = &route.upstream;
    // One clock read serves the request's deadline and the first attempt's (a retry reads
    // it again).
    let mut now = tokio::time::Instant::now();
    let deadline = route.request_timeout.map(|limit| now + limit);
    let attempts = if outgoing.repeatable() && upgrade.is_none() {
        1 + upstream.retries
    } else {
        1
    };
    let (request_id, trace_id) = (ids.request_id(), &*ids.trace.trace_id);
    let mut tried = Tried::default();
    let mut failure = None;
    for attempt in 0..attempts {
        let Some(index) = upstream.pick(tried) else {
            tracing::warn!(route = &*route.name, upstream = %upstream.name, request_id, trace_id, "no upstream target in rotation");
            return gateway_error(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        tried.add(index);
        let target = upstream.target(index);
        let last = attempt + 1 == attempts;
        // The common case, a request with a small whole body (or none) to a plain HTTP/1.1
        // target, goes through wasmgate's own client; everything else through hyper's.
        let native =
            upgrade.is_none() && upstream.speaks_plain_http1(target) && outgoing.native_body();
        let mut request = if native {
            Attempt::Native(outgoing.native_attempt(raw_fields))
        } else {
            let Some(request) = outgoing.attempt(target, upstream.version, last) else {
                break;
            };
            Attempt::Hyper(Box::new(request))
        };
        if let Some(upgrade) = &upgrade {
            let headers = request.headers_mut();
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, upgrade.protocol.clone());
        }
        let authority = target.authority.as_str();
        // Only an exported trace adds a header (`traceparent`), so only then are the headers
        // asked for by `&mut` (a native attempt would copy them).
        let mut span = if ids.trace.is_exported() {
            ids.trace
                .upstream_call(&upstream.name, authority, request.headers_mut())
        } else {
            None
        };
        if attempt > 0 {
            now = tokio::time::Instant::now();
        }
        let head_by = match deadline {
            Some(deadline) => deadline.min(now + route.timeout),
            None => now + route.timeout,
        };
        let sent = now.into_std();
        // One level of `Result`: each level is another copy of the response as it is built
        // and taken apart.
        let outcome: Result<Response<ProxyBody>, Unanswered> = {
            let _outstanding = upstream.begin(index);
            // Each client's future is awaited here rather than in an `async fn` of the attempt:
            // every level of `async fn` is a future built and then moved whole into its
            // caller's, once per request.
            match request {
                // wasmgate's client bounds the wait itself, with a timer kept per connection.
                // Borrowed: moved into the client's future, the request was copied twice more.
                // Its response is made with the body the client gets: it carries no upgrade
                // (`native` above) nor hop-by-hop fields (left out as the head is parsed).
                Attempt::Native(ref request) => {
                    let connect_timeout = upstream.connect_timeout(route.client);
                    let wrap = |body: crate::h1::Body| match deadline {
                        Some(deadline) => streamed_until(body, deadline),
                        None => streamed(body),
                    };
                    let sending = target
                        .pool
                        .send(request, connect_timeout, sent, head_by, wrap);
                    match sending.await {
                        Ok(response) => Ok(response),
                        Err(crate::h1::Error::TimedOut) => Err(Unanswered::TimedOut),
                        Err(err) => Err(Unanswered::Failed(err.into())),
                    }
                }
                Attempt::Hyper(request) => {
                    let sending = upstream.client(route.client).request(*request);
                    match tokio::time::timeout_at(head_by, sending).await {
                        Ok(Ok(head)) => {
                            Ok(answer(route, head, upgrade.take(), deadline, ids, target))
                        }
                        Ok(Err(err)) => Err(Unanswered::Failed(err.into())),
                        Err(_) => Err(Unanswered::TimedOut),
                    }
                }
            }
        };
        target.duration.observe(sent.elapsed().as_secs_f64());
        let attempt_failure = match outcome {
            Ok(response) => {
                upstream.succeeded(index);
                return response;
            }
            Err(Unanswered::Failed(err)) => match BodyError::find(&*err) {
                Some(BodyError::TooLarge(_)) => {
                    tracing::debug!(
                        route = &*route.name,
                        request_id,
                        "request body over the limit"
                    );
                    AttemptFailure::Client(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
                }
                Some(BodyError::Read(cause)) => {
                    tracing::debug!(route = &*route.name, request_id, error = %cause, "client body read failed");
                    AttemptFailure::Client(
                        StatusCode::BAD_REQUEST,
                        "request body could not be read",
                    )
                }
                None if is_timeout(&*err) => {
                    upstream.failed(index);
                    tracing::warn!(route = &*route.name, upstream = %upstream.name, target = authority, request_id, trace_id, attempt, error = %error_chain(&*err), "upstream connect timed out");
                    AttemptFailure::TimedOut
                }
                None => {
                    upstream.failed(index);
                    tracing::warn!(route = &*route.name, upstream = %upstream.name, target = authority, request_id, trace_id, attempt, error = %error_chain(&*err), "upstream request failed");
                    AttemptFailure::Transport
                }
            },
            Err(Unanswered::TimedOut) => {
                upstream.failed(index);
                let timeout = head_by.saturating_duration_since(now);
                tracing::warn!(route = &*route.name, upstream = %upstream.name, target = authority, request_id, trace_id, timeout = ?timeout, "upstream timed out");
                AttemptFailure::TimedOut
            }
        };
        if let Some(span) = &mut span {
            span.fail(match attempt_failure {
                AttemptFailure::Client(..) => "client body failed",
                AttemptFailure::Transport => "upstream unavailable",
                AttemptFailure::TimedOut => "upstream timed out",
            });
        }
        let retry = matches!(attempt_failure, AttemptFailure::Transport);
        failure = Some(attempt_failure);
        if !retry {
            break;
        }
    }
    let (status, reason) = match failure {
        Some(AttemptFailure::Client(status, reason)) => (status, reason),
        Some(AttemptFailure::TimedOut) => (StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
        Some(AttemptFailure::Transport) | None => (StatusCode::BAD_GATEWAY, "upstream unavailable"),
    };
    gateway_error(status, reason)
}

/// Why an attempt has no response head.
enum Unanswered {
    /// None by the attempt's deadline.
    TimedOut,
    /// The request or the connection failed.
    Failed(BoxError),
}

/// Whether a client error is a connect timeout (504 rather than 502).
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::body::find_cause::<std::io::Error>(err)
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
}

/// Turns the response hyper's client read into the one for the client: hop-by-hop headers
/// stripped, the body held to the request deadline, an agreed upgrade tunnelled. (wasmgate's
/// own client makes its responses ready as it reads them: [`forward`].)
fn answer(
    route: &Route,
    mut response: Response<Incoming>,
    upgrade: Option<Upgrade>,
    deadline: Option<tokio::time::Instant>,
    ids: &RequestIds,
    target: &Target,
) -> Response<ProxyBody> {
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upstream_side = switching.then(|| hyper::upgrade::on(&mut response));
    let (mut parts, body) = response.into_parts();
    let protocol = switching
        .then(|| parts.headers.get(UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(&mut parts.headers);
    match (upstream_side, upgrade, protocol) {
        (None, _, _) => {
            let body = match deadline {
                Some(deadline) => streamed_until(body, deadline),
                None => streamed(body),
            };
            Response::from_parts(parts, body)
        }
        (Some(upstream_side), Some(upgrade), Some(protocol)) => {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, protocol);
            tokio::spawn(tunnel(upgrade.client, upstream_side));
            Response::from_parts(parts, full(Bytes::new()))
        }
        _ => {
            tracing::warn!(route = &*route.name, upstream = %route.upstream.name, target = target.authority.as_str(), request_id = ids.request_id(), trace_id = &*ids.trace.trace_id, "upstream switched protocols without an upgrade to switch to");
            gateway_error(StatusCode::BAD_GATEWAY, "upstream unavailable")
        }
    }
}

/// An HTTP/1.1 upgrade (WebSocket and the like) the client asked for: passed upstream once the
/// request phase has let the request through, and tunnelled when the upstream agrees (101).
struct Upgrade {
    /// The `Upgrade` header's value.
    protocol: HeaderValue,
    /// The client's side of the connection, once the 101 has been sent.
    client: hyper::upgrade::OnUpgrade,
}

impl Upgrade {
    /// Takes the upgrade out of a request that asks for one (`Connection: upgrade` and
    /// `Upgrade`), before hop-by-hop headers are stripped.
    fn take(parts: &mut http::request::Parts) -> Option<Upgrade> {
        if parts.version != Version::HTTP_11 {
            return None;
        }
        let asks = parts
            .headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
        if !asks {
            return None;
        }
        let protocol = parts.headers.get(UPGRADE)?.clone();
        let client = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
        Some(Upgrade { protocol, client })
    }
}

/// Copies bytes both ways between an upgraded client and upstream until either side closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %err, "upgraded connection ended with an error");
    }
}

/// A plugin invocation's span name.
fn plugin_span(link: &ChainLink, phase: &str) -> std::borrow::Cow<'static, str> {
    format!("plugin {} {phase}", link.plugin.name()).into()
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
/// Hop-by-hop headers, `Upgrade` among them: an upgrade is passed on explicitly, only once the
/// request phase has allowed it.
pub(crate) static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes hop-by-hop headers, and those `Connection` names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Runs twice per request. One pass over the names present (compared as known names, without
    // hashing) finds which of these are there; only those are removed, where a removal per listed
    // name would hash each of them. Responses often carry `Connection: keep-alive`.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(index) = HOP_BY_HOP.iter().position(|listed| listed == name) {
            present |= 1 << index;
        }
    }
    if present == 0 {
        return;
    }
    // `HOP_BY_HOP[0]` is `Connection`. Its usual values name no header of their own; most
    // upstream responses carry `Connection: keep-alive`.
    let usual = |value: &HeaderValue| {
        let value = value.as_bytes();
        value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
    };
    if present & 1 != 0 && !headers.get_all(CONNECTION).iter().all(usual) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The usual tokens name no header of their own (`keep-alive` is listed anyway).
            .filter(|token| {
                !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close")
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .filter(|name| !HOP_BY_HOP.contains(name))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (index, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << index) != 0 {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_have_three_decimals() {
        use std::time::Duration;
        assert_eq!(super::millis(Duration::from_nanos(0)), "0.000");
        assert_eq!(super::millis(Duration::from_nanos(653_499)), "0.653");
        assert_eq!(super::millis(Duration::from_nanos(653_500)), "0.654");
        assert_eq!(super::millis(Duration::from_millis(12)), "12.000");
        assert_eq!(
            super::millis(Duration::from_micros(61_000_001)),
            "61000.001"
        );
        assert_eq!(super::millis(Duration::from_nanos(999_999_500)), "1000.000");
        assert_eq!(super::millis(Duration::from_micros(1_070)), "1.070");
    }

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

        // Every listed name goes, with all its values, and nothing else does.
        let mut headers = HeaderMap::new();
        for name in &HOP_BY_HOP {
            headers.append(name, HeaderValue::from_static("a"));
            headers.append(name, HeaderValue::from_static("b"));
        }
        headers.append(CONNECTION, HeaderValue::from_static("Keep-Alive, X-Other"));
        headers.insert("x-other", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));

        let mut headers = HeaderMap::new();
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);

        // A usual `Connection` field beside one that names a header: the named one still goes.
        let mut headers = HeaderMap::new();
        headers.append(CONNECTION, HeaderValue::from_static("Keep-Alive"));
        headers.append(CONNECTION, HeaderValue::from_static("x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));
    }
}
