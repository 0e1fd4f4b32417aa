//! Models loaded and unloaded at run time, broken model files, and a SIGTERM drain, each
//! while real requests are in flight against a real `meshserve` process.

mod support;

use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::{TestNode, copy_examples};

fn fraud_body() -> Value {
    json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]})
}

/// Sends requests on `workers` connections until `stop`, returning every status seen.
fn steady_load(
    url: String,
    body: Value,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    (0..workers)
        .map(|_| {
            let (url, body, stop) = (url.clone(), body.clone(), stop.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match http.post(&url).json(&body).send().await {
                        Ok(response) => statuses.push(response.status().as_u16()),
                        Err(e) => panic!("request failed at the transport level: {e}"),
                    }
                }
                statuses
            })
        })
        .collect()
}

async fn collect(handles: Vec<tokio::task::JoinHandle<Vec<u16>>>) -> Vec<u16> {
    let mut all = Vec::new();
    for handle in handles {
        all.extend(handle.await.unwrap());
    }
    all
}

#[tokio::test]
async fn reload_and_unload_under_load_drop_no_request() {
    let repo = copy_examples();
    let node = TestNode::start(repo.path(), &[]);
    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));

    // Reloads while requests stream: every request must succeed.
    let load = steady_load(
        node.url("/v2/models/fraud/infer"),
        fraud_body(),
        8,
        stop.clone(),
    );
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = http
            .post(node.url("/v2/repository/models/fraud/load"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let statuses = collect(load).await;
    assert!(
        statuses.len() > 50,
        "too few requests to mean anything: {}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|&s| s == 200),
        "reload lost requests: {statuses:?}"
    );

    // Unload while requests stream: each request is answered, either served or 404 after the unload.
    stop.store(false, Ordering::Relaxed);
    let load = steady_load(
        node.url("/v2/models/fraud/infer"),
        fraud_body(),
        8,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = http
        .post(node.url("/v2/repository/models/fraud/unload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let statuses = collect(load).await;
    let first_404 = statuses
        .iter()
        .position(|&s| s == 404)
        .expect("unload took effect");
    assert!(first_404 > 0, "requests before the unload were served");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 404),
        "{statuses:?}"
    );

    let index: Value = http
        .post(node.url("/v2/repository/index"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fraud = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "fraud")
        .unwrap();
    assert_eq!(fraud["state"], "UNAVAILABLE");
    let ready: Value = http
        .post(node.url("/v2/repository/index"))
        .json(&json!({"ready": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        ready
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["name"] != "fraud")
    );

    // And back.
    assert_eq!(
        http.post(node.url("/v2/repository/models/fraud/load"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let response = http
        .post(node.url("/v2/models/fraud/infer"))
        .json(&fraud_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        http.post(node.url("/v2/repository/models/fraud/unload"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.post(node.url("/v2/repository/models/fraud/unload"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn a_broken_model_file_is_reported_and_the_node_keeps_serving() {
    let repo = copy_examples();
    std::fs::create_dir_all(repo.path().join("broken/1")).unwrap();
    std::fs::write(
        repo.path().join("broken/1/model.onnx"),
        b"this is not an onnx file",
    )
    .unwrap();
    std::fs::create_dir_all(repo.path().join("badconfig/1")).unwrap();
    std::fs::copy(
        repo.path().join("fraud/1/model.onnx"),
        repo.path().join("badconfig/1/model.onnx"),
    )
    .unwrap();
    std::fs::write(
        repo.path().join("badconfig/config.toml"),
        "max_batch_size = \"lots\"\n",
    )
    .unwrap();
    // The CPU wheel has no CUDA provider: without fallback the load must fail and say why.
    for (name, config) in [
        ("gpu_only", "execution_providers = [\"cuda\"]\n"),
        (
            "gpu_or_cpu",
            "execution_providers = [\"cuda\"]\nfallback_to_cpu = true\n",
        ),
    ] {
        support::copy_tree(&repo.path().join("fraud"), &repo.path().join(name));
        std::fs::write(repo.path().join(name).join("config.toml"), config).unwrap();
    }
    let node = TestNode::start(repo.path(), &[]);
    let http = reqwest::Client::new();

    let index: Value = http
        .post(node.url("/v2/repository/index"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = |name: &str| {
        index
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(entry("broken")["state"], "UNAVAILABLE");
    assert!(
        entry("broken")["reason"]
            .as_str()
            .unwrap()
            .contains("ONNX Runtime could not load"),
        "{index}"
    );
    assert!(
        entry("badconfig")["reason"]
            .as_str()
            .unwrap()
            .contains("max_batch_size"),
        "{index}"
    );
    assert_eq!(entry("fraud")["state"], "READY");
    let gpu_only = entry("gpu_only")["reason"].as_str().unwrap().to_string();
    assert!(
        gpu_only.contains("execution provider 'cuda' is not available")
            && gpu_only.contains("fallback_to_cpu"),
        "{gpu_only}"
    );
    assert_eq!(entry("gpu_or_cpu")["state"], "READY");
    assert!(node.log_text().contains("model failed to load"));

    let response = http
        .post(node.url("/v2/repository/models/broken/load"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("failed to load 'broken'"),
        "{body}"
    );
    let response = http
        .post(node.url("/v2/repository/models/absent/load"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let response = http
        .post(node.url("/v2/repository/models/..%2Fetc/load"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    assert_eq!(
        http.get(node.url("/v2/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let response = http
        .post(node.url("/v2/models/fraud/infer"))
        .json(&fraud_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn sigterm_answers_every_in_flight_request_then_exits_cleanly() {
    let repo = copy_examples();
    // One thread, no batching across requests, and 64 rows a request: each takes milliseconds,
    // so a real queue is waiting when SIGTERM arrives.
    std::fs::write(
        repo.path().join("heavy/config.toml"),
        "max_batch_size = 64\nmax_queue_delay_us = 0\nintra_op_threads = 1\ninline_blocking_max_us = 0\nmax_queue_wait_us = 0\n",
    )
    .unwrap();
    let mut node = TestNode::start(repo.path(), &[]);
    let body = json!({"inputs": [{"name": "input", "shape": [64, 512], "datatype": "FP32", "data": vec![0.25; 64 * 512]}]});
    let http = reqwest::Client::new();
    let requests: Vec<_> = (0..96)
        .map(|_| {
            let request = http
                .post(node.url("/v2/models/heavy/infer"))
                .json(&body)
                .send();
            tokio::spawn(async move {
                let response = request.await;
                (response, std::time::Instant::now())
            })
        })
        .collect();
    // Wait until the node has taken on every request (queued, done, or the one running),
    // with a real queue still waiting, then SIGTERM.
    let waiting_since = std::time::Instant::now();
    let queued = loop {
        let metrics = node.metrics().await;
        let queued =
            support::metric_sum(&metrics, "meshserve_queue_depth", &[("model", "heavy")]) as usize;
        let completed =
            support::metric_sum(&metrics, "meshserve_requests_total", &[("model", "heavy")])
                as usize;
        if queued + completed + 1 >= 96 {
            break queued;
        }
        assert!(
            waiting_since.elapsed() < Duration::from_secs(20),
            "requests never reached the node"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(
        queued >= 8,
        "the queue had drained before SIGTERM ({queued} queued); the test would prove nothing"
    );
    let signalled = std::time::Instant::now();
    node.signal_term();
    // Readiness turns first, while the queue is still being served.
    let ready_url = node.url("/v2/health/ready");
    loop {
        let ready = http.get(&ready_url).send().await.unwrap().status();
        if ready == 503 {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_millis(500),
            "readiness still {ready} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = node.wait_for_exit(Duration::from_secs(60));
        (status, node.log_text())
    })
    .await
    .unwrap();
    let exited_after = signalled.elapsed();
    let mut served = 0;
    let mut served_after_signal = 0;
    for request in requests {
        match request.await.unwrap() {
            (Ok(response), at) => {
                assert_eq!(response.status(), 200);
                served += 1;
                served_after_signal += usize::from(at > signalled);
            }
            (Err(e), _) => panic!("a request in flight was lost: {e:?}"),
        }
    }
    assert!(
        served_after_signal >= queued,
        "{served_after_signal} answered after SIGTERM, {queued} were queued"
    );
    assert_eq!(served, 96, "every request sent was answered");
    // The default 2 s grace period, then the queue's last requests: not the 30 s drain timeout.
    assert!(
        exited_after < Duration::from_secs(15),
        "the node took {exited_after:?} to exit after SIGTERM"
    );
    assert!(status.success(), "exit status {status:?}");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("meshserve stopped"), "{log}");
}

#[test]
fn a_missing_onnx_runtime_library_fails_the_start_with_the_fix() {
    let repo = copy_examples();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_meshserve"))
        .args(["serve", "--http", "127.0.0.1:0", "--model-repository"])
        .arg(repo.path())
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.31.1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/libonnxruntime.so.1.31.1"),
        "{stderr}"
    );
    assert!(stderr.contains("ORT_DYLIB_PATH"), "{stderr}");
    assert!(
        stderr.contains("pip install onnxruntime==1.31.1"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_node_on_one_io_thread_serves_concurrent_clients_and_zero_threads_is_refused() {
    let repo = copy_examples();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_meshserve"))
        .args(["serve", "--http", "127.0.0.1:0", "--io-threads", "0"])
        .arg("--model-repository")
        .arg(repo.path())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("io_threads must be between 1 and 1024"),
        "{stderr}"
    );

    let node = TestNode::start(repo.path(), &["--io-threads", "1"]);
    let http = reqwest::Client::new();
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let request = http
                .post(node.url("/v2/models/fraud/infer"))
                .json(&fraud_body())
                .send();
            tokio::spawn(async move { request.await.map(|r| r.status().as_u16()) })
        })
        .collect();
    for client in clients {
        assert_eq!(client.await.unwrap().unwrap(), 200);
    }
}
