//! Where log lines go: stderr, through a buffer on each event-loop thread.
//!
//! A write system call per line was a fifth of the gateway's system calls per request with an
//! access log in the chain. An event-loop thread that opted in with [`BufferGuard::install`]
//! instead keeps its lines in a buffer of its own (no lock, no call), and writes them in one
//! call when the thread is about to wait for events (the runtime's `on_thread_park` hook calls
//! [`flush`]), when the buffer holds [`FLUSH_AT`] bytes, when its oldest line is [`MAX_DELAY`]
//! old, and when the thread ends. An idle gateway therefore writes each line at once; a busy
//! one writes a batch per turn of its event loop, as nginx does with `access_log ... buffer=`.
//! Each line is written whole: lines of different threads never interleave mid-line. What a
//! `SIGKILL` cuts short is at most one buffer per thread.
//!
//! Other threads (reloads, the epoch ticker) write straight through.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// A buffer this full is written at once.
pub const FLUSH_AT: usize = 16 << 10;

/// A line waits at most this long, even on a thread that never parks.
pub const MAX_DELAY: Duration = Duration::from_millis(100);

struct Pending {
    bytes: Vec<u8>,
    /// When the oldest line still in `bytes` was written.
    since: Option<Instant>,
}

thread_local! {
    /// `Some` on a thread that buffers its lines.
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// Buffering for the current thread's log lines, from [`BufferGuard::install`] until the guard
/// drops (which writes what is left).
#[derive(Debug)]
pub struct BufferGuard(());

impl BufferGuard {
    /// Starts buffering the current thread's lines. The thread must then call [`flush`] before
    /// it waits for anything (its runtime's `on_thread_park`).
    pub fn install() -> BufferGuard {
        PENDING.with(|pending| {
            pending.borrow_mut().get_or_insert_with(|| Pending {
                bytes: Vec::with_capacity(FLUSH_AT),
                since: None,
            });
        });
        BufferGuard(())
    }
}

impl Drop for BufferGuard {
    fn drop(&mut self) {
        flush();
        PENDING.with(|pending| pending.borrow_mut().take());
    }
}

/// Writes the current thread's buffered lines, if any.
pub fn flush() {
    // `try_with`: also called while the thread's locals are being torn down.
    let _ = PENDING.try_with(|pending| {
        if let Ok(mut pending) = pending.try_borrow_mut()
            && let Some(pending) = pending.as_mut()
        {
            write_out(pending);
        }
    });
}

fn write_out(pending: &mut Pending) {
    if !pending.bytes.is_empty() {
        // Nowhere to report a failed log write: the line is dropped, as `eprintln!` would.
        let _ = io::stderr().lock().write_all(&pending.bytes);
        pending.bytes.clear();
    }
    pending.since = None;
}

/// The log writer: buffered on threads that asked for it, straight to stderr elsewhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogOutput;

impl<'a> MakeWriter<'a> for LogOutput {
    type Writer = LogOutput;

    fn make_writer(&'a self) -> LogOutput {
        LogOutput
    }
}

impl Write for LogOutput {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let buffered = PENDING.try_with(|pending| {
            let Ok(mut pending) = pending.try_borrow_mut() else {
                return false;
            };
            let Some(pending) = pending.as_mut() else {
                return false;
            };
            pending.bytes.extend_from_slice(line);
            let now = Instant::now();
            let since = *pending.since.get_or_insert(now);
            if pending.bytes.len() >= FLUSH_AT || now.duration_since(since) >= MAX_DELAY {
                write_out(pending);
            }
            true
        });
        if buffered != Ok(true) {
            io::stderr().write_all(line)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Log line timestamps: RFC 3339 in UTC with microseconds (`2026-11-30T04:05:07.015948Z`), as
/// tracing-subscriber's default timer writes them. The date and time of day are formatted once
/// per second per thread and kept; each line formats only its microseconds. (The default timer
/// formats the whole date for every line: with an access log that was a line per request.)
#[derive(Debug, Clone, Copy, Default)]
pub struct LogTime;

thread_local! {
    /// The second last formatted on this thread, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for LogTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        write_time(w)
    }
}

/// Writes the current time as [`LogTime`] does, into any writer: a plugin line written directly
/// goes into a `String`, without the dynamic calls of tracing's `Writer`.
fn write_time(w: &mut impl std::fmt::Write) -> std::fmt::Result {
    let now = SystemTime::now();
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let second = since_epoch.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let whole = humantime::format_rfc3339_seconds(now).to_string();
            cached.1.clear();
            cached.1.push_str(whole.trim_end_matches('Z'));
            cached.0 = second;
        }
        w.write_str(&cached.1)
    })?;
    let mut fraction = *b".000000Z";
    let mut micros = since_epoch.subsec_micros();
    for digit in fraction[1..7].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    w.write_str(std::str::from_utf8(&fraction).expect("ASCII digits"))
}

/// The text format of plugin log lines (target [`PLUGIN_LOG_TARGET`]) when colour is off: the
/// same text as tracing-subscriber's `Full` format writes for them
/// (`<time> <level> wasmgate::plugin: <message> plugin="…" route="…" request_id="…" trace_id="…"`),
/// written directly. An access-log plugin writes a line per request, and the general formatter
/// (field visitors, colour wrappers that write nothing, `Debug` quoting character by character)
/// cost more than the rest of the log call. The gateway has already escaped the message and
/// checked the other fields, so nothing is escaped again, as with the general formatter
/// configured for these lines. The gateway opens no tracing spans, so there is no span context
/// to write before the target; were it to open some, `Full` would write them and this would not.
///
/// [`PLUGIN_LOG_TARGET`]: crate::runtime::PLUGIN_LOG_TARGET
#[derive(Debug, Clone, Copy, Default)]
pub struct PluginLines;

impl<S, N> FormatEvent<S, N> for PluginLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let metadata = event.metadata();
        line_start(&mut w, *metadata.level(), metadata.target())?;
        let mut fields = PlainFields {
            w: &mut w,
            result: Ok(()),
            first: true,
        };
        event.record(&mut fields);
        fields.result?;
        w.write_char('\n')
    }
}

/// The time, level and target that start a line, as the `Full` format writes them.
fn line_start(w: &mut impl std::fmt::Write, level: Level, target: &str) -> std::fmt::Result {
    write_time(w)?;
    let level = match level {
        Level::TRACE => " TRACE ",
        Level::DEBUG => " DEBUG ",
        Level::INFO => "  INFO ",
        Level::WARN => "  WARN ",
        Level::ERROR => " ERROR ",
    };
    w.write_str(level)?;
    w.write_str(target)?;
    w.write_str(": ")
}

/// A string field's value as `Debug` writes it: quoted, escaped only where it needs escaping.
fn quoted(w: &mut impl std::fmt::Write, value: &str) -> std::fmt::Result {
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ');
    if plain {
        w.write_char('"')?;
        w.write_str(value)?;
        w.write_char('"')
    } else {
        write!(w, "{value:?}")
    }
}

/// Whether plugin lines are written by [`plugin_line`] rather than through `tracing`: set by
/// the binary for the plain text format ([`write_plugin_lines_directly`]).
static DIRECT: AtomicBool = AtomicBool::new(false);

/// Has [`plugin_line`] write plugin lines itself, as [`PluginLines`] would format them. For the
/// plain text format only, which the caller has installed `PluginLines` for.
pub fn write_plugin_lines_directly() {
    DIRECT.store(true, Ordering::Relaxed);
}

/// The fields of a plugin's log line, as the host passes them to `tracing`.
#[derive(Debug, Clone, Copy)]
pub struct PluginLine<'a> {
    /// The message, escaped already.
    pub message: &'a str,
    /// The plugin's name.
    pub plugin: &'a str,
    /// The route's name.
    pub route: &'a str,
    /// The request id.
    pub request_id: &'a str,
    /// The trace id, empty without one.
    pub trace_id: &'a str,
}

thread_local! {
    /// A line being formatted, kept between lines for its capacity.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Writes a plugin's log line, if plugin lines are written directly and `enabled` (the filter's
/// verdict for the line's level): the text [`PluginLines`] writes for the same event, without
/// tracing's dispatch through the subscriber's layers and filters, which cost more than the
/// line itself (docs/performance.md, session 9). Returns `false` when the caller is to emit the
/// event through `tracing` instead.
pub fn plugin_line(level: Level, enabled: impl FnOnce() -> bool, line: PluginLine<'_>) -> bool {
    if !DIRECT.load(Ordering::Relaxed) {
        return false;
    }
    if !enabled() {
        return true;
    }
    let written = LINE.try_with(|text| {
        let Ok(mut text) = text.try_borrow_mut() else {
            return false;
        };
        text.clear();
        let formatted = format_plugin_line(&mut *text, level, line);
        formatted.is_ok() && LogOutput.write_all(text.as_bytes()).is_ok()
    });
    // Formatting cannot fail into a `String`; on a thread being torn down the line goes through
    // `tracing` instead.
    written == Ok(true)
}

fn format_plugin_line(
    w: &mut impl std::fmt::Write,
    level: Level,
    line: PluginLine<'_>,
) -> std::fmt::Result {
    line_start(w, level, crate::runtime::PLUGIN_LOG_TARGET)?;
    w.write_str(line.message)?;
    for (name, value) in [
        (" plugin=", line.plugin),
        (" route=", line.route),
        (" request_id=", line.request_id),
        (" trace_id=", line.trace_id),
    ] {
        w.write_str(name)?;
        quoted(w, value)?;
    }
    w.write_char('\n')
}

/// Writes an event's fields as the `Full` format does: the message bare, then ` name=value`.
struct PlainFields<'w, 'a> {
    w: &'w mut Writer<'a>,
    result: std::fmt::Result,
    first: bool,
}

impl PlainFields<'_, '_> {
    fn separate(&mut self, field: &Field) -> std::fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.w.write_char(' ')?;
        }
        if field.name() != "message" {
            self.w.write_str(field.name())?;
            self.w.write_char('=')?;
        }
        Ok(())
    }
}

impl Visit for PlainFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = self.separate(field).and_then(|()| {
            if field.name() == "message" {
                return self.w.write_str(value);
            }
            quoted(self.w, value)
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = self
            .separate(field)
            .and_then(|()| write!(self.w, "{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timestamp() -> String {
        let mut text = String::new();
        LogTime.format_time(&mut Writer::new(&mut text)).unwrap();
        text
    }

    #[test]
    fn timestamps_are_rfc3339_with_microseconds_and_the_current_time() {
        // Four readings 400 ms apart span 1.2 s: at least one crosses into a new second.
        for _ in 0..4 {
            let before = SystemTime::now();
            let text = timestamp();
            let after = SystemTime::now();
            // `2026-11-30T04:05:07.015948Z`
            assert_eq!(text.len(), 27, "{text}");
            assert!(text.ends_with('Z') && text.as_bytes()[19] == b'.', "{text}");
            let parsed = humantime::parse_rfc3339(&text).unwrap();
            // Microseconds: the parsed time is at most 1 µs before the time it was taken.
            assert!(
                parsed + Duration::from_micros(1) >= before && parsed <= after,
                "{text}"
            );
            // A new second on the thread formats a new date: crossing one must not keep the old.
            std::thread::sleep(Duration::from_millis(400));
        }
    }

    /// A writer into a shared buffer, for a subscriber under test.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// The lines `emit` logs through `format`, timestamps cut off.
    fn lines_with<F>(format: F, emit: impl Fn()) -> Vec<String>
    where
        F: FormatEvent<
                tracing_subscriber::Registry,
                tracing_subscriber::fmt::format::DefaultFields,
            > + Send
            + Sync
            + 'static,
    {
        use tracing_subscriber::layer::SubscriberExt;
        let out = Captured::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(out.clone())
            .with_ansi(false)
            .with_ansi_sanitization(false)
            .event_format(format);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| {
                assert!(
                    line.as_bytes()[19] == b'.' && &line[26..27] == "Z",
                    "{line}"
                );
                line[27..].to_owned()
            })
            .collect()
    }

    #[test]
    fn plugin_lines_are_the_text_the_general_formatter_writes() {
        let emit = || {
            let (plugin, route, request_id, trace_id) =
                ("access-log", "r0", "3c0a669695d2286ac336b508bc5dc990", "");
            let message = r#"{"status":200,"path":"/a b"}"#;
            tracing::info!(target: "wasmgate::plugin", plugin, route, request_id, trace_id, "{message}");
            let odd = "say \"hi\"\\ caf\u{e9}";
            tracing::warn!(target: "wasmgate::plugin", plugin = odd, route, request_id, trace_id, "careful");
            tracing::trace!(target: "wasmgate::plugin", plugin, route = "", request_id, trace_id, "t");
            tracing::error!(target: "wasmgate::plugin", plugin, route, request_id, trace_id, "");
        };
        let general = tracing_subscriber::fmt::format().with_timer(LogTime);
        let expected = lines_with(general, emit);
        assert_eq!(expected.len(), 4);
        assert_eq!(lines_with(PluginLines, emit), expected);
    }

    #[test]
    fn direct_plugin_lines_are_the_text_plugin_lines_writes() {
        let lines = [
            (
                Level::INFO,
                r#"{"status":200,"path":"/a b"}"#,
                "access-log",
                "r0",
                "",
            ),
            (
                Level::WARN,
                "careful",
                "say \"hi\"\\ caf\u{e9}",
                "r0",
                "0af7651916cd43dd8448eb211c80319c",
            ),
            (Level::TRACE, "t", "p", "", ""),
            (Level::ERROR, "", "p", "r0", ""),
        ];
        let request_id = "3c0a669695d2286ac336b508bc5dc990";
        let emit = || {
            for (level, message, plugin, route, trace_id) in lines {
                match level {
                    Level::INFO => {
                        tracing::info!(target: "wasmgate::plugin", plugin, route, request_id, trace_id, "{message}")
                    }
                    Level::WARN => {
                        tracing::warn!(target: "wasmgate::plugin", plugin, route, request_id, trace_id, "{message}")
                    }
                    Level::TRACE => {
                        tracing::trace!(target: "wasmgate::plugin", plugin, route, request_id, trace_id, "{message}")
                    }
                    _ => {
                        tracing::error!(target: "wasmgate::plugin", plugin, route, request_id, trace_id, "{message}")
                    }
                }
            }
        };
        let expected = lines_with(PluginLines, emit);
        assert_eq!(expected.len(), lines.len());
        let direct: Vec<String> = lines
            .iter()
            .map(|&(level, message, plugin, route, trace_id)| {
                let mut text = String::new();
                let line = PluginLine {
                    message,
                    plugin,
                    route,
                    request_id,
                    trace_id,
                };
                format_plugin_line(&mut Writer::new(&mut text), level, line).unwrap();
                assert!(text.ends_with('\n'), "{text}");
                text.trim_end_matches('\n')[27..].to_owned()
            })
            .collect();
        assert_eq!(direct, expected);
    }

    fn buffered_len() -> Option<usize> {
        PENDING.with(|pending| pending.borrow().as_ref().map(|p| p.bytes.len()))
    }

    #[test]
    fn lines_wait_in_the_buffer_until_a_flush_or_a_full_buffer() {
        std::thread::spawn(|| {
            assert_eq!(
                buffered_len(),
                None,
                "threads write straight through by default"
            );
            let guard = BufferGuard::install();
            LogOutput.write_all(b"one line\n").unwrap();
            assert_eq!(buffered_len(), Some(9));
            flush();
            assert_eq!(buffered_len(), Some(0));
            let long = vec![b'x'; FLUSH_AT / 2];
            LogOutput.write_all(&long).unwrap();
            assert_eq!(buffered_len(), Some(FLUSH_AT / 2));
            LogOutput.write_all(&long).unwrap();
            assert_eq!(buffered_len(), Some(0), "a full buffer is written at once");
            drop(guard);
            assert_eq!(buffered_len(), None);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_old_line_is_written_with_the_next() {
        std::thread::spawn(|| {
            let _guard = BufferGuard::install();
            LogOutput.write_all(b"first\n").unwrap();
            PENDING.with(|pending| {
                pending.borrow_mut().as_mut().unwrap().since =
                    Instant::now().checked_sub(MAX_DELAY);
            });
            LogOutput.write_all(b"second\n").unwrap();
            assert_eq!(buffered_len(), Some(0));
        })
        .join()
        .unwrap();
    }
}
