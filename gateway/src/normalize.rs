//! Path normalisation: the one spelling of a request path that routing, plugins and the upstream
//! all see.
//!
//! A route's chain guards a path only if no other spelling of that path can reach the route's
//! upstream by another route. So the path is put into one canonical form before routing, and the
//! upstream receives exactly that form:
//!
//! - `%XX` escapes of unreserved characters (letters, digits, `-._~`) are decoded; other escapes
//!   are kept, with upper-case hex digits;
//! - `.` and `..` segments are removed (RFC 3986 section 5.2.4), also when spelled `%2E`; `..`
//!   never climbs above the root;
//! - runs of `/` are merged into one when `merge_slashes` is set;
//! - `%2F` (an encoded slash) and `\` or `%5C` (a backslash) are refused, or kept as escapes that
//!   are not separators, by config: servers disagree on whether they separate segments;
//! - a segment that some servers read as a dot-segment once their `;parameters` are dropped
//!   (`..;x`, `.;x`) is refused: Java servers turn `/public/..;/admin` into `/admin`;
//! - `%00`, other control characters and malformed escapes are refused.
//!
//! The query is left as the client sent it.

use std::borrow::Cow;

use serde::Deserialize;

/// What to do with a path character on which servers disagree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ambiguous {
    /// Answer 400.
    #[default]
    Reject,
    /// Keep it, percent-encoded, as part of its segment (never as a separator).
    Keep,
}

/// How paths are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathRules {
    /// Merge runs of `/`.
    pub merge_slashes: bool,
    /// `%2F` in a path.
    pub encoded_slashes: Ambiguous,
    /// `\` or `%5C` in a path.
    pub backslashes: Ambiguous,
}

impl Default for PathRules {
    fn default() -> Self {
        PathRules {
            merge_slashes: true,
            encoded_slashes: Ambiguous::Reject,
            backslashes: Ambiguous::Reject,
        }
    }
}

/// Why a path was refused; the text goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// `%` not followed by two hex digits.
    MalformedEscape,
    /// NUL or another control character, encoded or not.
    ControlCharacter,
    /// `%2F` while `encoded_slashes` is `reject`.
    EncodedSlash,
    /// `\` or `%5C` while `backslashes` is `reject`.
    Backslash,
    /// A segment such as `..;x`.
    DotSegmentWithParameters,
    /// Not an origin-form path.
    NotAbsolute,
}

impl BadPath {
    /// The reason given to the client.
    pub fn reason(self) -> &'static str {
        match self {
            BadPath::MalformedEscape => "bad path: malformed percent-encoding",
            BadPath::ControlCharacter => "bad path: control character",
            BadPath::EncodedSlash => "bad path: encoded slash",
            BadPath::Backslash => "bad path: backslash",
            BadPath::DotSegmentWithParameters => "bad path: dot-segment with parameters",
            BadPath::NotAbsolute => "bad path: must start with /",
        }
    }
}

/// Normalises a path; borrows it when it is already normal, which is the common case.
pub fn normalize(path: &str, rules: PathRules) -> Result<Cow<'_, str>, BadPath> {
    if !path.starts_with('/') {
        return Err(BadPath::NotAbsolute);
    }
    if is_plain(path.as_bytes(), rules) {
        return Ok(Cow::Borrowed(path));
    }
    // Decode the escapes that are safe to decode; keep the rest as canonical escapes.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        match byte {
            b'%' => {
                let value = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| Some(hex_value(hex[0])? << 4 | hex_value(hex[1])?))
                    .ok_or(BadPath::MalformedEscape)?;
                i += 3;
                match value {
                    b'/' => match rules.encoded_slashes {
                        Ambiguous::Reject => return Err(BadPath::EncodedSlash),
                        Ambiguous::Keep => decoded.push_str("%2F"),
                    },
                    b'\\' => match rules.backslashes {
                        Ambiguous::Reject => return Err(BadPath::Backslash),
                        Ambiguous::Keep => decoded.push_str("%5C"),
                    },
                    v if v < 0x20 || v == 0x7f => return Err(BadPath::ControlCharacter),
                    v if is_unreserved(v) => decoded.push(v as char),
                    v => {
                        decoded.push('%');
                        decoded.push(HEX[usize::from(v >> 4)] as char);
                        decoded.push(HEX[usize::from(v & 0xf)] as char);
                    }
                }
                continue;
            }
            b'\\' => match rules.backslashes {
                Ambiguous::Reject => return Err(BadPath::Backslash),
                Ambiguous::Keep => decoded.push_str("%5C"),
            },
            v if v < 0x20 || v == 0x7f => return Err(BadPath::ControlCharacter),
            // Any other byte is one the URI parser already accepted.
            v => decoded.push(v as char),
        }
        i += 1;
    }

    // Remove dot-segments and, by config, empty ones. The leading `/` is implied.
    let trailing_slash = decoded.ends_with('/');
    let mut segments: Vec<&str> = Vec::new();
    let mut last_was_dot = false;
    for segment in decoded[1..].split('/') {
        last_was_dot = false;
        match segment {
            "." => last_was_dot = true,
            ".." => {
                segments.pop();
                last_was_dot = true;
            }
            "" if rules.merge_slashes => {}
            s if s.starts_with(".;") || s.starts_with("..;") => {
                return Err(BadPath::DotSegmentWithParameters);
            }
            s => segments.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    // `/a/` keeps its slash, and so does `/a/.` (RFC 3986: a final dot-segment leaves one).
    if normal.is_empty() || ((trailing_slash || last_was_dot) && !normal.ends_with('/')) {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// True when the path needs no work: no escapes, backslashes, dot-segments or (when merging)
/// empty segments. Checked first because nearly every real path is like this.
fn is_plain(bytes: &[u8], rules: PathRules) -> bool {
    let mut previous = b'/';
    let mut segment_start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        match byte {
            b'%' | b'\\' => return false,
            b if b < 0x20 || b == 0x7f => return false,
            b'/' => {
                if previous == b'/' && i > 0 && rules.merge_slashes {
                    return false;
                }
                if is_dot_segment(&bytes[segment_start..i]) {
                    return false;
                }
                segment_start = i + 1;
            }
            _ => {}
        }
        previous = byte;
    }
    !is_dot_segment(&bytes[segment_start..])
}

/// `.`, `..`, or either followed by `;` (path parameters); the segment starts after its `/`.
fn is_dot_segment(segment: &[u8]) -> bool {
    let segment = segment.strip_prefix(b"/").unwrap_or(segment);
    let name = segment.split(|&b| b == b';').next().unwrap_or(segment);
    name == b"." || name == b".."
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|v| v as u8)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(path: &str) -> Result<String, BadPath> {
        normalize(path, PathRules::default()).map(Cow::into_owned)
    }

    fn keep_all() -> PathRules {
        PathRules {
            merge_slashes: false,
            encoded_slashes: Ambiguous::Keep,
            backslashes: Ambiguous::Keep,
        }
    }

    #[test]
    fn plain_paths_are_borrowed() {
        for path in ["/", "/a", "/a/b/", "/a.b/c..d/.e", "/users/42;v=1"] {
            assert!(
                matches!(normalize(path, PathRules::default()), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn dot_segments_are_removed_and_never_climb_above_the_root() {
        assert_eq!(norm("/a/./b").unwrap(), "/a/b");
        assert_eq!(norm("/a/../b").unwrap(), "/b");
        assert_eq!(norm("/public/../admin").unwrap(), "/admin");
        assert_eq!(norm("/../../admin").unwrap(), "/admin");
        assert_eq!(norm("/a/..").unwrap(), "/");
        assert_eq!(norm("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/.").unwrap(), "/");
        assert_eq!(norm("/a/%2e%2E/admin").unwrap(), "/admin");
        assert_eq!(norm("/a/.%2e/admin").unwrap(), "/admin");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_made_canonical() {
        assert_eq!(norm("/%61dmin").unwrap(), "/admin");
        assert_eq!(norm("/a%7e%2D").unwrap(), "/a~-");
        assert_eq!(norm("/a%20b%3f").unwrap(), "/a%20b%3F");
        assert_eq!(norm("/caf%c3%a9").unwrap(), "/caf%C3%A9");
    }

    #[test]
    fn slashes_merge_by_config() {
        assert_eq!(norm("//admin").unwrap(), "/admin");
        assert_eq!(norm("/a//b///").unwrap(), "/a/b/");
        assert_eq!(
            normalize("/a//b", keep_all()).unwrap(),
            Cow::Borrowed("/a//b")
        );
        assert_eq!(normalize("/a//./b", keep_all()).unwrap(), "/a//b");
    }

    #[test]
    fn ambiguous_characters_are_refused_or_kept_by_config() {
        assert_eq!(norm("/a%2fb"), Err(BadPath::EncodedSlash));
        assert_eq!(norm("/a%5cb"), Err(BadPath::Backslash));
        assert_eq!(norm("/a\\b"), Err(BadPath::Backslash));
        assert_eq!(normalize("/a%2fb", keep_all()).unwrap(), "/a%2Fb");
        assert_eq!(normalize("/a\\..\\b", keep_all()).unwrap(), "/a%5C..%5Cb");
        // A kept encoded slash is not a separator, so it cannot hide a dot-segment.
        assert_eq!(normalize("/a/..%2f/b", keep_all()).unwrap(), "/a/..%2F/b");
    }

    #[test]
    fn malformed_and_dangerous_paths_are_refused() {
        assert_eq!(norm("/a%zz"), Err(BadPath::MalformedEscape));
        assert_eq!(norm("/a%4"), Err(BadPath::MalformedEscape));
        assert_eq!(norm("/a%00b"), Err(BadPath::ControlCharacter));
        assert_eq!(norm("/a%0d%0a"), Err(BadPath::ControlCharacter));
        assert_eq!(
            norm("/public/..;/admin"),
            Err(BadPath::DotSegmentWithParameters)
        );
        assert_eq!(norm("/.;x/admin"), Err(BadPath::DotSegmentWithParameters));
        assert_eq!(norm("*"), Err(BadPath::NotAbsolute));
    }
}
