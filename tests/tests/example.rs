//! The example in `examples/`, as the README walks through it: the real example upstream, the
//! real manifest (with only its ports and plugin folder swapped for the test's), and the token
//! flow with curl's requests.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use wasmgate_tests::{CliGateway, plugin_dir, workspace_root};

const SECRET: &str = "the-example-test-secret-0123456789abcdef";

#[tokio::test]
async fn the_readme_flow_works() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(example_upstream::serve(listener, SECRET.into()));

    let manifest = std::fs::read_to_string(workspace_root().join("examples/gateway.yaml"))
        .unwrap()
        .replace("127.0.0.1:9000", &upstream_addr.to_string())
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        // The admin listener too: a fixed port can be taken (by a gateway started by hand from
        // the same example, say), and the flow does not use it.
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace(
            "../target/wasm/wasm32-wasip2/release",
            &plugin_dir().display().to_string(),
        );
    let mut gateway = CliGateway::start(
        env!("CARGO_BIN_EXE_wasmgate-cli"),
        &manifest,
        &[("DEMO_JWT_SECRET", SECRET)],
    )
    .await;

    let hello = gateway
        .send(Request::get("/example").body(Full::default()).unwrap())
        .await;
    assert_eq!(hello.status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&hello.body).unwrap()["message"],
        "Hello, World!"
    );
    assert_eq!(hello.header("x-powered-by"), "wasmgate");

    // curl http://127.0.0.1:8080/protected  ->  401
    let anonymous = gateway
        .send(Request::get("/protected").body(Full::default()).unwrap())
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        anonymous.header("www-authenticate"),
        "Bearer realm=\"example\""
    );

    // curl -d grant_type=password -d username=demo -d password=demo-password .../token
    let form = |password: &str| {
        Request::post("/token")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(format!(
                "grant_type=password&username=demo&password={password}"
            ))))
            .unwrap()
    };
    let refused = gateway.send(form("wrong")).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let issued = gateway.send(form("demo-password")).await;
    assert_eq!(issued.status, StatusCode::OK);
    let issued: Value = serde_json::from_slice(&issued.body).unwrap();
    assert_eq!(issued["token_type"], "bearer");
    let token = issued["access_token"].as_str().unwrap();

    // curl -H "Authorization: Bearer $TOKEN" .../protected
    let granted = gateway
        .send(
            Request::get("/protected")
                .header("authorization", format!("Bearer {token}"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(granted.status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&granted.body).unwrap()["message"],
        "Access granted!"
    );

    // Logging runs on every route: the 401 and the grant are both in the access log.
    let line = gateway
        .line_containing(
            "\"route\":\"protected\",\"method\":\"GET\",\"path\":\"/protected\",\"status\":401",
        )
        .await;
    assert!(line.contains("plugin=\"access-log\""), "{line}");
    let line = gateway.line_containing("\"subject\":\"demo\"").await;
    assert!(line.contains("\"status\":200"), "{line}");

    gateway.stop().await;
    upstream.abort();
}
