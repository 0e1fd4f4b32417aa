//! Endpoints with real WebAssembly plugins built from `plugins/`, in a real node: the
//! first-party plugins give the right answers, and every promise of the sandbox is attacked.

mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::{TestNode, plugin, start_with_config, workspace_root};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

const FIRST_PARTY: &str = r#"
[features.cards]
path = "{examples}/models/fraud-check/cards.csv"

[endpoints.fraud-check]
model = "fraud"
pre = { path = "{plugins}/fraud_features.wasm", config = '{"table": "cards"}' }
post = { path = "{plugins}/threshold.wasm", config = '{"output": "probabilities", "index": 1, "review": 0.4, "block": 0.6}' }

[endpoints.fraud-features]
model = "fraud"
pre = { path = "{plugins}/fraud_features.wasm" }

[endpoints.fraud-json]
model = "fraud"
pre = { path = "{plugins}/json_features.wasm", config = '{"input": "features", "fields": ["f0","f1","f2","f3","f4","f5","f6","f7","f8","f9","f10","f11","f12","f13","f14","f15","f16","f17","f18","f19","f20","f21","f22","f23","f24","f25","f26","f27","f28","f29","f30","f31"]}' }

[endpoints.fraud-top]
model = "fraud"
post = { path = "{plugins}/top_k.wasm", config = '{"labels": ["legit", "fraud"], "k": 2}' }

[endpoints.image]
model = "image_stats"
pre = { path = "{plugins}/image_preprocess.wasm", config = '{"input": "image", "width": 32, "height": 32}' }
"#;

fn first_party() -> (TestNode, tempfile::TempDir) {
    plugin("fraud_features");
    start_with_config(FIRST_PARTY)
}

async fn post_json(http: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let response = http.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[tokio::test]
async fn first_party_plugins_compose_with_the_model() {
    let (node, _dir) = first_party();
    let http = client();

    // json-features: the same 32 numbers by name give exactly the plain OIP answer.
    let values: Vec<f64> = (0..32).map(|i| (i as f64 - 16.0) / 10.0).collect();
    let named: serde_json::Map<String, Value> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("f{i}"), json!(v)))
        .collect();
    let (status, via_plugin) = post_json(
        &http,
        node.url("/v2/models/fraud-json/infer"),
        &Value::Object(named),
    )
    .await;
    assert_eq!(status, 200, "{via_plugin}");
    let plain = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": values}]});
    let (_, direct) = post_json(&http, node.url("/v2/models/fraud/infer"), &plain).await;
    assert_eq!(via_plugin["model_name"], "fraud-json");
    assert_eq!(
        via_plugin["outputs"][0]["data"],
        direct["outputs"][0]["data"]
    );

    // top-k as a post-plugin on the OIP route: labels ranked by the model's own probabilities.
    let (status, ranked) = post_json(&http, node.url("/v2/models/fraud-top/infer"), &plain).await;
    assert_eq!(status, 200, "{ranked}");
    let p = floats(&direct["outputs"][0]["data"]);
    let best = if p[1] > p[0] { "fraud" } else { "legit" };
    assert_eq!(ranked["top"][0]["label"], best);
    assert!((ranked["top"][0]["score"].as_f64().unwrap() - p[0].max(p[1])).abs() < 1e-6);
    assert_eq!(ranked["top"].as_array().unwrap().len(), 2);

    // fraud-features + threshold: the decision follows the probability the model gives for the
    // very features the pre-plugin made; known and unknown cards differ through the lookup.
    for card in ["card-0003", "card-0005", "no-such-card"] {
        let transaction = json!({"card": card, "amount": 950.0, "hour": 3, "merchant_risk": 0.8, "foreign": true});
        let (status, decision) = post_json(
            &http,
            node.url("/v1/endpoints/fraud-check/invocations"),
            &transaction,
        )
        .await;
        assert_eq!(status, 200, "{decision}");
        let (_, model) = post_json(
            &http,
            node.url("/v2/models/fraud-features/infer"),
            &transaction,
        )
        .await;
        let score = floats(&model["outputs"][0]["data"])[1];
        assert!(
            (decision["score"].as_f64().unwrap() - score).abs() < 1e-6,
            "{decision} vs {score}"
        );
        let expected = if score >= 0.6 {
            "block"
        } else if score >= 0.4 {
            "review"
        } else {
            "allow"
        };
        assert_eq!(decision["decision"], expected);
    }
    // A name the router has to decode reaches the same endpoint as the plain name, which
    // skips the router.
    let transaction = json!({"card": "card-0003", "amount": 950.0});
    let (_, plain) = post_json(
        &http,
        node.url("/v1/endpoints/fraud-check/invocations"),
        &transaction,
    )
    .await;
    let (status, decoded) = post_json(
        &http,
        node.url("/v1/endpoints/fraud%2Dcheck/invocations"),
        &transaction,
    )
    .await;
    assert_eq!(status, 200, "{decoded}");
    assert_eq!(decoded, plain);
    let known = post_json(
        &http,
        node.url("/v2/models/fraud-features/infer"),
        &json!({"card": "card-0003", "amount": 950.0}),
    )
    .await
    .1;
    let unknown = post_json(
        &http,
        node.url("/v2/models/fraud-features/infer"),
        &json!({"card": "nobody", "amount": 950.0}),
    )
    .await
    .1;
    assert_ne!(
        known["outputs"][0]["data"], unknown["outputs"][0]["data"],
        "card history must change the features"
    );
    let batch =
        json!([{"card": "card-0001", "amount": 10.0}, {"card": "card-0002", "amount": 20.0}]);
    let (status, decisions) = post_json(
        &http,
        node.url("/v1/endpoints/fraud-check/invocations"),
        &batch,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(decisions.as_array().unwrap().len(), 2);

    let metrics = node.metrics().await;
    assert!(
        support::metric_sum(
            &metrics,
            "meshserve_feature_lookups_total",
            &[("table", "cards"), ("result", "hit")]
        ) >= 4.0,
        "{metrics}"
    );
    assert!(
        support::metric_sum(
            &metrics,
            "meshserve_feature_lookups_total",
            &[("table", "cards"), ("result", "miss")]
        ) >= 2.0
    );
    assert!(
        support::metric_sum(
            &metrics,
            "meshserve_plugin_duration_seconds_count",
            &[("endpoint", "fraud-check"), ("stage", "pre")]
        ) >= 4.0
    );

    // A plugin's own 4xx reaches the client with the plugin's message.
    let (status, error) = post_json(
        &http,
        node.url("/v1/endpoints/fraud-check/invocations"),
        &json!({"amount": 1}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        error["error"].as_str().unwrap().contains("fraud_features"),
        "{error}"
    );
}

#[tokio::test]
async fn image_preprocessing_resizes_and_normalises_png_and_jpeg() {
    let (node, _dir) = first_party();
    let http = client();
    let images = workspace_root().join("examples/images");
    // Solid red: every pixel is (1, 0, 0) before ImageNet normalisation.
    let expected = [
        (1.0 - 0.485) / 0.229,
        (0.0 - 0.456) / 0.224,
        (0.0 - 0.406) / 0.225,
    ];
    for (file, tolerance) in [("red-64x48.png", 1e-4), ("red-64x48.jpg", 0.05)] {
        let bytes = std::fs::read(images.join(file)).unwrap();
        let response = http
            .post(node.url("/v1/endpoints/image/invocations"))
            .header(
                "content-type",
                if file.ends_with("png") {
                    "image/png"
                } else {
                    "image/jpeg"
                },
            )
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{file}");
        let answer: Value = response.json().await.unwrap();
        let means = floats(&answer["outputs"][0]["data"]);
        for (got, want) in means.iter().zip(expected) {
            assert!(
                (got - want).abs() < tolerance,
                "{file}: {means:?} vs {expected:?}"
            );
        }
    }
    // A grey ramp: channels equal, the mean of a 0..255 ramp is 0.5 before normalisation.
    let bytes = std::fs::read(images.join("ramp-40x20-grey.png")).unwrap();
    let answer: Value = http
        .post(node.url("/v1/endpoints/image/invocations"))
        .body(bytes)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let means = floats(&answer["outputs"][0]["data"]);
    assert!(((means[0] * 0.229 + 0.485) - 0.5).abs() < 0.02, "{means:?}");
    // Not an image: the plugin's 422.
    let response = http
        .post(node.url("/v1/endpoints/image/invocations"))
        .body("not an image")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
}

/// A node whose endpoints each run the sandbox probe with one behaviour; `granted` is the
/// folder some of them are granted (it must exist when the node loads them).
fn probe_node(extra: &str, granted: &std::path::Path) -> (TestNode, tempfile::TempDir) {
    plugin("sandbox_probe");
    let mut config = String::new();
    for (name, behaviour, limits) in [
        ("ok", "ok", ""),
        ("loop", "loop", ", deadline_ms = 100"),
        ("grow", "grow-memory", ", memory_bytes = 16777216"),
        ("read-denied", "read-file:/etc/hostname", ""),
        (
            "read-granted",
            "read-file:/data/granted.txt",
            ", dirs = [{ host = \"{granted}\", guest = \"/data\" }]",
        ),
        (
            "write-denied",
            "write-file:/data/new.txt",
            ", dirs = [{ host = \"{granted}\", guest = \"/data\" }]",
        ),
        ("connect", "connect:127.0.0.1:9", ""),
        ("env-denied", "env:HOME", ""),
        ("env-granted", "env:PROBE", ", env = { PROBE = \"yes\" }"),
        ("panic", "panic", ""),
        ("bad-shape", "bad-shape", ""),
        ("bad-datatype", "bad-datatype", ""),
        ("reject", "reject", ""),
    ] {
        config.push_str(&format!(
            "[endpoints.{name}]\nmodel = \"fraud\"\npre = {{ path = \"{{plugins}}/sandbox_probe.wasm\", config = \"{behaviour}\"{limits} }}\n"
        ));
    }
    config.push_str(extra);
    start_with_config(&config.replace("{granted}", &granted.display().to_string()))
}

async fn call(http: &reqwest::Client, node: &TestNode, endpoint: &str) -> (u16, String) {
    let response = http
        .post(node.url(&format!("/v1/endpoints/{endpoint}/invocations")))
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test]
async fn the_sandbox_holds_every_promise() {
    // The granted folder must exist before the node loads the plugins it is granted to.
    let granted = tempfile::tempdir().unwrap();
    std::fs::write(granted.path().join("granted.txt"), "hello").unwrap();
    let (node, _dir) = probe_node("", granted.path());
    let http = client();

    assert_eq!(call(&http, &node, "ok").await.0, 200);

    let started = Instant::now();
    let (status, message) = call(&http, &node, "loop").await;
    let took = started.elapsed();
    assert_eq!(status, 500, "{message}");
    assert!(
        message.contains("sandbox_probe") && message.contains("100 ms deadline"),
        "{message}"
    );
    assert!(
        took >= Duration::from_millis(90) && took < Duration::from_secs(2),
        "deadline took {took:?}"
    );

    let (status, message) = call(&http, &node, "grow").await;
    assert_eq!(status, 500);
    assert!(
        message.contains("memory") && message.contains("16777216"),
        "{message}"
    );

    for denied in ["read-denied", "write-denied", "connect", "env-denied"] {
        let (status, message) = call(&http, &node, denied).await;
        assert_eq!(status, 400, "{denied}: {message}");
        assert!(message.contains("denied"), "{denied}: {message}");
    }
    assert!(
        !granted.path().join("new.txt").exists(),
        "a read-only grant was written to"
    );
    assert_eq!(
        call(&http, &node, "read-granted").await.0,
        200,
        "a granted directory must be readable"
    );
    assert_eq!(
        call(&http, &node, "env-granted").await.0,
        200,
        "a granted variable must be readable"
    );

    let (status, message) = call(&http, &node, "panic").await;
    assert_eq!(status, 500);
    assert!(
        message.contains("panicked") && message.contains("sandbox-probe was told to panic"),
        "{message}"
    );

    let (status, message) = call(&http, &node, "bad-shape").await;
    assert_eq!(status, 500);
    assert!(message.contains("invalid tensor"), "{message}");
    let (status, message) = call(&http, &node, "bad-datatype").await;
    assert_eq!(status, 500);
    assert!(
        message.contains("does not accept") && message.contains("FP64"),
        "{message}"
    );

    let (status, message) = call(&http, &node, "reject").await;
    assert_eq!(status, 422);
    assert!(message.contains("rejects this request"), "{message}");

    // After every attack the same plugin and the node still serve.
    assert_eq!(call(&http, &node, "ok").await.0, 200);
    let metrics = node.metrics().await;
    for kind in ["deadline", "memory", "panic", "output"] {
        assert!(
            support::metric_sum(
                &metrics,
                "meshserve_plugin_failures_total",
                &[("plugin", "sandbox_probe"), ("kind", kind)]
            ) >= 1.0,
            "{kind}\n{metrics}"
        );
    }
}

#[tokio::test]
async fn a_runaway_plugin_does_not_stall_other_endpoints() {
    let granted = tempfile::tempdir().unwrap();
    let (node, _dir) = probe_node(
        "[endpoints.slow-loop]\nmodel = \"fraud\"\npre = { path = \"{plugins}/sandbox_probe.wasm\", config = \"loop\", deadline_ms = 1500 }\n",
        granted.path(),
    );
    let http = client();
    // Two runaways, one per async worker thread, for 1.5 s each.
    let runaways: Vec<_> = (0..2)
        .map(|_| {
            let http = http.clone();
            let url = node.url("/v1/endpoints/slow-loop/invocations");
            tokio::spawn(async move {
                http.post(url)
                    .body("{}")
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_millis(800) {
        assert_eq!(call(&http, &node, "ok").await.0, 200);
        served += 1;
    }
    for runaway in runaways {
        assert_eq!(runaway.await.unwrap(), 500);
    }
    eprintln!("served {served} requests in 800 ms beside two runaway plugins");
    // Sequential calls of a few hundred µs each: a stalled node would manage a handful.
    assert!(
        served >= 100,
        "only {served} requests served while plugins ran away"
    );
}

#[tokio::test]
async fn five_hundred_concurrent_requests_through_plugins_are_all_correct() {
    let (node, _dir) = first_party();
    let http = client();
    let values =
        |i: usize| -> Vec<f64> { (0..32).map(|j| ((i * 7 + j) % 13) as f64 / 13.0).collect() };
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let http = http.clone();
            let named: serde_json::Map<String, Value> = values(i).iter().enumerate().map(|(j, v)| (format!("f{j}"), json!(v))).collect();
            let plain = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": values(i)}]});
            let (via, direct) = (node.url("/v2/models/fraud-json/infer"), node.url("/v2/models/fraud/infer"));
            tokio::spawn(async move {
                let a = post_json(&http, via, &Value::Object(named)).await;
                let b = post_json(&http, direct, &plain).await;
                assert_eq!(a.0, 200, "{}", a.1);
                assert_eq!(a.1["outputs"][0]["data"], b.1["outputs"][0]["data"], "request {i}");
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// A node with one endpoint, `swapped` on the fraud model, whose plugin is a copy of a
/// first-party one that the test may replace.
struct LivePlugin {
    node: TestNode,
    /// The copy the endpoint's entry names.
    path: std::path::PathBuf,
    /// The first-party component's bytes.
    original: Vec<u8>,
    dir: tempfile::TempDir,
    _models: tempfile::TempDir,
}

impl LivePlugin {
    /// `entry` is the endpoint's stage line, with `{live}` for the copy's path.
    fn serve(name: &str, entry: &str) -> LivePlugin {
        let dir = tempfile::tempdir().unwrap();
        let original = std::fs::read(plugin(name)).unwrap();
        let path = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&path, &original).unwrap();
        let entry = entry.replace("{live}", &path.display().to_string());
        let (node, models) = start_with_config(&format!(
            "[endpoints.swapped]\nmodel = \"fraud\"\n{entry}\n"
        ));
        LivePlugin {
            node,
            path,
            original,
            dir,
            _models: models,
        }
    }
}

#[tokio::test]
async fn a_replaced_component_serves_within_half_a_second_without_a_reload_call() {
    let live = LivePlugin::serve("noop", "post = { path = \"{live}\" }");
    let (node, dir, live, original) = (&live.node, live.dir.path(), &live.path, &live.original);
    let http = client();
    let serving = || async {
        let endpoints: Value = http
            .get(node.url("/v1/endpoints"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        endpoints[0]["plugins"][0]["sha256"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let mut delays = Vec::new();
    for round in 0..6 {
        // A build's last step: the new file renamed over the old one.
        let version = support::with_custom_section(original, &format!("build {round}"));
        let staged = dir.join("staged.wasm");
        std::fs::write(&staged, &version).unwrap();
        let written = Instant::now();
        std::fs::rename(&staged, live).unwrap();
        let digest = meshserve_host::plugin::sha256_hex(&version);
        while serving().await != digest {
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "version {round} never served"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        delays.push(written.elapsed());
        // Off the poll's phase, so the rounds sample it.
        tokio::time::sleep(Duration::from_millis(90 + 37 * round)).await;
    }
    println!("written to served: {delays:?}");
    delays.sort();
    // The node looks every 250 ms: a look every second would put the median near 600 ms.
    assert!(
        delays[delays.len() / 2] < Duration::from_millis(450),
        "median {:?}",
        delays[delays.len() / 2]
    );
}

#[tokio::test]
async fn hot_swap_under_load_loses_no_request_and_a_broken_file_keeps_the_old_version() {
    let live = LivePlugin::serve(
        "sandbox_probe",
        "pre = { path = \"{live}\", config = \"ok\" }",
    );
    let (node, dir, live, original) = (&live.node, live.dir.path(), &live.path, &live.original);
    let http = client();
    let digest = |v: &Value| v["plugins"][0]["sha256"].as_str().unwrap().to_string();
    let first: Value = http
        .post(node.url("/v1/endpoints/swapped/reload"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (http, url, stop) = (
                http.clone(),
                node.url("/v1/endpoints/swapped/invocations"),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    statuses.push(
                        http.post(&url)
                            .body("{}")
                            .send()
                            .await
                            .unwrap()
                            .status()
                            .as_u16(),
                    );
                }
                statuses
            })
        })
        .collect();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let staged = dir.join("staged.wasm");
        std::fs::write(
            &staged,
            support::with_custom_section(original, &format!("v{round}")),
        )
        .unwrap();
        std::fs::rename(&staged, live).unwrap();
        if round == 1 {
            // The admin call swaps at once, without waiting for the file watcher.
            let reloaded: Value = http
                .post(node.url("/v1/endpoints/swapped/reload"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_ne!(digest(&reloaded), digest(&first));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let statuses = task.await.unwrap();
        total += statuses.len();
        assert!(
            statuses.iter().all(|&s| s == 200),
            "a request failed during the swap: {statuses:?}"
        );
    }
    assert!(total > 100, "too few requests to mean anything: {total}");
    // The file watcher polls every quarter second: give it a few rounds to report the swap.
    let waiting = Instant::now();
    while !node.log_text().contains("plugins hot-swapped") {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "the watcher never swapped:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A file that is not a component: the reload fails with the reason and says that the
    // previous version keeps serving, which it does.
    std::fs::write(live, b"this is not wasm").unwrap();
    let response = http
        .post(node.url("/v1/endpoints/swapped/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    let error = error["error"].as_str().unwrap();
    assert!(
        error.contains("was not reloaded; its previous version keeps serving")
            && error.contains("it is not a WebAssembly component")
            && !error.contains("expected"),
        "{error}"
    );
    assert_eq!(call(&http, node, "swapped").await.0, 200);
}

#[tokio::test]
async fn a_malformed_plugin_at_start_leaves_only_its_endpoint_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.wasm");
    std::fs::write(&broken, b"this is not wasm").unwrap();
    let config = format!(
        "[endpoints.broken]\nmodel = \"fraud\"\npre = {{ path = \"{}\" }}\n[endpoints.fine]\nmodel = \"fraud\"\npre = {{ path = \"{{plugins}}/sandbox_probe.wasm\", config = \"ok\" }}\n",
        broken.display()
    );
    let (node, _models) = start_with_config(&config);
    let http = client();
    let (status, message) = call(&http, &node, "broken").await;
    assert_eq!(status, 503);
    assert!(
        message.contains("broken.wasm") && message.contains("not a valid"),
        "{message}"
    );
    assert_eq!(
        http.get(node.url("/v2/models/broken/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(call(&http, &node, "fine").await.0, 200);
    assert_eq!(
        http.get(node.url("/v2/models/fine/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(node.url("/v2/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn a_python_plugin_serves_through_the_same_world_and_is_compiled_once() {
    let python = workspace_root().join("plugins/target/python/labels.wasm");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/build-plugins.sh",
        python.display()
    );
    let cache = tempfile::tempdir().unwrap();
    let config = format!(
        "[plugins]\ncache_dir = \"{}\"\n[endpoints.labels]\nmodel = \"fraud\"\npost = {{ path = \"{}\", config = '{{\"labels\": [\"legit\", \"fraud\"]}}' }}\n",
        cache.path().display(),
        python.display()
    );
    let http = client();
    let body = json!({"inputs": [{"name": "features", "shape": [2, 32], "datatype": "FP32",
        "data": (0..64).map(|i| (i % 9) as f64 / 3.0 - 1.0).collect::<Vec<_>>()}]});
    for (round, source) in [(0, "compiled"), (1, "disk")] {
        let (node, _models) = start_with_config(&config);
        assert!(
            node.log_text().contains(&format!("source=\"{source}\""))
                || node.log_text().contains(&format!("source={source}")),
            "round {round}: {}",
            node.log_text()
        );
        let (status, labelled) = post_json(&http, node.url("/v2/models/labels/infer"), &body).await;
        assert_eq!(status, 200, "{labelled}");
        let (_, direct) = post_json(&http, node.url("/v2/models/fraud/infer"), &body).await;
        let p = floats(&direct["outputs"][0]["data"]);
        for (row, answer) in labelled.as_array().unwrap().iter().enumerate() {
            let (legit, fraud) = (p[row * 2], p[row * 2 + 1]);
            assert_eq!(
                answer["label"],
                if fraud > legit { "fraud" } else { "legit" }
            );
            assert!((answer["probabilities"]["fraud"].as_f64().unwrap() - fraud).abs() < 1e-6);
        }
    }
    assert!(
        std::fs::read_dir(cache.path())
            .unwrap()
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
    );
}

#[tokio::test]
async fn an_endpoint_whose_init_fails_leaves_the_shared_compiled_plugin_cached() {
    plugin("sandbox_probe");
    let cache = tempfile::tempdir().unwrap();
    // Endpoints load in name order: the refused one compiles the file first.
    let config = format!(
        "[plugins]\ncache_dir = \"{}\"\n\
         [endpoints.a-refused]\nmodel = \"fraud\"\npre = {{ path = \"{{plugins}}/sandbox_probe.wasm\", config = \"init-fail\" }}\n\
         [endpoints.b-ok]\nmodel = \"fraud\"\npre = {{ path = \"{{plugins}}/sandbox_probe.wasm\", config = \"ok\" }}\n",
        cache.path().display(),
    );
    let http = client();
    let compiles = |log: &str| {
        log.matches("source=\"compiled\"").count() + log.matches("source=compiled").count()
    };
    // The first start compiles the file once for both endpoints; the second compiles nothing.
    for (round, expected) in [(0, 1), (1, 0)] {
        let (node, _models) = start_with_config(&config);
        let log = node.log_text();
        assert_eq!(compiles(&log), expected, "round {round}: {log}");
        assert_eq!(call(&http, &node, "a-refused").await.0, 503);
        assert_eq!(call(&http, &node, "b-ok").await.0, 200);
    }
}

#[test]
fn serve_check_loads_every_plugin_and_names_each_problem() {
    let probe = plugin("sandbox_probe");
    let threshold = plugin("threshold");
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, endpoints: &str| {
        let config = dir.path().join(name);
        std::fs::write(
            &config,
            format!(
                "model_repository = \"{}\"\n{endpoints}",
                dir.path().display()
            ),
        )
        .unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_meshserve"))
            .args(["serve", "--check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let fine = format!(
        "[endpoints.fine]\nmodel = \"fraud\"\npre = {{ path = \"{}\", config = \"ok\" }}\n",
        probe.display()
    );
    let broken = format!(
        "{fine}[endpoints.wrong]\nmodel = \"fraud\"\npre = {{ path = \"{}\" }}\n\
         [endpoints.refused]\nmodel = \"fraud\"\npre = {{ path = \"{}\", config = \"init-fail\" }}\n",
        threshold.display(),
        probe.display()
    );
    let checked = check("broken.toml", &broken);
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(!checked.status.success(), "{stderr}");
    let said = |endpoint: &str| {
        stderr
            .lines()
            .find(|line| line.starts_with(&format!("endpoint '{endpoint}': ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        said("wrong").contains("configured as a pre stage"),
        "{stderr}"
    );
    assert!(
        said("refused").contains("init refused its config: sandbox-probe was told to fail init"),
        "{stderr}"
    );
    assert!(said("fine").is_empty(), "{stderr}");
    assert!(
        stderr.contains("2 of 3 endpoints would not start"),
        "{stderr}"
    );

    let checked = check("fine.toml", &fine);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(String::from_utf8_lossy(&checked.stdout).contains("config ok; 1 endpoints load"));
}

#[tokio::test]
async fn a_python_exception_is_located_in_the_answer_with_the_debug_switch() {
    let python = workspace_root().join("plugins/target/python/labels.wasm");
    // Labels that are not a list: the plugin's `len(labels)` raises a TypeError.
    let config = format!(
        "[endpoints.labels]\nmodel = \"fraud\"\npost = {{ path = \"{}\", config = '{{\"labels\": 5}}', debug = true }}\n",
        python.display()
    );
    let (node, _models) = start_with_config(&config);
    let body = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]});
    let (status, error) = post_json(&client(), node.url("/v2/models/labels/infer"), &body).await;
    assert_eq!(status, 500, "{error}");
    let error = error["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("app.py:") && error.contains("TypeError"),
        "{error}"
    );
}

/// `meshserve plugin` with `args`: its exit status, stdout and stderr.
fn plugin_command(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_meshserve"))
        .arg("plugin")
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn plugin_build_builds_a_project_and_names_the_stage_it_exports() {
    let build = |dir: &std::path::Path| plugin_command(&["build", &dir.display().to_string()]);
    let (ok, stdout, stderr) = build(&workspace_root().join("plugins/threshold"));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("threshold.wasm: ")
            && stdout.contains("exports meshserve:plugin/postprocess@0.2.0 (post stage)")
            && !stdout.contains("preprocess"),
        "{stdout}"
    );
    let empty = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = build(empty.path());
    assert!(!ok);
    assert!(stderr.contains("holds neither a Cargo.toml"), "{stderr}");
}

#[test]
fn plugin_run_calls_one_component_without_a_node_and_says_how_it_failed() {
    let plugin_run = |args: &[&str]| plugin_command(&[&["run"], args].concat());
    let probe = plugin("sandbox_probe").display().to_string();
    let threshold = plugin("threshold").display().to_string();

    // A pre stage's tensors come out as an OIP request the model would take.
    let (ok, stdout, stderr) =
        plugin_run(&[&probe, "--stage", "pre", "--config", "ok", "--calls", "3"]);
    assert!(ok, "{stderr}");
    let json_line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    let tensors: Value = serde_json::from_str(json_line).unwrap_or(Value::Null);
    assert_eq!(tensors["inputs"][0]["name"], "features", "{stdout}");
    assert_eq!(tensors["inputs"][0]["shape"], json!([1, 32]), "{stdout}");
    assert!(stdout.contains("3 call(s): p50"), "{stdout}");

    // Granted headers reach the plugin; a reply is printed with its status.
    let (ok, stdout, stderr) = plugin_run(&[
        &probe,
        "--stage",
        "pre",
        "--config",
        "header:x-user",
        "--header",
        "X-User: u7",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("reply 200 application/json") && stdout.contains("\"u7\""),
        "{stdout}"
    );

    // A post stage takes a model's answer and returns its own.
    let outputs = r#"{"model_name": "fraud", "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.2, 0.8]}]}"#;
    let (ok, stdout, stderr) = plugin_run(&[
        &threshold,
        "--stage",
        "post",
        "--config",
        r#"{"output": "probabilities", "index": 1}"#,
        "--outputs",
        outputs,
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("reply 200") && stdout.contains("0.8"),
        "{stdout}"
    );

    // Failures exit non-zero and say where (a panic's line) or which limit (the deadline).
    let (ok, _, stderr) = plugin_run(&[&probe, "--stage", "pre", "--config", "panic"]);
    assert!(!ok);
    assert!(
        stderr.contains("panicked: sandbox-probe was told to panic (at ")
            && stderr.contains("src/lib.rs:"),
        "{stderr}"
    );
    let (ok, _, stderr) = plugin_run(&[
        &probe,
        "--stage",
        "pre",
        "--config",
        "loop",
        "--deadline-ms",
        "20",
    ]);
    assert!(!ok);
    assert!(stderr.contains("ran past its 20 ms deadline"), "{stderr}");
    let (ok, _, stderr) = plugin_run(&[&threshold, "--stage", "pre"]);
    assert!(!ok);
    assert!(stderr.contains("configured as a pre stage"), "{stderr}");
}

#[tokio::test]
async fn a_fuel_budget_stops_a_plugin_that_spends_it() {
    plugin("sandbox_probe");
    let (node, _dir) = start_with_config(
        "[plugins]\nfuel = true\n[endpoints.metered]\nmodel = \"fraud\"\npre = { path = \"{plugins}/sandbox_probe.wasm\", config = \"loop\", fuel = 1000000, deadline_ms = 10000 }\n[endpoints.ok]\nmodel = \"fraud\"\npre = { path = \"{plugins}/sandbox_probe.wasm\", config = \"ok\", fuel = 100000000 }\n",
    );
    let http = client();
    let (status, message) = call(&http, &node, "metered").await;
    assert_eq!(status, 500);
    assert!(message.contains("fuel budget of 1000000"), "{message}");
    assert_eq!(call(&http, &node, "ok").await.0, 200);
}

/// A copy of the examples' models with the example endpoint folders `names` beside them.
fn repository_with_endpoints(names: &[&str]) -> tempfile::TempDir {
    plugin("fraud_features");
    let repo = support::copy_examples();
    for name in names {
        let from = workspace_root().join("examples/models").join(name);
        support::copy_tree(&from, &repo.path().join(name));
    }
    repo
}

async fn endpoint_list(http: &reqwest::Client, node: &TestNode) -> Vec<Value> {
    let list: Value = http
        .get(node.url("/v1/endpoints"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list.as_array().unwrap().clone()
}

/// Calls fraud-check once: status, decision and the plugin versions that made it.
async fn check_card(http: &reqwest::Client, node: &TestNode) -> (u16, Value, String) {
    let transaction = json!({"card": "card-0003", "amount": 950.0, "hour": 3, "merchant_risk": 0.8, "foreign": true});
    let response = http
        .post(node.url("/v1/endpoints/fraud-check/invocations"))
        .json(&transaction)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let versions = response
        .headers()
        .get("meshserve-plugins")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        versions,
    )
}

/// Issue 22: an endpoint is a folder of the model repository (definition, components and
/// feature table inside it). The node serves it with no endpoint in its config; a change to
/// anything in the folder replaces the endpoint as a whole; a broken folder keeps the old
/// version serving with the reason listed; the admin API unloads and loads it; removing the
/// folder removes the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_folder_in_the_repository_serves_swaps_as_a_whole_and_unloads() {
    let repo = repository_with_endpoints(&["fraud-check", "fraud-ranked"]);
    let node = TestNode::start(repo.path(), &[]);
    let http = client();

    let listed = endpoint_list(&http, &node).await;
    let names: Vec<&str> = listed.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["fraud-check", "fraud-ranked"], "{listed:?}");
    for entry in &listed {
        assert_eq!(entry["source"], "repository");
        assert_eq!(entry["state"], "READY", "{entry}");
        assert_eq!(entry["plugins"].as_array().unwrap().len(), 2);
    }
    let (status, decision, first) = check_card(&http, &node).await;
    assert_eq!(status, 200, "{decision}");
    assert!(
        first.starts_with("pre=fraud_features@") && first.contains(" post=threshold@"),
        "{first}"
    );
    assert!(decision["decision"].is_string(), "{decision}");

    // Anything in the folder changes: here the post-plugin's config, so every card blocks.
    let definition = repo.path().join("fraud-check/endpoint.toml");
    let text = std::fs::read_to_string(&definition).unwrap();
    std::fs::write(
        &definition,
        text.replace(
            "\"review\": 0.5, \"block\": 0.9",
            "\"review\": 0.0, \"block\": 0.0",
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        let (status, decision, versions) = check_card(&http, &node).await;
        assert_eq!(status, 200, "{decision}");
        if versions != first {
            assert_eq!(decision["decision"], "block", "{decision}");
            break versions;
        }
        assert!(Instant::now() < deadline, "the new config never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pre = |tag: &str| tag.split(' ').next().unwrap().to_string();
    assert_eq!(pre(&first), pre(&second), "the pre-plugin did not change");

    // A broken component: the previous version keeps serving, and the listing says why.
    std::fs::write(repo.path().join("fraud-check/threshold.wasm"), b"not wasm").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = endpoint_list(&http, &node).await;
        let entry = listed.iter().find(|e| e["name"] == "fraud-check").unwrap();
        if entry["reason"].is_string() {
            assert_eq!(entry["state"], "READY", "{entry}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broken file was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, versions) = check_card(&http, &node).await;
    assert_eq!((status, versions.as_str()), (200, second.as_str()));

    // Unloaded by an admin (loopback): 404 until loaded again, whatever the folder does.
    std::fs::copy(
        plugin("threshold"),
        repo.path().join("fraud-check/threshold.wasm"),
    )
    .unwrap();
    let admin = |action: &str| node.url(&format!("/v1/endpoints/fraud-check/{action}"));
    let unloaded = http.post(admin("unload")).send().await.unwrap();
    assert_eq!(unloaded.status(), 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body, _) = check_card(&http, &node).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("unknown endpoint"));
    let reload = http.post(admin("reload")).send().await.unwrap();
    assert_eq!(
        reload.status(),
        404,
        "an unloaded endpoint is loaded, not reloaded"
    );
    let loaded = http.post(admin("load")).send().await.unwrap();
    assert_eq!(loaded.status(), 200);
    let (status, decision, _) = check_card(&http, &node).await;
    assert_eq!(
        (status, decision["decision"].as_str()),
        (200, Some("block"))
    );

    // The folder goes: so does the endpoint.
    std::fs::remove_dir_all(repo.path().join("fraud-ranked")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while endpoint_list(&http, &node).await.len() != 1 {
        assert!(Instant::now() < deadline, "fraud-ranked stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 22: nothing in an endpoint folder may point outside it, and an endpoint whose model
/// is missing is unavailable with the reason (503), not unknown (404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_folder_reaching_outside_is_refused_and_a_missing_model_is_503() {
    let repo = repository_with_endpoints(&[]);
    let threshold = plugin("threshold");
    let cases = [
        (
            "dotdot",
            "post = { path = \"../fraud/config.toml\" }",
            "post.path",
        ),
        (
            "absolute",
            &*format!("post = {{ path = \"{}\" }}", threshold.display()),
            "post.path",
        ),
        (
            "symlink",
            "post = { path = \"link.wasm\" }",
            "through a symlink",
        ),
        (
            "table",
            "post = { path = \"threshold.wasm\" }\n[tables.t]\npath = \"/etc/hostname\"",
            "tables.t.path",
        ),
    ];
    for (name, line, _) in &cases {
        let dir = repo.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&threshold, dir.join("threshold.wasm")).unwrap();
        std::os::unix::fs::symlink(&threshold, dir.join("link.wasm")).unwrap();
        std::fs::write(
            dir.join("endpoint.toml"),
            format!("model = \"fraud\"\n{line}\n"),
        )
        .unwrap();
    }
    let lost = repo.path().join("lost");
    std::fs::create_dir_all(&lost).unwrap();
    std::fs::copy(&threshold, lost.join("threshold.wasm")).unwrap();
    std::fs::write(
        lost.join("endpoint.toml"),
        "model = \"nowhere\"\npost = { path = \"threshold.wasm\" }\n",
    )
    .unwrap();
    let node = TestNode::start(repo.path(), &[]);
    let http = client();
    let listed = endpoint_list(&http, &node).await;
    for (name, _, expected) in &cases {
        let entry = listed.iter().find(|e| e["name"] == *name).unwrap();
        assert_eq!(entry["state"], "UNAVAILABLE", "{entry}");
        let reason = entry["reason"].as_str().unwrap();
        assert!(reason.contains(expected), "{name}: {reason}");
        let response = http
            .post(node.url(&format!("/v1/endpoints/{name}/invocations")))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503, "{name}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(expected), "{body}");
    }
    let response = http
        .post(node.url("/v1/endpoints/lost/invocations"))
        .json(&json!({"inputs": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("model 'nowhere'"), "{error}");
    assert!(node.log_text().contains("endpoint folder not loaded"));
}
