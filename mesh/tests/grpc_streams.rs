//! Hostile gRPC streams against a real node, over a raw HTTP/2 client whose flow control the
//! test controls: a stream whose answers are never read holds a bounded amount and is stopped
//! after the stall limit while other clients are served; ten thousand streams on one
//! connection are held to the node's stream cap; a malformed message ends only its stream; a
//! cancelled stream stops its queued work.

mod support;

use bytes::Bytes;
use meshserve::http::grpc::proto::ModelInferRequest;
use meshserve::http::grpc::proto::model_infer_request::InferInputTensor;
use prost::Message;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::grpc_stream::{Read, connect, connect_with_window, frame, open};
use support::{TestNode, metric_sum, start_with_config};

/// Held by the tests whose figures CPU taken by the others would stretch: the 10,000-stream
/// test took enough of two cores to delay the cancel test's first answer until half its
/// requests had run.
static CPU_HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fraud request of `rows` rows, as one gRPC-framed message.
fn framed_request(rows: usize, id: &str) -> Bytes {
    model_request("fraud", "features", 32, rows, id)
}

/// A request for `model`, whose one FP32 input `input` has `width` columns, of `rows` rows.
fn model_request(model: &str, input: &str, width: usize, rows: usize, id: &str) -> Bytes {
    let message = ModelInferRequest {
        model_name: model.into(),
        id: id.into(),
        inputs: vec![InferInputTensor {
            name: input.into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, width as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(vec![0u8; rows * width * 4])],
        ..Default::default()
    };
    frame(&message.encode_to_vec())
}

fn served_over_grpc(metrics: &str) -> f64 {
    metric_sum(
        metrics,
        "meshserve_requests_total",
        &[("model", "fraud"), ("protocol", "grpc")],
    )
}

/// A unary REST call answers, within `within`.
async fn rest_answers(node: &TestNode, within: Duration) {
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(node.url("/v2/models/fraud/infer"))
        .json(
            &serde_json::json!({"inputs": [{"name": "features", "shape": [1, 32],
            "datatype": "FP32", "data": vec![0.0; 32]}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
}

/// Rows per request in the stall test: answers of a few hundred bytes.
const ROWS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_answers_are_never_read_holds_a_bounded_amount_and_is_stopped() {
    const STALL_MS: u64 = 3000;
    let (node, _dir) = start_with_config(&format!("[http]\nbody_read_timeout_ms = {STALL_MS}\n"));
    let polite = connect(node.addr).await;
    // One answer's size, from a client that reads.
    let mut probe = open(&polite).await;
    probe.send(framed_request(ROWS, "probe")).await;
    let answer = probe.answer().await;
    assert_eq!(answer.error_message, "");
    let answer_bytes = 5 + answer.encoded_len();
    drop(probe);

    // A client that sends and never reads.
    let rude = connect(node.addr).await;
    let mut stalled = open(&rude).await;
    let offered = 3000;
    let sender = stalled.outgoing.clone().unwrap();
    tokio::spawn(async move {
        for i in 0..offered {
            if sender
                .send(framed_request(ROWS, &i.to_string()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // Wait until the node stops taking its requests, well inside the stall limit.
    let started = Instant::now();
    let mut served = served_over_grpc(&node.metrics().await);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = served_over_grpc(&node.metrics().await);
        if now == served && now > 1.0 {
            break;
        }
        served = now;
        assert!(
            started.elapsed() < Duration::from_millis(STALL_MS * 2 / 3),
            "still growing: {now}"
        );
    }
    let served = served - 1.0; // the probe's
    // What a stream that is never read can make the node run: answers to fill the client's
    // window (64 KiB) and one more chunk (tonic writes up to 32 KiB at once), the answers the
    // stream buffers and its requests in flight.
    let bound = (65_535 + 32_768) / answer_bytes
        + meshserve::http::grpc::stream::ANSWERS_BUFFERED
        + meshserve::http::grpc::stream::IN_FLIGHT
        + 2;
    assert!(
        served > 0.0 && served <= bound as f64,
        "served {served} of {offered} unread requests; bound {bound} ({answer_bytes}-byte answers)"
    );

    // Meanwhile the node serves everyone else: REST, and a stream on another connection.
    rest_answers(&node, Duration::from_secs(1)).await;
    let mut other = open(&polite).await;
    other.send(framed_request(1, "other")).await;
    assert_eq!(other.answer().await.infer_response.unwrap().id, "other");
    drop(other);

    // Past the stall limit the node drops the stream's work and stops it.
    tokio::time::sleep(Duration::from_millis(STALL_MS + 1000)).await;
    assert!(
        node.log_text().contains("left its answers unread"),
        "{}",
        node.log_text()
    );
    let metrics = node.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "meshserve_grpc_streams_open", &[]),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        served_over_grpc(&metrics) - 2.0,
        served,
        "nothing ran after the stall"
    );
    // The client that finally reads finds the answers the node kept, then RESOURCE_EXHAUSTED.
    let mut read = 0;
    let status = loop {
        match stalled.read().await {
            Read::Answer(answer) => {
                assert_eq!(answer.infer_response.unwrap().id, read.to_string());
                read += 1;
            }
            Read::End(status) => break status,
        }
    };
    assert_eq!(status.as_deref(), Some("8"), "after {read} answers");
    assert!(
        read > 0 && read as f64 <= served,
        "read {read}, served {served}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_on_one_connection_are_held_to_the_stream_cap() {
    let _alone = CPU_HEAVY.lock().await;
    const CAP: usize = 100;
    const STREAMS: usize = 10_000;
    let (node, _dir) = start_with_config(&format!("[http]\nmax_concurrent_streams = {CAP}\n"));
    let rss_before = node.rss_bytes();
    let connection = connect(node.addr).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let connection = connection.clone();
        calls.spawn(async move {
            let mut stream = open(&connection).await;
            stream.send(framed_request(1, &i.to_string())).await;
            let answer = stream.answer().await;
            stream.finish();
            let end = stream.read().await;
            (i, answer, matches!(end, Read::End(Some(ref s)) if s == "0"))
        });
    }
    // Sample the node's open streams while the calls run.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, url) = (sampling.clone(), node.url("/metrics"));
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut most_open = 0.0f64;
            while sampling.load(Ordering::Relaxed) {
                let metrics = http.get(&url).send().await.unwrap().text().await.unwrap();
                most_open = most_open.max(metric_sum(&metrics, "meshserve_grpc_streams_open", &[]));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most_open
        })
    };
    let mut answered = 0;
    let calls_done = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(done) = calls.join_next().await {
            let (i, answer, ended_ok) = done.unwrap();
            assert_eq!(answer.error_message, "", "stream {i}");
            assert_eq!(answer.infer_response.unwrap().id, i.to_string());
            assert!(ended_ok, "stream {i} did not end with OK");
            answered += 1;
        }
    })
    .await;
    sampling.store(false, Ordering::Relaxed);
    let most_open = sampler.await.unwrap();
    assert!(
        calls_done.is_ok(),
        "{answered} of {STREAMS} answered in time"
    );
    assert_eq!(answered, STREAMS);
    assert!(
        most_open <= CAP as f64 && most_open >= (CAP / 4) as f64,
        "at most {most_open} streams open at once; the cap is {CAP}"
    );
    let grown = node.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 256 << 20, "the node grew by {} MiB", grown >> 20);
    rest_answers(&node, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_ends_its_stream_after_the_answers_before_it_and_no_other() {
    let (node, _dir) = start_with_config("");
    let connection = connect(node.addr).await;
    let mut bad = open(&connection).await;
    let mut good = open(&connection).await;
    bad.send(framed_request(1, "before")).await;
    bad.send(frame(&[0xff; 7])).await;
    // Sent after the malformed one: the node may have ended the stream already.
    let _ = bad
        .outgoing
        .as_ref()
        .unwrap()
        .send(framed_request(1, "after"))
        .await;
    assert_eq!(bad.answer().await.infer_response.unwrap().id, "before");
    match bad.read().await {
        Read::End(status) => assert_eq!(status.as_deref(), Some("13"), "INTERNAL"),
        Read::Answer(answer) => panic!("answered past the malformed message: {answer:?}"),
    }
    for id in ["one", "two"] {
        good.send(framed_request(1, id)).await;
        assert_eq!(good.answer().await.infer_response.unwrap().id, id);
    }
    good.finish();
    assert!(matches!(good.read().await, Read::End(Some(s)) if s == "0"));
}

/// Requests of `model` this node has computed, from its statistics.
async fn computed(node: &TestNode, model: &str) -> u64 {
    let stats: serde_json::Value = reqwest::get(node.url(&format!("/v2/models/{model}/stats")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    stats["model_stats"][0]["inference_stats"]["compute_infer"]["count"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_stops_its_queued_work() {
    const SENT: usize = 64;
    let _alone = CPU_HEAVY.lock().await;
    let (node, _dir) = start_with_config("");
    // The client's windows hold every request at once: all 64 reach the node long before it
    // has computed them (with small windows they trickle in while it computes, and on a busy
    // machine most were computed before the last was sent).
    let connection = connect_with_window(node.addr, 32 << 20).await;
    let mut stream = open(&connection).await;
    let sender = stream.outgoing.clone().unwrap();
    // 64 requests of 64 heavy rows (tens of ms each): most still queued when the client
    // cancels.
    let sending = tokio::spawn(async move {
        for i in 0..SENT {
            let request = model_request("heavy", "input", 512, 64, &i.to_string());
            sender.send(request).await.unwrap();
        }
    });
    assert_eq!(stream.answer().await.infer_response.unwrap().id, "0");
    sending.await.unwrap();
    // Dropping the call (its request half included) resets its HTTP/2 stream. Once the node
    // has noticed, its count stops growing, with most of the requests never run (had the
    // queued work run, the count would grow every few tens of ms up to all 64). How many ran
    // before the node noticed depends on how fast a busy machine delivered the first answer
    // and the reset (on CI: 11 more after the reset, 32 in all once; 27 more, 50 in all, in a
    // run where the other tests of this file shared the two cores), so the bound leaves room:
    // at least an eighth never runs, where a stream whose queued work went on would run all.
    let at_drop = computed(&node, "heavy").await;
    drop(stream);
    let started = Instant::now();
    let mut was = at_drop;
    loop {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let now = computed(&node, "heavy").await;
        if now == was || started.elapsed() > Duration::from_secs(5) {
            break;
        }
        was = now;
    }
    let after = computed(&node, "heavy").await;
    eprintln!("{after} of {SENT} computed, {at_drop} when the stream was cancelled");
    assert!(
        after == was && after <= (SENT - SENT / 8) as u64,
        "{after} of {SENT} computed after the stream was cancelled at {at_drop} \
         (before the last look: {was}): at least an eighth should never run"
    );
    let metrics = node.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "meshserve_grpc_streams_open", &[]),
        0.0
    );
}
