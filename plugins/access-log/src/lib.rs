//! `access-log`: one JSON line per request, written through the gateway's log.
//!
//! ```yaml
//! - name: access-log            # put it first in the chain, so it sees every outcome
//!   config:
//!     fields: [time, request_id, route, method, path, status, duration_ms]   # default: all
//!     headers: [user-agent, referer]        # request headers to include
//!     redact_headers: [x-api-key]           # logged as "[redacted]"
//!     redact_query: [token, access_token]   # query parameter values replaced
//! ```
//!
//! Fields: `time` (RFC 3339, UTC), `request_id`, `route`, `method`, `path`, `query`, `status`,
//! `duration_ms` (arrival to response head), `upstream_ms` (absent when the upstream was not
//! called), `client`, `subject` (from jwt-auth), `consumer` (from api-key), `bytes_in` (request
//! body bytes forwarded upstream; the `content-length` when the upstream was not called),
//! `bytes_out` (body bytes actually sent) and
//! `completed` (`false` when the client went away or the body was cut short). The line is written
//! in the completion phase, once the response body has been sent. `authorization`, `cookie` and
//! `set-cookie` are always redacted, whatever the configuration says. Control characters in values
//! are escaped by the JSON encoding.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;
use wasmgate_plugin_sdk::{Plugin, Request, Response, export_plugin, log, properties};

/// Every field, in output order.
pub const FIELDS: [&str; 16] = [
    "time",
    "request_id",
    "route",
    "method",
    "path",
    "query",
    "status",
    "duration_ms",
    "upstream_ms",
    "client",
    "subject",
    "consumer",
    "bytes_in",
    "bytes_out",
    "completed",
    "headers",
];

/// Headers never logged in clear, whatever the configuration.
const ALWAYS_REDACTED: [&str; 3] = ["authorization", "cookie", "set-cookie"];

/// Query parameters redacted by default.
fn default_redact_query() -> Vec<String> {
    [
        "access_token",
        "token",
        "api_key",
        "apikey",
        "key",
        "password",
    ]
    .map(String::from)
    .to_vec()
}

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Fields to write (default: all).
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// Request headers to include, under `headers`.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Further headers whose values are redacted.
    #[serde(default)]
    pub redact_headers: Vec<String>,
    /// Query parameters whose values are redacted.
    #[serde(default = "default_redact_query")]
    pub redact_query: Vec<String>,
}

/// What one line is made of.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Entry {
    /// Seconds and nanoseconds since the Unix epoch.
    pub time: (u64, u32),
    /// Values of the simple fields, by name.
    pub values: Vec<(&'static str, Value)>,
    /// Selected request headers.
    pub headers: Vec<(String, String)>,
}

/// The plugin.
pub struct AccessLog {
    /// The fields to write, one bit per index into [`FIELDS`].
    fields: u32,
    headers: Vec<String>,
    redact_headers: BTreeSet<String>,
    redact_query: BTreeSet<String>,
}

impl AccessLog {
    fn wants(&self, field: &str) -> bool {
        FIELDS
            .iter()
            .position(|known| *known == field)
            .is_some_and(|index| self.fields & (1 << index) != 0)
    }

    /// Builds the JSON line, fields in [`FIELDS`] order, written straight into one buffer
    /// (this runs for every request).
    pub fn render(&self, entry: &Entry) -> String {
        let mut line = Vec::with_capacity(320);
        line.push(b'{');
        for (index, field) in FIELDS.iter().enumerate() {
            if self.fields & (1 << index) == 0 {
                continue;
            }
            let value = match *field {
                "time" | "headers" => None,
                _ => match entry.values.iter().find(|(name, _)| name == field) {
                    Some((_, value)) => Some(value),
                    None => continue,
                },
            };
            if *field == "headers" && self.headers.is_empty() {
                continue;
            }
            if line.len() > 1 {
                line.push(b',');
            }
            // Field names are plain ASCII words: no escaping needed.
            line.push(b'"');
            line.extend_from_slice(field.as_bytes());
            line.extend_from_slice(b"\":");
            // serde_json escapes quotes and control characters in every value written.
            let written = match (*field, value) {
                ("time", _) => {
                    line.push(b'"');
                    write_rfc3339(&mut line, entry.time.0, entry.time.1);
                    line.push(b'"');
                    Ok(())
                }
                ("headers", _) => self.write_headers(&mut line, &entry.headers),
                ("query", Some(Value::String(query))) => {
                    serde_json::to_writer(&mut line, &self.redact_query(query))
                }
                (_, Some(value)) => serde_json::to_writer(&mut line, value),
                (_, None) => Ok(()),
            };
            debug_assert!(written.is_ok(), "writing to a Vec cannot fail");
        }
        line.push(b'}');
        // serde_json writes UTF-8, and the rest is ASCII.
        String::from_utf8(line).unwrap_or_default()
    }

    fn write_headers(
        &self,
        line: &mut Vec<u8>,
        headers: &[(String, String)],
    ) -> Result<(), serde_json::Error> {
        line.push(b'{');
        for (i, (name, value)) in headers.iter().enumerate() {
            if i > 0 {
                line.push(b',');
            }
            serde_json::to_writer(&mut *line, name)?;
            line.push(b':');
            let shown = if self.redacted(name) {
                "[redacted]"
            } else {
                value.as_str()
            };
            serde_json::to_writer(&mut *line, shown)?;
        }
        line.push(b'}');
        Ok(())
    }

    fn redacted(&self, header: &str) -> bool {
        let header = header.to_ascii_lowercase();
        ALWAYS_REDACTED.contains(&header.as_str()) || self.redact_headers.contains(&header)
    }

    fn redact_query(&self, query: &str) -> String {
        query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if self.redact_query.contains(key) => format!("{key}=[redacted]"),
                _ => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// Formats a Unix time as RFC 3339 in UTC with milliseconds.
pub fn rfc3339(secs: u64, nanos: u32) -> String {
    let mut text = Vec::with_capacity(24);
    write_rfc3339(&mut text, secs, nanos);
    String::from_utf8(text).unwrap_or_default()
}

/// Writes a Unix time as RFC 3339 in UTC with milliseconds, without the formatting machinery
/// (this runs for every request).
fn write_rfc3339(out: &mut Vec<u8>, secs: u64, nanos: u32) {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let parts = [
        (year.max(0) as u64, 4, b'-'),
        (month as u64, 2, b'-'),
        (day as u64, 2, b'T'),
        (rem / 3600, 2, b':'),
        (rem % 3600 / 60, 2, b':'),
        (rem % 60, 2, b'.'),
        (u64::from(nanos / 1_000_000), 3, b'Z'),
    ];
    for (value, width, after) in parts {
        push_padded(out, value, width);
        out.push(after);
    }
}

/// Writes `value` in decimal, zero-padded to `width` digits.
fn push_padded(out: &mut Vec<u8>, mut value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start.min(digits.len() - width)..]);
}

fn number(text: Option<String>) -> Option<Value> {
    let text = text?;
    text.parse::<u64>().map(Value::from).ok().or_else(|| {
        text.parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
    })
}

impl Plugin for AccessLog {
    type Config = Config;
    // Only the completion phase: no call in the other two.
    const ON_REQUEST: bool = false;
    const ON_RESPONSE: bool = false;
    const ON_COMPLETE: bool = true;

    fn new(config: Config) -> Result<Self, String> {
        let fields = match &config.fields {
            None => (1 << FIELDS.len()) - 1,
            Some(list) => list.iter().try_fold(0u32, |fields, f| {
                FIELDS
                    .iter()
                    .position(|known| known == f)
                    .map(|index| fields | 1 << index)
                    .ok_or_else(|| format!("unknown field `{f}` (known: {})", FIELDS.join(", ")))
            })?,
        };
        Ok(AccessLog {
            fields,
            headers: config
                .headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            redact_headers: config
                .redact_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            redact_query: config.redact_query.into_iter().collect(),
        })
    }

    fn on_complete(&self, request: &Request, response: &Response) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut values: Vec<(&'static str, Value)> = Vec::new();
        let mut put = |field: &'static str, value: Option<Value>| {
            if let Some(value) = value
                && self.wants(field)
            {
                values.push((field, value));
            }
        };
        put(
            "request_id",
            request.header("x-request-id").map(Value::String),
        );
        put("route", Some(Value::String(request.route_name())));
        put("method", Some(Value::String(request.method())));
        put("path", Some(Value::String(request.path())));
        put("query", request.query().map(Value::String));
        put("status", Some(Value::from(response.status())));
        put(
            "duration_ms",
            number(properties::get("wasmgate.duration_ms")),
        );
        put(
            "upstream_ms",
            number(properties::get("wasmgate.upstream_ms")),
        );
        put("client", Some(Value::String(request.client_addr())));
        put("subject", properties::get("subject").map(Value::String));
        put("consumer", properties::get("consumer").map(Value::String));
        let bytes_in =
            properties::get("wasmgate.bytes_in").or_else(|| request.header("content-length"));
        put("bytes_in", number(bytes_in));
        put("bytes_out", number(properties::get("wasmgate.bytes_out")));
        put(
            "completed",
            properties::get("wasmgate.completed").map(|done| Value::Bool(done == "true")),
        );
        let headers = if self.wants("headers") {
            self.headers
                .iter()
                .filter_map(|name| request.header(name).map(|value| (name.clone(), value)))
                .collect()
        } else {
            Vec::new()
        };
        let entry = Entry {
            time: (now.as_secs(), now.subsec_nanos()),
            values,
            headers,
        };
        log::info(&self.render(&entry));
    }
}

export_plugin!(AccessLog);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(json: &str) -> AccessLog {
        AccessLog::new(serde_json::from_str(json).unwrap()).unwrap()
    }

    fn entry() -> Entry {
        Entry {
            time: (1_764_417_600, 123_000_000),
            values: vec![
                ("route", Value::from("api")),
                ("method", Value::from("GET")),
                ("path", Value::from("/a\nb")),
                ("query", Value::from("x=1&token=s3cret")),
                ("status", Value::from(200)),
            ],
            headers: vec![
                ("user-agent".into(), "curl".into()),
                ("authorization".into(), "Bearer s3cret".into()),
                ("x-api-key".into(), "k".into()),
            ],
        }
    }

    #[test]
    fn lines_are_json_with_secrets_redacted_and_controls_escaped() {
        let log = plugin(
            r#"{"headers":["user-agent","authorization","x-api-key"],"redact_headers":["X-Api-Key"]}"#,
        );
        let line = log.render(&entry());
        assert!(!line.contains('\n'), "{line}");
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["time"], "2025-11-29T12:00:00.123Z");
        assert_eq!(parsed["path"], "/a\nb");
        assert_eq!(parsed["query"], "x=1&token=[redacted]");
        assert_eq!(parsed["headers"]["user-agent"], "curl");
        assert_eq!(parsed["headers"]["authorization"], "[redacted]");
        assert_eq!(parsed["headers"]["x-api-key"], "[redacted]");
        assert!(!line.contains("s3cret"), "{line}");
    }

    #[test]
    fn fields_are_selectable_and_checked() {
        let log = plugin(r#"{"fields":["status","route"]}"#);
        assert_eq!(log.render(&entry()), r#"{"route":"api","status":200}"#);
        let err = AccessLog::new(serde_json::from_str(r#"{"fields":["colour"]}"#).unwrap())
            .err()
            .unwrap();
        assert!(err.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5_000_000), "2000-02-29T00:00:00.005Z");
        assert_eq!(
            rfc3339(1_764_419_696, 999_999_999),
            "2025-11-29T12:34:56.999Z"
        );
    }
}
