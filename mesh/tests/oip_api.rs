//! The Open Inference Protocol over HTTP, end to end: a real `meshserve` process on
//! loopback, real ONNX models, answers checked against onnxruntime's own references.

mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::{TestNode, copy_examples, metric_sum, workspace_root};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn reference(model: &str) -> Value {
    let path = workspace_root().join(format!("examples/references/{model}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Little-endian bytes of a JSON reference tensor, in the OIP binary layout.
fn to_binary(tensor: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    for v in tensor["data"].as_array().unwrap() {
        match tensor["datatype"].as_str().unwrap() {
            "BOOL" => out.push(u8::from(v.as_bool().unwrap())),
            "INT8" => out.extend((v.as_i64().unwrap() as i8).to_le_bytes()),
            "INT16" => out.extend((v.as_i64().unwrap() as i16).to_le_bytes()),
            "INT32" => out.extend((v.as_i64().unwrap() as i32).to_le_bytes()),
            "INT64" => out.extend(v.as_i64().unwrap().to_le_bytes()),
            "UINT8" => out.extend((v.as_u64().unwrap() as u8).to_le_bytes()),
            "UINT16" => out.extend((v.as_u64().unwrap() as u16).to_le_bytes()),
            "UINT32" => out.extend((v.as_u64().unwrap() as u32).to_le_bytes()),
            "UINT64" => out.extend(v.as_u64().unwrap().to_le_bytes()),
            "FP32" => out.extend((v.as_f64().unwrap() as f32).to_le_bytes()),
            "FP64" => out.extend(v.as_f64().unwrap().to_le_bytes()),
            "BYTES" => {
                let s = v.as_str().unwrap().as_bytes();
                out.extend((s.len() as u32).to_le_bytes());
                out.extend(s);
            }
            other => panic!("unexpected datatype {other}"),
        }
    }
    out
}

/// Decodes an OIP binary output back to JSON values, for comparison with a reference.
fn from_binary(datatype: &str, bytes: &[u8]) -> Vec<Value> {
    fn chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        bytes.chunks_exact(N).map(|c| c.try_into().unwrap())
    }
    match datatype {
        "BOOL" => bytes.iter().map(|&b| json!(b != 0)).collect(),
        "INT8" => bytes.iter().map(|&b| json!(b as i8)).collect(),
        "UINT8" => bytes.iter().map(|&b| json!(b)).collect(),
        "INT16" => chunks::<2>(bytes)
            .map(|c| json!(i16::from_le_bytes(c)))
            .collect(),
        "UINT16" => chunks::<2>(bytes)
            .map(|c| json!(u16::from_le_bytes(c)))
            .collect(),
        "INT32" => chunks::<4>(bytes)
            .map(|c| json!(i32::from_le_bytes(c)))
            .collect(),
        "UINT32" => chunks::<4>(bytes)
            .map(|c| json!(u32::from_le_bytes(c)))
            .collect(),
        "INT64" => chunks::<8>(bytes)
            .map(|c| json!(i64::from_le_bytes(c)))
            .collect(),
        "UINT64" => chunks::<8>(bytes)
            .map(|c| json!(u64::from_le_bytes(c)))
            .collect(),
        "FP32" => chunks::<4>(bytes)
            .map(|c| json!(f32::from_le_bytes(c)))
            .collect(),
        "FP64" => chunks::<8>(bytes)
            .map(|c| json!(f64::from_le_bytes(c)))
            .collect(),
        "BYTES" => {
            let mut out = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                out.push(json!(String::from_utf8(rest[4..4 + len].to_vec()).unwrap()));
                rest = &rest[4 + len..];
            }
            out
        }
        other => panic!("unexpected datatype {other}"),
    }
}

fn assert_close(model: &str, name: &str, got: &[Value], want: &[Value]) {
    assert_eq!(got.len(), want.len(), "{model}/{name}: element count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        match (g.as_f64(), w.as_f64()) {
            (Some(g), Some(w)) if !(g.fract() == 0.0 && w.fract() == 0.0 && w.abs() > 1e15) => {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{model}/{name}[{i}]: {g} vs {w}"
                );
            }
            _ => assert_eq!(g, w, "{model}/{name}[{i}]"),
        }
    }
}

fn check_outputs(model: &str, outputs: &[Value], expected: &[Value], binary: Option<&[u8]>) {
    assert_eq!(outputs.len(), expected.len(), "{model}: output count");
    let mut offset = 0;
    for want in expected {
        let name = want["name"].as_str().unwrap();
        let got = outputs
            .iter()
            .find(|o| o["name"] == name)
            .unwrap_or_else(|| panic!("{model}: no output {name}"));
        assert_eq!(got["datatype"], want["datatype"], "{model}/{name}");
        assert_eq!(got["shape"], want["shape"], "{model}/{name}");
        let values = match binary {
            Some(section) => {
                let size = got["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
                let values = from_binary(
                    want["datatype"].as_str().unwrap(),
                    &section[offset..offset + size],
                );
                offset += size;
                values
            }
            None => got["data"].as_array().unwrap().clone(),
        };
        assert_close(model, name, &values, want["data"].as_array().unwrap());
    }
}

#[tokio::test]
async fn every_model_matches_onnxruntime_through_json_and_binary_tensors() {
    let repo = copy_examples();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    for model in ["fraud", "heavy", "mixed", "echo"] {
        let reference = reference(model);
        for case in reference["cases"].as_array().unwrap() {
            // JSON in, JSON out.
            let body = json!({ "id": "case", "inputs": case["inputs"] });
            let response = http
                .post(node.url(&format!("/v2/models/{model}/infer")))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{model}");
            assert!(support::server_timing(&response).contains("infer;dur="));
            let answer: Value = response.json().await.unwrap();
            assert_eq!(answer["model_name"], model);
            assert_eq!(answer["model_version"], "1");
            assert_eq!(answer["id"], "case");
            check_outputs(
                model,
                answer["outputs"].as_array().unwrap(),
                case["outputs"].as_array().unwrap(),
                None,
            );

            // Binary in, binary out.
            let mut inputs = Vec::new();
            let mut section = Vec::new();
            for input in case["inputs"].as_array().unwrap() {
                let bytes = to_binary(input);
                inputs.push(json!({
                    "name": input["name"], "shape": input["shape"], "datatype": input["datatype"],
                    "parameters": { "binary_data_size": bytes.len() }
                }));
                section.extend(bytes);
            }
            let header = json!({ "inputs": inputs, "parameters": { "binary_data_output": true } });
            let response = support::binary_body(
                http.post(node.url(&format!("/v2/models/{model}/versions/1/infer"))),
                &header,
                section,
            )
            .send()
            .await
            .unwrap();
            assert_eq!(response.status(), 200, "{model} binary");
            let json_length: usize = response.headers()["inference-header-content-length"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let bytes = response.bytes().await.unwrap();
            let answer: Value = serde_json::from_slice(&bytes[..json_length]).unwrap();
            check_outputs(
                model,
                answer["outputs"].as_array().unwrap(),
                case["outputs"].as_array().unwrap(),
                Some(&bytes[json_length..]),
            );
        }
    }
}

#[tokio::test]
async fn health_metadata_readiness_and_config() {
    let repo = copy_examples();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let get = |path: &str| http.get(node.url(path)).send();
    assert_eq!(get("/v2/health/live").await.unwrap().status(), 200);
    assert_eq!(get("/v2/health/ready").await.unwrap().status(), 200);
    let server: Value = get("/v2").await.unwrap().json().await.unwrap();
    assert_eq!(server["name"], "meshserve");
    assert!(
        server["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );

    for path in ["/v2/models/mixed", "/v2/models/mixed/versions/1"] {
        let meta: Value = get(path).await.unwrap().json().await.unwrap();
        assert_eq!(meta["name"], "mixed");
        assert_eq!(meta["versions"], json!(["1"]));
        assert_eq!(meta["platform"], "onnxruntime_onnx");
        assert_eq!(
            meta["inputs"],
            json!([
                {"name": "ids", "datatype": "INT64", "shape": [-1, 4]},
                {"name": "mask", "datatype": "BOOL", "shape": [-1, 4]}
            ])
        );
        assert_eq!(
            meta["outputs"][2],
            json!({"name": "mean", "datatype": "FP64", "shape": [-1, 1]})
        );
    }
    assert_eq!(get("/v2/models/fraud/ready").await.unwrap().status(), 200);
    assert_eq!(
        get("/v2/models/fraud/versions/1/ready")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get("/v2/models/fraud/versions/2/ready")
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(get("/v2/models/nope/ready").await.unwrap().status(), 404);

    let config: Value = get("/v2/models/fraud/config")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["max_batch_size"], 64);
    assert_eq!(
        config["input"][0],
        json!({"name": "features", "data_type": "TYPE_FP32", "dims": [32]})
    );
    assert_eq!(
        config["dynamic_batching"]["max_queue_delay_microseconds"],
        200
    );
}

async fn error_of(response: reqwest::Response, status: u16) -> String {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field in {body}"))
        .to_string()
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_node_keeps_serving() {
    let repo = copy_examples();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let infer = |model: &str| http.post(node.url(&format!("/v2/models/{model}/infer")));
    let features = |n: usize| json!({"inputs": [{"name": "features", "shape": [1, n], "datatype": "FP32", "data": vec![0.5; n]}]});

    let message = error_of(infer("nope").json(&features(32)).send().await.unwrap(), 404).await;
    assert!(message.contains("unknown model 'nope'"), "{message}");
    let message = error_of(
        http.post(node.url("/v2/models/fraud/versions/9/infer"))
            .json(&features(32))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    assert!(message.contains("no version '9'"), "{message}");

    let message = error_of(
        infer("fraud").json(&features(31)).send().await.unwrap(),
        400,
    )
    .await;
    assert!(
        message.contains("shape [1, 31]") && message.contains("[-1, 32]"),
        "{message}"
    );

    let wrong_name = json!({"inputs": [{"name": "feature", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]});
    let message = error_of(infer("fraud").json(&wrong_name).send().await.unwrap(), 400).await;
    assert!(
        message.contains("no input 'feature'") && message.contains("features"),
        "{message}"
    );

    let wrong_type = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP64", "data": vec![0.5; 32]}]});
    let message = error_of(infer("fraud").json(&wrong_type).send().await.unwrap(), 400).await;
    assert!(
        message.contains("FP64") && message.contains("expects FP32"),
        "{message}"
    );

    let short = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 30]}]});
    let message = error_of(infer("fraud").json(&short).send().await.unwrap(), 400).await;
    assert!(message.contains("needs 32 elements"), "{message}");

    let message = error_of(
        infer("fraud").body("{\"inputs\": [").send().await.unwrap(),
        400,
    )
    .await;
    assert!(message.contains("malformed request JSON"), "{message}");

    let missing = json!({"inputs": [{"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]});
    let message = error_of(infer("mixed").json(&missing).send().await.unwrap(), 400).await;
    assert!(message.contains("missing input 'mask'"), "{message}");

    let mut unknown_output = features(32);
    unknown_output["outputs"] = json!([{"name": "logits"}]);
    let message = error_of(
        infer("fraud").json(&unknown_output).send().await.unwrap(),
        400,
    )
    .await;
    assert!(message.contains("no output 'logits'"), "{message}");

    let no_rows =
        json!({"inputs": [{"name": "features", "shape": [0, 32], "datatype": "FP32", "data": []}]});
    let message = error_of(infer("fraud").json(&no_rows).send().await.unwrap(), 400).await;
    assert!(message.contains("between 1 and"), "{message}");

    let truncated_binary = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "parameters": {"binary_data_size": 128}}]});
    let response = support::binary_body(infer("fraud"), &truncated_binary, [0u8; 100])
        .send()
        .await
        .unwrap();
    let message = error_of(response, 400).await;
    assert!(message.contains("binary_data_size 128"), "{message}");

    let message = error_of(http.get(node.url("/v2/nothing")).send().await.unwrap(), 404).await;
    assert!(message.contains("no route"), "{message}");
    let response = http
        .get(node.url("/v2/models/fraud/infer"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    // Names are percent-decoded (on the router's path; plain ones skip it).
    let decoded = infer("fr%61ud").json(&features(32)).send().await.unwrap();
    assert_eq!(decoded.status(), 200);
    let unknown = infer("no%20such").json(&features(32)).send().await.unwrap();
    let message = error_of(unknown, 404).await;
    assert!(message.contains("unknown model 'no such'"), "{message}");

    // After all that, the node still answers correctly.
    let ok = infer("fraud").json(&features(32)).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let metrics = node.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "meshserve_requests_total",
            &[("model", "fraud"), ("status", "400")]
        ) >= 7.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "meshserve_requests_total",
            &[("model", "_unknown"), ("status", "404")]
        ),
        2.0,
        "the unknown model and the unknown percent-encoded one"
    );
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let repo = copy_examples();
    let config = repo.path().join("node.toml");
    std::fs::write(&config, "[http]\nmax_body_bytes = 4096\n").unwrap();
    let node = TestNode::start(repo.path(), &["--config", config.to_str().unwrap()]);
    let http = client();
    let big = json!({"inputs": [{"name": "features", "shape": [64, 32], "datatype": "FP32", "data": vec![0.123456; 64 * 32]}]});
    let message = error_of(
        http.post(node.url("/v2/models/fraud/infer"))
            .json(&big)
            .send()
            .await
            .unwrap(),
        413,
    )
    .await;
    assert!(message.contains("4096"), "{message}");
    // A chunked body without Content-Length is cut off at the limit too.
    let status = chunked_post_status(node.addr, "/v2/models/fraud/infer", 10, 1000);
    assert_eq!(status, 413);
    let small = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]});
    assert_eq!(
        http.post(node.url("/v2/models/fraud/infer"))
            .json(&small)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Sends a chunked HTTP/1.1 POST of `chunks` × `size` spaces and returns the status code.
fn chunked_post_status(addr: std::net::SocketAddr, path: &str, chunks: usize, size: usize) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "POST {path} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    for _ in 0..chunks {
        // The server may answer and close as soon as the limit is crossed.
        if write!(stream, "{size:x}\r\n{}\r\n", " ".repeat(size)).is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn expired_deadlines_are_dropped_unrun_with_504() {
    let repo = copy_examples();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let mut body = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]});
    body["parameters"] = json!({"timeout": 1});
    let message = error_of(
        http.post(node.url("/v2/models/fraud/infer"))
            .json(&body)
            .send()
            .await
            .unwrap(),
        504,
    )
    .await;
    assert!(
        message.contains("deadline of 1 µs") && message.contains("it was not run"),
        "{message}"
    );
    body["parameters"] = json!({});
    let response = http
        .post(node.url("/v2/models/fraud/infer"))
        .header("meshserve-timeout-us", "1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let response = http
        .post(node.url("/v2/models/fraud/infer"))
        .header("meshserve-timeout-us", "1000000")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let metrics = node.metrics().await;
    // The expired requests never reached ONNX Runtime: one batch ran, for the one live request.
    assert_eq!(
        metric_sum(
            &metrics,
            "meshserve_batch_size_count",
            &[("model", "fraud")]
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_model_that_fails_at_run_time_gets_500_and_others_keep_serving() {
    let repo = copy_examples();
    support::copy_tree(
        &workspace_root().join("mesh/tests/models/reshape_by_value"),
        &repo.path().join("reshape_by_value"),
    );
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let bad = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    let message = error_of(
        http.post(node.url("/v2/models/reshape_by_value/infer"))
            .json(&bad)
            .send()
            .await
            .unwrap(),
        500,
    )
    .await;
    assert!(
        message.contains("reshape_by_value") && message.contains("failed"),
        "{message}"
    );
    let good = json!({"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]});
    let answer: Value = http
        .post(node.url("/v2/models/reshape_by_value/infer"))
        .json(&good)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["outputs"][0]["shape"], json!([2, 3]));
}

#[tokio::test]
async fn a_full_queue_sheds_with_503_and_retry_after() {
    let repo = copy_examples();
    std::fs::write(
        repo.path().join("heavy/config.toml"),
        "max_batch_size = 1\nqueue_capacity = 2\nintra_op_threads = 1\ninline_blocking_max_us = 0\n",
    )
    .unwrap();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let body = json!({"inputs": [{"name": "input", "shape": [1, 512], "datatype": "FP32", "data": vec![0.25; 512]}]});
    let requests = (0..64).map(|_| {
        http.post(node.url("/v2/models/heavy/infer"))
            .json(&body)
            .send()
    });
    let responses = join_all(requests).await;
    let mut ok = 0;
    let mut shed = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status().as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(response.headers()["retry-after"], "1");
                let message = error_of(response, 503).await;
                assert!(message.contains("overloaded"), "{message}");
                shed += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 1 && shed >= 1, "ok {ok}, shed {shed}");
}

async fn join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test]
async fn two_hundred_concurrent_requests_are_all_correct_and_batched() {
    let repo = copy_examples();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let reference = reference("fraud");
    let cases = reference["cases"].as_array().unwrap().clone();
    let requests = (0..200).map(|i| {
        let case = cases[i % cases.len()].clone();
        let request = http
            .post(node.url("/v2/models/fraud/infer"))
            .json(&json!({"id": i.to_string(), "inputs": case["inputs"]}));
        async move {
            let answer: Value = request.send().await.unwrap().json().await.unwrap();
            assert_eq!(answer["id"], i.to_string());
            check_outputs(
                "fraud",
                answer["outputs"].as_array().unwrap(),
                case["outputs"].as_array().unwrap(),
                None,
            );
        }
    });
    join_all(requests).await;
    // heavy (about 100 µs a run) may run one request inline at idle, but 200 at once queue
    // and must share batches.
    let body = json!({"inputs": [{"name": "input", "shape": [1, 512], "datatype": "FP32", "data": vec![0.25; 512]}]});
    let heavy = (0..200).map(|_| {
        let request = http.post(node.url("/v2/models/heavy/infer")).json(&body);
        async move { request.send().await.unwrap().status() }
    });
    for status in join_all(heavy).await {
        assert_eq!(status, 200);
    }
    let metrics = node.metrics().await;
    let batches = metric_sum(
        &metrics,
        "meshserve_batch_size_count",
        &[("model", "heavy")],
    );
    let singles = metric_sum(
        &metrics,
        "meshserve_batch_size_bucket",
        &[("model", "heavy"), ("le", "1.0")],
    );
    assert!(
        batches < 200.0,
        "every request ran alone: {batches} batches"
    );
    assert!(singles < batches, "no batch above size 1:\n{metrics}");
    assert_eq!(
        metric_sum(
            &metrics,
            "meshserve_requests_total",
            &[("model", "fraud"), ("status", "200")]
        ),
        200.0
    );
}

#[tokio::test]
async fn http2_prior_knowledge_serves_the_same_api() {
    let repo = copy_examples();
    let node = TestNode::start(repo.path(), &[]);
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let body = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]});
    let response = http
        .post(node.url("/v2/models/fraud/infer"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let p: Vec<f64> = answer["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!((p[0] + p[1] - 1.0).abs() < 1e-5, "softmax sums to 1: {p:?}");
}

#[tokio::test]
async fn a_timeout_of_zero_means_no_deadline_in_the_body_and_in_the_header() {
    let repo = copy_examples();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let mut body = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]});
    body["parameters"] = json!({"timeout": 0});
    let url = node.url("/v2/models/fraud/infer");
    assert_eq!(
        http.post(&url).json(&body).send().await.unwrap().status(),
        200
    );
    body["parameters"] = json!({});
    let response = http
        .post(&url)
        .header("meshserve-timeout-us", "0")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_deadline_says_whether_the_request_ran_and_one_the_queue_cannot_meet_is_refused_at_once()
{
    let repo = copy_examples();
    std::fs::write(
        repo.path().join("heavy/config.toml"),
        "max_batch_size = 64\nmax_queue_delay_us = 0\nintra_op_threads = 1\n",
    )
    .unwrap();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let url = node.url("/v2/models/heavy/infer");
    // 1024 rows take about 20 ms here; sent as binary tensors, they are queued at once.
    let big = |timeout_us: &str| {
        let header = json!({"inputs": [{"name": "input", "shape": [1024, 512], "datatype": "FP32",
            "parameters": {"binary_data_size": 1024 * 512 * 4}}]});
        support::binary_body(
            http.post(&url).header("meshserve-timeout-us", timeout_us),
            &header,
            std::iter::repeat_n(0.25f32.to_le_bytes(), 1024 * 512).flatten(),
        )
        .send()
    };
    // Requests that complete, a small one and a big one, so the model's run times are known
    // (admission predicts from them, per row weighed by rows: a busy machine that slows the
    // small run alone must not make one row look like milliseconds).
    let warm = json!({"inputs": [{"name": "input", "shape": [1, 512], "datatype": "FP32", "data": vec![0.25; 512]}]});
    assert_eq!(
        http.post(&url).json(&warm).send().await.unwrap().status(),
        200
    );
    assert_eq!(big("0").await.unwrap().status(), 200);
    // Alone on an idle model a request runs at once: its 5 ms deadline passes while it runs.
    let message = error_of(big("5000").await.unwrap(), 504).await;
    assert!(
        message.contains("deadline of 5000 µs") && message.contains("it was running"),
        "{message}"
    );
    // Two more big requests: one runs, the other queues behind it.
    let first = tokio::spawn(big("0"));
    let queued = tokio::spawn(big("0"));
    let waiting = Instant::now();
    loop {
        let metrics = node.metrics().await;
        if metric_sum(&metrics, "meshserve_queue_depth", &[("model", "heavy")]) >= 1.0 {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(5),
            "the big requests never queued"
        );
    }
    // Behind them, a request with a 2 ms deadline, which its own run would meet: the 1024
    // rows queued ahead of it take about 20 ms, so it is refused as it arrives (503, retry
    // later), never queued or run.
    let small = json!({"inputs": [{"name": "input", "shape": [1, 512], "datatype": "FP32", "data": vec![0.25; 512]}]});
    let started = Instant::now();
    let response = http
        .post(&url)
        .header("meshserve-timeout-us", "2000")
        .json(&small)
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    let retry_after = response.headers().get("retry-after").cloned();
    let message = error_of(response, 503).await;
    assert!(retry_after.is_some(), "{message}");
    assert!(
        message.contains("after this request's deadline of 2000 µs")
            && message.contains("refused without waiting"),
        "{message}"
    );
    let predicted_us: u64 = message
        .split("answer in about ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prediction in {message}"));
    assert!(
        predicted_us > 2000,
        "the prediction ({predicted_us} µs) is what refused it"
    );
    // Had it waited its turn, it would have come after two runs of about 20 ms.
    assert!(
        took < Duration::from_millis(15),
        "a request refused at once answered after {took:?}"
    );
    for response in [first, queued] {
        let response = response.await.unwrap().unwrap();
        let status = response.status();
        assert_eq!(status, 200, "{:?}", response.text().await);
    }
}

#[tokio::test]
async fn a_request_larger_than_max_batch_size_runs_alone_up_to_max_request_rows() {
    let repo = copy_examples();
    // No config at all: the batch dimension is dynamic, so batching defaults to 64 rows.
    std::fs::remove_file(repo.path().join("fraud/config.toml")).unwrap();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let url = node.url("/v2/models/fraud/infer");
    let rows = 1024;
    let data: Vec<f64> = (0..rows * 32)
        .map(|i| ((i * 7) % 23) as f64 / 23.0 - 0.5)
        .collect();
    let body = json!({"inputs": [{"name": "features", "shape": [rows, 32], "datatype": "FP32", "data": data}]});
    let response = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let output = &answer["outputs"][0];
    assert_eq!(output["shape"], json!([rows, 2]));
    let all = output["data"].as_array().unwrap();
    // Each row answers as it does alone.
    for row in [0, 1, 511, 1023] {
        let one = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": data[row * 32..row * 32 + 32]}]});
        let alone: Value = http
            .post(&url)
            .json(&one)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let alone = alone["outputs"][0]["data"].as_array().unwrap();
        for k in 0..2 {
            let (a, b) = (
                all[row * 2 + k].as_f64().unwrap(),
                alone[k].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-5, "row {row}: {a} vs {b}");
        }
    }

    // max_request_rows bounds what a client may send.
    std::fs::write(
        repo.path().join("fraud/config.toml"),
        "max_request_rows = 100\n",
    )
    .unwrap();
    let reload = http
        .post(node.url("/v2/repository/models/fraud/load"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    let message = error_of(http.post(&url).json(&body).send().await.unwrap(), 400).await;
    assert!(
        message.contains("between 1 and 100 rows (max_request_rows"),
        "{message}"
    );
}

/// The queue stage of an answer's `Server-Timing`, in ms.
fn queue_ms(timing: &str) -> f64 {
    timing
        .split(", ")
        .find_map(|part| part.strip_prefix("queue;dur="))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no queue stage in {timing}"))
}

#[tokio::test]
async fn at_idle_a_fast_model_runs_on_the_callers_thread_and_a_slow_one_on_its_worker() {
    let repo = copy_examples();
    // heavy again, with inline runs past the direct bound turned off.
    let queued = repo.path().join("heavy_queued");
    std::fs::create_dir_all(queued.join("1")).unwrap();
    std::fs::copy(
        repo.path().join("heavy/1/model.onnx"),
        queued.join("1/model.onnx"),
    )
    .unwrap();
    std::fs::write(queued.join("config.toml"), "inline_blocking_max_us = 0\n").unwrap();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let mut inline = Vec::new();
    for (model, input, width) in [
        ("fraud", "features", 32),
        ("heavy", "input", 512),
        ("heavy_queued", "input", 512),
    ] {
        let body = json!({"inputs": [{"name": input, "shape": [1, width], "datatype": "FP32", "data": vec![0.25; width]}]});
        let mut zero_queue = 0;
        for _ in 0..20 {
            let response = http
                .post(node.url(&format!("/v2/models/{model}/infer")))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let timing = support::server_timing(&response);
            // A worker thread takes microseconds to wake: only an inline run queues for 0.
            if queue_ms(&timing) == 0.0 {
                zero_queue += 1;
            }
        }
        inline.push(zero_queue);
    }
    // fraud runs in a few µs: once measured, one request at a time runs inline. heavy takes
    // about 100 µs, past the direct bound but under the blocking one (2 ms): one request at a
    // time runs inline too, its thread's other tasks moved away first. With the blocking
    // bound at 0 it always goes through its worker.
    assert!(
        inline[0] >= 12,
        "fraud ran inline {} of 20 times",
        inline[0]
    );
    assert!(
        inline[1] >= 12,
        "heavy ran inline {} of 20 times",
        inline[1]
    );
    assert_eq!(inline[2], 0, "heavy_queued ran inline");
    // A request far larger than the ones fraud ran inline is predicted by its rows (20,000
    // rows of a few µs each): it goes to the worker, not onto the front door's thread.
    let rows = 20_000;
    let header = json!({"inputs": [{"name": "features", "shape": [rows, 32], "datatype": "FP32",
        "parameters": {"binary_data_size": rows * 32 * 4}}]});
    let response = support::binary_body(
        http.post(node.url("/v2/models/fraud/infer")),
        &header,
        std::iter::repeat_n(0.25f32.to_le_bytes(), rows * 32).flatten(),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let timing = support::server_timing(&response);
    assert!(queue_ms(&timing) > 0.0, "20,000 rows ran inline: {timing}");
}

/// Issue 21: a thousand inputs that each claim a megabyte in a 58 KB body took a node from
/// 55 MiB to 1.1 GiB. Now the decoder reserves what the body can hold: the answer is 400 and
/// resident memory barely moves, for any model name, however often it is sent.
#[tokio::test]
async fn a_small_body_of_lying_shapes_costs_no_memory() {
    let repo = copy_examples();
    let node = TestNode::start(repo.path(), &[]);
    let input = r#"{"name":"a","shape":[262144],"datatype":"FP32","data":[]}"#;
    let body = format!("{{\"inputs\":[{}]}}", vec![input; 1000].join(","));
    assert!(body.len() < 60_000);
    let http = reqwest::Client::new();
    // One request first, so the memory of a connection and its first answer is counted
    // before the measurement starts.
    let warm = http
        .post(node.url("/v2/models/fraud/infer"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 400);
    let before = node.rss_bytes();
    for model in ["fraud", "no-such-model", "heavy"] {
        for _ in 0..10 {
            let response = http
                .post(node.url(&format!("/v2/models/{model}/infer")))
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{model}");
            let error: Value = response.json().await.unwrap();
            assert!(
                error["error"]
                    .as_str()
                    .unwrap()
                    .contains("shape needs 262144 elements"),
                "{error}"
            );
        }
    }
    let grown = node.rss_bytes().saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "resident memory grew by {} KiB over 30 such requests",
        grown >> 10
    );
}

#[tokio::test]
async fn a_model_without_config_gets_the_sessions_its_probe_chose_and_config_keys_win() {
    let repo = copy_examples();
    std::fs::remove_file(repo.path().join("fraud/config.toml")).unwrap();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let config = || async {
        let config: Value = http
            .get(node.url("/v2/models/fraud/config"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let count = config["instance_group"][0]["count"].as_u64().unwrap();
        let threads: u64 = config["parameters"]["intra_op_threads"]["string_value"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let why = config["parameters"]["sessions_chosen_because"]["string_value"]
            .as_str()
            .unwrap()
            .to_string();
        (count, threads, why)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    // Fraud's 64-row run is far too small for ONNX Runtime to split over threads.
    let (count, threads, why) = config().await;
    assert_eq!((count, threads), ((cores / 2).max(1), 1), "{why}");
    let expected = if cores > 1 {
        "single-threaded sessions on half the cores"
    } else {
        "one core"
    };
    assert!(
        why.contains("64-row run takes") && why.contains(expected),
        "{why}"
    );
    let log = node.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("sessions chosen") && l.contains(expected)),
        "the choice and its reason are logged:\n{log}"
    );
    let answer = http
        .post(node.url("/v2/models/fraud/infer"))
        .json(&json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // The operator's key wins; the other follows from it.
    std::fs::write(repo.path().join("fraud/config.toml"), "instances = 1\n").unwrap();
    let reload = http
        .post(node.url("/v2/repository/models/fraud/load"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    let (count, threads, why) = config().await;
    assert_eq!((count, threads), (1, cores), "{why}");
    assert!(why.contains("instances from config.toml"), "{why}");
}
