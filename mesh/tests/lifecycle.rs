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
        "max_batch_size = 64\nmax_queue_delay_us = 0\nintra_op_threads = 1\n",
    )
    .unwrap();
    let mut node = TestNode::start(repo.path(), &[]);
    let body = json!({"inputs": [{"name": "input", "shape": [64, 512], "datatype": "FP32", "data": vec![0.25; 64 * 512]}]});
    let http = reqwest::Client::new();
    let requests: Vec<_> = (0..128)
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
    // Let the requests reach the server, then ask it to stop while they are queued.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let node_pid = node.pid();
    let signalled = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = node.terminate(Duration::from_secs(60));
        (status, node.log_text())
    })
    .await
    .unwrap();
    let mut served = 0;
    let mut served_after_signal = 0;
    for request in requests {
        let (response, at) = request.await.unwrap();
        let response =
            response.unwrap_or_else(|e| panic!("request lost in the drain (pid {node_pid}): {e}"));
        assert_eq!(response.status(), 200);
        served += 1;
        served_after_signal += usize::from(at > signalled);
    }
    assert!(
        served_after_signal > 0,
        "every request finished before SIGTERM; the test proved nothing"
    );
    assert_eq!(served, 128);
    assert!(status.0.success(), "exit status {:?}", status.0);
    assert!(status.1.contains("SIGTERM"), "{}", status.1);
    assert!(status.1.contains("meshserve stopped"), "{}", status.1);
}
