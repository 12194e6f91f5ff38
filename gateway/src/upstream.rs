//! Upstream services: their targets and the pooled HTTP client that reaches them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use prometheus_client::metrics::histogram::Histogram;

use crate::body::UpstreamBody;
use crate::manifest::UpstreamSpec;
use crate::metrics::Metrics;

/// Parses a target URL: `http://host:port`, with no path, query or credentials.
pub fn parse_target(url: &str) -> Result<Authority, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|err| format!("target `{url}` is not a URL: {err}"))?;
    match uri.scheme() {
        Some(scheme) if *scheme == Scheme::HTTP => {}
        Some(scheme) if *scheme == Scheme::HTTPS => {
            return Err(format!(
                "target `{url}`: https upstreams are not supported yet"
            ));
        }
        _ => return Err(format!("target `{url}` must start with http://")),
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err(format!("target `{url}` must not have a path or query"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("target `{url}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("target `{url}` must not hold credentials"));
    }
    Ok(authority)
}

/// One server of an upstream.
#[derive(Debug)]
pub struct Target {
    /// Where it listens.
    pub authority: Authority,
    /// Its response-time series.
    pub duration: Histogram,
}

/// An upstream service with its own connection pool.
#[derive(Debug)]
pub struct Upstream {
    /// The upstream's name in the manifest.
    pub name: String,
    targets: Vec<Target>,
    next: AtomicUsize,
    /// Longest wait for the response head.
    pub timeout: Duration,
    client: Client<HttpConnector, UpstreamBody>,
}

impl Upstream {
    /// Builds the upstream; its targets were checked with the manifest.
    pub fn new(name: &str, spec: &UpstreamSpec, metrics: &Metrics) -> Result<Upstream, String> {
        let targets = spec
            .targets
            .iter()
            .map(|t| {
                let authority = parse_target(&t.url)?;
                let duration = metrics.target(name, authority.as_str());
                Ok(Target {
                    authority,
                    duration,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(spec.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Ok(Upstream {
            name: name.to_string(),
            targets,
            next: AtomicUsize::new(0),
            timeout: spec.timeout,
            client,
        })
    }

    /// The target for the next request, in turn.
    pub fn pick(&self) -> &Target {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        &self.targets[i]
    }

    /// The pooled client.
    pub fn client(&self) -> &Client<HttpConnector, UpstreamBody> {
        &self.client
    }
}

#[cfg(test)]
mod tests {
    use super::parse_target;

    #[test]
    fn targets_are_plain_http_authorities() {
        assert_eq!(
            parse_target("http://127.0.0.1:9000").unwrap().as_str(),
            "127.0.0.1:9000"
        );
        assert_eq!(
            parse_target("http://127.0.0.1:9000/").unwrap().as_str(),
            "127.0.0.1:9000"
        );
        assert!(parse_target("https://x:1").unwrap_err().contains("https"));
        assert!(parse_target("http://x:1/base").is_err());
        assert!(parse_target("x:1").is_err());
        assert!(parse_target("http://u:p@x:1").is_err());
    }
}
