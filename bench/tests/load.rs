//! The load generator against a real node (the `meshserve` binary built beside
//! `meshserve-bench`, serving the example `fraud` model): several sender threads, and a node
//! left at rest after a crowding load.

use meshserve_bench::{ServerProcess, start_server};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A node serving a copy of the example `fraud` model; the copy lives as long as the node.
async fn fraud_node() -> (ServerProcess, SocketAddr, tempfile::TempDir) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let node = Path::new(env!("CARGO_BIN_EXE_meshserve-bench")).with_file_name("meshserve");
    assert!(
        node.is_file(),
        "{} is missing: build it with `cargo build --release -p meshserve`",
        node.display()
    );
    let repository = tempfile::tempdir().unwrap();
    copy(
        &root.join("examples/models/fraud"),
        &repository.path().join("fraud"),
    );
    let args = ["--model-repository".as_ref(), repository.path().as_os_str()];
    let (process, addr) = start_server(&node, &args).await.unwrap();
    (process, addr, repository)
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target: PathBuf = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `meshserve-bench http` against `addr` with these options, for one second.
fn load(addr: SocketAddr, options: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshserve-bench"))
        .args([
            "http",
            "--addr",
            &addr.to_string(),
            "--model",
            "fraud",
            "--json",
        ])
        .args(["--duration-secs", "1", "--warmup-secs", "0"])
        .args(options)
        .output()
        .unwrap()
}

fn report(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn the_load_generator_on_two_threads_drives_a_node_without_errors() {
    let (_node, addr, _repository) = fraud_node().await;
    let refused = load(addr, &["--threads", "0"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--threads"), "{stderr}");
    let report = report(&load(addr, &["--threads", "2", "--concurrency", "8"]));
    let run = &report["runs"][0];
    assert_eq!(run["errors"], 0, "{report}");
    assert_eq!(run["unanswered"], 0, "{report}");
    assert!(run["ok"].as_u64().unwrap() > 100, "{report}");
}

#[tokio::test]
async fn a_node_at_rest_after_a_crowding_load_uses_almost_no_cpu() {
    let (node, addr, _repository) = fraud_node().await;
    // Concurrency 64 crowds the front door, so the model's workers watch for jobs between
    // batches; once the load stops, no thread may keep watching (or spinning).
    let report = report(&load(addr, &["--concurrency", "64"]));
    assert_eq!(report["runs"][0]["errors"], 0, "{report}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = || node.cpu_time().expect("/proc/<pid>/stat");
    let before = cpu();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu() - before;
    // A thread left spinning would use about two seconds of CPU in two seconds.
    assert!(
        used <= Duration::from_millis(200),
        "{used:?} of CPU in two idle seconds"
    );
}
