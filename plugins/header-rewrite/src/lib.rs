//! `header-rewrite`: removes, renames, sets and adds request and response headers.
//!
//! ```yaml
//! plugins:
//!   - name: header-rewrite
//!     config:
//!       request:
//!         remove: [x-internal]
//!         rename: { x-old-name: x-new-name }
//!         set: { x-gateway: wasmgate, x-client: "{client_addr}" }
//!         add: { x-user: "{property.subject}", x-seen-by: "{route}" }
//!       response:
//!         set: { cache-control: no-store, x-request-id-echo: "{request_id}" }
//! ```
//!
//! Within a phase the operations run in the order remove, rename, set, add, each over its headers
//! in name order. Values may hold placeholders: `{client_addr}`, `{route}`, `{request_id}`,
//! `{header.NAME}` (a request header) and `{property.NAME}` (a request property, such as the
//! `subject` jwt-auth records); `{{` and `}}` stand for braces. A header whose placeholder has no
//! value is left alone. Names and literal text are checked when the manifest loads; a value that
//! would hold CR, LF or NUL once expanded is refused at run time, never forwarded.

use std::collections::BTreeMap;

use serde::Deserialize;
use wasmgate_plugin_sdk::{
    Action, EditHeaders, FixedEdits, HeaderEdit, HostError, ImmediateResponse, Plugin, Reads,
    Request, Response, log, properties,
};

/// The plugin's configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Rewrites applied to the request before it goes upstream.
    #[serde(default)]
    pub request: RewriteConfig,
    /// Rewrites applied to the response before it goes to the client.
    #[serde(default)]
    pub response: RewriteConfig,
}

/// One phase's rewrites, as written in the manifest.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteConfig {
    /// Headers removed, every value.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Headers renamed, old name to new name, every value kept.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Headers set to one value, replacing any others.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Values appended to headers.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
}

/// A piece of a value template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text used as is.
    Literal(String),
    /// The client's address.
    ClientAddr,
    /// The route's name.
    Route,
    /// The request id.
    RequestId,
    /// A request header's first value.
    Header(String),
    /// A request property.
    Property(String),
}

/// A header value with placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

impl Template {
    /// Parses a value template.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    let part = match name.as_str() {
                        "client_addr" => Part::ClientAddr,
                        "route" => Part::Route,
                        "request_id" => Part::RequestId,
                        _ => match name.split_once('.') {
                            Some(("header", header)) if is_token(header) => {
                                Part::Header(header.to_ascii_lowercase())
                            }
                            Some(("property", key)) if !key.is_empty() => {
                                Part::Property(key.to_string())
                            }
                            _ => return Err(format!("unknown placeholder `{{{name}}}`")),
                        },
                    };
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(part);
                }
                '}' => return Err("a lone `}` (write `}}` for a brace)".into()),
                '\r' | '\n' | '\0' => return Err("contains CR, LF or NUL".into()),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template(parts))
    }

    /// The value, when the template has no placeholder.
    pub fn literal(&self) -> Option<String> {
        match self.0.as_slice() {
            [] => Some(String::new()),
            [Part::Literal(text)] => Some(text.clone()),
            _ => None,
        }
    }

    /// Expands the template; `None` when a placeholder has no value.
    pub fn expand(&self, lookup: &dyn Fn(&Part) -> Option<String>) -> Option<String> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Literal(text) => out.push_str(text),
                other => out.push_str(&lookup(other)?),
            }
        }
        Some(out)
    }
}

/// RFC 9110 token characters.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// One phase's rewrites, checked and parsed.
#[derive(Debug, Default)]
pub struct Rewrite {
    remove: Vec<String>,
    rename: Vec<(String, String)>,
    set: Vec<(String, Template)>,
    add: Vec<(String, Template)>,
}

impl Rewrite {
    fn new(config: RewriteConfig, phase: &str) -> Result<Rewrite, String> {
        let names = config
            .remove
            .iter()
            .chain(config.rename.keys())
            .chain(config.rename.values())
            .chain(config.set.keys())
            .chain(config.add.keys());
        for name in names {
            if !is_token(name) {
                return Err(format!("{phase}: `{name}` is not a valid header name"));
            }
        }
        let templates = |map: BTreeMap<String, String>| {
            map.into_iter()
                .map(|(name, value)| {
                    let template = Template::parse(&value)
                        .map_err(|err| format!("{phase}: the value of `{name}`: {err}"))?;
                    Ok((name, template))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Rewrite {
            remove: config.remove,
            rename: config.rename.into_iter().collect(),
            set: templates(config.set)?,
            add: templates(config.add)?,
        })
    }

    /// Applies the rewrites to `target`, expanding placeholders with `lookup`. A value that
    /// expands to something a header cannot hold is skipped and reported.
    fn apply(
        &self,
        target: &mut impl EditHeaders,
        lookup: &dyn Fn(&Part) -> Option<String>,
    ) -> Result<Vec<String>, HostError> {
        let mut refused = Vec::new();
        for name in &self.remove {
            target.remove_header(name)?;
        }
        for (from, to) in &self.rename {
            let values = target.header_values(from);
            if values.is_empty() {
                continue;
            }
            target.remove_header(from)?;
            target.remove_header(to)?;
            for value in values {
                target.add_header(to, &value)?;
            }
        }
        for (edits, replace) in [(&self.set, true), (&self.add, false)] {
            for (name, template) in edits {
                let Some(value) = template.expand(lookup) else {
                    continue;
                };
                if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                    refused.push(name.clone());
                    continue;
                }
                if replace {
                    target.set_header(name, &value)?;
                } else {
                    target.add_header(name, &value)?;
                }
            }
        }
        Ok(refused)
    }
}

impl Rewrite {
    /// The rewrite as the edits it makes for every request, when nothing in it depends on the
    /// request: no renames (they carry a header's values over) and no placeholders. In the
    /// order `apply` makes them.
    fn fixed(&self) -> Option<Vec<HeaderEdit>> {
        if !self.rename.is_empty() {
            return None;
        }
        let removes = self
            .remove
            .iter()
            .map(|name| Some(HeaderEdit::Remove(name.clone())));
        let sets = self
            .set
            .iter()
            .map(|(name, value)| Some(HeaderEdit::Set(name.clone(), value.literal()?)));
        let adds = self
            .add
            .iter()
            .map(|(name, value)| Some(HeaderEdit::Add(name.clone(), value.literal()?)));
        removes.chain(sets).chain(adds).collect()
    }
}

/// Which headers a rewrite edits.
#[derive(Clone, Copy)]
enum Side {
    Request,
    Response,
}

impl Rewrite {
    /// Adds to `reads` what this rewrite reads for every request: its placeholders, and the
    /// headers it renames.
    fn reads(&self, reads: Reads, side: Side) -> Reads {
        let renamed = self
            .rename
            .iter()
            .fold(reads, |reads, (from, _)| match side {
                Side::Request => reads.request_header(from),
                Side::Response => reads.response_header(from),
            });
        self.set
            .iter()
            .chain(&self.add)
            .flat_map(|(_, template)| &template.0)
            .fold(renamed, |reads, part| match part {
                Part::Literal(_) => reads,
                Part::ClientAddr => reads.property("wasmgate.client_addr"),
                Part::Route => reads.property("wasmgate.route"),
                Part::RequestId => reads.request_header("x-request-id"),
                Part::Header(name) => reads.request_header(name),
                Part::Property(key) => reads.property(key),
            })
    }
}

/// What the placeholders of a request read, gathered before any edit.
fn lookup_for(request: &Request) -> impl Fn(&Part) -> Option<String> + '_ {
    move |part| match part {
        Part::Literal(text) => Some(text.clone()),
        Part::ClientAddr => Some(request.client_addr()),
        Part::Route => Some(request.route_name()),
        Part::RequestId => request.header("x-request-id"),
        Part::Header(name) => request.header(name),
        Part::Property(key) => properties::get(key),
    }
}

/// The header-rewrite plugin.
pub struct HeaderRewrite {
    request: Rewrite,
    response: Rewrite,
}

impl Plugin for HeaderRewrite {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(HeaderRewrite {
            request: Rewrite::new(config.request, "request")?,
            response: Rewrite::new(config.response, "response")?,
        })
    }

    fn reads(&self) -> Reads {
        let reads = self.request.reads(Reads::new(), Side::Request);
        self.response.reads(reads, Side::Response)
    }

    fn fixed_edits(&self) -> FixedEdits {
        // With fixed values (the usual rewrite), the gateway makes the edits itself, and the
        // phases below run only in a gateway older than contract 0.2.4.
        FixedEdits {
            request: self.request.fixed(),
            response: self.response.fixed(),
        }
    }

    fn on_request(&self, request: &mut Request) -> Action {
        // Placeholders read the request as it arrived here, before this phase's edits.
        let snapshot = Snapshot::of(request, &self.request);
        match self.request.apply(request, &|part| snapshot.get(part)) {
            Ok(refused) => {
                for name in refused {
                    log::warn(&format!(
                        "request header `{name}` not set: its value would hold CR, LF or NUL"
                    ));
                }
                Action::Continue
            }
            // Names were checked at load, so a refusal here is the gateway enforcing a rule of
            // its own: fail the request rather than half-apply the rewrite.
            Err(err) => {
                log::error(&format!("request rewrite refused: {err}"));
                Action::Respond(ImmediateResponse::new(500).body("header rewrite failed\n"))
            }
        }
    }

    fn on_response(&self, request: &Request, response: &mut Response) {
        match self.response.apply(response, &lookup_for(request)) {
            Ok(refused) => {
                for name in refused {
                    log::warn(&format!(
                        "response header `{name}` not set: its value would hold CR, LF or NUL"
                    ));
                }
            }
            Err(err) => log::error(&format!("response rewrite refused: {err}")),
        }
    }
}

/// Placeholder values read from the request before it is edited (the request cannot be read
/// through `&mut` while it is being changed).
struct Snapshot(Vec<(Part, Option<String>)>);

impl Snapshot {
    fn of(request: &Request, rewrite: &Rewrite) -> Snapshot {
        let lookup = lookup_for(request);
        let parts = rewrite
            .set
            .iter()
            .chain(&rewrite.add)
            .flat_map(|(_, template)| template.0.iter())
            .filter(|part| !matches!(part, Part::Literal(_)))
            .map(|part| (part.clone(), lookup(part)))
            .collect();
        Snapshot(parts)
    }

    fn get(&self, part: &Part) -> Option<String> {
        match part {
            Part::Literal(text) => Some(text.clone()),
            _ => self
                .0
                .iter()
                .find(|(p, _)| p == part)
                .and_then(|(_, v)| v.clone()),
        }
    }
}

wasmgate_plugin_sdk::export_plugin!(HeaderRewrite);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<HeaderRewrite, String> {
        let config: Config = serde_json::from_str(json).map_err(|e| e.to_string())?;
        HeaderRewrite::new(config)
    }

    #[test]
    fn fixed_values_are_fixed_edits_and_placeholders_or_renames_are_not() {
        let plugin = config(
            r#"{"request":{"add":{"x-c":"3"},"set":{"x-b":"2","x-a":"{{1}}"},"remove":["x-old"]},
                "response":{"set":{"x-r":"{route}"}}}"#,
        )
        .unwrap();
        let fixed = plugin.fixed_edits();
        // In the order the phase makes them: removes, sets (by name), adds.
        assert_eq!(
            fixed.request,
            Some(vec![
                HeaderEdit::Remove("x-old".into()),
                HeaderEdit::Set("x-a".into(), "{1}".into()),
                HeaderEdit::Set("x-b".into(), "2".into()),
                HeaderEdit::Add("x-c".into(), "3".into()),
            ])
        );
        assert_eq!(fixed.response, None);
        let renaming = config(r#"{"request":{"rename":{"x-a":"x-b"}}}"#).unwrap();
        assert_eq!(renaming.fixed_edits().request, None);
        // Nothing to do is fixed too: the phase need not be called.
        assert_eq!(renaming.fixed_edits().response, Some(Vec::new()));
    }

    #[test]
    fn accepts_valid_rules() {
        assert!(config(r#"{"request":{"set":{"x-a":"1 {route} {{x}}"},"remove":["x-b"],"rename":{"x-c":"x-d"}}}"#).is_ok());
    }

    #[test]
    fn refuses_bad_names_values_and_placeholders() {
        let err = config(r#"{"request":{"set":{"bad name":"1"}}}"#)
            .err()
            .unwrap();
        assert!(
            err.contains("`bad name` is not a valid header name"),
            "{err}"
        );
        let err = config(r#"{"response":{"add":{"x-a":"1\r\nx-b: 2"}}}"#)
            .err()
            .unwrap();
        assert!(err.contains("CR, LF or NUL"), "{err}");
        let err = config(r#"{"request":{"set":{"x-a":"{nope}"}}}"#)
            .err()
            .unwrap();
        assert!(err.contains("unknown placeholder `{nope}`"), "{err}");
        assert!(config(r#"{"request":{"rename":{"x-a":"bad name"}}}"#).is_err());
    }

    #[test]
    fn templates_expand_and_skip_missing_values() {
        let t = Template::parse("{route}:{header.x-a}:{{lit}}").unwrap();
        let lookup = |part: &Part| match part {
            Part::Route => Some("r".to_string()),
            Part::Header(name) if name == "x-a" => Some("A".to_string()),
            _ => None,
        };
        assert_eq!(t.expand(&lookup).as_deref(), Some("r:A:{lit}"));
        assert_eq!(
            Template::parse("{property.subject}")
                .unwrap()
                .expand(&lookup),
            None
        );
    }

    /// Records the edits over an in-memory header list instead of calling the gateway.
    #[derive(Default)]
    struct Recorder {
        headers: Vec<(String, String)>,
        log: Vec<String>,
    }

    impl EditHeaders for Recorder {
        fn header_values(&self, name: &str) -> Vec<String> {
            self.headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect()
        }
        fn set_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
            self.remove_header(name)?;
            self.headers.push((name.into(), value.into()));
            self.log.push(format!("set {name}={value}"));
            Ok(())
        }
        fn add_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
            self.headers.push((name.into(), value.into()));
            self.log.push(format!("add {name}={value}"));
            Ok(())
        }
        fn remove_header(&mut self, name: &str) -> Result<(), HostError> {
            self.headers.retain(|(n, _)| n != name);
            self.log.push(format!("remove {name}"));
            Ok(())
        }
    }

    #[test]
    fn applies_remove_rename_set_add_and_refuses_injected_values() {
        let rewrite = Rewrite::new(
            serde_json::from_str(
                r#"{"add":{"x-a":"2"},"set":{"x-a":"1","x-evil":"{property.p}"},"remove":["x-gone"],"rename":{"x-old":"x-new"}}"#,
            )
            .unwrap(),
            "request",
        )
        .unwrap();
        let mut target = Recorder {
            headers: vec![
                ("x-old".into(), "o1".into()),
                ("x-old".into(), "o2".into()),
                ("x-gone".into(), "g".into()),
            ],
            ..Recorder::default()
        };
        let lookup = |part: &Part| match part {
            Part::Property(_) => Some("v\r\nx-injected: 1".to_string()),
            _ => None,
        };
        let refused = rewrite.apply(&mut target, &lookup).unwrap();
        assert_eq!(refused, ["x-evil"]);
        assert_eq!(
            target.headers,
            [("x-new", "o1"), ("x-new", "o2"), ("x-a", "1"), ("x-a", "2")]
                .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        assert!(target.log.iter().all(|entry| !entry.contains("x-evil")));
    }
}
