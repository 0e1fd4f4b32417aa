//! `meshserve plugin new`: a plugin project that builds, tests and serves as it is written,
//! from any folder. A Rust project carries the SDK of the interface this binary serves
//! (vendored, so no checkout or registry release is needed), a Python one the WIT.

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

use super::build::PLUGIN_WIT;

#[derive(Args)]
pub(super) struct NewArgs {
    /// The folder to create; its name is the project's, the crate's and the endpoint's
    /// (lower-case letters, digits, `-` and `_`, starting with a letter).
    dir: PathBuf,
    /// The stages the plugin implements.
    #[arg(long, value_enum, default_value = "pre")]
    stage: StagesArg,
    /// The language to write it in.
    #[arg(long, value_enum, default_value = "rust")]
    lang: LanguageArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StagesArg {
    Pre,
    Post,
    Both,
}

impl StagesArg {
    fn pre(self) -> bool {
        self != StagesArg::Post
    }

    fn post(self) -> bool {
        self != StagesArg::Pre
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LanguageArg {
    Rust,
    Python,
}

/// The SDK's files, as this binary was built with them: `(path in the SDK, text)`.
const SDK: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../../../guest-sdk/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../../../guest-sdk/src/lib.rs"),
    ),
    (
        "src/tensor.rs",
        include_str!("../../../../guest-sdk/src/tensor.rs"),
    ),
    (
        "src/testing.rs",
        include_str!("../../../../guest-sdk/src/testing.rs"),
    ),
    ("wit/plugin.wit", PLUGIN_WIT),
];

const CARGO_TOML: &str = include_str!("templates/Cargo.toml.in");
/// The versions the first-party plugins are built and tested with: a new project starts from
/// them (cargo drops what it does not use), so it builds with what meshserve was tested with,
/// without asking the registry's index.
const CARGO_LOCK: &str = include_str!("../../../../plugins/Cargo.lock");
const RUST_HEAD: &str = include_str!("templates/head.rs.in");
const RUST_PRE: &str = include_str!("templates/pre.rs.in");
const RUST_POST: &str = include_str!("templates/post.rs.in");
const RUST_TESTS_PRE: &str = include_str!("templates/tests_pre.rs.in");
const RUST_TESTS_POST: &str = include_str!("templates/tests_post.rs.in");
const RUST_TESTS_CONFIG: &str = include_str!("templates/tests_config.rs.in");
const PYTHON_HEAD: &str = include_str!("templates/head.py.in");
const PYTHON_PRE: &str = include_str!("templates/pre.py.in");
const PYTHON_POST: &str = include_str!("templates/post.py.in");

/// A request body the pre stage takes.
const TRANSACTION: &str = "{\"amount\": 120.5, \"hour\": 23}\n";

/// What the fraud model answers for one transaction, as `plugin run --outputs` takes it.
const MODEL_ANSWER: &str = "{\"outputs\": [{\"name\": \"probabilities\", \"shape\": [1, 2], \"datatype\": \"FP32\", \"data\": [0.3, 0.7]}]}\n";

pub(super) fn new(args: NewArgs) -> Result<()> {
    let name = args
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    check_name(&name)?;
    if args.dir.exists()
        && std::fs::read_dir(&args.dir)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(true)
    {
        bail!("{} exists and is not empty", args.dir.display());
    }
    let project = Project {
        name: name.clone(),
        stages: args.stage,
        lang: args.lang,
    };
    for (path, text) in project.files() {
        let path = args.dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "made {} plugin '{name}' in {}; in that folder:\n{}",
        match args.lang {
            LanguageArg::Rust => "Rust",
            LanguageArg::Python => "Python",
        },
        args.dir.display(),
        project.commands()
    );
    Ok(())
}

/// The project's name is also a crate's and an endpoint's (a URL segment).
fn check_name(name: &str) -> Result<()> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!(
            "'{name}' cannot name a plugin: use lower-case letters, digits, '-' and '_', starting with a letter (64 at most)"
        );
    }
    Ok(())
}

struct Project {
    name: String,
    stages: StagesArg,
    lang: LanguageArg,
}

impl Project {
    /// `score-card` -> `ScoreCard`, the plugin's type.
    fn type_name(&self) -> String {
        self.name
            .split(['-', '_'])
            .map(|word| {
                let mut chars = word.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect()
    }

    fn fill(&self, template: &str) -> String {
        template
            .replace("{{name}}", &self.name)
            .replace("{{Type}}", &self.type_name())
    }

    /// Where the built component lands, relative to the project.
    fn component(&self) -> String {
        match self.lang {
            LanguageArg::Rust => format!(
                "target/wasm32-wasip2/release/{}.wasm",
                self.name.replace('-', "_")
            ),
            LanguageArg::Python => format!("target/{}.wasm", self.name),
        }
    }

    fn files(&self) -> Vec<(String, String)> {
        let mut files = match self.lang {
            LanguageArg::Rust => {
                let mut files = vec![
                    ("Cargo.toml".to_string(), self.fill(CARGO_TOML)),
                    ("Cargo.lock".to_string(), CARGO_LOCK.to_string()),
                    ("src/lib.rs".to_string(), self.rust_source()),
                ];
                files.extend(SDK.iter().map(|(path, text)| {
                    (format!("vendor/meshserve-guest/{path}"), text.to_string())
                }));
                files
            }
            LanguageArg::Python => vec![
                ("app.py".to_string(), self.python_source()),
                ("wit/plugin.wit".to_string(), PLUGIN_WIT.to_string()),
            ],
        };
        files.push(("node.toml".into(), self.node_toml()));
        files.push(("README.md".into(), self.readme()));
        files.push((".gitignore".into(), "target/\n__pycache__/\n".into()));
        if self.stages.pre() {
            files.push(("example.json".into(), TRANSACTION.into()));
        } else {
            files.push(("example.json".into(), features_request()));
        }
        if self.stages.post() {
            files.push(("outputs.json".into(), MODEL_ANSWER.into()));
        }
        files
    }

    fn summary(&self, comment: &str) -> String {
        let mut summary = String::new();
        if self.stages.pre() {
            summary += &format!(
                "{comment}Pre: a transaction `{{\"amount\": 120.5, \"hour\": 23}}` into the model's features.\n"
            );
        }
        if self.stages.post() {
            summary += &format!(
                "{comment}Post: the fraud probability into `{{\"fraud\": false, \"score\": 0.49}}`.\n"
            );
        }
        summary
    }

    fn rust_source(&self) -> String {
        let mut names = vec!["Error", "Plugin", "Tensor", "config_json"];
        if self.stages.pre() {
            names.extend(["Pre", "Preprocess", "Request"]);
        }
        if self.stages.post() {
            names.extend(["Answer", "Context", "Postprocess"]);
        }
        // rustfmt's order: upper-case names first, then lower-case, each alphabetically.
        names.sort_by_key(|n| (n.starts_with(|c: char| c.is_ascii_lowercase()), *n));
        let imports = rustfmt_use("meshserve_guest", &names);
        let mut source = RUST_HEAD
            .replace("{{summary}}", &self.summary("//! "))
            .replace("{{imports}}", &imports);
        let mut tests = String::from(RUST_TESTS_CONFIG);
        let mut stages = Vec::new();
        if self.stages.pre() {
            source += RUST_PRE;
            tests += RUST_TESTS_PRE;
            stages.push("pre");
        }
        if self.stages.post() {
            source += RUST_POST;
            tests += RUST_TESTS_POST;
            stages.push("post");
        }
        source += &format!(
            "\nmeshserve_guest::export_plugin!({{{{Type}}}}: {});\n",
            stages.join(", ")
        );
        source += &format!(
            "\n// `cargo test` runs these natively: `meshserve_guest::testing` builds requests and\n// contexts, answers `host::lookup` from tables a test puts in, and keeps `host::info` lines.\n#[cfg(test)]\nmod tests {{\n    use super::*;\n    use meshserve_guest::testing;\n    use serde_json::json;\n{tests}}}\n"
        );
        self.fill(&source)
    }

    fn python_source(&self) -> String {
        let mut source = PYTHON_HEAD.replace("{{summary}}", &self.summary(""));
        if self.stages.pre() {
            source += PYTHON_PRE;
        }
        if self.stages.post() {
            source += PYTHON_POST;
        }
        self.fill(&source)
    }

    /// Where a client calls the endpoint, and what with.
    fn call(&self) -> String {
        if self.stages.pre() {
            format!(
                "curl -s localhost:8000/v1/endpoints/{}/invocations -d @example.json",
                self.name
            )
        } else {
            format!(
                "curl -s localhost:8000/v2/models/{}/infer -d @example.json",
                self.name
            )
        }
    }

    fn node_toml(&self) -> String {
        let entry = |stage: &str| {
            format!(
                "{stage} = {{ path = \"{}\", config = '{{\"threshold\": 0.5}}', debug = true }}\n",
                self.component()
            )
        };
        let mut toml = format!(
            "# Serves this plugin on the models bundled in meshserve; paths are relative to this file.\n#   meshserve serve --config node.toml\n#   {}\n\n[http]\nlisten = \"127.0.0.1:8000\"\n\n",
            self.call()
        );
        if self.lang == LanguageArg::Python {
            // A Python component is large: compile it once, not at every start.
            toml += "[plugins]\ncache_dir = \"target/plugin-cache\"\n\n";
        }
        toml += &format!("[endpoints.{}]\nmodel = \"fraud\"\n", self.name);
        toml +=
            "# debug = true puts where a failure happened into the 500: for development only.\n";
        if self.stages.pre() {
            toml += &entry("pre");
        }
        if self.stages.post() {
            toml += &entry("post");
        }
        toml
    }

    /// The author's loop, one command per line.
    fn commands(&self) -> String {
        let component = match self.lang {
            LanguageArg::Rust => self.component(),
            // Compiled once, not at every run (as the node.toml's cache).
            LanguageArg::Python => format!("{} --cache-dir target/plugin-cache", self.component()),
        };
        let mut lines = Vec::new();
        if self.lang == LanguageArg::Rust {
            lines
                .push("cargo test                      # the plugin's tests, natively".to_string());
        }
        lines.push(
            "meshserve plugin build          # the component, and the stage it exports".into(),
        );
        if self.stages.pre() {
            lines.push(format!(
                "meshserve plugin run {component} --stage pre --body @example.json"
            ));
        }
        if self.stages.post() {
            lines.push(format!(
                "meshserve plugin run {component} --stage post --outputs @outputs.json"
            ));
        }
        lines.push("meshserve serve --config node.toml --check".into());
        lines.push("meshserve serve --config node.toml   # then, from another terminal:".into());
        lines.push(self.call());
        lines.push(format!(
            "meshserve plugin watch --endpoint {}   # rebuild on every change, swap it in",
            self.name
        ));
        lines.iter().map(|l| format!("  {l}\n")).collect()
    }

    fn readme(&self) -> String {
        let toolchain = match self.lang {
            LanguageArg::Rust => {
                "It needs Rust 1.95 or newer and the wasm32-wasip2 target (`rustup target add wasm32-wasip2`). The SDK is in `vendor/meshserve-guest`; `cargo doc --open` shows its reference (`meshserve_guest`)."
            }
            LanguageArg::Python => {
                "It needs componentize-py (`pip install componentize-py==0.25.1`; or name it in `COMPONENTIZE_PY`). `wit/plugin.wit` is the contract; `componentize-py -d wit -w pre bindings bindings` writes the Python API to read."
            }
        };
        let commands: String = self
            .commands()
            .lines()
            .map(|l| format!("{}\n", l.trim_start()))
            .collect();
        format!(
            "# {}\n\nA meshserve plugin, made by `meshserve plugin new`. {toolchain}\n\n```sh\n{commands}```\n",
            self.name
        )
    }
}

/// `use krate::{names};` laid out as rustfmt would: one line if it fits in 100 columns, else
/// the names wrapped inside braces.
fn rustfmt_use(krate: &str, names: &[&str]) -> String {
    let one_line = format!("use {krate}::{{{}}};", names.join(", "));
    if one_line.len() <= 100 {
        return one_line;
    }
    let mut lines = vec![format!("use {krate}::{{")];
    let mut line = String::from("   ");
    for name in names {
        if line.len() + name.len() + 2 > 100 {
            lines.push(std::mem::replace(&mut line, String::from("   ")));
        }
        line += &format!(" {name},");
    }
    lines.push(line);
    lines.push("};".into());
    lines.join("\n")
}

/// An OIP request to the fraud model, for an endpoint without a pre stage.
fn features_request() -> String {
    // What the pre stage makes of the transaction the other projects send (120.5 at 23:00).
    let (amount, hour) = (120.5f32, 23.0f32);
    let angle = std::f32::consts::TAU * hour / 24.0;
    let mut features = vec![0.0f32; 32];
    features[..5].copy_from_slice(&[
        amount / 1000.0,
        amount.ln_1p() / 10.0,
        hour / 23.0,
        angle.sin(),
        angle.cos(),
    ]);
    serde_json::json!({
        "inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": features}]
    })
    .to_string()
        + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_must_serve_as_a_crate_and_an_endpoint() {
        for good in ["score", "score-card", "s2_v"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Score",
            "2score",
            "score card",
            "../score",
            &"s".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_type_is_the_name_in_camel_case() {
        let project = |name: &str| Project {
            name: name.into(),
            stages: StagesArg::Both,
            lang: LanguageArg::Rust,
        };
        assert_eq!(project("score-card_v2").type_name(), "ScoreCardV2");
        assert_eq!(
            project("score").component(),
            "target/wasm32-wasip2/release/score.wasm"
        );
        assert_eq!(
            project("score-card").component(),
            "target/wasm32-wasip2/release/score_card.wasm"
        );
    }
}
