//! The engine on a bad day, in a real node: one bad request fails only itself, even when it
//! was batched with good ones; a model whose outputs do not follow the batch dimension is
//! served request by request instead of failing under load; text the model cannot take is
//! refused at decode.

mod support;

use serde_json::{Value, json};
use support::{TestNode, copy_examples, copy_tree, metric_sum, workspace_root};

/// A node over the example models plus the named test models.
fn node_with_test_models(models: &[&str]) -> (TestNode, tempfile::TempDir) {
    let repo = copy_examples();
    for model in models {
        copy_tree(
            &workspace_root().join("mesh/tests/models").join(model),
            &repo.path().join(model),
        );
    }
    let node = TestNode::start(repo.path(), &[]);
    (node, repo)
}

async fn post(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let response = http.post(url).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The sum and the count of a model's batch sizes: a sum above the count means some batch
/// held more than one request.
async fn batch_sizes(node: &TestNode, model: &str) -> (f64, f64) {
    let metrics = node.metrics().await;
    (
        metric_sum(&metrics, "meshserve_batch_size_sum", &[("model", model)]),
        metric_sum(&metrics, "meshserve_batch_size_count", &[("model", model)]),
    )
}

/// Rounds of concurrent requests sent until the model's queue merged some into a batch (when
/// they meet in the queue depends on the scheduler's timing); every round is checked.
const ROUNDS: usize = 10;

#[tokio::test]
async fn a_poisoned_request_batched_with_good_ones_fails_alone() {
    let (node, _repo) = node_with_test_models(&["gather_rows"]);
    let http = reqwest::Client::new();
    let url = node.url("/v2/models/gather_rows/infer");
    for _ in 0..ROUNDS {
        // Sixteen at once; the eighth asks for row 99 of 10.
        let tasks: Vec<_> = (0..16i64)
            .map(|i| {
                let id = if i == 7 { 99 } else { i % 10 };
                let body = json!({"inputs": [{"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [id]}]});
                let (http, url) = (http.clone(), url.clone());
                tokio::spawn(async move { (id, post(&http, &url, body).await) })
            })
            .collect();
        for task in tasks {
            let (id, (status, answer)) = task.await.unwrap();
            if id == 99 {
                assert_eq!(status, 500, "{answer}");
                assert!(
                    answer["error"].as_str().unwrap().contains("gather_rows"),
                    "{answer}"
                );
            } else {
                assert_eq!(status, 200, "id {id}: {answer}");
                let row: Vec<f64> = (0..4).map(|k| (id * 4 + k) as f64).collect();
                assert_eq!(answer["outputs"][0]["data"], json!(row), "id {id}");
            }
        }
        let (sum, count) = batch_sizes(&node, "gather_rows").await;
        if sum > count {
            // The poisoned request met good ones in a batch, and only it failed.
            return;
        }
    }
    panic!("no batch held more than one request in {ROUNDS} rounds");
}

#[tokio::test]
async fn a_model_whose_outputs_do_not_follow_the_batch_is_served_request_by_request() {
    let (node, _repo) = node_with_test_models(&["flatten_rows"]);
    let http = reqwest::Client::new();
    let url = node.url("/v2/models/flatten_rows/infer");
    let noticed = |node: &TestNode| {
        node.log_text()
            .contains("do not follow its inputs' batch dimension")
    };
    // Rounds until requests met in a batch and the mismatch showed, then one more, served
    // request by request; every answer right in every round.
    let mut after = None;
    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let data: Vec<f64> = (0..4).map(|k| (round * 100 + i * 4 + k) as f64).collect();
                let body = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": data.clone()}]});
                let (http, url) = (http.clone(), url.clone());
                tokio::spawn(async move { (data, post(&http, &url, body).await) })
            })
            .collect();
        for task in tasks {
            let (data, (status, answer)) = task.await.unwrap();
            assert_eq!(status, 200, "round {round}: {answer}");
            assert_eq!(answer["outputs"][0]["data"], json!(data));
        }
        match after {
            Some(done) if round > done => return,
            None if noticed(&node) => after = Some(round),
            _ => {}
        }
    }
    assert!(after.is_some(), "{}", node.log_text());
}

#[tokio::test]
async fn bytes_the_model_cannot_take_as_text_are_refused_at_decode() {
    let repo = copy_examples();
    let node = TestNode::start(repo.path(), &[]);
    let http = reqwest::Client::new();
    let url = node.url("/v2/models/echo/infer");
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("examples/references/echo.json")).unwrap(),
    )
    .unwrap();
    let inputs = reference["cases"][0]["inputs"].clone();
    assert_eq!(
        post(&http, &url, json!({"inputs": inputs.clone()})).await.0,
        200
    );

    // A NUL inside a string element.
    let mut with_nul = inputs.clone();
    for input in with_nul.as_array_mut().unwrap() {
        if input["name"] == "in_bytes" {
            input["data"] = json!(["a", "b\u{0}c", "d"]);
        }
    }
    let (status, answer) = post(&http, &url, json!({"inputs": with_nul})).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("NUL"),
        "{answer}"
    );

    // Bytes that are not UTF-8, sent as a binary tensor.
    let mut binary = inputs.clone();
    let mut raw = Vec::new();
    for element in [&[0xffu8, 0xfe][..], b"ok", b"x"] {
        raw.extend((element.len() as u32).to_le_bytes());
        raw.extend(element);
    }
    for input in binary.as_array_mut().unwrap() {
        if input["name"] == "in_bytes" {
            input.as_object_mut().unwrap().remove("data");
            input["parameters"] = json!({"binary_data_size": raw.len()});
        }
    }
    let response = support::binary_body(http.post(&url), &json!({"inputs": binary}), raw)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("not valid UTF-8"),
        "{answer}"
    );
    assert_eq!(post(&http, &url, json!({"inputs": inputs})).await.0, 200);
}

#[tokio::test]
async fn unloads_during_a_long_load_do_not_stall_other_models() {
    let repo = copy_examples();
    // Thirty versions of `heavy`, two sessions each: a load of it takes a while.
    for version in 2..=30 {
        copy_tree(
            &repo.path().join("heavy/1"),
            &repo.path().join(format!("heavy/{version}")),
        );
    }
    std::fs::write(
        repo.path().join("heavy/config.toml"),
        "versions = \"all\"\ninstances = 2\nintra_op_threads = 1\n",
    )
    .unwrap();
    let node = TestNode::start(repo.path(), &[]);
    let http = reqwest::Client::new();
    let load = {
        let (http, url) = (http.clone(), node.url("/v2/repository/models/heavy/load"));
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let status = http.post(url).send().await.unwrap().status();
            (status, started.elapsed())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    // Unloads wait for the load's lock: four of them would hold every async worker.
    let unloads: Vec<_> = ["echo", "mixed", "image_stats", "echo"]
        .into_iter()
        .map(|model| {
            let (http, url) = (
                http.clone(),
                node.url(&format!("/v2/repository/models/{model}/unload")),
            );
            tokio::spawn(async move { http.post(url).send().await.unwrap().status() })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let url = node.url("/v2/models/fraud/infer");
    let body = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]});
    let mut slowest = std::time::Duration::ZERO;
    while !load.is_finished() {
        let started = std::time::Instant::now();
        assert_eq!(post(&http, &url, body.clone()).await.0, 200);
        slowest = slowest.max(started.elapsed());
    }
    let (status, took) = load.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        took > std::time::Duration::from_millis(200),
        "the load took only {took:?}: the test would prove nothing"
    );
    assert!(
        slowest < std::time::Duration::from_millis(150),
        "fraud took {slowest:?} while a load and unloads ran"
    );
    for unload in unloads {
        let status = unload.await.unwrap();
        assert!(status == 200 || status == 404, "{status}");
    }
}
