//! Worker threads: every listener served by several threads, each with its own event loop and
//! its own `SO_REUSEPORT` socket; all of them serve, and a drain ends them.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use wasmgate_tests::{TestUpstream, send, write_manifest};

/// The worker threads of this process, with the CPU ticks each has used.
fn worker_threads() -> Vec<u64> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            if !name.starts_with("wasmgate-worker") {
                return None;
            }
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_serves_and_a_drain_ends_them() {
    let upstream = TestUpstream::start("main").await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ prefix: / }}, upstream: main }}\n",
        upstream.url()
    );
    let path = write_manifest(dir.path(), &manifest);
    let gateway = wasmgate::Gateway::start_with_workers(&path, 3)
        .await
        .unwrap();
    let addr = gateway.listeners()[0].1;
    // A thread names itself once it runs.
    for _ in 0..50 {
        if worker_threads().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(worker_threads().len(), 2);

    // Many connections, each with a burst of requests: the kernel spreads the connections over
    // the three sockets, and every thread does work.
    let before = worker_threads();
    let mut clients = Vec::new();
    for i in 0..60 {
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for j in 0..20 {
                let request = Request::get(format!("/c{i}/r{j}"))
                    .header("host", "x")
                    .header("connection", if j == 19 { "close" } else { "keep-alive" })
                    .body(Full::<Bytes>::default())
                    .unwrap();
                statuses.push(send(addr, request).await.status);
            }
            statuses
        }));
    }
    for client in clients {
        assert!(client.await.unwrap().iter().all(|s| *s == StatusCode::OK));
    }
    assert_eq!(upstream.seen().len(), 60 * 20);
    let after = worker_threads();
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().zip(&before).all(|(a, b)| a > b),
        "a worker thread did no work: {before:?} -> {after:?}"
    );

    assert_eq!(gateway.drain().await, wasmgate::Drained::Clean);
    for _ in 0..50 {
        if worker_threads().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("worker threads outlived the drained gateway");
}
