//! The HTTP front door on a bad day, against a real node over real sockets: slow and idle
//! connections are closed on time while normal clients are served, the connection cap and the
//! body budget hold, and SIGTERM goes in order (not-ready, grace, drain, exit; a second signal
//! exits at once).

mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::{TestNode, copy_examples};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn fraud_body() -> Value {
    json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]})
}

/// A node over a copy of the example models with `config` (the `[http]` table and the like).
fn node_with(config: &str) -> (TestNode, tempfile::TempDir) {
    let repo = copy_examples();
    let path = repo.path().join("node.toml");
    std::fs::write(&path, config).unwrap();
    let node = TestNode::start(repo.path(), &["--config", path.to_str().unwrap()]);
    (node, repo)
}

/// Waits until the server closes `stream` (EOF or reset), or `within` passes.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

async fn infer_ok(http: &reqwest::Client, node: &TestNode) -> u16 {
    http.post(node.url("/v2/models/fraud/infer"))
        .json(&fraud_body())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn slow_and_idle_connections_are_closed_on_time_while_clients_are_served() {
    let (node, _repo) = node_with(
        "[http]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout_ms = 1000\nidle_timeout_ms = 1500\nbody_read_timeout_ms = 1000\n",
    );
    let http = reqwest::Client::new();
    // 64 slowloris connections: half a request header, then nothing.
    let mut slow = Vec::new();
    for _ in 0..64 {
        let mut stream = TcpStream::connect(node.addr).await.unwrap();
        stream
            .write_all(b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
            .await
            .unwrap();
        slow.push(stream);
    }
    // An HTTP/2 connection (prior knowledge) that opens and then sends nothing.
    let mut idle_h2 = TcpStream::connect(node.addr).await.unwrap();
    idle_h2
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // A body that never finishes.
    let mut slow_body = TcpStream::connect(node.addr).await.unwrap();
    slow_body
        .write_all(b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inputs\"")
        .await
        .unwrap();

    // Meanwhile a normal client is served.
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_millis(500) {
        assert_eq!(infer_ok(&http, &node).await, 200);
        served += 1;
    }
    assert!(
        served >= 20,
        "only {served} requests served beside the slow connections"
    );

    for (i, stream) in slow.iter_mut().enumerate() {
        let closed = closed_within(stream, Duration::from_secs(5)).await;
        assert!(
            closed.is_some(),
            "slowloris connection {i} was still open after 5 s"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the slow connections took {:?} to close",
        started.elapsed()
    );
    let mut answer = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        slow_body.read_to_string(&mut answer),
    )
    .await
    .expect("the slow body's connection stayed open");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_read_timeout_ms"), "{answer}");
    assert!(
        closed_within(&mut idle_h2, Duration::from_secs(5))
            .await
            .is_some(),
        "an idle HTTP/2 connection was never closed"
    );
    assert_eq!(infer_ok(&http, &node).await, 200);
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let (node, _repo) = node_with(
        "[http]\nlisten = \"127.0.0.1:0\"\nmax_connections = 4\nidle_timeout_ms = 60000\nheader_read_timeout_ms = 60000\n",
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(node.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = reqwest::Client::new();
    let url = node.url("/v2/health/live");
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let status = client.get(url).send().await.unwrap().status().as_u16();
        (status, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "a fifth connection was served past the cap of 4"
    );
    drop(held.pop());
    let (status, waited) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert!(waited >= Duration::from_millis(600), "{waited:?}");
}

#[tokio::test]
async fn the_body_budget_refuses_new_bodies_with_503_while_it_is_spent() {
    let (node, _repo) = node_with(
        "[http]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes_in_flight = 2048\nbody_read_timeout_ms = 3000\n",
    );
    // 2000 bytes buffered by a body that is still arriving.
    let mut hog = TcpStream::connect(node.addr).await.unwrap();
    hog.write_all(b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    hog.write_all(&[b' '; 2000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let http = reqwest::Client::new();
    let response = http
        .post(node.url("/v2/models/fraud/infer"))
        .json(&fraud_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("max_body_bytes_in_flight"),
        "{error}"
    );
    // The hog gives up (408); its bytes go back to the budget.
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(6), hog.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(infer_ok(&http, &node).await, 200);
}

async fn status(http: &reqwest::Client, url: &str) -> Option<u16> {
    http.get(url).send().await.ok().map(|r| r.status().as_u16())
}

#[tokio::test]
async fn sigterm_reports_not_ready_serves_through_the_grace_period_then_exits() {
    let (mut node, _repo) =
        node_with("shutdown_grace_ms = 1500\n[http]\nlisten = \"127.0.0.1:0\"\n");
    let http = reqwest::Client::new();
    let ready = node.url("/v2/health/ready");
    assert_eq!(status(&http, &ready).await, Some(200));
    let signalled = Instant::now();
    node.signal_term();
    // Readiness turns first...
    loop {
        if status(&http, &ready).await == Some(503) {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_millis(500),
            "readiness still 200 after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...while requests are still served, through the grace period.
    let mut served = 0;
    while signalled.elapsed() < Duration::from_millis(1200) {
        assert_eq!(infer_ok(&http, &node).await, 200);
        served += 1;
    }
    assert!(served > 10, "{served}");
    // Then the node stops accepting and exits promptly.
    let exit = tokio::task::spawn_blocking(move || {
        let status = node.wait_for_exit(Duration::from_secs(10));
        (status, node.log_text())
    })
    .await
    .unwrap();
    let took = signalled.elapsed();
    assert!(exit.0.success(), "{:?}\n{}", exit.0, exit.1);
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM with a 1.5 s grace period"
    );
    assert!(exit.1.contains("reporting not-ready"), "{}", exit.1);
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let (mut node, _repo) =
        node_with("shutdown_grace_ms = 60000\n[http]\nlisten = \"127.0.0.1:0\"\n");
    node.signal_term();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    node.signal_term();
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = node.wait_for_exit(Duration::from_secs(10));
        (status, node.log_text())
    })
    .await
    .unwrap();
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "{:?}",
        signalled.elapsed()
    );
    assert!(!status.success());
    assert!(log.contains("second signal"), "{log}");
}

#[tokio::test]
async fn admin_operations_need_the_configured_token() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-token-of-some-length\n").unwrap();
    let (node, _repo) = node_with(&format!(
        "[http]\nadmin_token_file = \"{}\"\n",
        token_file.display()
    ));
    let http = reqwest::Client::new();
    let unload = node.url("/v2/repository/models/echo/unload");
    let refused = http.post(&unload).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    let wrong = http
        .post(&unload)
        .bearer_auth("s3cret-token-of-some-lengtH")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // Still loaded: nothing happened.
    let ready = http
        .get(node.url("/v2/models/echo/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let done = http
        .post(&unload)
        .bearer_auth("s3cret-token-of-some-length")
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let ready = http
        .get(node.url("/v2/models/echo/ready"))
        .send()
        .await
        .unwrap();
    assert_ne!(ready.status(), 200);
    // Reading and inference need no token.
    let answer = http
        .post(node.url("/v2/models/fraud/infer"))
        .json(&fraud_body())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}

#[test]
fn a_short_admin_token_fails_the_start_with_the_fix() {
    let repo = copy_examples();
    let token_file = repo.path().join("token");
    std::fs::write(&token_file, "short").unwrap();
    let config = repo.path().join("node.toml");
    std::fs::write(
        &config,
        format!("[http]\nadmin_token_file = \"{}\"\n", token_file.display()),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_meshserve"))
        .args(["serve", "--http", "127.0.0.1:0", "--model-repository"])
        .arg(repo.path())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("shorter than 16 bytes") && stderr.contains("/dev/urandom"),
        "{stderr}"
    );
}
