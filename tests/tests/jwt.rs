//! jwt-auth through the gateway, with its compiled wasm: the configuration surface, and every
//! attack class of RFC 8725 that applies to a verifier.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::{Request, StatusCode};
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};
use wasmgate_tests::{TestGateway, TestResponse, TestUpstream, workspace_root};

const SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!!";

fn key_file(name: &str) -> String {
    std::fs::read_to_string(workspace_root().join("tests/keys").join(name)).unwrap()
}

fn now() -> i64 {
    get_current_timestamp() as i64
}

/// Claims that pass the `/rs` route.
fn good_claims() -> Value {
    json!({ "sub": "alice", "iss": "https://idp.test", "aud": "orders", "exp": now() + 300, "scope": "orders:read" })
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, key).unwrap()
}

fn rsa() -> EncodingKey {
    EncodingKey::from_rsa_pem(key_file("rsa.key").as_bytes()).unwrap()
}

fn rs256(claims: &Value) -> String {
    sign(Algorithm::RS256, Some("rsa1"), &rsa(), claims)
}

/// A token assembled by hand, for what no honest library would sign.
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(signature)
    )
}

async fn gateway(upstream: &TestUpstream) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    for name in ["rsa.pub", "ec256.pub", "ed25519.pub"] {
        std::fs::copy(
            workspace_root().join("tests/keys").join(name),
            dir.path().join(name),
        )
        .unwrap();
    }
    let jwks = json!({ "keys": [{ "kty": "oct", "kid": "jw1", "alg": "HS256", "k": B64.encode(SECRET) }] });
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    let manifest = format!(
        r#"version: 1
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
plugins:
  jwt-auth: {{ source: "{{plugins}}/jwt_auth.wasm" }}
  probe: {{ source: "{{plugins}}/probe_plugin.wasm" }}
upstreams:
  main: {{ targets: [{{ url: "{upstream}" }}] }}
routes:
  - name: rs
    match: {{ prefix: /rs }}
    upstream: main
    plugins:
      - name: jwt-auth
        config:
          algorithms: [RS256, PS256, ES256, EdDSA, HS256]
          keys:
            - {{ kid: rsa1, pem: {{ $file: "{dir}/rsa.pub" }} }}
            - {{ kid: ec1, pem: {{ $file: "{dir}/ec256.pub" }} }}
            - {{ kid: ed1, pem: {{ $file: "{dir}/ed25519.pub" }} }}
            - {{ kid: hs1, secret: "{SECRET}" }}
          issuers: [https://idp.test]
          audiences: [orders]
          realm: orders
          max_token_bytes: 4096
          forward_claims: {{ sub: x-user-id, scope: x-scope }}
      - {{ name: probe, config: {{ tag: after, property_to_header: {{ subject: x-subject }} }} }}
  - name: scoped
    match: {{ prefix: /scoped }}
    upstream: main
    plugins:
      - name: jwt-auth
        config:
          algorithms: [RS256]
          keys: [{{ kid: rsa1, pem: {{ $file: "{dir}/rsa.pub" }} }}]
          require: {{ scopes: [orders:write], claims: {{ tier: gold }} }}
  - name: jwks
    match: {{ prefix: /jwks }}
    upstream: main
    plugins:
      - name: jwt-auth
        config:
          algorithms: [HS256]
          jwks: {{ $file: jwks.json }}
          strip_authorization: true
  - name: cookie
    match: {{ prefix: /cookie }}
    upstream: main
    plugins:
      - {{ name: jwt-auth, config: {{ algorithms: [HS256], keys: [{{ secret: "{SECRET}" }}], token: {{ cookie: session }} }} }}
      - {{ name: probe, config: {{ tag: after, property_to_header: {{ subject: x-subject }} }} }}
  - name: query
    match: {{ prefix: /query }}
    upstream: main
    plugins:
      - {{ name: jwt-auth, config: {{ algorithms: [HS256], keys: [{{ secret: "{SECRET}" }}], token: {{ query: jwt }} }} }}
"#,
        upstream = upstream.url(),
        dir = dir.path().display(),
    );
    let gateway = TestGateway::start(&manifest.replace(
        "$file: jwks.json",
        &format!("$file: \"{}/jwks.json\"", dir.path().display()),
    ))
    .await;
    drop(dir);
    gateway
}

async fn call(gateway: &TestGateway, path: &str, token: Option<&str>) -> TestResponse {
    let mut request = Request::get(path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    gateway.send(request.body(Full::default()).unwrap()).await
}

fn assert_invalid_token(response: &TestResponse, what: &str) {
    assert_eq!(response.status, StatusCode::UNAUTHORIZED, "{what}");
    assert_eq!(
        response.header("www-authenticate"),
        "Bearer realm=\"orders\", error=\"invalid_token\"",
        "{what}"
    );
    // Nothing about keys or which check failed.
    assert_eq!(response.text(), "{\"error\":\"invalid_token\"}\n", "{what}");
}

#[tokio::test]
async fn valid_tokens_of_every_algorithm_pass_with_claims_forwarded() {
    let upstream = TestUpstream::start("main").await;
    let gateway = gateway(&upstream).await;
    let claims = good_claims();
    let tokens = [
        ("RS256", rs256(&claims)),
        (
            "PS256",
            sign(Algorithm::PS256, Some("rsa1"), &rsa(), &claims),
        ),
        (
            "ES256",
            sign(
                Algorithm::ES256,
                Some("ec1"),
                &EncodingKey::from_ec_pem(key_file("ec256.key").as_bytes()).unwrap(),
                &claims,
            ),
        ),
        (
            "EdDSA",
            sign(
                Algorithm::EdDSA,
                Some("ed1"),
                &EncodingKey::from_ed_pem(key_file("ed25519.key").as_bytes()).unwrap(),
                &claims,
            ),
        ),
        (
            "HS256",
            sign(
                Algorithm::HS256,
                Some("hs1"),
                &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
                &claims,
            ),
        ),
    ];
    for (alg, token) in tokens {
        let request = Request::get("/rs/orders")
            .header("authorization", format!("Bearer {token}"))
            // A client trying to pass as someone else: removed before the claim is forwarded.
            .header("x-user-id", "mallory")
            .body(Full::default())
            .unwrap();
        let response = gateway.send(request).await;
        assert_eq!(response.status, StatusCode::OK, "{alg}");
        let seen = upstream.last();
        let user: Vec<_> = seen.headers.get_all("x-user-id").iter().collect();
        assert_eq!(user, ["alice"], "{alg}");
        assert_eq!(seen.headers["x-scope"], "orders:read", "{alg}");
        // The subject reached the next plugin through the request's properties.
        assert_eq!(seen.headers["x-subject"], "alice", "{alg}");
        assert!(
            seen.headers.contains_key("authorization"),
            "kept unless strip_authorization"
        );
    }

    // A claim the token lacks: what the client sent under its header does not pass either.
    let mut claims = good_claims();
    claims.as_object_mut().unwrap().remove("scope");
    let token = sign(
        Algorithm::HS256,
        Some("hs1"),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        &claims,
    );
    let request = Request::get("/rs/orders")
        .header("authorization", format!("Bearer {token}"))
        .header("x-scope", "orders:admin")
        .body(Full::default())
        .unwrap();
    assert_eq!(gateway.send(request).await.status, StatusCode::OK);
    let seen = upstream.last();
    assert!(!seen.headers.contains_key("x-scope"), "{:?}", seen.headers);
    assert_eq!(seen.headers["x-user-id"], "alice");
}

#[tokio::test]
async fn every_bad_token_is_refused_without_saying_why() {
    let upstream = TestUpstream::start("main").await;
    let gateway = gateway(&upstream).await;
    let good = good_claims();
    let with = |patch: Value| {
        let mut claims = good_claims();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    };
    let valid = rs256(&good);
    let (head, rest) = valid.split_once('.').unwrap();
    let signature = rest.split_once('.').unwrap().1;
    let tampered = format!(
        "{head}.{}.{signature}",
        B64.encode(with(json!({ "sub": "admin" })).to_string())
    );
    let oversized = rs256(&with(json!({ "pad": "x".repeat(5000) })));
    let rsa_public_pem = key_file("rsa.pub");

    let cases: Vec<(&str, String)> = vec![
        ("expired", rs256(&with(json!({ "exp": now() - 3600 })))),
        (
            "not yet valid",
            rs256(&with(json!({ "nbf": now() + 3600 }))),
        ),
        ("missing exp", rs256(&with(json!({ "exp": null })))),
        (
            "wrong issuer",
            rs256(&with(json!({ "iss": "https://evil.test" }))),
        ),
        ("missing issuer", rs256(&with(json!({ "iss": null })))),
        ("wrong audience", rs256(&with(json!({ "aud": "billing" })))),
        ("missing audience", rs256(&with(json!({ "aud": null })))),
        (
            "wrong key",
            sign(
                Algorithm::RS256,
                Some("rsa1"),
                &EncodingKey::from_rsa_pem(key_file("rsa-other.key").as_bytes()).unwrap(),
                &good,
            ),
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, Some("rsa9"), &rsa(), &good),
        ),
        (
            "no kid among several keys",
            sign(Algorithm::RS256, None, &rsa(), &good),
        ),
        (
            "alg none",
            raw_token(&json!({ "alg": "none", "kid": "rsa1" }), &good, b""),
        ),
        (
            "alg none, no signature part",
            format!(
                "{}.{}.",
                B64.encode(json!({ "alg": "none" }).to_string()),
                B64.encode(good.to_string())
            ),
        ),
        (
            // The RSA public key used as an HMAC secret: the classic algorithm confusion.
            "algorithm confusion",
            sign(
                Algorithm::HS256,
                Some("rsa1"),
                &EncodingKey::from_secret(rsa_public_pem.as_bytes()).unwrap(),
                &good,
            ),
        ),
        (
            "HMAC key named for an RSA algorithm",
            sign(
                Algorithm::HS256,
                Some("hs1"),
                &EncodingKey::from_secret(b"guessed-secret-guessed-secret-32b").unwrap(),
                &good,
            ),
        ),
        (
            "algorithm outside the allow-list",
            sign(Algorithm::RS512, Some("rsa1"), &rsa(), &good),
        ),
        ("tampered payload", tampered),
        (
            "stripped signature",
            format!("{head}.{}.", rest.split_once('.').unwrap().0),
        ),
        (
            "unknown critical header",
            raw_token(
                &json!({ "alg": "RS256", "kid": "rsa1", "crit": ["exp-ext"], "exp-ext": 1 }),
                &good,
                b"sig",
            ),
        ),
        ("malformed", "not-a-jwt".to_string()),
        ("garbage segments", "a.b.c".to_string()),
        ("oversized", oversized),
    ];
    for (what, token) in &cases {
        let response = call(&gateway, "/rs/orders", Some(token)).await;
        assert_invalid_token(&response, what);
    }
    assert!(
        upstream.seen().is_empty(),
        "no bad token reached the upstream"
    );
}

#[tokio::test]
async fn missing_and_doubled_tokens() {
    let upstream = TestUpstream::start("main").await;
    let gateway = gateway(&upstream).await;
    let missing = call(&gateway, "/rs/orders", None).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.header("www-authenticate"),
        "Bearer realm=\"orders\""
    );

    let token = rs256(&good_claims());
    let two_headers = Request::get("/rs/orders")
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap();
    let response = gateway.send(two_headers).await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        response.header("www-authenticate"),
        "Bearer realm=\"orders\", error=\"invalid_request\""
    );

    let header_and_query = Request::get(format!("/rs/orders?access_token={token}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(
        gateway.send(header_and_query).await.status,
        StatusCode::BAD_REQUEST
    );

    let basic = Request::get("/rs/orders")
        .header("authorization", "Basic YWxpY2U6c2VjcmV0")
        .body(Full::default())
        .unwrap();
    assert_eq!(gateway.send(basic).await.status, StatusCode::UNAUTHORIZED);
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn authenticated_but_not_allowed_is_403() {
    let upstream = TestUpstream::start("main").await;
    let gateway = gateway(&upstream).await;
    let mut claims = good_claims();
    claims["scope"] = json!("orders:read orders:write");
    claims["tier"] = json!("silver");
    let response = call(&gateway, "/scoped", Some(&rs256(&claims))).await;
    assert_eq!(response.status, StatusCode::FORBIDDEN);
    assert_eq!(
        response.header("www-authenticate"),
        "Bearer error=\"insufficient_scope\""
    );
    claims["tier"] = json!("gold");
    assert_eq!(
        call(&gateway, "/scoped", Some(&rs256(&claims)))
            .await
            .status,
        StatusCode::OK
    );
    claims["scope"] = json!("orders:read");
    assert_eq!(
        call(&gateway, "/scoped", Some(&rs256(&claims)))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn jwks_kid_selection_strip_and_other_token_sources() {
    let upstream = TestUpstream::start("main").await;
    let gateway = gateway(&upstream).await;
    let hs = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let claims = json!({ "sub": "bob", "exp": now() + 60 });

    let response = call(
        &gateway,
        "/jwks",
        Some(&sign(Algorithm::HS256, Some("jw1"), &hs, &claims)),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(
        !upstream.last().headers.contains_key("authorization"),
        "stripped"
    );
    let response = call(
        &gateway,
        "/jwks",
        Some(&sign(Algorithm::HS256, Some("jw2"), &hs, &claims)),
    )
    .await;
    assert_eq!(response.status, StatusCode::UNAUTHORIZED);

    let token = sign(Algorithm::HS256, None, &hs, &claims);
    let cookie = Request::get("/cookie")
        .header("cookie", format!("theme=dark; session={token}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(gateway.send(cookie).await.status, StatusCode::OK);
    // A route that names no claims reads `sub` alone, and still sets the subject.
    assert_eq!(upstream.last().headers["x-subject"], "bob");
    let no_cookie = Request::get("/cookie")
        .header("cookie", "theme=dark")
        .body(Full::default())
        .unwrap();
    assert_eq!(
        gateway.send(no_cookie).await.status,
        StatusCode::UNAUTHORIZED
    );
    let query = Request::get(format!("/query?x=1&jwt={token}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(gateway.send(query).await.status, StatusCode::OK);
    let twice = Request::get(format!("/query?jwt={token}&jwt={token}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(gateway.send(twice).await.status, StatusCode::BAD_REQUEST);
}
