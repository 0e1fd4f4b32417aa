//! Hostile plugins against every bound of the sandbox (docs/plugins.md, "What the sandbox
//! promises"): each test runs `plugins/sandbox-probe` in a real node with one misbehaviour and
//! checks that the call fails alone, with a clear status, while another endpoint keeps answering.
//! Also: instance reuse and isolation, the 0.2 interface's direct replies and headers, stage
//! checks at load, and hot swap of an endpoint's plugins as one unit.

mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::{TestNode, plugin, start_with_config};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Options for probes that build and copy megabytes, in tests about size limits rather than
/// running time. On a freshly started VM (or one that reports free pages to its host) the first
/// touch of each page stalls the vCPU while the hypervisor backs it, and that stall is charged
/// as the thread's CPU time: CI measured an 8 MB lookup key past the default 50 ms deadline
/// where a warm machine needs under 5 ms.
const MOVES_MEGABYTES: &str = ", deadline_ms = 5000";

/// One endpoint of the probe: its name, stage (`pre` or `post`), behaviour and extra options.
type Probe<'a> = (&'a str, &'a str, &'a str, &'a str);

/// A node with the probe's endpoints, each with its own behaviour, plus `ok` (a healthy pre).
fn probe_node(node_options: &str, probes: &[Probe]) -> (TestNode, tempfile::TempDir) {
    plugin("sandbox_probe");
    let mut config = node_options.to_string();
    for (name, stage, behaviour, options) in [("ok", "pre", "ok", "")].iter().chain(probes.iter()) {
        config.push_str(&format!(
            "\n[endpoints.{name}]\nmodel = \"fraud\"\n{stage} = {{ path = \"{{plugins}}/sandbox_probe.wasm\", config = \"{behaviour}\"{options} }}\n"
        ));
    }
    start_with_config(&config)
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
    raw_len: usize,
}

impl Answer {
    fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }
}

/// Calls `endpoint` with an OIP body (so post-stage probes get the model's outputs).
async fn call_with(
    http: &reqwest::Client,
    node: &TestNode,
    endpoint: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let body = json!({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5; 32]}]});
    let mut request = http
        .post(node.url(&format!("/v1/endpoints/{endpoint}/invocations")))
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        raw_len: bytes.len(),
    }
}

async fn call(http: &reqwest::Client, node: &TestNode, endpoint: &str) -> Answer {
    call_with(http, node, endpoint, &[]).await
}

/// Asserts a failed call's status and that its error names the plugin and says `what`.
fn assert_fails(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    let error = answer.error();
    assert!(
        error.contains("sandbox_probe") && error.contains(what),
        "expected '{what}': {error}"
    );
}

#[tokio::test]
async fn a_log_flood_is_rate_limited_and_cannot_forge_log_lines() {
    let (node, _dir) = probe_node(
        "",
        &[
            (
                "flood",
                "pre",
                "log-flood:100000",
                ", deadline_ms = 5000, limits = { log_lines_per_second = 10, log_burst = 20 }",
            ),
            ("forge", "pre", "log-forge", ""),
        ],
    );
    let http = client();
    let before = node.log_text().len();
    let flood = call(&http, &node, "flood").await;
    assert_eq!(flood.status, 200, "{}", flood.body);
    let log = node.log_text();
    let flooded = log.matches("sandbox-probe flood line").count();
    assert!(
        (20..=30).contains(&flooded),
        "{flooded} of 100000 lines reached the log"
    );
    assert!(
        log.len() - before < 64 << 10,
        "the log grew by {} bytes",
        log.len() - before
    );
    let dropped = support::metric_sum(
        &node.metrics().await,
        "meshserve_plugin_log_dropped_total",
        &[("plugin", "sandbox_probe")],
    );
    assert!(dropped >= 99_000.0, "dropped {dropped}");

    assert_eq!(call(&http, &node, "forge").await.status, 200);
    let log = node.log_text();
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-01-01T00:00:00Z ERROR forged")),
        "a plugin forged a log line:\n{log}"
    );
    let forged = log
        .lines()
        .find(|l| l.contains("innocent"))
        .expect("the plugin's line");
    assert!(
        forged.contains("innocent\\n2026-01-01") && !forged.contains('\u{1b}'),
        "{forged}"
    );
    assert!(
        forged.len() < 2048 && forged.contains("bytes cut"),
        "{} bytes: {}",
        forged.len(),
        &forged[..200.min(forged.len())]
    );
    assert_eq!(call(&http, &node, "ok").await.status, 200);
}

/// Options for a probe that builds a 48 MiB argument in its own memory.
const HOLDS_48_MIB: &str = ", deadline_ms = 5000, memory_bytes = 134217728";

#[tokio::test]
async fn oversized_host_call_arguments_fail_before_they_are_copied() {
    let (node, _dir) = probe_node(
        "[features.cards]\npath = \"{examples}/models/fraud-check/cards.csv\"\n",
        &[
            ("huge-key", "pre", "lookup-key:50331648", HOLDS_48_MIB),
            ("huge-table", "pre", "lookup-table:50331648", HOLDS_48_MIB),
            ("key", "pre", "lookup-key:100000", ""),
            ("table", "pre", "lookup-table:5000", ""),
            ("fine-key", "pre", "lookup-key:1024", ""),
            (
                "wide-key",
                "pre",
                "lookup-key:3000000",
                &format!("{MOVES_MEGABYTES}, limits = {{ lookup_key_bytes = 4194304 }}"),
            ),
        ],
    );
    let http = client();
    // Past the argument budget (1 MiB and a little) wasmtime refuses the call before it copies
    // anything, whatever the plugin's much larger output limit.
    for name in ["huge-key", "huge-table"] {
        assert_fails(
            &call(&http, &node, name).await,
            500,
            "to one host call; the limit is 1048576 (call_argument_bytes)",
        );
    }
    // Within it, the lookup's own checks name the bound.
    assert_fails(
        &call(&http, &node, "key").await,
        500,
        "lookup key of 100000 bytes; the limit is 1024",
    );
    assert_fails(
        &call(&http, &node, "table").await,
        500,
        "lookup table name of 5000 bytes; the limit is 128",
    );
    assert_eq!(call(&http, &node, "fine-key").await.status, 200);
    // A plugin allowed longer keys gets an argument budget to match.
    assert_eq!(call(&http, &node, "wide-key").await.status, 200);
    assert_eq!(call(&http, &node, "ok").await.status, 200);
    let exposition = node.metrics().await;
    assert!(
        support::metric_sum(
            &exposition,
            "meshserve_plugin_failures_total",
            &[("plugin", "sandbox_probe"), ("kind", "limit")]
        ) >= 4.0,
        "{exposition}"
    );
}

#[tokio::test]
async fn host_resources_a_guest_holds_are_capped_per_instance() {
    let (node, _dir) = probe_node(
        "",
        &[
            ("million", "pre", "pollables:1000000", MOVES_MEGABYTES),
            ("some", "pre", "pollables:1000", ""),
            (
                "few-allowed",
                "pre",
                "pollables:1000",
                ", limits = { resources = 100 }",
            ),
        ],
    );
    let http = client();
    let rss_before = node.rss_bytes();
    assert_fails(
        &call(&http, &node, "million").await,
        500,
        "held more than 4096 host resources at once (pollables, streams, files); the limit is 4096",
    );
    let grew = node.rss_bytes().saturating_sub(rss_before);
    assert!(grew < 16 << 20, "the node grew by {grew} bytes");
    assert_eq!(call(&http, &node, "some").await.status, 200);
    assert_fails(
        &call(&http, &node, "few-allowed").await,
        500,
        "the limit is 100 (resources)",
    );
    // The failed instance is gone; the next call gets a fresh one.
    assert_eq!(call(&http, &node, "some").await.status, 200);
    assert_eq!(call(&http, &node, "ok").await.status, 200);
}

#[tokio::test]
async fn outputs_past_their_limits_fail_with_a_clear_error() {
    let limited = &format!("{MOVES_MEGABYTES}, limits = {{ output_bytes = 1048576 }}");
    let (node, _dir) = probe_node(
        "",
        &[
            ("big-tensor", "pre", "big-output:4000000", limited),
            ("fits", "pre", "big-output:256", limited),
            ("many", "pre", "many-tensors:100", ""),
            (
                "100k-tensors",
                "pre",
                "many-tensors:100000",
                MOVES_MEGABYTES,
            ),
            ("deep", "pre", "rank:20", ""),
            ("long-name", "pre", "long-name:1000", ""),
            ("big-body", "post", "big-body:4000000", limited),
            ("bad-header", "post", "bad-header", ""),
            (
                "many-headers",
                "pre",
                "many-headers:100000",
                MOVES_MEGABYTES,
            ),
            ("some-headers", "pre", "many-headers:100", ""),
        ],
    );
    let http = client();
    // Past what any plugin may return, a list fails when its length is read, before a piece
    // of it is copied; below that, the plugin's own limit names itself.
    assert_fails(
        &call(&http, &node, "many-headers").await,
        500,
        "returned 100000 headers; no plugin may return more than 1024",
    );
    assert_fails(
        &call(&http, &node, "some-headers").await,
        500,
        "replied with 100 headers; the limit is 32",
    );
    assert_fails(
        &call(&http, &node, "100k-tensors").await,
        500,
        "returned 100000 tensors; no plugin may return more than 1024",
    );
    assert_fails(
        &call(&http, &node, "big-tensor").await,
        500,
        "the output limit is 1048576",
    );
    // Within the limit, the tensor reaches the model, which refuses its shape: the plugin's fault.
    assert_fails(&call(&http, &node, "fits").await, 500, "does not accept");
    assert_fails(
        &call(&http, &node, "many").await,
        500,
        "returned 100 tensors; the limit is 64",
    );
    assert_fails(
        &call(&http, &node, "deep").await,
        500,
        "rank 20; the limit is 16",
    );
    assert_fails(
        &call(&http, &node, "long-name").await,
        500,
        "tensor name of 1000 bytes",
    );
    let big = call(&http, &node, "big-body").await;
    assert_fails(&big, 500, "the output limit is 1048576");
    assert!(
        big.raw_len < 1024,
        "{} bytes reached the client",
        big.raw_len
    );
    assert_fails(
        &call(&http, &node, "bad-header").await,
        500,
        "header 'content-length', which the node sets itself",
    );
    assert_eq!(call(&http, &node, "ok").await.status, 200);
}

#[tokio::test]
async fn a_sleeping_plugin_is_stopped_by_its_wall_clock_limit() {
    let (node, _dir) = probe_node(
        "",
        &[
            ("sleeper", "pre", "sleep:60000", ", wall_timeout_ms = 300"),
            (
                "post-sleeper",
                "post",
                "sleep:60000",
                ", wall_timeout_ms = 300",
            ),
        ],
    );
    let http = client();
    for endpoint in ["sleeper", "post-sleeper"] {
        let started = Instant::now();
        let answer = call(&http, &node, endpoint).await;
        let took = started.elapsed();
        assert_fails(&answer, 500, "300 ms wall-clock limit");
        assert!(
            !answer.error().contains("deadline"),
            "the running-time deadline was blamed: {}",
            answer.error()
        );
        assert!(
            took >= Duration::from_millis(280) && took < Duration::from_secs(3),
            "{endpoint}: {took:?}"
        );
    }
    assert_eq!(call(&http, &node, "ok").await.status, 200);
}

#[tokio::test]
async fn starting_an_instance_has_its_own_running_time_limit() {
    let (node, _dir) = probe_node(
        "",
        &[
            // Calls get 10 ms, starting gets the default 500: a 40 ms init is fine.
            ("slow-start", "pre", "init-spin:40", ", deadline_ms = 10"),
            (
                "endless-start",
                "pre",
                "init-loop",
                ", start_deadline_ms = 200",
            ),
        ],
    );
    let http = client();
    assert_eq!(call(&http, &node, "slow-start").await.status, 200);
    assert_fails(
        &call(&http, &node, "endless-start").await,
        503,
        "ran past its 200 ms start-up deadline",
    );
    let ready = http
        .get(node.url("/v2/models/endless-start/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(call(&http, &node, "ok").await.status, 200);
}

#[tokio::test]
async fn randomness_is_bounded_per_call() {
    let (node, _dir) = probe_node(
        "",
        &[
            ("some", "pre", "random:4096", ""),
            ("too-much", "pre", "random:1000000", ""),
            (
                "over-own-cap",
                "pre",
                "random:4096",
                ", limits = { random_bytes = 1024 }",
            ),
        ],
    );
    let http = client();
    assert_eq!(call(&http, &node, "some").await.status, 200);
    assert_fails(&call(&http, &node, "too-much").await, 500, "randomness");
    assert_fails(
        &call(&http, &node, "over-own-cap").await,
        500,
        "more than 1024 bytes of randomness",
    );
    // The allowance is per call: the reused instance draws again.
    assert_eq!(call(&http, &node, "some").await.status, 200);
}

#[tokio::test]
async fn one_plugins_runaway_calls_cannot_take_every_slot() {
    let (node, _dir) = probe_node(
        "",
        &[(
            "hog",
            "pre",
            "sleep:1500",
            ", max_instances = 2, queue_timeout_ms = 100, wall_timeout_ms = 5000",
        )],
    );
    let http = client();
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let (http, url) = (http.clone(), node.url("/v1/endpoints/hog/invocations"));
            tokio::spawn(async move {
                let response = http.post(url).body("{}").send().await.unwrap();
                (response.status().as_u16(), response.text().await.unwrap())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Both of the hog's instances are taken: a third call waits 100 ms, then 503.
    let started = Instant::now();
    let refused = call(&http, &node, "hog").await;
    assert_fails(&refused, 503, "instances stayed in use for 100 ms");
    assert!(refused.headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(1));
    // Another endpoint of the same plugin is not affected.
    let started = Instant::now();
    assert_eq!(call(&http, &node, "ok").await.status, 200);
    assert!(started.elapsed() < Duration::from_millis(500));
    for hog in hogs {
        let (status, body) = hog.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn a_plugin_whose_failures_spend_its_budget_pauses_until_it_refills() {
    // Each call loops to its 40 ms deadline and 50 ms of failures a second are allowed: the
    // second call (the first, on a slow machine) overdraws the budget by 20 ms or more, which
    // takes at least 400 ms to refill.
    let (node, _dir) = probe_node(
        "",
        &[(
            "runaway",
            "pre",
            "loop",
            ", deadline_ms = 40, failure_budget_ms = 50",
        )],
    );
    let http = client();
    let mut failed = 0;
    let refused = loop {
        let answer = call(&http, &node, "runaway").await;
        if answer.status == 503 {
            break answer;
        }
        assert_fails(&answer, 500, "running time");
        failed += 1;
        assert!(failed <= 3, "{failed} looping calls ran without a pause");
    };
    assert!(failed >= 1, "paused before any call failed");
    assert_fails(
        &refused,
        503,
        "its failing calls spent more than its 50 ms per second",
    );
    assert_eq!(refused.headers["retry-after"], "1");
    // Paused calls do not run (they would fail with 500); other endpoints never notice.
    let again = call(&http, &node, "runaway").await;
    assert_eq!(again.status, 503, "{}", again.body);
    assert_eq!(call(&http, &node, "ok").await.status, 200);
    // Once the budget has refilled, the plugin runs again (and fails on its own terms).
    let resume_ms: u64 = again
        .error()
        .rsplit("calls resume in ")
        .next()
        .and_then(|rest| rest.split(" ms").next()?.parse().ok())
        .unwrap_or_else(|| panic!("no pause in '{}'", again.error()));
    assert!(resume_ms <= 1000, "paused for {resume_ms} ms");
    tokio::time::sleep(Duration::from_millis(resume_ms + 20)).await;
    assert_fails(&call(&http, &node, "runaway").await, 500, "running time");
}

#[tokio::test]
async fn the_node_wide_memory_budget_refuses_growth_with_503() {
    let (node, _dir) = probe_node(
        "[plugins]\nmemory_budget_bytes = 41943040\n",
        // A generous running-time deadline: growing memory is slow on a busy machine, and
        // only the memory budget may stop this guest.
        &[(
            "hoard",
            "pre",
            "grow-memory",
            ", memory_bytes = 134217728, deadline_ms = 5000",
        )],
    );
    let http = client();
    let answer = call(&http, &node, "hoard").await;
    assert_fails(&answer, 503, "memory budget");
    assert!(answer.headers.contains_key("retry-after"));
    // The hoard's memory went back to the budget with its instance.
    for _ in 0..3 {
        assert_eq!(call(&http, &node, "ok").await.status, 200);
    }
}

#[tokio::test]
async fn clients_get_short_errors_and_the_log_gets_the_details() {
    let (node, _dir) = probe_node(
        "",
        &[
            ("panic", "pre", "panic", ""),
            ("debug-panic", "pre", "panic", ", debug = true"),
            ("exit", "pre", "exit", ""),
            ("post-panic", "post", "panic", ""),
            ("init-fail", "pre", "init-fail", ""),
        ],
    );
    let http = client();
    let panicked = call(&http, &node, "panic").await;
    assert_fails(&panicked, 500, "panicked: sandbox-probe was told to panic");
    assert!(panicked.raw_len < 300, "{}", panicked.body);
    assert!(!panicked.error().contains("wasm backtrace"));
    assert!(!panicked.error().contains("lib.rs"), "{}", panicked.body);
    // With the development switch on, the answer says where in the source it panicked.
    let located = call(&http, &node, "debug-panic").await;
    assert_fails(
        &located,
        500,
        "panicked: sandbox-probe was told to panic (at ",
    );
    assert!(located.error().contains("src/lib.rs:"), "{}", located.body);
    assert_fails(
        &call(&http, &node, "post-panic").await,
        500,
        "panicked: sandbox-probe post was told to panic",
    );
    // WASI 0.2 passes only success or failure to `exit`.
    assert_fails(
        &call(&http, &node, "exit").await,
        500,
        "exited with status 1",
    );
    // A config the plugin refuses is found at load: the endpoint is unavailable, saying why.
    assert_fails(
        &call(&http, &node, "init-fail").await,
        503,
        "init refused its config: sandbox-probe was told to fail init",
    );
    let ready = http
        .get(node.url("/v2/models/init-fail/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    // The log's backtrace names the plugin's own functions, demangled, before its cut: the
    // panic machinery above them is left out.
    let log = node.log_text();
    assert!(
        log.contains("frames of panic machinery left out")
            && log.contains("sandbox_probe.wasm!<sandbox_probe::"),
        "{log}"
    );
    assert_eq!(call(&http, &node, "ok").await.status, 200);
}

#[tokio::test]
async fn a_plugin_failing_every_request_grows_the_log_only_by_its_rate_limit() {
    let state = tempfile::tempdir().unwrap();
    let options = format!(
        ", isolation = \"per-call\", dirs = [{{ host = \"{}\", guest = \"/state\", writable = true }}], limits = {{ log_burst = 10, log_lines_per_second = 1 }}, failure_budget_ms = 1000000{MOVES_MEGABYTES}",
        state.path().display()
    );
    let (node, _dir) = probe_node(
        "",
        &[("init-fail", "pre", "init-fail-later:16777216", &options)],
    );
    let http = client();
    let before = node.log_text().len();
    let started = Instant::now();
    let calls = 40;
    for _ in 0..calls {
        let answer = call(&http, &node, "init-fail").await;
        assert_fails(&answer, 500, "init refused its config: mmm");
        assert!(
            answer.raw_len < 1024,
            "{} bytes reached the client",
            answer.raw_len
        );
    }
    let seconds = started.elapsed().as_secs() as usize + 1;
    // Each admitted line holds at most log_message_bytes (1 KiB) of the plugin's text, and
    // at most the burst plus one a second are admitted.
    let grew = node.log_text().len() - before;
    let most_lines = 10 + seconds + 1;
    assert!(
        grew < most_lines * 3 * 1024,
        "the log grew by {grew} bytes in {seconds} s of {calls} failing calls"
    );
    let dropped = support::metric_sum(
        &node.metrics().await,
        "meshserve_plugin_log_dropped_total",
        &[("plugin", "sandbox_probe")],
    );
    assert!(dropped >= (calls - most_lines) as f64, "dropped {dropped}");
    assert_eq!(call(&http, &node, "ok").await.status, 200);
}

#[tokio::test]
async fn plugins_see_only_the_headers_their_config_lists() {
    let (node, _dir) = probe_node(
        "",
        &[
            ("blind", "pre", "headers", ""),
            (
                "listed",
                "pre",
                "headers",
                ", headers = [\"x-user\", \"Authorization\"]",
            ),
            ("ungranted", "pre", "header:x-other", ""),
            (
                "granted",
                "pre",
                "header:X-User",
                ", headers = [\"x-user\"]",
            ),
        ],
    );
    let http = client();
    let sent = [
        ("authorization", "Bearer secret"),
        ("cookie", "session=1"),
        ("x-user", "u1"),
        ("x-other", "o"),
    ];
    let blind = call_with(&http, &node, "blind", &sent).await;
    assert_eq!(blind.status, 200);
    assert_eq!(blind.body, json!([]));
    let listed = call_with(&http, &node, "listed", &sent).await;
    let mut seen: Vec<String> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[0].as_str().unwrap().to_string())
        .collect();
    seen.sort();
    assert_eq!(seen, ["authorization", "x-user"]);

    // A header asked for by name but not granted reads as absent, and the log says why, once.
    let told = "asked for a request header its entry does not grant";
    assert!(!node.log_text().contains(told));
    for _ in 0..3 {
        let ungranted = call_with(&http, &node, "ungranted", &sent).await;
        assert_eq!((ungranted.status, &ungranted.body), (200, &Value::Null));
    }
    let granted = call_with(&http, &node, "granted", &sent).await;
    assert_eq!(granted.body, json!("u1"));
    // The node's log reaches its file a moment after the answer: wait for the line first.
    let waiting = Instant::now();
    while !node.log_text().contains(told) && waiting.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = node.log_text();
    assert_eq!(log.matches(told).count(), 1, "{log}");
    assert!(log.contains("x-other"), "{log}");
}

#[tokio::test]
async fn plugins_answer_directly_with_their_own_status_and_headers() {
    let (node, _dir) = probe_node(
        "",
        &[
            ("pre-reply", "pre", "reply:418", ""),
            ("post-reply", "post", "reply:201", ""),
        ],
    );
    let http = client();
    let pre = call(&http, &node, "pre-reply").await;
    assert_eq!(pre.status, 418);
    assert_eq!(pre.headers["x-probe"], "pre");
    assert_eq!(pre.body, json!({"answered": "by the pre stage"}));
    // The model did not run: the timing names only the pre stage.
    let timing = pre.headers["server-timing"].to_str().unwrap();
    assert!(
        timing.contains("pre;dur=") && !timing.contains("infer;dur="),
        "{timing}"
    );
    let post = call(&http, &node, "post-reply").await;
    assert_eq!(post.status, 201);
    assert_eq!(post.headers["x-probe"], "post");
    assert_eq!(post.body, json!({"outputs": 1}));
}

#[tokio::test]
async fn warm_instances_keep_state_only_within_their_stage_and_bounds() {
    let (node, _dir) = probe_node(
        "",
        &[
            (
                "reused",
                "pre",
                "count",
                ", max_instances = 1, max_calls_per_instance = 3",
            ),
            ("other", "pre", "count", ", max_instances = 1"),
            ("fresh", "pre", "count", ", isolation = \"per-call\""),
        ],
    );
    let http = client();
    let mut counts = Vec::new();
    for _ in 0..7 {
        let answer = call(&http, &node, "reused").await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        counts.push(answer.body["calls"].as_u64().unwrap());
    }
    // One warm instance serves three calls, then a fresh one takes over.
    assert_eq!(counts, [1, 2, 3, 1, 2, 3, 1]);
    // Another endpoint of the same plugin never sees those calls.
    assert_eq!(call(&http, &node, "other").await.body["calls"], 1);
    // per-call isolation: every call starts from nothing.
    for _ in 0..4 {
        assert_eq!(call(&http, &node, "fresh").await.body["calls"], 1);
    }
}

#[tokio::test]
async fn a_plugin_built_for_the_wrong_stage_fails_at_load_with_what_to_do() {
    plugin("threshold");
    let (node, _dir) = start_with_config(
        "[endpoints.wrong]\nmodel = \"fraud\"\npre = { path = \"{plugins}/threshold.wasm\" }\n\
         [endpoints.right]\nmodel = \"fraud\"\npost = { path = \"{plugins}/threshold.wasm\" }\n",
    );
    let http = client();
    let wrong = call(&http, &node, "wrong").await;
    assert_eq!(wrong.status, 503);
    assert!(
        wrong.error().contains("configured as a pre stage")
            && wrong.error().contains("meshserve:plugin/preprocess@0.2.0")
            && wrong.error().contains("export_plugin!(T: pre)"),
        "{}",
        wrong.error()
    );
    assert_eq!(call(&http, &node, "right").await.status, 200);
}

#[tokio::test]
async fn a_reload_swaps_an_endpoints_plugins_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let probe = std::fs::read(plugin("sandbox_probe")).unwrap();
    let (pre, post) = (dir.path().join("pre.wasm"), dir.path().join("post.wasm"));
    std::fs::write(&pre, &probe).unwrap();
    std::fs::write(&post, &probe).unwrap();
    let cache = dir.path().join("cache");
    let (node, _models) = start_with_config(&format!(
        "[plugins]\ncache_dir = \"{}\"\n[endpoints.pair]\nmodel = \"fraud\"\npre = {{ path = \"{}\", config = \"ok\" }}\npost = {{ path = \"{}\", config = \"ok\" }}\n",
        cache.display(),
        pre.display(),
        post.display()
    ));
    let cached = || {
        let mut names: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".cwasm"))
            .map(|name| name[..64].to_string())
            .collect();
        names.sort();
        names
    };
    let http = client();
    let versions = || async {
        let metadata: Value = http
            .get(node.url("/v2/models/pair"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        metadata["plugins"].clone()
    };
    let before = versions().await;
    assert_eq!(before.as_array().unwrap().len(), 2, "{before}");

    // A new pre and a broken post: the reload fails and neither changes.
    let mut changed = probe.clone();
    changed.extend_from_slice(b"\0\x05\x04pair"); // a custom section: new digest, same code
    std::fs::write(&pre, &changed).unwrap();
    std::fs::write(&post, b"\0asm broken").unwrap();
    let reload = http
        .post(node.url("/v1/endpoints/pair/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 400);
    let error: Value = reload.json().await.unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("its previous version keeps serving"),
        "{error}"
    );
    assert_eq!(versions().await, before);
    assert_eq!(call(&http, &node, "pair").await.status, 200);

    // Both fine: both swap at once.
    std::fs::write(&post, &probe).unwrap();
    let reload = http
        .post(node.url("/v1/endpoints/pair/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    let after = versions().await;
    assert_ne!(after[0]["sha256"], before[0]["sha256"]);
    assert_eq!(after[1]["sha256"], before[1]["sha256"]);
    assert_eq!(call(&http, &node, "pair").await.status, 200);

    // Compiled code is kept for the versions that serve: the probe (post) and the new pre.
    let serving = |v: &Value| v["sha256"].as_str().unwrap().to_string();
    let mut expected = vec![serving(&after[0]), serving(&after[1])];
    expected.sort();
    assert_eq!(cached(), expected);

    // Both stages on the new version: the old one is evicted from the disk cache.
    std::fs::write(&post, &changed).unwrap();
    let reload = http
        .post(node.url("/v1/endpoints/pair/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    let after = versions().await;
    assert_eq!(after[1]["sha256"], after[0]["sha256"]);
    assert_eq!(cached(), vec![serving(&after[0])]);

    // Touching a file without changing its bytes is not a new version.
    let stamp = after.clone();
    std::fs::write(&pre, &changed).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(versions().await, stamp);
    assert!(
        !node.log_text().contains("plugins hot-swapped"),
        "{}",
        node.log_text()
    );
}
