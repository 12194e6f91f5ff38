//! The admin listener: liveness, readiness, metrics, reload and the loaded manifest's identity.
//!
//! | Path | Answer |
//! |---|---|
//! | `GET /status` | 200 while the process serves |
//! | `GET /status/ready` | 200 once the manifest and its plugins are loaded; 503 while draining |
//! | `GET /metrics` | Prometheus metrics (OpenMetrics text) |
//! | `POST /reload` | 200 with the new manifest's hash, or 422 with every error |
//! | `GET /config` | the loaded manifest's SHA-256, load time and routes, and how many per-request plugin uses have their pre-initialised image (`plugin_images`), as JSON |

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::server::Shared;

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&shared, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method();
    match request.uri().path() {
        "/status" => only(method, &Method::GET, || text(StatusCode::OK, "alive\n")),
        "/status/ready" => only(method, &Method::GET, || {
            if shared.draining.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }),
        "/metrics" => only(method, &Method::GET, || {
            let mut response =
                Response::new(Full::new(Bytes::from(shared.services.metrics.encode())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }),
        "/config" => only(method, &Method::GET, || {
            let snapshot = shared.snapshot.load();
            // The per-request plugin uses by the state of their pre-initialised image: until
            // every one is `ready` (or `refused`), some requests still configure an instance.
            let (mut ready, mut pending, mut refused) = (0, 0, 0);
            for (_, _, slot) in snapshot.preinit_slots() {
                match (slot.settled(), slot.image().is_some()) {
                    (true, true) => ready += 1,
                    (true, false) => refused += 1,
                    (false, _) => pending += 1,
                }
            }
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "sha256": snapshot.manifest_digest,
                    "loaded_at": humantime::format_rfc3339_millis(snapshot.loaded_at).to_string(),
                    "routes": snapshot.route_names().collect::<Vec<_>>(),
                    "plugin_images": { "ready": ready, "pending": pending, "refused": refused },
                }),
            )
        }),
        "/reload" if method == Method::POST => match shared.reload().await {
            Ok(report) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "result": "success",
                    "sha256": report.manifest_digest,
                    "elapsed_ms": report.elapsed.as_millis() as u64,
                    "compiled": report.compiled,
                }),
            ),
            Err(errors) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({
                    "result": "failure",
                    "errors": errors.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }),
            ),
        },
        "/reload" => not_allowed("POST"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn only(
    method: &Method,
    allowed: &Method,
    answer: impl FnOnce() -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    if method == allowed || (*allowed == Method::GET && method == Method::HEAD) {
        answer()
    } else {
        not_allowed(allowed.as_str())
    }
}

fn not_allowed(allow: &str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    if let Ok(allow) = HeaderValue::from_str(allow) {
        response.headers_mut().insert(ALLOW, allow);
    }
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
