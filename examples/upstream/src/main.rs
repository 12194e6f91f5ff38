//! `example-upstream [ADDR]`: serves the example API (default `127.0.0.1:9000`); see the library
//! documentation for its routes. Tokens are signed with `DEMO_JWT_SECRET`.

use std::net::SocketAddr;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into())
        .parse()
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
    let Ok(secret) = std::env::var("DEMO_JWT_SECRET") else {
        eprintln!("set DEMO_JWT_SECRET (the same value the gateway's jwt-auth plugin is given)");
        std::process::exit(2);
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("example upstream listening on {}", listener.local_addr()?);
    example_upstream::serve(listener, secret).await
}
