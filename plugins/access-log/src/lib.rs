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

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde::Deserialize;
use wasmgate_plugin_sdk::{Plugin, Reads, Request, Response, export_plugin, log, properties};

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

/// Indices into [`FIELDS`] (the bit of each in the configured set).
pub mod field {
    #![allow(missing_docs)]
    pub const TIME: usize = 0;
    pub const REQUEST_ID: usize = 1;
    pub const ROUTE: usize = 2;
    pub const METHOD: usize = 3;
    pub const PATH: usize = 4;
    pub const QUERY: usize = 5;
    pub const STATUS: usize = 6;
    pub const DURATION_MS: usize = 7;
    pub const UPSTREAM_MS: usize = 8;
    pub const CLIENT: usize = 9;
    pub const SUBJECT: usize = 10;
    pub const CONSUMER: usize = 11;
    pub const BYTES_IN: usize = 12;
    pub const BYTES_OUT: usize = 13;
    pub const COMPLETED: usize = 14;
    pub const HEADERS: usize = 15;
}

/// One value of a line, borrowed where it can be from what the gateway handed in (the line is
/// written and dropped within the call).
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    /// Text, escaped as a JSON string when written.
    Text(Cow<'a, str>),
    /// A number in JSON's syntax (checked by [`number`]), written as it is.
    Number(Cow<'a, str>),
    /// `true` or `false`.
    Bool(bool),
}

/// What one line is made of.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Entry<'a> {
    /// Seconds and nanoseconds since the Unix epoch.
    pub time: (u64, u32),
    /// The simple fields' values, by index into [`FIELDS`]; `None` leaves a field out.
    pub values: [Option<Value<'a>>; FIELDS.len()],
    /// Selected request headers.
    pub headers: Vec<(String, String)>,
}

/// How a value read from the host is written.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Number,
    Bool,
}

/// The property each field is read from (all but `time`, `status` and `headers`).
const SOURCES: [(usize, &str, Kind); 13] = [
    (field::REQUEST_ID, "wasmgate.request_id", Kind::Text),
    (field::ROUTE, "wasmgate.route", Kind::Text),
    (field::METHOD, "wasmgate.method", Kind::Text),
    (field::PATH, "wasmgate.path", Kind::Text),
    (field::QUERY, "wasmgate.query", Kind::Text),
    (field::DURATION_MS, "wasmgate.duration_ms", Kind::Number),
    (field::UPSTREAM_MS, "wasmgate.upstream_ms", Kind::Number),
    (field::CLIENT, "wasmgate.client_addr", Kind::Text),
    (field::SUBJECT, "subject", Kind::Text),
    (field::CONSUMER, "consumer", Kind::Text),
    (field::BYTES_IN, "wasmgate.bytes_in", Kind::Number),
    (field::BYTES_OUT, "wasmgate.bytes_out", Kind::Number),
    (field::COMPLETED, "wasmgate.completed", Kind::Bool),
];

/// The plugin.
pub struct AccessLog {
    /// The fields to write, one bit per index into [`FIELDS`].
    fields: u32,
    /// The properties the wanted fields are read from, asked for in one call per request (a
    /// call out of the sandbox costs about as much as rendering a field) by a list the gateway
    /// keeps (the keys cross out of the sandbox once), and what each becomes.
    keys: properties::KeyList,
    reads: Vec<(usize, Kind)>,
    headers: Vec<String>,
    /// Lower-cased.
    redact_headers: Vec<String>,
    redact_query: BTreeSet<String>,
}

impl AccessLog {
    fn wants(&self, index: usize) -> bool {
        self.fields & (1 << index) != 0
    }

    /// Builds the JSON line, fields in [`FIELDS`] order, written straight into one `String`.
    /// This runs for every request: fields are found by index, numbers are copied as the host
    /// wrote them rather than parsed and formatted again, and the line is never validated as
    /// UTF-8 again (it is built from `str`s).
    pub fn render(&self, entry: &Entry) -> String {
        let mut line = String::with_capacity(320);
        line.push('{');
        for (index, name) in FIELDS.iter().enumerate() {
            if !self.wants(index) {
                continue;
            }
            let value = match index {
                field::TIME => None,
                field::HEADERS if self.headers.is_empty() => continue,
                field::HEADERS => None,
                _ => match &entry.values[index] {
                    Some(value) => Some(value),
                    None => continue,
                },
            };
            if line.len() > 1 {
                line.push(',');
            }
            // Field names are plain ASCII words: no escaping needed.
            line.push('"');
            line.push_str(name);
            line.push_str("\":");
            match (index, value) {
                (field::TIME, _) => {
                    line.push('"');
                    write_rfc3339(&mut line, entry.time.0, entry.time.1);
                    line.push('"');
                }
                (field::HEADERS, _) => self.write_headers(&mut line, &entry.headers),
                (field::QUERY, Some(Value::Text(query))) => {
                    json_string(&mut line, &self.redact_query(query));
                }
                (_, Some(Value::Text(text))) => json_string(&mut line, text),
                (_, Some(Value::Number(number))) => line.push_str(number),
                (_, Some(Value::Bool(true))) => line.push_str("true"),
                (_, Some(Value::Bool(false))) => line.push_str("false"),
                (_, None) => {}
            }
        }
        line.push('}');
        line
    }

    fn write_headers(&self, line: &mut String, headers: &[(String, String)]) {
        line.push('{');
        for (i, (name, value)) in headers.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            json_string(line, name);
            line.push(':');
            let shown = if self.redacted(name) {
                "[redacted]"
            } else {
                value.as_str()
            };
            json_string(line, shown);
        }
        line.push('}');
    }

    fn redacted(&self, header: &str) -> bool {
        ALWAYS_REDACTED
            .into_iter()
            .chain(self.redact_headers.iter().map(String::as_str))
            .any(|redacted| redacted.eq_ignore_ascii_case(header))
    }

    fn redact_query<'q>(&self, query: &'q str) -> Cow<'q, str> {
        let redacts = |pair: &str| {
            pair.split_once('=')
                .is_some_and(|(key, _)| self.redact_query.contains(key))
        };
        if !query.split('&').any(redacts) {
            return Cow::Borrowed(query);
        }
        let redacted = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if self.redact_query.contains(key) => format!("{key}=[redacted]"),
                _ => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&");
        Cow::Owned(redacted)
    }
}

/// Formats a Unix time as RFC 3339 in UTC with milliseconds.
pub fn rfc3339(secs: u64, nanos: u32) -> String {
    let mut text = String::with_capacity(24);
    write_rfc3339(&mut text, secs, nanos);
    text
}

/// Writes a Unix time as RFC 3339 in UTC with milliseconds, without the formatting machinery
/// (this runs for every request).
fn write_rfc3339(out: &mut String, secs: u64, nanos: u32) {
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
    // u32 digits: 64-bit division is a library call on wasm32. Written into a fixed buffer,
    // two digits at a time, and appended once: the line's timestamp is on every request.
    let rem = rem as u32;
    let year = year.clamp(0, 9999) as u32;
    let millis = nanos / 1_000_000;
    let mut text = *b"0000-00-00T00:00:00.000Z";
    let mut pair = |at: usize, value: u32| {
        let value = value as usize * 2;
        text[at..at + 2].copy_from_slice(&PAIRS.as_bytes()[value..value + 2]);
    };
    pair(0, year / 100);
    pair(2, year % 100);
    pair(5, month as u32);
    pair(8, day as u32);
    pair(11, rem / 3600);
    pair(14, rem % 3600 / 60);
    pair(17, rem % 60);
    pair(21, millis % 100);
    text[20] = b'0' + (millis / 100) as u8;
    out.push_str(std::str::from_utf8(&text).expect("digits and punctuation are ASCII"));
}

/// "00" to "99", for writing two digits at a time.
const PAIRS: &str = "0001020304050607080910111213141516171819\
                     2021222324252627282930313233343536373839\
                     4041424344454647484950515253545556575859\
                     6061626364656667686970717273747576777879\
                     8081828384858687888990919293949596979899";

/// Writes `value` in decimal, zero-padded to `width` digits.
fn push_padded(out: &mut String, value: u32, width: usize) {
    let digits = if value == 0 {
        1
    } else {
        value.ilog10() as usize + 1
    };
    for _ in digits..width {
        out.push('0');
    }
    let mut divisor = 10u32.pow((digits.max(1) - 1) as u32);
    let mut rest = value;
    let mut left = digits;
    // An odd count starts with one digit; pairs follow.
    if left % 2 == 1 {
        out.push(char::from(b'0' + (rest / divisor) as u8));
        rest %= divisor;
        divisor /= 10;
        left -= 1;
    }
    while left > 0 {
        divisor /= 10;
        let pair = (rest / divisor) as usize;
        out.push_str(&PAIRS[pair * 2..pair * 2 + 2]);
        rest %= divisor;
        divisor /= 10;
        left -= 2;
    }
}

/// What each byte becomes in a JSON string: 0 for itself, else the letter of its escape (`u` for
/// `\u00XX`). A table, so that the common byte costs one load and one test.
const ESCAPES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table
};

/// Writes `text` as a JSON string (RFC 8259 section 7): quotes, backslashes and control
/// characters escaped, everything else as it is. Runs of plain characters are copied whole.
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    let bytes = text.as_bytes();
    let mut plain = 0;
    let mut at = 0;
    while at < bytes.len() {
        // Eight bytes at a time while none of them needs escaping: most of a log line's text
        // (paths, addresses, ids, user agents) is plain, and a byte at a time cost ~15
        // instructions each in the compiled plugin.
        if let Some(word) = bytes.get(at..at + 8) {
            let word = u64::from_le_bytes(word.try_into().expect("eight bytes"));
            let flagged = needs_escape(word);
            if flagged == 0 {
                at += 8;
                continue;
            }
            // The lowest flagged byte is always one that needs escaping (see `needs_escape`).
            at += flagged.trailing_zeros() as usize / 8;
        }
        let byte = bytes[at];
        let escape = ESCAPES[usize::from(byte)];
        if escape != 0 {
            // Every escaped byte is ASCII, so `at` is a character boundary.
            out.push_str(&text[plain..at]);
            out.push('\\');
            out.push(char::from(escape));
            if escape == b'u' {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("00");
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0xf)]));
            }
            plain = at + 1;
        }
        at += 1;
    }
    out.push_str(&text[plain..]);
    out.push('"');
}

/// The bytes of a little-endian word that JSON must escape (below 0x20, `"` and `\`), each
/// flagged by its high bit. Bytes above the lowest flagged one may be flagged falsely (a borrow
/// runs on from a match), never the lowest: callers use only that one.
fn needs_escape(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    control
        | zero_byte(word ^ (ONES * u64::from(b'"')))
        | zero_byte(word ^ (ONES * u64::from(b'\\')))
}

/// A number the host or the client wrote as text, as a JSON number: leading zeros of a whole
/// number are dropped (a `Content-Length` may have them); anything that is not JSON's number
/// syntax gives no value, so that the line stays valid JSON.
pub fn number<'a>(text: Option<impl Into<Cow<'a, str>>>) -> Option<Value<'a>> {
    let text = text?.into();
    let bytes = text.as_bytes();
    if !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit) {
        let zeros = bytes.iter().take_while(|&&b| b == b'0').count();
        let keep = zeros.min(bytes.len() - 1);
        let kept = match text {
            Cow::Borrowed(text) => Cow::Borrowed(&text[keep..]),
            Cow::Owned(text) if keep == 0 => Cow::Owned(text),
            Cow::Owned(text) => Cow::Owned(text[keep..].to_owned()),
        };
        return Some(Value::Number(kept));
    }
    is_json_number(bytes).then_some(Value::Number(text))
}

/// Whether `text` is a number in JSON's grammar (RFC 8259 section 6).
fn is_json_number(text: &[u8]) -> bool {
    let digits = |at: &mut usize| {
        let start = *at;
        while text.get(*at).is_some_and(u8::is_ascii_digit) {
            *at += 1;
        }
        *at > start
    };
    let mut at = usize::from(text.first() == Some(&b'-'));
    match text.get(at) {
        Some(b'0') => at += 1,
        Some(b'1'..=b'9') => {
            digits(&mut at);
        }
        _ => return false,
    }
    if text.get(at) == Some(&b'.') {
        at += 1;
        if !digits(&mut at) {
            return false;
        }
    }
    if matches!(text.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(text.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        if !digits(&mut at) {
            return false;
        }
    }
    at == text.len()
}

/// A small whole number in decimal, without the formatting machinery.
fn decimal(value: u16) -> String {
    let mut out = String::with_capacity(5);
    push_padded(&mut out, u32::from(value), 1);
    out
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
        let wanted = SOURCES
            .iter()
            .filter(|(index, _, _)| fields & (1 << index) != 0);
        let keys =
            properties::KeyList::new(wanted.clone().map(|(_, key, _)| key.to_string()).collect());
        let reads = wanted.map(|&(index, _, kind)| (index, kind)).collect();
        Ok(AccessLog {
            fields,
            keys,
            reads,
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

    fn reads(&self) -> Reads {
        // The status comes with every completion call. `content-length` is left out: it is
        // read only when the upstream was not called.
        let reads = Reads::new().key_list(&self.keys);
        match self.wants(field::HEADERS) {
            true => self
                .headers
                .iter()
                .fold(reads, |reads, name| reads.request_header(name)),
            false => reads,
        }
    }

    fn on_complete(&self, request: &Request, response: &Response) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // Read before `entry`, which borrows from them.
        let values = (!self.keys.keys().is_empty()).then(|| self.keys.read());
        let mut entry = Entry {
            time: (now.as_secs(), now.subsec_nanos()),
            ..Entry::default()
        };
        if let Some(values) = &values {
            for (at, &(index, kind)) in self.reads.iter().enumerate() {
                let value = values.get(at);
                entry.values[index] = match kind {
                    Kind::Text => value.map(|text| Value::Text(text.into())),
                    Kind::Number => number(value),
                    Kind::Bool => value.map(|value| Value::Bool(value == "true")),
                };
            }
        }
        // Without an upstream call, the request body's size is the client's word for it.
        if self.wants(field::BYTES_IN) && entry.values[field::BYTES_IN].is_none() {
            entry.values[field::BYTES_IN] = number(request.header("content-length"));
        }
        if self.wants(field::STATUS) {
            entry.values[field::STATUS] = Some(Value::Number(decimal(response.status()).into()));
        }
        if self.wants(field::HEADERS) {
            entry.headers = self
                .headers
                .iter()
                .filter_map(|name| request.header(name).map(|value| (name.clone(), value)))
                .collect();
        }
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

    fn entry() -> Entry<'static> {
        let mut entry = Entry {
            time: (1_764_417_600, 123_000_000),
            headers: vec![
                ("user-agent".into(), "curl".into()),
                ("authorization".into(), "Bearer s3cret".into()),
                ("X-Api-Key".into(), "k".into()),
            ],
            ..Entry::default()
        };
        let text = |value: &'static str| Some(Value::Text(value.into()));
        entry.values[field::ROUTE] = text("api");
        entry.values[field::METHOD] = text("GET");
        entry.values[field::PATH] = text("/a\nb");
        entry.values[field::QUERY] = text("x=1&token=s3cret");
        entry.values[field::STATUS] = Some(Value::Number(decimal(200).into()));
        entry.values[field::DURATION_MS] = number(Some("12.500"));
        entry.values[field::COMPLETED] = Some(Value::Bool(true));
        entry
    }

    #[test]
    fn field_indices_name_their_fields() {
        let indices = [
            (field::TIME, "time"),
            (field::REQUEST_ID, "request_id"),
            (field::ROUTE, "route"),
            (field::METHOD, "method"),
            (field::PATH, "path"),
            (field::QUERY, "query"),
            (field::STATUS, "status"),
            (field::DURATION_MS, "duration_ms"),
            (field::UPSTREAM_MS, "upstream_ms"),
            (field::CLIENT, "client"),
            (field::SUBJECT, "subject"),
            (field::CONSUMER, "consumer"),
            (field::BYTES_IN, "bytes_in"),
            (field::BYTES_OUT, "bytes_out"),
            (field::COMPLETED, "completed"),
            (field::HEADERS, "headers"),
        ];
        assert_eq!(indices.len(), FIELDS.len());
        for (index, name) in indices {
            assert_eq!(FIELDS[index], name);
        }
    }

    #[test]
    fn strings_are_written_as_json_reads_them_back() {
        for text in [
            "",
            "plain",
            "quote \" and backslash \\",
            "lines\nand\r\ttabs",
            "\u{0}\u{1}\u{1f} controls \u{7f} del",
            "unicode: é, 中文, 🦀",
            "\"\"\\\\",
        ] {
            let mut written = String::new();
            json_string(&mut written, text);
            assert!(!written.contains('\n'), "{written}");
            let read: String = serde_json::from_str(&written).unwrap();
            assert_eq!(read, text);
        }
        let mut written = String::new();
        json_string(&mut written, "a\u{1}b");
        assert_eq!(written, "\"a\\u0001b\"");
    }

    #[test]
    fn every_byte_is_escaped_at_every_offset_of_a_word() {
        // The word-at-a-time scan against a byte at a time, for each ASCII byte at each place
        // in texts of up to three words, with a second escaped byte after it (the one a borrow
        // could flag falsely).
        let reference = |text: &str| {
            let mut out = String::from('"');
            for c in text.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        };
        for byte in 0u8..0x80 {
            for len in 1..24 {
                for at in 0..len {
                    let mut text = vec![b'a'; len];
                    text[at] = byte;
                    if at + 2 < len {
                        text[at + 2] = b'"';
                    }
                    let text = String::from_utf8(text).unwrap();
                    let mut written = String::new();
                    json_string(&mut written, &text);
                    assert_eq!(written, reference(&text), "{text:?}");
                }
            }
        }
    }

    #[test]
    fn numbers_are_written_only_in_json_syntax() {
        let written = |text: &str| match number(Some(text.to_owned())) {
            Some(Value::Number(owned)) => {
                // Borrowed text reads the same.
                let borrowed = match number(Some(text)) {
                    Some(Value::Number(borrowed)) => borrowed,
                    _ => panic!("{text} read as a number only when owned"),
                };
                assert_eq!(borrowed, owned);
                Some(owned.into_owned())
            }
            _ => None,
        };
        for (text, json) in [
            ("0", "0"),
            ("18", "18"),
            ("007", "7"),
            ("000", "0"),
            ("0.123", "0.123"),
            ("12.500", "12.500"),
            ("-1.5e3", "-1.5e3"),
            ("184467440737095516150", "184467440737095516150"),
        ] {
            assert_eq!(written(text).as_deref(), Some(json), "{text}");
        }
        for bad in [
            "", "-", "1.", ".5", "01.5", "1e", "NaN", "inf", "+1", "1 ", "0x10", "1,5",
        ] {
            assert_eq!(written(bad), None, "{bad:?}");
        }
        assert_eq!(decimal(0), "0");
        assert_eq!(decimal(404), "404");
        assert_eq!(decimal(u16::MAX), "65535");
    }

    #[test]
    fn lines_are_json_with_secrets_redacted_and_controls_escaped() {
        let log = plugin(
            r#"{"headers":["user-agent","authorization","x-api-key"],"redact_headers":["X-Api-Key"]}"#,
        );
        let line = log.render(&entry());
        assert!(!line.contains('\n'), "{line}");
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["time"], "2025-11-29T12:00:00.123Z");
        assert_eq!(parsed["status"], 200);
        assert_eq!(parsed["duration_ms"], 12.5);
        assert_eq!(parsed["completed"], true);
        assert_eq!(parsed["path"], "/a\nb");
        assert_eq!(parsed["query"], "x=1&token=[redacted]");
        assert_eq!(parsed["headers"]["user-agent"], "curl");
        assert_eq!(parsed["headers"]["authorization"], "[redacted]");
        assert_eq!(parsed["headers"]["X-Api-Key"], "[redacted]");
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
