//! `meshserve plugin build`: a plugin project into its component. A Rust crate is built by
//! cargo for wasm32-wasip2; a Python project (an `app.py`) by componentize-py against the WIT
//! this binary serves. Either way it then says what it made: file, size, digest and the stage
//! it exports, or why the file is not a plugin.

use anyhow::{Context, Result, bail};
use clap::Args;
use meshserve_host::plugin::runtime::exported_stages;
use meshserve_host::plugin::sha256_hex;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Args)]
pub(super) struct BuildArgs {
    /// The project folder (where its Cargo.toml or app.py is).
    #[arg(default_value = ".")]
    pub(super) dir: PathBuf,
}

/// The WIT every plugin is built against, as this binary serves it.
pub(super) const PLUGIN_WIT: &str = include_str!("../../../../guest-sdk/wit/plugin.wit");

/// What language a project folder is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Language {
    Rust,
    Python,
}

impl Language {
    pub(super) fn of(dir: &Path) -> Result<Language> {
        if dir.join("Cargo.toml").is_file() {
            Ok(Language::Rust)
        } else if dir.join("app.py").is_file() {
            Ok(Language::Python)
        } else {
            bail!(
                "{} holds neither a Cargo.toml (a Rust plugin) nor an app.py (a Python plugin)",
                dir.display()
            )
        }
    }
}

/// Builds the project in `dir` and reports each component it made; fails if the build failed
/// or made something that is not a plugin. Returns the components.
pub(super) fn build(dir: &Path) -> Result<Vec<PathBuf>> {
    let built = match Language::of(dir)? {
        Language::Rust => build_rust(dir)?,
        Language::Python => vec![build_python(dir)?],
    };
    let mut not_plugins = 0;
    for path in &built {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let size = format!("{:.1} KiB", bytes.len() as f64 / 1024.0);
        match exported_stages(&bytes) {
            Ok(stages) if !stages.is_empty() => {
                let exports: Vec<String> = stages
                    .iter()
                    .map(|s| format!("{} ({} stage)", s.interface(), s.as_str()))
                    .collect();
                println!(
                    "{}: {size}, sha256 {}, exports {}",
                    path.display(),
                    &sha256_hex(&bytes)[..12],
                    exports.join(" and ")
                );
            }
            Ok(_) => {
                not_plugins += 1;
                eprintln!(
                    "{}: {size}, a component that exports neither stage: build it with meshserve_guest::export_plugin!(T: pre), (T: post) or (T: pre, post)",
                    path.display()
                );
            }
            Err(problem) => {
                not_plugins += 1;
                eprintln!("{}: {problem}", path.display());
            }
        }
    }
    if not_plugins > 0 {
        bail!(
            "{not_plugins} of {} built files are not plugins",
            built.len()
        );
    }
    Ok(built)
}

fn build_rust(dir: &Path) -> Result<Vec<PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Cargo's diagnostics go to the author's terminal as usual; its JSON names what it built.
    let output = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run cargo in {}", dir.display()))?;
    if !output.status.success() {
        bail!(
            "cargo build failed in {} (if the target is missing: rustup target add wasm32-wasip2)",
            dir.display()
        );
    }
    let built: Vec<PathBuf> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .flat_map(|message| {
            let files = message["filenames"].as_array().cloned().unwrap_or_default();
            files
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
                .filter(|f| f.extension().is_some_and(|x| x == "wasm"))
                .collect::<Vec<_>>()
        })
        .collect();
    if built.is_empty() {
        bail!(
            "the build made no .wasm: a plugin crate needs crate-type = [\"cdylib\"] under [lib]"
        );
    }
    Ok(built)
}

/// The WIT world an `app.py` implements, from the export classes it defines.
pub(super) fn python_world(app: &str) -> Option<&'static str> {
    let defines = |class: &str| {
        app.lines()
            .any(|line| line.starts_with(&format!("class {class}(")))
    };
    match (defines("Preprocess"), defines("Postprocess")) {
        (true, true) => Some("pre-post"),
        (true, false) => Some("pre"),
        (false, true) => Some("post"),
        (false, false) => None,
    }
}

/// componentize-py: `$COMPONENTIZE_PY`, else the one on the PATH.
fn componentize_py() -> std::ffi::OsString {
    std::env::var_os("COMPONENTIZE_PY").unwrap_or_else(|| "componentize-py".into())
}

fn build_python(dir: &Path) -> Result<PathBuf> {
    let app = std::fs::read_to_string(dir.join("app.py"))
        .with_context(|| format!("cannot read {}/app.py", dir.display()))?;
    let world = python_world(&app).context(
        "app.py defines neither `class Preprocess(exports.Preprocess)` nor `class Postprocess(exports.Postprocess)`",
    )?;
    // The project's own WIT if it has one, else the one this binary serves.
    let bundled_wit;
    let wit = if dir.join("wit").is_dir() {
        dir.join("wit")
    } else {
        bundled_wit = tempfile::tempdir()?;
        std::fs::write(bundled_wit.path().join("plugin.wit"), PLUGIN_WIT)?;
        bundled_wit.path().to_path_buf()
    };
    let name = project_name(dir)?;
    let out = dir.join("target").join(format!("{name}.wasm"));
    std::fs::create_dir_all(dir.join("target"))?;
    let status = Command::new(componentize_py())
        .arg("-d")
        .arg(&wit)
        .args(["-w", world, "componentize", "app", "-p"])
        .arg(dir)
        .arg("-o")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run componentize-py ({e}): pip install componentize-py==0.25.1, or name it in COMPONENTIZE_PY"
            )
        })?;
    if !status.success() {
        bail!("componentize-py failed in {}", dir.display());
    }
    Ok(out)
}

/// The project's name: its folder's.
pub(super) fn project_name(dir: &Path) -> Result<String> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no folder {}", dir.display()))?;
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("the project folder has no name")
}
