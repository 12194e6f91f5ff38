//! `api-key`: lets a request through when it carries a known API key, and records who it is.
//!
//! ```yaml
//! - name: api-key
//!   config:
//!     keys:
//!       - { consumer: mobile-app, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 }
//!     header: x-api-key            # default; or `query: api_key`
//!     forward_consumer: x-consumer # optional: the consumer's name, sent upstream
//! ```
//!
//! Keys are stored as SHA-256 hashes (`printf %s "$KEY" | sha256sum`). A plain `key:` entry is
//! refused unless `allow_plain: true`. The presented key is hashed and compared with every
//! stored hash in constant time, so neither timing nor order reveals which key nearly matched.
//! The consumer's name goes into the request's `consumer` property; the key header is removed
//! before the request goes upstream.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use wasmgate_plugin_sdk::{
    Action, ImmediateResponse, Plugin, Reads, Request, export_plugin, properties,
};

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The keys.
    pub keys: Vec<KeyConfig>,
    /// Accepts `key:` entries in plain text. Off by default: a manifest should not hold keys.
    #[serde(default)]
    pub allow_plain: bool,
    /// The header that carries the key (default `x-api-key`).
    #[serde(default)]
    pub header: Option<String>,
    /// A query parameter that carries the key, instead of a header.
    #[serde(default)]
    pub query: Option<String>,
    /// A header that carries the consumer's name upstream (any client-sent value is removed).
    #[serde(default)]
    pub forward_consumer: Option<String>,
}

/// One key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Who holds the key.
    pub consumer: String,
    /// The key's SHA-256, in hex.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The key itself (only with `allow_plain: true`).
    #[serde(default)]
    pub key: Option<String>,
}

/// Known keys, by hash.
pub struct Keys {
    hashes: Vec<[u8; 32]>,
    consumers: Vec<String>,
}

impl Keys {
    /// Builds the key table from the configuration.
    pub fn new(config: &Config) -> Result<Keys, String> {
        if config.keys.is_empty() {
            return Err("no keys".into());
        }
        let mut hashes = Vec::new();
        let mut consumers = Vec::new();
        for (i, key) in config.keys.iter().enumerate() {
            let hash = match (&key.sha256, &key.key) {
                (Some(hex), None) => parse_hex(hex)
                    .ok_or_else(|| format!("keys[{i}]: `sha256` must be 64 hex digits"))?,
                (None, Some(_)) if !config.allow_plain => {
                    return Err(format!(
                        "keys[{i}]: a plain `key` is refused; store its `sha256` instead (or set `allow_plain: true`)"
                    ));
                }
                (None, Some(plain)) => Sha256::digest(plain.as_bytes()).into(),
                _ => return Err(format!("keys[{i}]: give one of `sha256` and `key`")),
            };
            if key.consumer.is_empty() || key.consumer.chars().any(char::is_control) {
                return Err(format!("keys[{i}]: `consumer` must be a non-empty name"));
            }
            hashes.push(hash);
            consumers.push(key.consumer.clone());
        }
        Ok(Keys { hashes, consumers })
    }

    /// The consumer whose key this is. Every stored hash is compared, whatever matches.
    pub fn consumer(&self, presented: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, hash) in self.hashes.iter().enumerate() {
            let matches = digests_equal(hash, &digest);
            index.conditional_assign(&(i as u32), matches);
            found |= matches;
        }
        bool::from(found).then(|| self.consumers[index as usize].as_str())
    }
}

/// Whether two digests are equal, in constant time: the words' differences are gathered
/// without a branch, and only the gathered word is compared, by `subtle`. (`subtle`'s slice
/// comparison takes a byte at a time through an optimisation barrier each: 1,050 instructions
/// per key in the compiled plugin, against a few dozen here.)
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> subtle::Choice {
    let difference = a
        .chunks_exact(8)
        .zip(b.chunks_exact(8))
        .fold(0u64, |gathered, (a, b)| {
            let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("eight bytes"));
            gathered | (word(a) ^ word(b))
        });
    difference.ct_eq(&0)
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// The plugin.
pub struct ApiKey {
    keys: Keys,
    header: String,
    query: Option<String>,
    forward_consumer: Option<String>,
}

impl Plugin for ApiKey {
    type Config = Config;
    const AUTH: bool = true;
    const ON_RESPONSE: bool = false;

    fn new(config: Config) -> Result<Self, String> {
        if config.header.is_some() && config.query.is_some() {
            return Err("give `header` or `query`, not both".into());
        }
        Ok(ApiKey {
            keys: Keys::new(&config)?,
            header: config.header.unwrap_or_else(|| "x-api-key".into()),
            query: config.query,
            forward_consumer: config.forward_consumer,
        })
    }

    fn reads(&self) -> Reads {
        match &self.query {
            Some(_) => Reads::new().property("wasmgate.query"),
            None => Reads::new().request_header(&self.header),
        }
    }

    fn on_request(&self, request: &mut Request) -> Action {
        let presented: Vec<String> = match &self.query {
            Some(name) => request
                .query()
                .unwrap_or_default()
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .filter(|(key, _)| key == name)
                .map(|(_, value)| value.to_string())
                .collect(),
            None => request.header_values(&self.header),
        };
        let consumer = match presented.as_slice() {
            [key] => self.keys.consumer(key),
            _ => None,
        };
        let Some(consumer) = consumer else {
            return Action::Respond(
                ImmediateResponse::new(401)
                    .header("content-type", "application/json")
                    .body("{\"error\":\"unauthorized\"}\n"),
            );
        };
        let mut edits = Ok(());
        if self.query.is_none() {
            // The key is the client's secret: the upstream has no use for it.
            edits = request.remove_header(&self.header);
        }
        if let Some(header) = &self.forward_consumer {
            // Setting replaces every value a client sent, so none can pose as a consumer.
            edits = edits.and_then(|()| request.set_header(header, consumer));
        }
        if edits.is_err() {
            return Action::Respond(ImmediateResponse::new(500));
        }
        let _ = properties::set("consumer", consumer);
        Action::Continue
    }
}

export_plugin!(ApiKey);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_equal_only_when_every_byte_is() {
        let digest: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        assert!(bool::from(digests_equal(&digest, &digest)));
        for at in 0..32 {
            for bit in 0..8 {
                let mut other = digest;
                other[at] ^= 1 << bit;
                assert!(!bool::from(digests_equal(&digest, &other)), "{at}:{bit}");
            }
        }
    }

    fn keys(json: &str) -> Result<Keys, String> {
        Keys::new(&serde_json::from_str(json).map_err(|e| e.to_string())?)
    }

    const TEST_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"

    #[test]
    fn hashed_keys_identify_their_consumer() {
        let keys = keys(&format!(
            r#"{{"keys":[{{"consumer":"a","sha256":"{}"}},{{"consumer":"b","sha256":"{TEST_HASH}"}}]}}"#,
            "00".repeat(32)
        ))
        .unwrap();
        assert_eq!(keys.consumer("test"), Some("b"));
        assert_eq!(keys.consumer("tesT"), None);
        assert_eq!(keys.consumer(""), None);
    }

    #[test]
    fn plain_keys_need_allow_plain() {
        let err = keys(r#"{"keys":[{"consumer":"a","key":"k"}]}"#)
            .err()
            .unwrap();
        assert!(err.contains("plain `key` is refused"), "{err}");
        let keys = keys(r#"{"keys":[{"consumer":"a","key":"k"}],"allow_plain":true}"#).unwrap();
        assert_eq!(keys.consumer("k"), Some("a"));
    }

    #[test]
    fn malformed_hashes_are_refused() {
        assert!(keys(r#"{"keys":[{"consumer":"a","sha256":"abc"}]}"#).is_err());
        assert!(
            keys(&format!(
                r#"{{"keys":[{{"consumer":"a","sha256":"{}"}}]}}"#,
                "zz".repeat(32)
            ))
            .is_err()
        );
        assert!(keys(r#"{"keys":[]}"#).is_err());
    }
}
