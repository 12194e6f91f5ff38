//! `hyper-floor LISTEN UPSTREAM`: a reverse proxy with nothing but the HTTP stack wasmgate is built
//! on (a hyper-util auto server and a pooled hyper-util legacy client on one current-thread Tokio
//! runtime, as one wasmgate worker runs). No routing, no header work, no checks, no metrics, no
//! logs. The load benchmark runs it (`bench.py --floor`) so that wasmgate's own cost per request
//! can be told apart from its HTTP stack's.

use std::convert::Infallible;
use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

mod native;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: hyper-floor LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().map_err(std::io::Error::other)?;
    let upstream: SocketAddr = upstream.parse().map_err(std::io::Error::other)?;
    let mode = args.next();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match mode.as_deref() {
        None => runtime.block_on(serve(listen, upstream)),
        Some("native-client") => runtime.block_on(serve_native_client(listen, upstream)),
        Some("raw") => runtime.block_on(serve_raw(listen, upstream)),
        Some(other) => {
            eprintln!("unknown mode {other}: native-client or raw");
            std::process::exit(2);
        }
    }
}

/// hyper's server with the hand-written client of [`native`].
async fn serve_native_client(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let pool = native::Pool::new(upstream);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let pool = pool.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let pool = pool.clone();
                async move {
                    Ok::<_, Infallible>(match native::forward(pool, request).await {
                        Ok(response) => response,
                        Err(_) => {
                            let mut response = Response::new(http_body_util::Full::default());
                            *response.status_mut() = StatusCode::BAD_GATEWAY;
                            response
                        }
                    })
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// No hyper at all: [`native::raw`] per connection.
async fn serve_raw(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let pool = native::Pool::new(upstream);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(native::raw(stream, pool.clone()));
    }
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let authority = upstream.to_string();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            let service = service_fn(move |mut request: Request<Incoming>| {
                let client = client.clone();
                let uri = Uri::builder()
                    .scheme("http")
                    .authority(authority.as_str())
                    .path_and_query(
                        request
                            .uri()
                            .path_and_query()
                            .map_or("/", |path| path.as_str()),
                    )
                    .build();
                async move {
                    let Ok(uri) = uri else {
                        return Ok::<_, Infallible>(status(StatusCode::BAD_REQUEST));
                    };
                    *request.uri_mut() = uri;
                    Ok(match client.request(request).await {
                        Ok(response) => response.map(Body::Upstream),
                        Err(_) => status(StatusCode::BAD_GATEWAY),
                    })
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The upstream's body, or none.
enum Body {
    Upstream(Incoming),
    Empty,
}

fn status(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::Empty);
    *response.status_mut() = status;
    response
}

impl hyper::body::Body for Body {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            Body::Upstream(body) => std::pin::Pin::new(body).poll_frame(cx),
            Body::Empty => std::task::Poll::Ready(None),
        }
    }
}
