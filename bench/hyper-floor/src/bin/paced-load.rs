//! A fixed-rate (open-loop) HTTP/1.1 load generator, for the latency the issue asks about at a
//! given load rather than at saturation, which is all wrk measures.
//!
//! ```text
//! paced-load <host:port> <path> <requests per second> <seconds> <connections> ["Name: value" ...]
//! ```
//!
//! Request `i` is due at `start + i / rate` and goes out on connection `i % connections`, each
//! connection keep-alive and one request at a time. A request is timed from when it went out,
//! unless its connection was still waiting on the previous answer when it fell due: then from
//! when it was due, so that a stall of the server counts against every request it held back
//! (coordinated omission). The last millisecond before a request is due is spun rather than
//! slept (Tokio's timers tick in milliseconds), so that requests go out spread as scheduled, not
//! in bursts a tick apart. Prints one JSON line: requests, failed
//! (not 200, or a broken connection), the achieved rate, and p50, p99 and max in milliseconds.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    path: String,
    rate: f64,
    seconds: f64,
    connections: usize,
    headers: Vec<String>,
}

fn args() -> Result<Args, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.len() < 5 {
        return Err(
            "usage: paced-load <host:port> <path> <rate> <seconds> <connections> [header ...]"
                .into(),
        );
    }
    let number = |i: usize, what: &str| {
        argv[i]
            .parse::<f64>()
            .ok()
            .filter(|n| *n > 0.0)
            .ok_or_else(|| format!("{what} must be a positive number, not `{}`", argv[i]))
    };
    Ok(Args {
        addr: argv[0].clone(),
        path: argv[1].clone(),
        rate: number(2, "the rate")?,
        seconds: number(3, "the duration")?,
        connections: number(4, "the connection count")? as usize,
        headers: argv[5..].to_vec(),
    })
}

/// What one connection saw: each answered request's latency, and the failures.
#[derive(Default)]
struct Seen {
    latencies: Vec<Duration>,
    failed: u64,
}

fn main() {
    let args = match args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let (seen, elapsed) = runtime.block_on(run(&args));
    let failed: u64 = seen.iter().map(|s| s.failed).sum();
    let mut latencies: Vec<Duration> = seen.into_iter().flat_map(|s| s.latencies).collect();
    latencies.sort_unstable();
    let quantile = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let at = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[at].as_secs_f64() * 1e3
    };
    println!(
        "{{\"requests\": {}, \"failed\": {}, \"rate\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"max_ms\": {:.3}}}",
        latencies.len(),
        failed,
        latencies.len() as f64 / elapsed.as_secs_f64(),
        quantile(0.50),
        quantile(0.99),
        quantile(1.0),
    );
}

async fn run(args: &Args) -> (Vec<Seen>, Duration) {
    let mut request = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", args.path, args.addr);
    for header in &args.headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let total = (args.rate * args.seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    // Connections open before the clock starts.
    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let stream = open(&args.addr)
            .await
            .unwrap_or_else(|err| panic!("connecting to {}: {err}", args.addr));
        streams.push(stream);
    }
    let start = Instant::now() + Duration::from_millis(10);
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(k, stream)| {
            let request = request.clone().into_bytes();
            let (connections, every, addr) = (args.connections as u64, interval, args.addr.clone());
            tokio::spawn(async move {
                connection(
                    &addr,
                    stream,
                    request,
                    start,
                    every,
                    k as u64,
                    connections,
                    total,
                )
                .await
            })
        })
        .collect();
    let mut seen = Vec::with_capacity(tasks.len());
    for task in tasks {
        seen.push(task.await.expect("a connection task"));
    }
    (seen, start.elapsed())
}

/// A connection to `addr`, with Nagle's algorithm off.
async fn open(addr: &str) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Runs requests `first`, `first + step`, ... below `total` on one connection.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, each argument named there"
)]
async fn connection(
    addr: &str,
    mut stream: TcpStream,
    request: Vec<u8>,
    start: Instant,
    interval: Duration,
    first: u64,
    step: u64,
    total: u64,
) -> Seen {
    let mut seen = Seen::default();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut i = first;
    while i < total {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        // Behind schedule: the previous answer came after this request was due.
        let from = if now > due + Duration::from_micros(100) {
            due
        } else {
            // Tokio's timer wakes at millisecond ticks, which would send the requests due within
            // one tick together: it brings the task near, and the last stretch is spun.
            if let Some(near) = due
                .checked_sub(Duration::from_millis(1))
                .filter(|&t| t > now)
            {
                tokio::time::sleep_until(near.into()).await;
            }
            while Instant::now() < due {
                tokio::task::yield_now().await;
            }
            Instant::now()
        };
        let mut answer = exchange(&mut stream, &request, &mut buf).await;
        if answer.is_err() {
            // The server closed the kept-alive connection (as nginx does after
            // `keepalive_requests`): once more on a new one, as wrk would.
            answer = match open(addr).await {
                Ok(fresh) => {
                    stream = fresh;
                    exchange(&mut stream, &request, &mut buf).await
                }
                Err(err) => Err(err),
            };
        }
        match answer {
            Ok(200) => seen.latencies.push(from.elapsed()),
            Ok(_) => seen.failed += 1,
            Err(_) => {
                // The rest of this connection's share fails with it.
                seen.failed += (total - i).div_ceil(step);
                return seen;
            }
        }
        i += step;
    }
    seen
}

/// Sends the request and reads one `Content-Length` response; returns its status.
async fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> io::Result<u16> {
    stream.write_all(request).await?;
    buf.clear();
    loop {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = response.parse(buf).map_err(io::Error::other)?
        else {
            continue;
        };
        let length: usize = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .ok_or_else(|| io::Error::other("no content-length"))?;
        let status = response.code.unwrap_or(0);
        while buf.len() < head + length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Ok(status);
    }
}
