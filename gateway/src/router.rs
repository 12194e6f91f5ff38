//! Route matching by host, path and method.
//!
//! A request goes to the most specific route that takes its method. Specificity, from the first
//! thing compared to the last:
//! 1. **Host**: routes whose `host` equals the request's host, then wildcard hosts
//!    (`*.example.com`, longest suffix first), then routes without a host.
//! 2. **Path**, inside a host group: a literal segment beats a parameter
//!    (`/users/me` over `/users/{id}`), and both beat a catch-all (`/users/{*rest}`) or a
//!    `prefix` route (a catch-all at its prefix); among catch-alls the longest literal start
//!    wins (`/api/v1` over `/api` over `/`).
//! 3. **Method**: among routes with the same path, those that list the method come before those
//!    that take every method, each in manifest order.
//!
//! When the most specific path has no route for the method, the search goes on to less specific
//! ones. A request whose path matched only routes for other methods gets 405; one whose path
//! matched nothing, 404.

use std::collections::HashMap;

use http::Method;

use crate::manifest::MatchSpec;

/// Checks a route's `match` block on its own (the router reports conflicts between routes).
pub fn check_match(spec: &MatchSpec) -> Result<(), String> {
    match (&spec.path, &spec.prefix) {
        (Some(_), Some(_)) => return Err("`match` takes `path` or `prefix`, not both".into()),
        (Some(path), None) if !path.starts_with('/') => {
            return Err(format!("path `{path}` must start with `/`"));
        }
        (None, Some(prefix)) if !prefix.starts_with('/') => {
            return Err(format!("prefix `{prefix}` must start with `/`"));
        }
        (None, Some(prefix)) if prefix.contains(['{', '}']) => {
            return Err(format!(
                "prefix `{prefix}` cannot hold parameters; use `path`"
            ));
        }
        _ => {}
    }
    if let Some(host) = &spec.host {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        if bare.is_empty() || bare.contains(['*', '/', ':']) {
            return Err(format!(
                "host `{host}` must be a name such as `api.example.com` or `*.example.com`"
            ));
        }
    }
    for method in spec.methods.iter().flatten() {
        if Method::from_bytes(method.as_bytes()).is_err() || method.to_ascii_uppercase() != *method
        {
            return Err(format!("`{method}` is not an upper-case HTTP method"));
        }
    }
    Ok(())
}

/// The answer to a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMatch {
    /// The index of the route, as given to [`RouterBuilder::add`].
    Found(usize),
    /// Some route has this path, but none takes this method.
    MethodNotAllowed,
    /// No route has this path.
    NotFound,
}

/// Collects routes, then builds a [`Router`].
#[derive(Default)]
pub struct RouterBuilder {
    exact_hosts: HashMap<String, PathTable>,
    wildcard_hosts: HashMap<String, PathTable>,
    any_host: PathTable,
}

impl RouterBuilder {
    /// Adds route `index`. Fails when its path template cannot sit beside those already added.
    pub fn add(&mut self, index: usize, spec: &MatchSpec) -> Result<(), String> {
        let table = match spec.host.as_deref() {
            None => &mut self.any_host,
            Some(host) => match host.strip_prefix("*.") {
                Some(suffix) => self
                    .wildcard_hosts
                    .entry(format!(".{}", suffix.to_ascii_lowercase()))
                    .or_default(),
                None => self
                    .exact_hosts
                    .entry(host.to_ascii_lowercase())
                    .or_default(),
            },
        };
        let methods = spec.methods.as_ref().map(|methods| {
            methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect()
        });
        let entry = RouteEntry { index, methods };
        match (&spec.path, &spec.prefix) {
            (Some(path), _) => table.insert(path, entry),
            (None, prefix) => {
                let prefix = prefix.as_deref().unwrap_or("/").trim_end_matches('/');
                // `/api` takes `/api`, `/api/` and everything below; `/` takes everything.
                if !prefix.is_empty() {
                    table.insert(prefix, entry.clone())?;
                }
                table.insert(&format!("{prefix}/"), entry.clone())?;
                table.insert(&format!("{prefix}/{{*wasmgate_rest}}"), entry)
            }
        }
    }

    /// Freezes the routes.
    pub fn build(self) -> Router {
        let mut wildcard_hosts: Vec<(String, PathTable)> =
            self.wildcard_hosts.into_iter().collect();
        wildcard_hosts.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Router {
            exact_hosts: self.exact_hosts,
            wildcard_hosts,
            any_host: self.any_host,
        }
    }
}

/// Finds the route for a request. Immutable once built, so lookups need no locking.
#[derive(Debug)]
pub struct Router {
    exact_hosts: HashMap<String, PathTable>,
    wildcard_hosts: Vec<(String, PathTable)>,
    any_host: PathTable,
}

impl Router {
    /// Finds the route for a host (without port, any case), path and method.
    pub fn lookup(&self, host: Option<&str>, path: &str, method: &Method) -> RouteMatch {
        let mut path_matched = false;
        let mut try_table = |table: &PathTable| {
            let found = table.lookup(path, method, &mut path_matched);
            found.map(RouteMatch::Found)
        };
        if let Some(host) = host {
            // Host names are case-insensitive; most clients send lower case, so avoid the
            // allocation when they do.
            let lowered;
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lowered = host.to_ascii_lowercase();
                lowered.as_str()
            } else {
                host
            };
            if let Some(found) = self.exact_hosts.get(host).and_then(&mut try_table) {
                return found;
            }
            for (suffix, table) in &self.wildcard_hosts {
                if host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && let Some(found) = try_table(table)
                {
                    return found;
                }
            }
        }
        if let Some(found) = try_table(&self.any_host) {
            return found;
        }
        if path_matched {
            RouteMatch::MethodNotAllowed
        } else {
            RouteMatch::NotFound
        }
    }
}

#[derive(Debug, Clone)]
struct RouteEntry {
    index: usize,
    /// `None` takes every method.
    methods: Option<Vec<Method>>,
}

/// Path templates of one host group.
///
/// matchit holds one value per template, so routes that share a template (differing by method)
/// share a slot. It also refuses a parameter and a catch-all at the same position, so templates
/// with a catch-all (and prefix routes) live in a second tree that is searched after the first:
/// that order is what makes literals and parameters beat catch-alls.
#[derive(Default)]
struct PathTable {
    /// `[templates without a catch-all, templates ending in one]`.
    trees: [matchit::Router<usize>; 2],
    slots: Vec<Vec<RouteEntry>>,
    slot_of: HashMap<String, usize>,
}

impl std::fmt::Debug for PathTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathTable")
            .field("templates", &self.slot_of.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PathTable {
    fn insert(&mut self, template: &str, entry: RouteEntry) -> Result<(), String> {
        if let Some(&slot) = self.slot_of.get(template) {
            let entries = &mut self.slots[slot];
            // Routes that list methods go before those that take any method.
            let position = match entry.methods {
                Some(_) => entries
                    .iter()
                    .position(|e| e.methods.is_none())
                    .unwrap_or(entries.len()),
                None => entries.len(),
            };
            entries.insert(position, entry);
            return Ok(());
        }
        let slot = self.slots.len();
        let tree = usize::from(template.contains("{*"));
        self.trees[tree]
            .insert(template, slot)
            .map_err(|err| format!("path `{template}` cannot be routed: {err}"))?;
        self.slots.push(vec![entry]);
        self.slot_of.insert(template.to_string(), slot);
        Ok(())
    }

    /// The first route, most specific first, whose path and method match. Sets `path_matched`
    /// when some route's path matched, whatever its methods.
    fn lookup(&self, path: &str, method: &Method, path_matched: &mut bool) -> Option<usize> {
        for tree in &self.trees {
            let Ok(found) = tree.at(path) else { continue };
            *path_matched = true;
            let takes = |e: &&RouteEntry| e.methods.as_ref().is_none_or(|m| m.contains(method));
            if let Some(entry) = self.slots[*found.value].iter().find(takes) {
                return Some(entry.index);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        host: Option<&str>,
        path: Option<&str>,
        prefix: Option<&str>,
        methods: &[&str],
    ) -> MatchSpec {
        MatchSpec {
            host: host.map(str::to_string),
            path: path.map(str::to_string),
            prefix: prefix.map(str::to_string),
            methods: (!methods.is_empty()).then(|| methods.iter().map(|m| m.to_string()).collect()),
        }
    }

    fn router(specs: &[MatchSpec]) -> Router {
        let mut builder = RouterBuilder::default();
        for (i, s) in specs.iter().enumerate() {
            builder.add(i, s).unwrap();
        }
        builder.build()
    }

    #[test]
    fn literal_beats_parameter_beats_catch_all() {
        let r = router(&[
            spec(None, Some("/users/{*rest}"), None, &[]),
            spec(None, Some("/users/{id}"), None, &[]),
            spec(None, Some("/users/me"), None, &[]),
        ]);
        assert_eq!(
            r.lookup(None, "/users/me", &Method::GET),
            RouteMatch::Found(2)
        );
        assert_eq!(
            r.lookup(None, "/users/42", &Method::GET),
            RouteMatch::Found(1)
        );
        assert_eq!(
            r.lookup(None, "/users/42/posts", &Method::GET),
            RouteMatch::Found(0)
        );
        assert_eq!(r.lookup(None, "/other", &Method::GET), RouteMatch::NotFound);
    }

    #[test]
    fn prefix_matches_on_segment_boundaries() {
        let r = router(&[spec(None, None, Some("/api"), &[])]);
        for path in ["/api", "/api/", "/api/v1/x"] {
            assert_eq!(
                r.lookup(None, path, &Method::GET),
                RouteMatch::Found(0),
                "{path}"
            );
        }
        assert_eq!(r.lookup(None, "/apix", &Method::GET), RouteMatch::NotFound);
    }

    #[test]
    fn exact_host_then_wildcard_then_any() {
        let r = router(&[
            spec(None, None, Some("/"), &[]),
            spec(Some("*.example.com"), None, Some("/"), &[]),
            spec(Some("api.example.com"), Some("/only"), None, &[]),
        ]);
        assert_eq!(
            r.lookup(Some("api.example.com"), "/only", &Method::GET),
            RouteMatch::Found(2)
        );
        assert_eq!(
            r.lookup(Some("API.Example.com"), "/only", &Method::GET),
            RouteMatch::Found(2)
        );
        // The exact host has no route for this path: the wildcard group answers.
        assert_eq!(
            r.lookup(Some("api.example.com"), "/x", &Method::GET),
            RouteMatch::Found(1)
        );
        assert_eq!(
            r.lookup(Some("www.example.com"), "/x", &Method::GET),
            RouteMatch::Found(1)
        );
        // A wildcard needs a subdomain.
        assert_eq!(
            r.lookup(Some("example.com"), "/x", &Method::GET),
            RouteMatch::Found(0)
        );
        assert_eq!(r.lookup(None, "/x", &Method::GET), RouteMatch::Found(0));
    }

    #[test]
    fn listed_methods_come_before_any_method() {
        let r = router(&[
            spec(None, Some("/items"), None, &[]),
            spec(None, Some("/items"), None, &["POST"]),
            spec(None, Some("/only-get"), None, &["GET"]),
        ]);
        assert_eq!(
            r.lookup(None, "/items", &Method::POST),
            RouteMatch::Found(1)
        );
        assert_eq!(r.lookup(None, "/items", &Method::GET), RouteMatch::Found(0));
        assert_eq!(
            r.lookup(None, "/only-get", &Method::DELETE),
            RouteMatch::MethodNotAllowed
        );
    }

    #[test]
    fn a_less_specific_route_takes_a_method_the_most_specific_does_not() {
        let r = router(&[
            spec(None, None, Some("/"), &[]),
            spec(None, Some("/items/{id}"), None, &["GET"]),
            spec(None, None, Some("/api/v1"), &[]),
            spec(None, None, Some("/api"), &[]),
        ]);
        assert_eq!(
            r.lookup(None, "/items/1", &Method::GET),
            RouteMatch::Found(1)
        );
        assert_eq!(
            r.lookup(None, "/items/1", &Method::PUT),
            RouteMatch::Found(0)
        );
        assert_eq!(
            r.lookup(None, "/api/v1/x", &Method::GET),
            RouteMatch::Found(2)
        );
        assert_eq!(
            r.lookup(None, "/api/v2", &Method::GET),
            RouteMatch::Found(3)
        );
        assert_eq!(r.lookup(None, "/apix", &Method::GET), RouteMatch::Found(0));
    }

    #[test]
    fn conflicting_templates_are_reported() {
        let mut builder = RouterBuilder::default();
        builder
            .add(0, &spec(None, Some("/a/{x}"), None, &[]))
            .unwrap();
        let err = builder
            .add(1, &spec(None, Some("/a/{y}"), None, &[]))
            .unwrap_err();
        assert!(err.contains("/a/{y}"), "{err}");
    }

    #[test]
    fn match_blocks_are_checked() {
        assert!(check_match(&spec(None, Some("/a"), Some("/b"), &[])).is_err());
        assert!(check_match(&spec(None, Some("a"), None, &[])).is_err());
        assert!(check_match(&spec(Some("a/b"), None, None, &[])).is_err());
        assert!(check_match(&spec(None, None, None, &["get"])).is_err());
        assert!(check_match(&spec(Some("*.x.io"), Some("/u/{id}"), None, &["GET"])).is_ok());
    }
}
