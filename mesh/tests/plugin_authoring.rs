//! The plugin author's loop, as an author runs it: docs/plugins.md's walk-throughs are read
//! from the page and every command in them is run as written, in an empty folder, with the
//! real `meshserve`, cargo and componentize-py; then each step's result is checked.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{TestNode, workspace_root};

/// The commands of the page's walk-through `name`: every line of its `sh` blocks, with
/// continuation lines joined.
fn walkthrough(name: &str) -> Vec<String> {
    let page = std::fs::read_to_string(workspace_root().join("docs/plugins.md")).unwrap();
    let start = format!("<!-- walkthrough: {name} -->");
    let section = page
        .split_once(&start)
        .and_then(|(_, rest)| rest.split_once("<!-- /walkthrough -->"))
        .map(|(section, _)| section)
        .unwrap_or_else(|| panic!("docs/plugins.md has no walk-through '{name}'"));
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block || line.trim().is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => pending += head,
            None => {
                commands.push(format!("{pending}{line}").trim().to_string());
                pending.clear();
            }
        }
    }
    assert!(
        !commands.is_empty(),
        "walk-through '{name}' has no commands"
    );
    commands
}

/// An author's shell: a working folder, `meshserve` on the PATH, and what runs in the
/// background (the node, `plugin watch`), stopped when it is dropped.
struct Author {
    dir: PathBuf,
    path: String,
    node: Option<TestNode>,
    watch: Option<(Child, PathBuf)>,
    /// Each command run and what it printed (stdout and stderr).
    ran: Vec<(String, String)>,
    _home: tempfile::TempDir,
}

impl Author {
    fn new() -> Author {
        let home = tempfile::tempdir().unwrap();
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_meshserve"));
        // meshserve, then the Python tools scripts/setup.sh installed (componentize-py).
        let path = format!(
            "{}:{}:{}",
            binary.parent().unwrap().display(),
            workspace_root().join(".venv/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Author {
            dir: home.path().to_path_buf(),
            path,
            node: None,
            watch: None,
            ran: Vec::new(),
            _home: home,
        }
    }

    fn command(&self, line: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .args(["-c", line])
            .current_dir(&self.dir)
            .env("PATH", &self.path);
        command
    }

    /// Runs one command of the page. The node and `plugin watch` run in the background, on
    /// a free port instead of 8000 (other tests run beside this one).
    fn run(&mut self, line: &str) {
        let program: Vec<&str> = line.split('#').next().unwrap().split_whitespace().collect();
        match program.as_slice() {
            // What scripts/setup.sh does on every machine that runs the tests.
            ["rustup", "target", "add", ..] | ["pip", "install", ..] => return,
            ["cd", folder] => {
                self.dir = self.dir.join(folder);
                return;
            }
            ["meshserve", "serve", rest @ ..] if !rest.contains(&"--check") => {
                let mut command = Command::new(env!("CARGO_BIN_EXE_meshserve"));
                command
                    .args(&program[1..])
                    .args(["--http", "127.0.0.1:0"])
                    .current_dir(&self.dir);
                self.node = Some(TestNode::spawn(command));
                self.ran.push((line.to_string(), String::new()));
                return;
            }
            ["meshserve", "plugin", "watch", ..] => {
                let node = self
                    .node
                    .as_ref()
                    .expect("the walk-through serves before it watches");
                let log = self.dir.join("target/watch.log");
                std::fs::create_dir_all(log.parent().unwrap()).unwrap();
                let file = std::fs::File::create(&log).unwrap();
                let child = self
                    .command(&format!("exec {line} --node {}", node.url("")))
                    .stdout(file.try_clone().unwrap())
                    .stderr(file)
                    .spawn()
                    .unwrap();
                self.watch = Some((child, log));
                self.ran.push((line.to_string(), String::new()));
                return;
            }
            _ => {}
        }
        let line_here = match &self.node {
            Some(node) => line
                .replace("http://localhost:8000", &node.url(""))
                .replace("localhost:8000", node.url("").trim_start_matches("http://")),
            None => line.to_string(),
        };
        let output = self.command(&line_here).output().unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "`{line}` failed:\n{printed}");
        self.ran.push((line.to_string(), printed));
    }

    /// What the command of the page starting with `prefix` printed.
    fn printed(&self, prefix: &str) -> &str {
        self.ran
            .iter()
            .find(|(line, _)| line.starts_with(prefix))
            .map(|(_, printed)| printed.as_str())
            .unwrap_or_else(|| panic!("the walk-through ran no `{prefix}`"))
    }

    /// The endpoint's answer to `example.json` now.
    fn answer(&self, url: &str) -> Value {
        let node = self.node.as_ref().expect("a node");
        let output = self
            .command(&format!("curl -s {} -d @example.json", node.url(url)))
            .output()
            .unwrap();
        serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
    }
}

impl Drop for Author {
    fn drop(&mut self) {
        if let Some((child, _)) = &mut self.watch {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The JSON line a `plugin run` printed.
fn json_line(printed: &str) -> Value {
    printed
        .lines()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON in:\n{printed}"))
}

#[test]
fn the_rust_walkthrough_runs_as_written_from_an_empty_folder_to_a_watched_endpoint() {
    let mut author = Author::new();
    for line in walkthrough("rust") {
        author.run(&line);
    }

    assert!(
        author
            .printed("cargo test")
            .contains("test result: ok. 4 passed; 0 failed"),
        "{}",
        author.printed("cargo test")
    );
    let component = author.dir.join("target/wasm32-wasip2/release/score.wasm");
    assert!(
        author.printed("meshserve plugin build").contains(&format!(
            "{}: ",
            component.display()
        )) && author.printed("meshserve plugin build").contains(
            "exports meshserve:plugin/preprocess@0.2.0 (pre stage) and meshserve:plugin/postprocess@0.2.0 (post stage)"
        ),
        "{}",
        author.printed("meshserve plugin build")
    );
    let tensors = json_line(
        author.printed("meshserve plugin run target/wasm32-wasip2/release/score.wasm --stage pre"),
    );
    assert_eq!(tensors["inputs"][0]["name"], "features");
    assert_eq!(tensors["inputs"][0]["shape"], serde_json::json!([1, 32]));
    // example.json: {"amount": 120.5, "hour": 23}, amounts over 1000, hours over 23.
    assert_eq!(tensors["inputs"][0]["data"][0], 0.1205);
    assert_eq!(tensors["inputs"][0]["data"][2], 1.0);
    let verdict = json_line(
        author.printed("meshserve plugin run target/wasm32-wasip2/release/score.wasm --stage post"),
    );
    assert_eq!(verdict, serde_json::json!({"fraud": true, "score": 0.7}));
    assert!(
        author
            .printed("meshserve serve --config node.toml --check")
            .contains("config ok; 1 endpoints load")
    );

    // The endpoint served the model's probability through both stages: the page's answer.
    let served = json_line(author.printed("curl"));
    let score = served["score"].as_f64().expect("a score");
    assert!((score - 0.49492806).abs() < 1e-4, "{served}");
    assert_eq!(served["fraud"], false, "{served}");

    // An edit while `plugin watch` runs is rebuilt and swapped into the node.
    let (_, watch_log) = author.watch.as_ref().expect("the walk-through watches");
    let watch_log = watch_log.clone();
    let ready = Instant::now();
    while !std::fs::read_to_string(&watch_log)
        .unwrap_or_default()
        .contains("watching")
    {
        assert!(
            ready.elapsed() < Duration::from_secs(120),
            "plugin watch never built"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let source = author.dir.join("src/lib.rs");
    let edited = std::fs::read_to_string(&source)
        .unwrap()
        .replace(
            "    fraud: bool,\n",
            "    fraud: bool,\n    edited: bool,\n",
        )
        .replace(
            "                score: row[1],\n",
            "                score: row[1],\n                edited: true,\n",
        );
    std::fs::write(&source, edited).unwrap();
    let edited_at = Instant::now();
    loop {
        let answer = author.answer("/v1/endpoints/score/invocations");
        if answer["edited"] == true {
            break;
        }
        assert!(
            edited_at.elapsed() < Duration::from_secs(180),
            "the edit never served; last answer {answer}; watch printed:\n{}",
            std::fs::read_to_string(&watch_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "edit to served answer through plugin watch: {:.1} s (a cargo build included)",
        edited_at.elapsed().as_secs_f64()
    );
    let watched = std::fs::read_to_string(&watch_log).unwrap();
    assert!(watched.contains("endpoint 'score' reloaded"), "{watched}");

    // The SDK's reference, as the page tells an author to open it (`cargo doc --open`).
    author.run("cargo doc -p meshserve-guest --no-deps");
    let reference = author.dir.join("target/doc/meshserve_guest");
    assert!(reference.join("testing/index.html").is_file());
    assert!(reference.join("trait.Preprocess.html").is_file());
}

#[test]
fn the_python_walkthrough_builds_and_runs_both_stages() {
    let mut author = Author::new();
    for line in walkthrough("python") {
        author.run(&line);
    }
    assert!(
        author.printed("meshserve plugin build").contains(
            "labels.wasm: "
        ) && author.printed("meshserve plugin build").contains(
            "exports meshserve:plugin/preprocess@0.2.0 (pre stage) and meshserve:plugin/postprocess@0.2.0 (post stage)"
        ),
        "{}",
        author.printed("meshserve plugin build")
    );
    let tensors = json_line(author.printed(
        "meshserve plugin run target/labels.wasm --cache-dir target/plugin-cache --stage pre",
    ));
    assert_eq!(tensors["inputs"][0]["shape"], serde_json::json!([1, 32]));
    assert_eq!(tensors["inputs"][0]["data"][0], 0.1205);
    assert_eq!(tensors["inputs"][0]["data"][2], 1.0);
    let verdict = json_line(author.printed(
        "meshserve plugin run target/labels.wasm --cache-dir target/plugin-cache --stage post",
    ));
    assert_eq!(verdict["fraud"], true);
    assert!(
        (verdict["score"].as_f64().unwrap() - 0.7).abs() < 1e-6,
        "{verdict}"
    );
    // The Python API to read, as the page says to write it.
    author.run("componentize-py -d wit -w pre bindings bindings");
    assert!(author.dir.join("bindings/wit_world/__init__.py").is_file());
    // The second run found the component compiled in the cache the first one wrote.
    assert!(
        author
            .printed("meshserve plugin run target/labels.wasm --cache-dir target/plugin-cache --stage post")
            .contains("source=\"disk\""),
        "{}",
        author.printed("meshserve plugin run target/labels.wasm --cache-dir target/plugin-cache --stage post")
    );
}

/// Runs `meshserve plugin new` in a fresh folder: the project's folder.
fn new_project(root: &Path, name: &str, args: &[&str]) -> PathBuf {
    let output = Command::new(env!("CARGO_BIN_EXE_meshserve"))
        .args(["plugin", "new", name])
        .args(args)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    root.join(name)
}

#[test]
fn plugin_new_writes_a_formatted_tested_project_that_exports_only_its_stage() {
    let root = tempfile::tempdir().unwrap();
    // The two projects share one build folder, so the SDK's dependencies build once.
    let target = root.path().join("shared-target");
    for (stage, tests, exports, not) in [
        ("pre", 3, "(pre stage)", "postprocess"),
        ("post", 2, "(post stage)", "preprocess"),
    ] {
        let dir = new_project(root.path(), &format!("only-{stage}"), &["--stage", stage]);
        let cargo = |args: &[&str]| {
            Command::new("cargo")
                .args(args)
                .current_dir(&dir)
                .env("CARGO_TARGET_DIR", &target)
                .stderr(Stdio::piped())
                .output()
                .unwrap()
        };
        let fmt = cargo(&["fmt", "--check"]);
        assert!(
            fmt.status.success(),
            "{}",
            String::from_utf8_lossy(&fmt.stdout)
        );
        let test = cargo(&["test"]);
        let printed = String::from_utf8_lossy(&test.stdout);
        assert!(
            test.status.success() && printed.contains(&format!("test result: ok. {tests} passed")),
            "{printed}{}",
            String::from_utf8_lossy(&test.stderr)
        );
        let build = Command::new(env!("CARGO_BIN_EXE_meshserve"))
            .args(["plugin", "build"])
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&build.stdout);
        assert!(
            build.status.success() && printed.contains(exports) && !printed.contains(not),
            "{printed}"
        );
    }

    // A project is never written over another, nor under a name that is not an endpoint's.
    let again = Command::new(env!("CARGO_BIN_EXE_meshserve"))
        .args(["plugin", "new", "only-pre"])
        .current_dir(root.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists and is not empty"));
    let bad = Command::new(env!("CARGO_BIN_EXE_meshserve"))
        .args(["plugin", "new", "Score Card"])
        .current_dir(root.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot name a plugin"));
}
