//! W3C Trace Context and OpenTelemetry spans.
//!
//! Without a `tracing` section in the manifest the gateway is not a participant: a client's
//! `traceparent` and `tracestate` go upstream unchanged, and the trace id is written in the
//! request's log lines. With an OTLP endpoint configured, each request gets a server span (the
//! client's span its parent, when it sent one), each plugin invocation and the upstream call a
//! child span, and the upstream receives a `traceparent` whose parent is the upstream-call span,
//! so its own spans hang under ours. Spans are exported over OTLP/HTTP (JSON) in batches by a
//! background task, never on the request path.

use std::borrow::Cow;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, SdkTracer, SdkTracerProvider};

use crate::manifest::TracingSpec;

/// The `traceparent` header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A parsed `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The caller's span.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Reads the request's `traceparent`; `None` when absent, repeated or malformed (which the
    /// spec says to treat as absent).
    pub fn from_headers(headers: &HeaderMap) -> Option<TraceParent> {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        TraceParent::parse(value.as_bytes())
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; lower-case hex only, ids not all zero.
    pub fn parse(text: &[u8]) -> Option<TraceParent> {
        if text.len() != 55 || &text[..3] != b"00-" || text[35] != b'-' || text[52] != b'-' {
            return None;
        }
        let mut trace_id = [0; 16];
        let mut parent_id = [0; 8];
        let mut flags = [0; 1];
        decode_hex(&text[3..35], &mut trace_id)?;
        decode_hex(&text[36..52], &mut parent_id)?;
        decode_hex(&text[53..55], &mut flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags: flags[0],
        })
    }

    /// The header value.
    pub fn to_header(&self) -> HeaderValue {
        let mut text = String::with_capacity(55);
        text.push_str("00-");
        push_hex(&mut text, &self.trace_id);
        text.push('-');
        push_hex(&mut text, &self.parent_id);
        text.push('-');
        push_hex(&mut text, &[self.flags]);
        HeaderValue::try_from(text).expect("hex digits and dashes are a valid header value")
    }

    /// The trace id in hex, as logs show it.
    pub fn trace_id_hex(&self) -> String {
        let mut text = String::with_capacity(32);
        push_hex(&mut text, &self.trace_id);
        text
    }
}

fn decode_hex(text: &[u8], out: &mut [u8]) -> Option<()> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (pair, byte) in text.chunks_exact(2).zip(out.iter_mut()) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

fn push_hex(text: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        text.push(DIGITS[usize::from(byte >> 4)] as char);
        text.push(DIGITS[usize::from(byte & 15)] as char);
    }
}

/// The span exporter, when the manifest configures one.
pub struct Telemetry {
    /// Always `Some` but in `drop`, which moves them to another thread.
    handles: Option<(SdkTracerProvider, SdkTracer)>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Starts the exporter's background task; call inside the Tokio runtime.
    pub fn start(spec: &TracingSpec) -> Result<Telemetry, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(spec.otlp_endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|err| format!("cannot create the OTLP exporter: {err}"))?;
        let batches = BatchConfigBuilder::default()
            .with_scheduled_delay(spec.export_interval)
            .build();
        let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_batch_config(batches)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder()
                    .with_service_name(spec.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("wasmgate");
        Ok(Telemetry {
            handles: Some((provider, tracer)),
        })
    }

    fn tracer(&self) -> &SdkTracer {
        &self.handles.as_ref().expect("present until dropped").1
    }

    /// Exports what is queued and stops the exporter.
    pub async fn shutdown(&self) {
        let provider = self
            .handles
            .as_ref()
            .expect("present until dropped")
            .0
            .clone();
        // The SDK blocks while the export task flushes: not on a worker that task may need.
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(err) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                tracing::warn!(error = %err, "flushing spans at shutdown");
            }
        })
        .await;
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // The SDK shuts the provider down when its last handle goes, blocking until the export
        // task answers. On a current-thread runtime that task can never run while we block, so
        // our handles are dropped on a thread of its own. After `shutdown` this is a no-op.
        if let Some(handles) = self.handles.take() {
            let _ = std::thread::Builder::new()
                .name("wasmgate-otlp-shutdown".into())
                .spawn(move || drop(handles));
        }
    }
}

/// One request's trace: its id for the logs and, when exporting, its server span.
pub struct RequestTrace {
    /// The trace id in hex, for log lines; empty when the request has no trace.
    pub trace_id: Box<str>,
    exported: Option<(Context, SdkTracer)>,
}

impl RequestTrace {
    /// Starts a request's trace from its headers.
    pub fn begin(
        telemetry: Option<&Telemetry>,
        headers: &HeaderMap,
        method: &http::Method,
    ) -> RequestTrace {
        let incoming = TraceParent::from_headers(headers);
        let Some(telemetry) = telemetry else {
            let trace_id = incoming.map(|t| t.trace_id_hex()).unwrap_or_default();
            return RequestTrace {
                trace_id: trace_id.into(),
                exported: None,
            };
        };
        let parent = match incoming {
            Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(parent.trace_id),
                SpanId::from_bytes(parent.parent_id),
                TraceFlags::new(parent.flags),
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let tracer = telemetry.tracer();
        let span = tracer
            .span_builder(format!("{method}"))
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new("http.request.method", method.to_string())])
            .start_with_context(tracer, &parent);
        let trace_id = span.span_context().trace_id().to_string();
        RequestTrace {
            trace_id: trace_id.into(),
            exported: Some((parent.with_span(span), tracer.clone())),
        }
    }

    /// Names the server span after the route, once the request is routed.
    pub fn routed(&self, method: &http::Method, route: &str, request_id: &str) {
        if let Some((cx, _)) = &self.exported {
            let span = cx.span();
            span.update_name(format!("{method} {route}"));
            span.set_attribute(KeyValue::new("http.route", route.to_string()));
            span.set_attribute(KeyValue::new("wasmgate.request_id", request_id.to_string()));
        }
    }

    /// Starts a child span (a plugin invocation), when exporting.
    pub fn child(&self, name: impl FnOnce() -> Cow<'static, str>) -> Option<ChildSpan> {
        let (cx, tracer) = self.exported.as_ref()?;
        let span = tracer.span_builder(name()).start_with_context(tracer, cx);
        Some(ChildSpan(Box::new(span)))
    }

    /// Whether this request's spans are exported: only then does an upstream call change its
    /// headers.
    pub fn is_exported(&self) -> bool {
        self.exported.is_some()
    }

    /// Starts the upstream call's span and sets the `traceparent` the upstream receives: ours
    /// when exporting, the client's unchanged otherwise (it was forwarded with the headers).
    pub fn upstream_call(
        &self,
        upstream: &str,
        target: &str,
        headers: &mut HeaderMap,
    ) -> Option<ChildSpan> {
        let (cx, tracer) = self.exported.as_ref()?;
        let span = tracer
            .span_builder(format!("upstream {upstream}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("wasmgate.upstream", upstream.to_string()),
                KeyValue::new("server.address", target.to_string()),
            ])
            .start_with_context(tracer, cx);
        let context = span.span_context();
        let ours = TraceParent {
            trace_id: context.trace_id().to_bytes(),
            parent_id: context.span_id().to_bytes(),
            flags: context.trace_flags().to_u8(),
        };
        headers.insert(TRACEPARENT.clone(), ours.to_header());
        Some(ChildSpan(Box::new(span)))
    }

    /// Ends the server span with the response status.
    pub fn finish(&self, status: http::StatusCode) {
        if let Some((cx, _)) = &self.exported {
            let span = cx.span();
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
            if status.is_server_error() {
                span.set_status(Status::error(status.as_str().to_string()));
            }
            span.end();
        }
    }
}

/// A child span; ends when dropped, or with an error status by [`ChildSpan::fail`].
///
/// Boxed: a span is ~280 bytes, and an `Option<ChildSpan>` is held across the awaits of every
/// request's future (the upstream call, each plugin phase) whether or not it is exported, and
/// that future is moved whole as it is built. Only an exported span pays for the allocation.
pub struct ChildSpan(Box<opentelemetry_sdk::trace::Span>);

impl ChildSpan {
    /// Marks the span failed.
    pub fn fail(&mut self, reason: &str) {
        self.0.set_status(Status::error(reason.to_string()));
    }
}

impl Drop for ChildSpan {
    fn drop(&mut self) {
        self.0.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_malformed_ones_are_absent() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.flags, 1);
        assert_eq!(parsed.to_header(), text);
        assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736x00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad}");
        }
    }
}
