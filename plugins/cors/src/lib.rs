//! `cors`: answers CORS preflight requests and adds CORS headers to actual responses, for allowed
//! origins only.
//!
//! ```yaml
//! - name: cors
//!   config:
//!     allow_origins: ["https://app.example.com", "https://*.example.com"]   # or ["*"]
//!     allow_methods: [GET, POST]        # default GET, HEAD, POST
//!     allow_headers: [content-type, authorization]
//!     expose_headers: [x-request-id]
//!     allow_credentials: false
//!     max_age: 600                      # seconds a preflight may be cached
//! ```
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered by the
//! plugin: 204 with the CORS headers when origin, method and headers are all allowed, else 403
//! with none. An actual request from an allowed origin gets `Access-Control-Allow-Origin` (the
//! origin itself, never `*` with credentials) and `Vary: Origin`; a disallowed origin gets no CORS
//! header at all, so the browser refuses the response.

use serde::Deserialize;
use wasmgate_plugin_sdk::{
    Action, ImmediateResponse, Plugin, Reads, Request, Response, export_plugin,
};

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Origins: exact (`https://app.example.com`), a pattern with one `*` standing for a
    /// subdomain label sequence (`https://*.example.com`), or `*` for any.
    pub allow_origins: Vec<String>,
    /// Methods a preflight may ask for.
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers a preflight may ask for (case-insensitive).
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers the browser may show to scripts.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Whether credentials (cookies, HTTP auth) may be sent.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a preflight answer may be cached, in seconds.
    #[serde(default)]
    pub max_age: Option<u32>,
}

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST"].map(String::from).to_vec()
}

/// An allowed origin.
#[derive(Debug, PartialEq)]
enum OriginRule {
    Any,
    Exact(String),
    /// `prefix*suffix`, where the `*` matches one or more subdomain labels.
    Wildcard(String, String),
}

impl OriginRule {
    fn parse(text: &str) -> Result<OriginRule, String> {
        if text == "*" {
            return Ok(OriginRule::Any);
        }
        let lower = text.to_ascii_lowercase();
        if !(lower.starts_with("https://") || lower.starts_with("http://")) || lower.ends_with('/')
        {
            return Err(format!(
                "origin `{text}` must be scheme://host[:port], without a path"
            ));
        }
        match lower.split_once('*') {
            None => Ok(OriginRule::Exact(lower)),
            Some((prefix, suffix))
                if prefix.ends_with("://") && suffix.starts_with('.') && !suffix.contains('*') =>
            {
                Ok(OriginRule::Wildcard(prefix.to_string(), suffix.to_string()))
            }
            _ => Err(format!(
                "origin `{text}`: `*` may only stand for the leading labels, as in https://*.example.com"
            )),
        }
    }

    fn allows(&self, origin: &str) -> bool {
        match self {
            OriginRule::Any => true,
            OriginRule::Exact(exact) => origin.eq_ignore_ascii_case(exact),
            OriginRule::Wildcard(prefix, suffix) => {
                let origin = origin.to_ascii_lowercase();
                origin.len() > prefix.len() + suffix.len()
                    && origin.starts_with(prefix.as_str())
                    && origin.ends_with(suffix.as_str())
                    && origin[prefix.len()..origin.len() - suffix.len()]
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            }
        }
    }
}

/// The plugin.
pub struct Cors {
    origins: Vec<OriginRule>,
    methods: Vec<String>,
    headers: Vec<String>,
    expose: String,
    credentials: bool,
    max_age: Option<u32>,
}

impl Cors {
    fn origin_allowed(&self, origin: &str) -> bool {
        // `null` comes from sandboxed frames and file pages; never trust it, even under `*`.
        origin != "null" && self.origins.iter().any(|rule| rule.allows(origin))
    }

    /// The headers for an allowed origin's response.
    fn allow_origin_headers(&self, origin: &str) -> Vec<(&'static str, String)> {
        let any = !self.credentials && self.origins.contains(&OriginRule::Any);
        let mut headers = vec![(
            "access-control-allow-origin",
            if any {
                "*".to_string()
            } else {
                origin.to_string()
            },
        )];
        if self.credentials {
            headers.push(("access-control-allow-credentials", "true".into()));
        }
        headers
    }

    /// The answer to a preflight.
    fn preflight(&self, origin: &str, method: &str, requested: Option<&str>) -> ImmediateResponse {
        let method_ok = self.methods.iter().any(|m| m == method);
        let requested: Vec<String> = requested
            .unwrap_or_default()
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let headers_ok = requested.iter().all(|h| self.headers.contains(h));
        if !self.origin_allowed(origin) || !method_ok || !headers_ok {
            return ImmediateResponse::new(403).body("CORS preflight refused\n");
        }
        let mut response = ImmediateResponse::new(204)
            .header("access-control-allow-methods", self.methods.join(", "))
            .header(
                "vary",
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            );
        for (name, value) in self.allow_origin_headers(origin) {
            response = response.header(name, value);
        }
        if !requested.is_empty() {
            response = response.header("access-control-allow-headers", requested.join(", "));
        }
        if let Some(max_age) = self.max_age {
            response = response.header("access-control-max-age", max_age.to_string());
        }
        response
    }
}

impl Plugin for Cors {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let origins = config
            .allow_origins
            .iter()
            .map(|o| OriginRule::parse(o))
            .collect::<Result<Vec<_>, _>>()?;
        if origins.is_empty() {
            return Err("`allow_origins` must list at least one origin".into());
        }
        for method in &config.allow_methods {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("`{method}` is not an upper-case method"));
            }
        }
        for header in config.allow_headers.iter().chain(&config.expose_headers) {
            if header.is_empty()
                || !header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(format!("`{header}` is not a header name"));
            }
        }
        Ok(Cors {
            origins,
            methods: config.allow_methods,
            headers: config
                .allow_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            expose: config.expose_headers.join(", "),
            credentials: config.allow_credentials,
            max_age: config.max_age,
        })
    }

    fn reads(&self) -> Reads {
        // Every request's `origin`; the rest only for a preflight, read then.
        Reads::new().request_header("origin")
    }

    fn on_request(&self, request: &mut Request) -> Action {
        let Some(origin) = request.header("origin") else {
            return Action::Continue;
        };
        match request.header("access-control-request-method") {
            Some(method) if request.method() == "OPTIONS" => {
                let requested = request.header("access-control-request-headers");
                Action::Respond(self.preflight(&origin, &method, requested.as_deref()))
            }
            _ => Action::Continue,
        }
    }

    fn on_response(&self, request: &Request, response: &mut Response) {
        let Some(origin) = request.header("origin") else {
            return;
        };
        // Caches must not serve one origin's answer to another.
        let _ = response.add_header("vary", "Origin");
        if !self.origin_allowed(&origin) {
            return;
        }
        for (name, value) in self.allow_origin_headers(&origin) {
            let _ = response.set_header(name, &value);
        }
        if !self.expose.is_empty() {
            let _ = response.set_header("access-control-expose-headers", &self.expose);
        }
    }
}

export_plugin!(Cors);

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(json: &str) -> Result<Cors, String> {
        Cors::new(serde_json::from_str(json).map_err(|e| e.to_string())?)
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain_pattern() {
        let c = cors(r#"{"allow_origins":["https://app.example.com","https://*.example.org"]}"#)
            .unwrap();
        assert!(c.origin_allowed("https://app.example.com"));
        assert!(c.origin_allowed("HTTPS://APP.example.com"));
        assert!(!c.origin_allowed("https://app.example.com.evil.io"));
        assert!(!c.origin_allowed("http://app.example.com"));
        assert!(c.origin_allowed("https://a.b.example.org"));
        assert!(!c.origin_allowed("https://example.org"));
        assert!(!c.origin_allowed("https://evil.io/.example.org"));
        assert!(!c.origin_allowed("null"));
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(cors(r#"{"allow_origins":[]}"#).is_err());
        assert!(cors(r#"{"allow_origins":["app.example.com"]}"#).is_err());
        assert!(cors(r#"{"allow_origins":["https://app.*.com"]}"#).is_err());
        assert!(cors(r#"{"allow_origins":["*"],"allow_methods":["get"]}"#).is_err());
    }

    #[test]
    fn preflights_need_origin_method_and_headers_allowed() {
        let c = cors(r#"{"allow_origins":["https://app.test"],"allow_methods":["GET","PUT"],"allow_headers":["content-type"],"max_age":60,"allow_credentials":true}"#).unwrap();
        let ok = c.preflight("https://app.test", "PUT", Some("Content-Type"));
        assert_eq!(ok.status, 204);
        assert!(ok.headers.contains(&(
            "access-control-allow-origin".into(),
            "https://app.test".into()
        )));
        assert!(
            ok.headers
                .contains(&("access-control-allow-credentials".into(), "true".into()))
        );
        assert!(
            ok.headers
                .contains(&("access-control-max-age".into(), "60".into()))
        );
        for refused in [
            c.preflight("https://evil.test", "PUT", None),
            c.preflight("https://app.test", "DELETE", None),
            c.preflight("https://app.test", "PUT", Some("x-secret")),
        ] {
            assert_eq!(refused.status, 403);
            assert!(
                refused
                    .headers
                    .iter()
                    .all(|(n, _)| !n.starts_with("access-control"))
            );
        }
    }

    #[test]
    fn any_origin_is_never_star_with_credentials() {
        let c = cors(r#"{"allow_origins":["*"],"allow_credentials":true}"#).unwrap();
        assert_eq!(
            c.allow_origin_headers("https://x.test")[0].1,
            "https://x.test"
        );
        let c = cors(r#"{"allow_origins":["*"]}"#).unwrap();
        assert_eq!(c.allow_origin_headers("https://x.test")[0].1, "*");
    }
}
