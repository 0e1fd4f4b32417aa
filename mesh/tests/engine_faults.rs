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

async fn batched_max(http: &reqwest::Client, node: &TestNode, model: &str) -> (f64, f64) {
    let metrics = http
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (
        metric_sum(&metrics, "meshserve_batch_size_sum", &[("model", model)]),
        metric_sum(&metrics, "meshserve_batch_size_count", &[("model", model)]),
    )
}

#[tokio::test]
async fn a_poisoned_request_batched_with_good_ones_fails_alone() {
    let (node, _repo) = node_with_test_models(&["gather_rows"]);
    let http = reqwest::Client::new();
    let url = node.url("/v2/models/gather_rows/infer");
    // Sixteen requests inside one 50 ms batching window; the eighth asks for row 99 of 10.
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
    // They really were batched: some batch held more than one request.
    let (sum, count) = batched_max(&http, &node, "gather_rows").await;
    assert!(
        sum > count,
        "no batch held more than one request (sum {sum}, count {count})"
    );
}

#[tokio::test]
async fn a_model_whose_outputs_do_not_follow_the_batch_is_served_request_by_request() {
    let (node, _repo) = node_with_test_models(&["flatten_rows"]);
    let http = reqwest::Client::new();
    let url = node.url("/v2/models/flatten_rows/infer");
    for round in 0..2 {
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
    }
    assert!(
        node.log_text()
            .contains("do not follow its inputs' batch dimension"),
        "{}",
        node.log_text()
    );
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
    let header = json!({"inputs": binary}).to_string();
    let mut body = header.clone().into_bytes();
    body.extend(&raw);
    let response = http
        .post(&url)
        .header("Inference-Header-Content-Length", header.len())
        .body(body)
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
