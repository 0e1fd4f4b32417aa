//! Starts real `meshserve` processes on loopback for the integration tests.

#![allow(dead_code)]

pub mod grpc_stream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository's root (the workspace), from this crate's folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A copy of the example model repository that a test may change (its models; see
/// [`copy_tree`]).
pub fn copy_examples() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_tree(&workspace_root().join("examples/models"), dir.path());
    dir
}

/// Copies `from` into `to`, leaving out the endpoint folders inside it (those holding an
/// `endpoint.toml`): a node serving the examples' models would otherwise compile every
/// example plugin at start. A test that serves an endpoint folder copies it by name.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            if entry.path().join("endpoint.toml").is_file() {
                continue;
            }
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A running node, killed when dropped.
pub struct TestNode {
    child: Child,
    pub addr: SocketAddr,
    /// The HTTP/3 address, when the node serves HTTP/3.
    pub http3: Option<SocketAddr>,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Disconnects when the log reader has read the process's last line.
    log_done: std::sync::mpsc::Receiver<()>,
    /// Keeps a connection open for the node's own reads (metrics), so polling them is cheap.
    http: reqwest::Client,
}

impl TestNode {
    /// Starts `meshserve serve` on a free loopback port with `repository` and extra arguments.
    pub fn start(repository: &Path, extra: &[&str]) -> TestNode {
        TestNode::spawn(TestNode::command(repository, extra))
    }

    /// The command [`TestNode::start`] runs, to change (its environment) before
    /// [`TestNode::spawn`].
    pub fn command(repository: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_meshserve"));
        command
            .args(["serve", "--http", "127.0.0.1:0", "--model-repository"])
            .arg(repository)
            .args(extra);
        command
    }

    /// Starts a prepared `meshserve` command and waits until it serves.
    pub fn spawn(mut command: Command) -> TestNode {
        command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start meshserve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let (done_tx, log_done) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Logged before it is announced, so a caller woken by it finds it in the log.
                sink.lock().unwrap().push(line.clone());
                if line.contains("meshserve serving") {
                    let _ = tx.send(line);
                }
            }
            drop(done_tx);
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "meshserve did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let addr = line
            .split("address=")
            .nth(1)
            .and_then(|rest| rest.split("://").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line}"));
        let http3 = line
            .split("http3=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        TestNode {
            child,
            addr,
            http3,
            log,
            log_done,
            http: reqwest::Client::new(),
        }
    }

    /// The node's mesh (QUIC) address, from its log, when it is in a mesh.
    pub fn mesh_addr(&self) -> Option<SocketAddr> {
        self.log_text()
            .lines()
            .find(|l| l.contains("mesh endpoint up"))
            .and_then(|l| l.split("quic=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory now, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal_term();
        self.wait_for_exit(within)
    }

    /// Sends SIGTERM without waiting: the node turns not-ready and leaves its mesh at once,
    /// and exits after its grace period and drain.
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
    }

    /// Waits for the process to exit by itself.
    pub fn wait_for_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Everything the process wrote is in the log before the caller reads it.
                let _ = self.log_done.recv_timeout(Duration::from_secs(2));
                return status;
            }
            assert!(Instant::now() < end, "meshserve did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's Prometheus exposition, fetched now.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the sum of a metric's samples whose label set contains every `labels` pair.
/// `request` with an OIP binary-tensor body: the JSON `header`, then the tensors' `data`,
/// and the header that says where the JSON ends.
pub fn binary_body(
    request: reqwest::RequestBuilder,
    header: &serde_json::Value,
    data: impl IntoIterator<Item = u8>,
) -> reqwest::RequestBuilder {
    let header = header.to_string();
    let json_length = header.len();
    let mut body = header.into_bytes();
    body.extend(data);
    request
        .header("Inference-Header-Content-Length", json_length)
        .body(body)
}

/// A response's `Server-Timing` header (the node always sends one on an answer).
pub fn server_timing(response: &reqwest::Response) -> String {
    response.headers()["server-timing"]
        .to_str()
        .unwrap()
        .to_string()
}

pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A first-party plugin component, built by `scripts/build-plugins.sh`.
pub fn plugin(name: &str) -> PathBuf {
    let path = workspace_root()
        .join("plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-plugins.sh",
        path.display()
    );
    path
}

/// Starts a node over a copy of the example models with `config` (TOML) as its node config;
/// `{plugins}`, `{examples}` and `{dir}` in it expand to the plugin build folder, the
/// repository's `examples/` and the node's temporary folder (which holds the model copy).
pub fn start_with_config(config: &str) -> (TestNode, tempfile::TempDir) {
    let dir = copy_examples();
    let plugins = workspace_root().join("plugins/target/wasm32-wasip2/release");
    let text = config
        .replace("{plugins}", &plugins.display().to_string())
        .replace(
            "{examples}",
            &workspace_root().join("examples").display().to_string(),
        )
        .replace("{dir}", &dir.path().display().to_string());
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        format!("model_repository = \"{}\"\n{text}", dir.path().display()),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshserve"));
    command
        .args(["serve", "--http", "127.0.0.1:0", "--config"])
        .arg(&path);
    (TestNode::spawn(command), dir)
}

/// Makes a mesh CA in `dir` with node, client and front-door (`--server`) certificates,
/// through the real binary.
pub fn make_certs(dir: &Path, nodes: &[&str], clients: &[&str], servers: &[&str]) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshserve"));
    command.arg("certs").arg("--dir").arg(dir);
    for (flag, names) in [
        ("--node", nodes),
        ("--client", clients),
        ("--server", servers),
    ] {
        for name in names {
            command.args([flag, name]);
        }
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{output:?}");
}

/// Resident memory of process `pid`, in bytes (`VmRSS` in `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// `wasm` (a component) with a custom section named `tag` appended: the same code under
/// another digest, as a rebuilt plugin would be.
pub fn with_custom_section(wasm: &[u8], tag: &str) -> Vec<u8> {
    let mut section = Vec::new();
    section.push(tag.len() as u8);
    section.extend(tag.as_bytes());
    section.extend(b"hot swap");
    let mut out = wasm.to_vec();
    out.push(0); // custom section id
    out.push(section.len() as u8);
    out.extend(section);
    out
}
