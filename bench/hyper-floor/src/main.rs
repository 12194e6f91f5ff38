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

/// Accepts connections on `listen` for ever, each served by `serve` on a task of its own.
async fn accept_each<F, Fut>(listen: SocketAddr, mut serve: F) -> std::io::Result<()>
where
    F: FnMut(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream));
    }
}

/// Serves one connection with hyper's auto (HTTP/1 and HTTP/2) server.
async fn serve_hyper<S, B>(stream: tokio::net::TcpStream, service: S)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// hyper's server with the hand-written client of [`native`].
async fn serve_native_client(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let pool = native::Pool::new(upstream);
    accept_each(listen, move |stream| {
        let pool = pool.clone();
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
        serve_hyper(stream, service)
    })
    .await
}

/// No hyper at all: [`native::raw`] per connection.
async fn serve_raw(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let pool = native::Pool::new(upstream);
    accept_each(listen, move |stream| {
        let pool = pool.clone();
        async move {
            let _ = native::raw(stream, pool).await;
        }
    })
    .await
}

/// hyper's server with hyper-util's pooled client.
async fn serve(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let authority = upstream.to_string();
    accept_each(listen, move |stream| {
        let client = client.clone();
        let authority = authority.clone();
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
        serve_hyper(stream, service)
    })
    .await
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
