//! The example upstream: the API behind the example gateway, after the FastAPI security tutorial.
//!
//! - `GET /example` answers `{"message": "Hello, World!"}`;
//! - `POST /token` takes an OAuth2 password grant (`grant_type=password&username=..&password=..`,
//!   form-encoded) for the demo user and answers a bearer JWT (HS256, 15 minutes), signed with
//!   the secret in `DEMO_JWT_SECRET`;
//! - `GET /protected` answers `{"message": "Access granted!"}`: the gateway's jwt-auth plugin has
//!   already checked the token, and sends the user's name in `x-user`;
//! - anything else answers with a JSON echo of the request (method, path, query, headers), so
//!   that what the gateway's plugins changed is visible with curl.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The demo user's name.
pub const DEMO_USER: &str = "demo";
/// The demo user's password.
pub const DEMO_PASSWORD: &str = "demo-password";
/// The issuer and audience of the tokens, which the example manifest requires.
pub const ISSUER: &str = "wasmgate-example";
/// See [`ISSUER`].
pub const AUDIENCE: &str = "example-api";
/// How long a token lives.
pub const TOKEN_SECONDS: u64 = 15 * 60;

/// Serves connections from `listener` until the task is dropped, signing tokens with `secret`.
pub async fn serve(listener: TcpListener, secret: String) -> std::io::Result<()> {
    let secret: &'static str = Box::leak(secret.into_boxed_str());
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, secret));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    secret: &str,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/example") => (StatusCode::OK, json!({ "message": "Hello, World!" })),
        (&Method::GET, "/protected") => (StatusCode::OK, json!({ "message": "Access granted!" })),
        (&Method::POST, "/token") => token(request, secret).await,
        _ => (StatusCode::OK, echo(&request)),
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// The OAuth2 resource-owner password grant, for the demo user only.
async fn token(request: Request<Incoming>, secret: &str) -> (StatusCode, Value) {
    let Ok(body) = Limited::new(request.into_body(), 4096).collect().await else {
        return (
            StatusCode::BAD_REQUEST,
            json!({ "error": "invalid_request" }),
        );
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&body.to_bytes())
        .into_owned()
        .collect();
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if field("grant_type") != Some("password") {
        return (
            StatusCode::BAD_REQUEST,
            json!({ "error": "unsupported_grant_type" }),
        );
    }
    if field("username") != Some(DEMO_USER) || field("password") != Some(DEMO_PASSWORD) {
        return (StatusCode::BAD_REQUEST, json!({ "error": "invalid_grant" }));
    }
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({ "sub": DEMO_USER, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + TOKEN_SECONDS });
    let signed = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).and_then(|key| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &key,
        )
    });
    match signed {
        Ok(token) => (
            StatusCode::OK,
            json!({ "access_token": token, "token_type": "bearer", "expires_in": TOKEN_SECONDS }),
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "error": "server_error" }),
        ),
    }
}

fn echo(request: &Request<Incoming>) -> Value {
    let headers: serde_json::Map<String, Value> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes())
                    .into_owned()
                    .into(),
            )
        })
        .collect();
    json!({
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "query": request.uri().query(),
        "headers": headers,
    })
}
