//! `jwt-auth`: bearer-token authentication with JSON Web Tokens, verified inside the sandbox with
//! jsonwebtoken (pure-Rust crypto), following RFC 8725 (JWT best current practices).
//!
//! ```yaml
//! - name: jwt-auth
//!   config:
//!     algorithms: [RS256]                  # the allow-list; nothing else is ever accepted
//!     keys:
//!       - { kid: main, pem: { $file: keys/rsa.pub } }
//!       - { kid: legacy, secret: { $env: JWT_SECRET } }   # an HMAC key, for HS* only
//!     jwks: { $file: jwks.json }           # or an inline JWKS object
//!     issuers: [https://auth.example.com]  # when set, `iss` must be present and listed
//!     audiences: [api]                     # when set, `aud` must be present and match
//!     leeway: 30                           # seconds of clock skew allowed (default 30)
//!     required_claims: [sub]
//!     require: { scopes: [orders:read], claims: { tier: gold } }   # else 403
//!     token: { header: authorization }     # default; or { cookie: NAME } or { query: NAME }
//!     max_token_bytes: 8192
//!     forward_claims: { sub: x-user-id }   # client-sent x-user-id is removed first
//!     strip_authorization: false
//! ```
//!
//! Verification is in [`Verifier`], which knows nothing of the gateway, so it is unit-tested on
//! the host.

use std::collections::BTreeMap;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, Header, Validation, decode, decode_header,
};
use serde::Deserialize;
use serde_json::{Map, Value};
use wasmgate_plugin_sdk::{
    Action, ImmediateResponse, Plugin, Reads, Request, export_plugin, properties,
};

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Accepted algorithms. Required: the token's `alg` header never chooses on its own.
    pub algorithms: Vec<Algorithm>,
    /// Keys, each optionally with a `kid`.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// A JWKS document, as an object or as JSON text (from `{ $file: ... }`).
    #[serde(default)]
    pub jwks: Option<Value>,
    /// Accepted issuers; when set, `iss` is required.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Accepted audiences; when set, `aud` is required.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway: u64,
    /// Claims that must be present.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// What an authenticated caller must also have, or get 403.
    #[serde(default)]
    pub require: Requirements,
    /// Where the token is taken from.
    #[serde(default)]
    pub token: TokenSource,
    /// Tokens longer than this are refused before any decoding.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Claims forwarded upstream, claim name to header name.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Removes the `Authorization` header before the request goes upstream.
    #[serde(default)]
    pub strip_authorization: bool,
    /// The `realm` in `WWW-Authenticate`.
    #[serde(default)]
    pub realm: Option<String>,
}

fn default_leeway() -> u64 {
    30
}

fn default_max_token_bytes() -> usize {
    8 << 10
}

/// One verification key. Exactly one of `secret`, `secret_base64` and `pem`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Matched against the token's `kid` header.
    #[serde(default)]
    pub kid: Option<String>,
    /// An HMAC secret, as text.
    #[serde(default)]
    pub secret: Option<String>,
    /// An HMAC secret, base64-encoded.
    #[serde(default)]
    pub secret_base64: Option<String>,
    /// A PEM public key: RSA, EC (P-256, P-384) or Ed25519.
    #[serde(default)]
    pub pem: Option<String>,
}

/// Authorisation requirements, checked after authentication.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Scopes that must all be granted (`scope`, space-separated, or `scp`, a list).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Claims that must equal these values (or, for a list claim, contain them).
    #[serde(default)]
    pub claims: BTreeMap<String, Value>,
}

/// Where the token comes from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum TokenSource {
    /// A header; `authorization` expects the `Bearer` scheme, any other holds the bare token.
    Header(String),
    /// A cookie.
    Cookie(String),
    /// A query parameter.
    Query(String),
}

impl Default for TokenSource {
    fn default() -> Self {
        TokenSource::Header("authorization".into())
    }
}

/// A key ready to verify with.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// Why a request is refused, as RFC 6750 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token at all: 401 with a bare challenge.
    Missing,
    /// A malformed request, such as two tokens: 400 `invalid_request`.
    InvalidRequest,
    /// A token that does not verify: 401 `invalid_token`. The reason is for tests and debug
    /// logs only; the client never sees it.
    InvalidToken(&'static str),
    /// A valid token without the scope or claims the route requires: 403 `insufficient_scope`.
    InsufficientScope,
}

/// HS256 keys made ready once. An HMAC keyed with a secret has already hashed the secret's inner
/// and outer pads: two of the six or seven SHA-256 blocks that verifying a typical token takes.
/// jsonwebtoken's own verifier keys a new HMAC for every token; the crypto provider installed
/// here hands out a copy of the one prepared for the key instead, and leaves every other
/// algorithm (and any key not prepared) to jsonwebtoken's pure-Rust provider.
mod keyed_hmac {
    use std::cell::RefCell;
    use std::sync::OnceLock;

    use hmac::{Hmac, KeyInit, Mac};
    use jsonwebtoken::crypto::{CryptoProvider, JwtVerifier, rust_crypto};
    use jsonwebtoken::errors::Error;
    use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
    use sha2::Sha256;

    thread_local! {
        /// Prepared HMACs by key bytes. A plugin instance is single-threaded, and has a few keys.
        static KEYED: RefCell<Vec<(Vec<u8>, Hmac<Sha256>)>> = const { RefCell::new(Vec::new()) };
    }

    /// Prepares `key` for HS256, if it is an HMAC secret, and installs the provider that uses it.
    pub fn prepare(key: &DecodingKey) {
        static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
        let provider = PROVIDER.get_or_init(|| CryptoProvider {
            verifier_factory: verifier,
            ..rust_crypto::DEFAULT_PROVIDER.clone()
        });
        // Already installed by an earlier configuration of this instance: the same provider.
        let _ = provider.install_default();
        if key.family() != AlgorithmFamily::Hmac {
            return;
        }
        let Ok(bytes) = key.try_get_as_bytes() else {
            return;
        };
        let Ok(mac) = Hmac::<Sha256>::new_from_slice(bytes) else {
            return;
        };
        KEYED.with(|keyed| {
            let mut keyed = keyed.borrow_mut();
            if !keyed.iter().any(|(known, _)| known == bytes) {
                keyed.push((bytes.to_vec(), mac));
            }
        });
    }

    /// Whether this thread holds a prepared HMAC for `secret`.
    #[cfg(test)]
    pub fn is_prepared(secret: &[u8]) -> bool {
        KEYED.with(|keyed| keyed.borrow().iter().any(|(known, _)| known == secret))
    }

    fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
        if *alg == Algorithm::HS256
            && key.family() == AlgorithmFamily::Hmac
            && let Ok(bytes) = key.try_get_as_bytes()
        {
            let prepared = KEYED.with(|keyed| {
                let keyed = keyed.borrow();
                keyed
                    .iter()
                    .find(|(known, _)| known == bytes)
                    .map(|(_, mac)| mac.clone())
            });
            if let Some(mac) = prepared {
                return Ok(Box::new(Hs256(mac)));
            }
        }
        (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(alg, key)
    }

    struct Hs256(Hmac<Sha256>);

    impl signature::Verifier<Vec<u8>> for Hs256 {
        fn verify(&self, message: &[u8], tag: &Vec<u8>) -> Result<(), signature::Error> {
            let mut mac = self.0.clone();
            mac.update(message);
            // Constant-time comparison.
            mac.verify_slice(tag).map_err(signature::Error::from_source)
        }
    }

    impl JwtVerifier for Hs256 {
        fn algorithm(&self) -> Algorithm {
            Algorithm::HS256
        }
    }
}

/// What a token signed with `alg` must satisfy under `config`.
fn validation(config: &Config, alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.algorithms = vec![alg];
    validation.leeway = config.leeway;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required = vec!["exp".to_string()];
    if config.issuers.is_empty() {
        validation.iss = None;
    } else {
        validation.set_issuer(&config.issuers);
        required.push("iss".into());
    }
    if config.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&config.audiences);
        required.push("aud".into());
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Verifies tokens against a configuration.
pub struct Verifier {
    config: Config,
    keys: Vec<Key>,
    /// The checks for each allowed algorithm, built once: a `Validation` is a handful of hash
    /// sets, which cost more to build for every request than the claims cost to check.
    validations: Vec<(Algorithm, Validation)>,
    /// Whether the route reads claims other than `sub` (to forward, require or demand them).
    /// Only then is every claim of a token parsed into a map: for a small token that parse cost
    /// about a sixth of the plugin's work per request (docs/performance.md, "Session 13").
    reads_claims: bool,
    /// With a single key and several algorithms, the checks for all of them at once (all of
    /// the key's family, which the configuration check ensures). See [`Verifier::one_key`].
    one_key_checks: Option<Validation>,
}

impl Verifier {
    /// Checks the configuration and prepares the keys.
    pub fn new(config: Config) -> Result<Verifier, String> {
        if config.algorithms.is_empty() {
            return Err("`algorithms` must list at least one algorithm".into());
        }
        let mut keys = Vec::new();
        for (i, key) in config.keys.iter().enumerate() {
            let at = || format!("keys[{i}]");
            let material = [
                key.secret.is_some(),
                key.secret_base64.is_some(),
                key.pem.is_some(),
            ];
            if material.iter().filter(|m| **m).count() != 1 {
                return Err(format!(
                    "{}: give exactly one of `secret`, `secret_base64`, `pem`",
                    at()
                ));
            }
            let decoded = if let Some(secret) = &key.secret {
                if secret.len() < 32 {
                    // RFC 7518 section 3.2: an HS256 key at least as long as the hash.
                    return Err(format!(
                        "{}: an HMAC secret must be at least 32 bytes",
                        at()
                    ));
                }
                DecodingKey::from_secret(secret.as_bytes())
            } else if let Some(secret) = &key.secret_base64 {
                DecodingKey::from_base64_secret(secret)
            } else {
                let pem = key.pem.as_deref().unwrap_or_default().as_bytes();
                DecodingKey::from_rsa_pem(pem)
                    .or_else(|_| DecodingKey::from_ec_pem(pem))
                    .or_else(|_| DecodingKey::from_ed_pem(pem))
            };
            let decoded = decoded.map_err(|err| format!("{}: not a usable key: {err}", at()))?;
            keyed_hmac::prepare(&decoded);
            keys.push(Key {
                kid: key.kid.clone(),
                key: decoded,
            });
        }
        if let Some(jwks) = &config.jwks {
            let set: JwkSet = match jwks {
                Value::String(text) => serde_json::from_str(text),
                other => serde_json::from_value(other.clone()),
            }
            .map_err(|err| format!("jwks: not a JWK set: {err}"))?;
            for (i, jwk) in set.keys.iter().enumerate() {
                let key =
                    DecodingKey::from_jwk(jwk).map_err(|err| format!("jwks.keys[{i}]: {err}"))?;
                keyed_hmac::prepare(&key);
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    key,
                });
            }
        }
        if keys.is_empty() {
            return Err("no keys: give `keys` or `jwks`".into());
        }
        for alg in &config.algorithms {
            if !keys.iter().any(|k| k.key.family() == alg.family()) {
                return Err(format!("no key can verify {alg:?}"));
            }
        }
        if config.max_token_bytes == 0 {
            return Err("`max_token_bytes` must be positive".into());
        }
        let validations = config
            .algorithms
            .iter()
            .map(|&alg| (alg, validation(&config, alg)))
            .collect();
        let require = &config.require;
        let reads_claims = !(config.forward_claims.is_empty()
            && config.required_claims.is_empty()
            && require.scopes.is_empty()
            && require.claims.is_empty());
        // Built for every instance: with one algorithm, the checks of that algorithm serve.
        let one_key_checks = (keys.len() == 1 && config.algorithms.len() > 1).then(|| {
            let mut checks = validation(&config, config.algorithms[0]);
            checks.algorithms = config.algorithms.clone();
            checks
        });
        Ok(Verifier {
            config,
            keys,
            validations,
            reads_claims,
            one_key_checks,
        })
    }

    /// With a single key, the checks for every allowed algorithm: the token's header is then
    /// parsed once, by jsonwebtoken as it verifies, rather than once to choose the key and
    /// again to verify.
    fn one_key(&self) -> Option<&Validation> {
        match (&self.keys[..], &self.one_key_checks) {
            ([_], Some(checks)) => Some(checks),
            ([_], None) => self.validations.first().map(|(_, checks)| checks),
            _ => None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Verifies a token and the route's requirements; returns the claims the route reads: all
    /// of them when its configuration names claims, else `sub` alone.
    pub fn verify(&self, token: &str) -> Result<Map<String, Value>, Refusal> {
        use Refusal::InvalidToken;
        // Checked before anything is decoded: a huge token costs nothing but this comparison.
        if token.len() > self.config.max_token_bytes {
            return Err(InvalidToken("too long"));
        }
        let claims = match self.one_key() {
            // The usual case: jsonwebtoken reads the header as it verifies, and the token's
            // `kid` is checked against the key after. A token refused this way is read again
            // the long way, only to name the reason.
            Some(validation) => match self.decode(token, &self.keys[0].key, validation) {
                Ok((header, claims)) => {
                    self.key_for(header.kid.as_deref(), header.alg)?;
                    claims
                }
                Err(_) => self.verify_with_header(token)?,
            },
            None => self.verify_with_header(token)?,
        };
        if self
            .config
            .required_claims
            .iter()
            .any(|c| !claims.contains_key(c))
        {
            return Err(InvalidToken("missing claim"));
        }
        if !self.authorised(&claims) {
            return Err(Refusal::InsufficientScope);
        }
        Ok(claims)
    }

    /// Reads the token's header first, to choose the key by `kid` and the checks by `alg`,
    /// then verifies.
    fn verify_with_header(&self, token: &str) -> Result<Map<String, Value>, Refusal> {
        use Refusal::InvalidToken;
        let header = decode_header(token).map_err(|_| InvalidToken("malformed"))?;
        // The allow-list decides, never the token (RFC 8725 section 3.1); `none` cannot even be
        // named in the configuration.
        if !self.config.algorithms.contains(&header.alg) {
            return Err(InvalidToken("algorithm not allowed"));
        }
        let key = self.key_for(header.kid.as_deref(), header.alg)?;
        let validation = self
            .validations
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .map(|(_, validation)| validation)
            .ok_or(InvalidToken("algorithm not allowed"))?;
        let (_, claims) = self.decode(token, key, validation).map_err(|err| {
            use jsonwebtoken::errors::ErrorKind;
            InvalidToken(match err.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not yet valid",
                ErrorKind::InvalidIssuer => "wrong issuer",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::MissingRequiredClaim(_) => "missing claim",
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::InvalidAlgorithm => "algorithm does not fit the key",
                _ => "malformed",
            })
        })?;
        Ok(claims)
    }

    /// jsonwebtoken's verification, with the claims the route reads.
    fn decode(
        &self,
        token: &str,
        key: &DecodingKey,
        validation: &Validation,
    ) -> jsonwebtoken::errors::Result<(Header, Map<String, Value>)> {
        if self.reads_claims {
            decode::<Map<String, Value>>(token, key, validation)
                .map(|data| (data.header, data.claims))
        } else {
            decode::<Subject>(token, key, validation)
                .map(|data| (data.header, data.claims.into_claims()))
        }
    }

    /// The key for a token: the one with its `kid`, or, without a `kid`, the one key without a
    /// `kid`. It must be of the algorithm's family, so a public key can never serve as an HMAC
    /// secret (algorithm confusion, RFC 8725 section 2.1).
    fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<&DecodingKey, Refusal> {
        let family: AlgorithmFamily = alg.family();
        let mut candidates = self.keys.iter().filter(|k| k.kid.as_deref() == kid);
        let key = match (kid, candidates.next(), candidates.next()) {
            (_, Some(key), None) => key,
            (None, None, _) if self.keys.len() == 1 => &self.keys[0],
            (Some(_), None, _) => return Err(Refusal::InvalidToken("unknown kid")),
            _ => return Err(Refusal::InvalidToken("no single key for the token")),
        };
        if key.key.family() != family {
            return Err(Refusal::InvalidToken("algorithm does not fit the key"));
        }
        Ok(&key.key)
    }

    fn authorised(&self, claims: &Map<String, Value>) -> bool {
        let require = &self.config.require;
        if !require.scopes.is_empty() {
            let granted: Vec<&str> = match (claims.get("scope"), claims.get("scp")) {
                (Some(Value::String(scope)), _) => scope.split(' ').collect(),
                (_, Some(Value::Array(list))) => list.iter().filter_map(Value::as_str).collect(),
                (_, Some(Value::String(scope))) => scope.split(' ').collect(),
                _ => Vec::new(),
            };
            if !require.scopes.iter().all(|s| granted.contains(&s.as_str())) {
                return false;
            }
        }
        require
            .claims
            .iter()
            .all(|(name, wanted)| match claims.get(name) {
                Some(Value::Array(items)) if !wanted.is_array() => items.contains(wanted),
                Some(value) => value == wanted,
                None => false,
            })
    }
}

/// The claims of a token read for `sub` alone: every other value is skipped, not built. Like a
/// map of the claims, it takes only a JSON object.
struct Subject(Option<Value>);

impl Subject {
    fn into_claims(self) -> Map<String, Value> {
        let mut claims = Map::new();
        if let Some(sub) = self.0 {
            claims.insert("sub".into(), sub);
        }
        claims
    }
}

impl<'de> Deserialize<'de> for Subject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Subject, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, Visitor};

        /// A claim name, compared with `sub` where it lies in the JSON (no copy).
        struct IsSub(bool);
        impl<'de> Deserialize<'de> for IsSub {
            fn deserialize<D: serde::Deserializer<'de>>(names: D) -> Result<IsSub, D::Error> {
                struct Name;
                impl Visitor<'_> for Name {
                    type Value = IsSub;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a claim name")
                    }
                    fn visit_str<E>(self, name: &str) -> Result<IsSub, E> {
                        Ok(IsSub(name == "sub"))
                    }
                }
                names.deserialize_str(Name)
            }
        }

        struct Claims;
        impl<'de> Visitor<'de> for Claims {
            type Value = Subject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of claims")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut claims: A) -> Result<Subject, A::Error> {
                let mut sub = None;
                while let Some(IsSub(is_sub)) = claims.next_key()? {
                    if is_sub {
                        sub = Some(claims.next_value()?);
                    } else {
                        claims.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Subject(sub))
            }
        }
        deserializer.deserialize_map(Claims)
    }
}

/// The tokens a request carries in the configured place, plus `access_token` query parameters
/// when the token is expected in a header (RFC 6750 forbids using two methods at once).
fn find_tokens(request: &Request, source: &TokenSource) -> Vec<String> {
    let mut tokens = Vec::new();
    match source {
        TokenSource::Header(name) => {
            for value in request.header_values(name) {
                if name.eq_ignore_ascii_case("authorization") {
                    match value.split_once(' ') {
                        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                            tokens.push(token.trim().to_string())
                        }
                        // Another scheme (Basic, ...) is not ours to judge, but it is not a
                        // token either: count it, so that it cannot sit beside one unseen.
                        _ => tokens.push(String::new()),
                    }
                } else {
                    tokens.push(value);
                }
            }
            tokens.extend(query_values(request, "access_token"));
        }
        TokenSource::Cookie(name) => {
            for header in request.header_values("cookie") {
                for pair in header.split(';') {
                    if let Some((key, value)) = pair.trim().split_once('=')
                        && key == name
                    {
                        tokens.push(value.to_string());
                    }
                }
            }
        }
        TokenSource::Query(name) => tokens.extend(query_values(request, name)),
    }
    tokens
}

fn query_values(request: &Request, name: &str) -> Vec<String> {
    let Some(query) = request.query() else {
        return Vec::new();
    };
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string())
        .collect()
}

/// The answer to a refused request: status, challenge and a body that names only the error code.
fn refuse(refusal: &Refusal, realm: Option<&str>) -> ImmediateResponse {
    let (status, error) = match refusal {
        Refusal::Missing => (401, None),
        Refusal::InvalidRequest => (400, Some("invalid_request")),
        Refusal::InvalidToken(_) => (401, Some("invalid_token")),
        Refusal::InsufficientScope => (403, Some("insufficient_scope")),
    };
    let mut challenge = String::from("Bearer");
    let mut params = Vec::new();
    if let Some(realm) = realm {
        params.push(format!("realm=\"{realm}\""));
    }
    if let Some(error) = error {
        params.push(format!("error=\"{error}\""));
    }
    if !params.is_empty() {
        challenge.push(' ');
        challenge.push_str(&params.join(", "));
    }
    let body = match error {
        Some(error) => format!("{{\"error\":\"{error}\"}}\n"),
        None => "{\"error\":\"unauthorized\"}\n".to_string(),
    };
    ImmediateResponse::new(status)
        .header("www-authenticate", challenge)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(body)
}

/// A claim as a header value, or `None` when it cannot be one (a control character, or an
/// object).
fn header_value(claim: &Value) -> Option<String> {
    let text = match claim {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .or_else(|| item.as_number().map(|n| n.to_string()))
            })
            .collect::<Option<Vec<_>>>()?
            .join(","),
        _ => return None,
    };
    (!text.chars().any(char::is_control)).then_some(text)
}

/// The plugin.
pub struct JwtAuth {
    verifier: Verifier,
}

impl Plugin for JwtAuth {
    type Config = Config;
    const AUTH: bool = true;
    const ON_RESPONSE: bool = false;

    fn new(config: Config) -> Result<Self, String> {
        for header in config.forward_claims.values() {
            if header.is_empty()
                || !header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(format!("forward_claims: `{header}` is not a header name"));
            }
        }
        Ok(JwtAuth {
            verifier: Verifier::new(config)?,
        })
    }

    fn reads(&self) -> Reads {
        // What `find_tokens` reads, for every request.
        let query = Reads::new().property("wasmgate.query");
        match &self.verifier.config().token {
            TokenSource::Header(name) => query.request_header(name),
            TokenSource::Cookie(_) => Reads::new().request_header("cookie"),
            TokenSource::Query(_) => query,
        }
    }

    fn on_request(&self, request: &mut Request) -> Action {
        let config = self.verifier.config();
        let realm = config.realm.as_deref();
        let tokens = find_tokens(request, &config.token);
        let token = match tokens.as_slice() {
            [] => return Action::Respond(refuse(&Refusal::Missing, realm)),
            [token] if !token.is_empty() => token,
            [_] => {
                return Action::Respond(refuse(
                    &Refusal::InvalidToken("not a bearer token"),
                    realm,
                ));
            }
            _ => return Action::Respond(refuse(&Refusal::InvalidRequest, realm)),
        };
        let claims = match self.verifier.verify(token) {
            Ok(claims) => claims,
            Err(refusal) => return Action::Respond(refuse(&refusal, realm)),
        };
        for (claim, header) in &config.forward_claims {
            // Whatever the client sent under this name goes, whether or not the claim is there:
            // setting replaces every value, and without the claim the header is removed.
            let forwarded = match claims.get(claim).and_then(header_value) {
                Some(value) => request.set_header(header, &value),
                None => request.remove_header(header),
            };
            if forwarded.is_err() {
                return Action::Respond(ImmediateResponse::new(500));
            }
        }
        if config.strip_authorization && request.remove_header("authorization").is_err() {
            return Action::Respond(ImmediateResponse::new(500));
        }
        if let Some(subject) = claims.get("sub").and_then(Value::as_str) {
            let _ = properties::set("subject", subject);
        }
        Action::Continue
    }
}

export_plugin!(JwtAuth);

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

    fn verifier(extra: Value) -> Result<Verifier, String> {
        let mut config = serde_json::json!({
            "algorithms": ["HS256"],
            "keys": [{ "secret": SECRET }],
        });
        if let (Value::Object(base), Value::Object(extra)) = (&mut config, extra) {
            base.extend(extra);
        }
        Verifier::new(serde_json::from_value(config).map_err(|e| e.to_string())?)
    }

    fn token(claims: Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    #[test]
    fn config_is_checked() {
        assert!(verifier(serde_json::json!({})).is_ok());
        let err = verifier(serde_json::json!({ "algorithms": [] }))
            .err()
            .unwrap();
        assert!(err.contains("at least one algorithm"), "{err}");
        let err = verifier(serde_json::json!({ "keys": [{ "secret": "short" }] }))
            .err()
            .unwrap();
        assert!(err.contains("at least 32 bytes"), "{err}");
        let err = verifier(serde_json::json!({ "algorithms": ["RS256"] }))
            .err()
            .unwrap();
        assert!(err.contains("no key can verify RS256"), "{err}");
        // `none` is not an algorithm jsonwebtoken can even name.
        assert!(verifier(serde_json::json!({ "algorithms": ["none"] })).is_err());
    }

    #[test]
    fn an_inline_jwks_object_selects_keys_by_kid() {
        let k = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYtdGVzdC1zZWNyZXQ"; // base64url(SECRET)
        let config = serde_json::json!({
            "algorithms": ["HS256"],
            "jwks": { "keys": [{ "kty": "oct", "kid": "inline-1", "alg": "HS256", "k": k }] },
        });
        let v = Verifier::new(serde_json::from_value(config).unwrap()).unwrap();
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("inline-1".into());
        let claims = serde_json::json!({ "exp": now() + 60 });
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        assert!(v.verify(&token).is_ok());
        header.kid = Some("inline-2".into());
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        assert_eq!(v.verify(&token), Err(Refusal::InvalidToken("unknown kid")));
    }

    #[test]
    fn hs256_signatures_are_checked_with_the_prepared_key() {
        let v = verifier(serde_json::json!({})).unwrap();
        assert!(keyed_hmac::is_prepared(SECRET.as_bytes()));
        let claims = serde_json::json!({ "exp": now() + 60 });
        assert!(v.verify(&token(claims.clone())).is_ok());
        let other =
            jsonwebtoken::EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes").unwrap();
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &other,
        )
        .unwrap();
        assert_eq!(
            v.verify(&forged),
            Err(Refusal::InvalidToken("bad signature"))
        );
        // One signature character changed (not the last, whose low bits base64 may ignore).
        let genuine = token(claims);
        let at = genuine.rfind('.').unwrap() + 5;
        let flipped = if genuine.as_bytes()[at] == b'A' {
            "B"
        } else {
            "A"
        };
        let altered = format!("{}{flipped}{}", &genuine[..at], &genuine[at + 1..]);
        assert_eq!(
            v.verify(&altered),
            Err(Refusal::InvalidToken("bad signature"))
        );
    }

    #[test]
    fn valid_tokens_pass_and_claims_come_back() {
        let v = verifier(serde_json::json!({})).unwrap();
        let claims = v
            .verify(&token(
                serde_json::json!({ "sub": "alice", "exp": now() + 60 }),
            ))
            .unwrap();
        assert_eq!(claims["sub"], "alice");
    }

    #[test]
    fn a_route_that_names_no_claims_gets_sub_alone_and_one_that_does_gets_all() {
        let claims = serde_json::json!({ "sub": "alice", "tier": "gold", "exp": now() + 60 });
        let v = verifier(serde_json::json!({})).unwrap();
        let read = v.verify(&token(claims.clone())).unwrap();
        assert_eq!(Value::Object(read), serde_json::json!({ "sub": "alice" }));
        let v = verifier(serde_json::json!({ "forward_claims": { "tier": "x-tier" } })).unwrap();
        let read = v.verify(&token(claims.clone())).unwrap();
        assert_eq!(Value::Object(read), claims);

        // Read for `sub` alone, claims still follow JSON: any value, a name written with an
        // escape, and only an object. (A `sub` given twice jsonwebtoken refuses itself, as it
        // reads the claims it checks: RFC 7519 section 4 allows either refusing or the last.)
        let v = verifier(serde_json::json!({})).unwrap();
        let read = v
            .verify(&token(serde_json::json!({ "sub": 42, "exp": now() + 60 })))
            .unwrap();
        assert_eq!(read["sub"], 42);
        let read = v
            .verify(&token(serde_json::json!({ "exp": now() + 60 })))
            .unwrap();
        assert!(read.is_empty());
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        let header = jsonwebtoken::Header::new(Algorithm::HS256);
        let exp = now() + 60;
        let signed = |text: String| {
            let raw = serde_json::value::RawValue::from_string(text).unwrap();
            jsonwebtoken::encode(&header, &raw, &key).unwrap()
        };
        let escaped = signed(format!(r#"{{"s\u0075b":"c","exp":{exp}}}"#));
        assert_eq!(v.verify(&escaped).unwrap()["sub"], "c");
        let twice = signed(format!(r#"{{"sub":"a","exp":{exp},"sub":"b"}}"#));
        assert_eq!(v.verify(&twice), Err(Refusal::InvalidToken("malformed")));
        let array = token(serde_json::json!([exp, "alice"]));
        assert_eq!(v.verify(&array), Err(Refusal::InvalidToken("malformed")));
    }

    #[test]
    fn with_one_key_the_header_is_still_held_to_the_allow_list_and_the_kid() {
        let claims = serde_json::json!({ "exp": now() + 60 });
        let sign = |alg, kid: Option<&str>| {
            let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
            let mut header = jsonwebtoken::Header::new(alg);
            header.kid = kid.map(str::to_string);
            jsonwebtoken::encode(&header, &claims, &key).unwrap()
        };
        let v = verifier(serde_json::json!({})).unwrap();
        assert_eq!(
            v.verify(&sign(Algorithm::HS384, None)),
            Err(Refusal::InvalidToken("algorithm not allowed"))
        );
        assert_eq!(
            v.verify(&sign(Algorithm::HS256, Some("other"))),
            Err(Refusal::InvalidToken("unknown kid"))
        );
        let both = serde_json::json!({ "algorithms": ["HS256", "HS384"] });
        let v = verifier(both).unwrap();
        assert!(v.verify(&sign(Algorithm::HS384, None)).is_ok());
        assert!(v.verify(&sign(Algorithm::HS256, None)).is_ok());
        assert_eq!(
            v.verify(&sign(Algorithm::HS512, None)),
            Err(Refusal::InvalidToken("algorithm not allowed"))
        );
        let keyed = serde_json::json!({ "keys": [{ "kid": "main", "secret": SECRET }] });
        let v = verifier(keyed).unwrap();
        assert!(v.verify(&sign(Algorithm::HS256, Some("main"))).is_ok());
        assert!(v.verify(&sign(Algorithm::HS256, None)).is_ok());
        assert_eq!(
            v.verify(&sign(Algorithm::HS256, Some("other"))),
            Err(Refusal::InvalidToken("unknown kid"))
        );
    }

    #[test]
    fn time_claims_are_enforced_with_leeway() {
        let v = verifier(serde_json::json!({ "leeway": 5 })).unwrap();
        let expired = token(serde_json::json!({ "exp": now() - 60 }));
        assert_eq!(v.verify(&expired), Err(Refusal::InvalidToken("expired")));
        let within_leeway = token(serde_json::json!({ "exp": now() - 2 }));
        assert!(v.verify(&within_leeway).is_ok());
        let early = token(serde_json::json!({ "exp": now() + 600, "nbf": now() + 300 }));
        assert_eq!(
            v.verify(&early),
            Err(Refusal::InvalidToken("not yet valid"))
        );
        let no_exp = token(serde_json::json!({ "sub": "x" }));
        assert_eq!(
            v.verify(&no_exp),
            Err(Refusal::InvalidToken("missing claim"))
        );
    }

    #[test]
    fn configured_issuer_and_audience_must_be_present_and_match() {
        let v = verifier(serde_json::json!({ "issuers": ["https://idp"], "audiences": ["api"] }))
            .unwrap();
        let good = serde_json::json!({ "exp": now() + 60, "iss": "https://idp", "aud": "api" });
        assert!(v.verify(&token(good)).is_ok());
        for (claims, reason) in [
            (
                serde_json::json!({ "exp": now() + 60, "aud": "api" }),
                "missing claim",
            ),
            (
                serde_json::json!({ "exp": now() + 60, "iss": "https://idp" }),
                "missing claim",
            ),
            (
                serde_json::json!({ "exp": now() + 60, "iss": "https://evil", "aud": "api" }),
                "wrong issuer",
            ),
            (
                serde_json::json!({ "exp": now() + 60, "iss": "https://idp", "aud": "web" }),
                "wrong audience",
            ),
        ] {
            assert_eq!(
                v.verify(&token(claims.clone())),
                Err(Refusal::InvalidToken(reason)),
                "{claims}"
            );
        }
    }

    #[test]
    fn scopes_and_claims_are_required_with_403() {
        let v = verifier(serde_json::json!({
            "require": { "scopes": ["orders:read"], "claims": { "tier": "gold", "groups": "admins" } }
        }))
        .unwrap();
        let ok = serde_json::json!({ "exp": now() + 60, "scope": "a orders:read", "tier": "gold", "groups": ["x", "admins"] });
        assert!(v.verify(&token(ok)).is_ok());
        let no_scope = serde_json::json!({ "exp": now() + 60, "scope": "a", "tier": "gold", "groups": ["admins"] });
        assert_eq!(v.verify(&token(no_scope)), Err(Refusal::InsufficientScope));
        let wrong_tier = serde_json::json!({ "exp": now() + 60, "scp": ["orders:read"], "tier": "silver", "groups": ["admins"] });
        assert_eq!(
            v.verify(&token(wrong_tier)),
            Err(Refusal::InsufficientScope)
        );
    }

    #[test]
    fn oversized_and_malformed_tokens_are_refused_before_verification() {
        let v = verifier(serde_json::json!({ "max_token_bytes": 64 })).unwrap();
        let long = token(serde_json::json!({ "exp": now() + 60, "pad": "x".repeat(100) }));
        assert_eq!(v.verify(&long), Err(Refusal::InvalidToken("too long")));
        assert_eq!(
            v.verify("not.a.jwt"),
            Err(Refusal::InvalidToken("malformed"))
        );
    }

    #[test]
    fn claims_become_header_values_only_when_safe() {
        assert_eq!(
            header_value(&serde_json::json!("alice")),
            Some("alice".into())
        );
        assert_eq!(header_value(&serde_json::json!(42)), Some("42".into()));
        assert_eq!(
            header_value(&serde_json::json!(["a", "b"])),
            Some("a,b".into())
        );
        assert_eq!(header_value(&serde_json::json!("a\r\nx-evil: 1")), None);
        assert_eq!(header_value(&serde_json::json!({ "nested": 1 })), None);
    }

    #[test]
    fn challenges_follow_rfc_6750() {
        let missing = refuse(&Refusal::Missing, Some("api"));
        assert_eq!(missing.status, 401);
        assert!(
            missing
                .headers
                .contains(&("www-authenticate".into(), "Bearer realm=\"api\"".into()))
        );
        let invalid = refuse(&Refusal::InvalidToken("expired"), None);
        assert!(invalid.headers.contains(&(
            "www-authenticate".into(),
            "Bearer error=\"invalid_token\"".into()
        )));
        assert!(!String::from_utf8_lossy(&invalid.body).contains("expired"));
        assert_eq!(refuse(&Refusal::InsufficientScope, None).status, 403);
        assert_eq!(refuse(&Refusal::InvalidRequest, None).status, 400);
    }
}
