//! Finding and starting ONNX Runtime.
//!
//! `ort` loads the shared library at run time (`load-dynamic`), and panics on first use if
//! it cannot. So the library is resolved and checked here first, and a missing library is
//! an error that says how to fix it. Order: the path from the config, then
//! `ORT_DYLIB_PATH`, then the folder of the binary itself (where the container image puts
//! it), then the `onnxruntime` Python wheel in the usual install locations.
//! Only one ONNX Runtime environment may exist per process, so it lives in a `OnceLock`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The wheel whose library we look for; its version matches `ort`'s `api-31` feature.
pub const ONNXRUNTIME_WHEEL: &str = "onnxruntime==1.31.1";

/// The command that installs the library where discovery finds it.
pub const INSTALL_HINT: &str = "python3 -m pip install onnxruntime==1.31.1";

/// Why ONNX Runtime could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No library at any known place.
    #[error(
        "ONNX Runtime library not found (looked in: {searched}). Install it with `{INSTALL_HINT}`, \
         or point to it with ORT_DYLIB_PATH=/path/to/libonnxruntime.so.1.31.1 or `onnxruntime_library` in the config"
    )]
    NotFound {
        /// The places tried, for the operator.
        searched: String,
    },
    /// A path was given explicitly but nothing is there.
    #[error(
        "ONNX Runtime library {path} (from {source_name}) does not exist. Install it with `{INSTALL_HINT}` or fix the path"
    )]
    Missing {
        /// The configured path.
        path: PathBuf,
        /// Where the path came from.
        source_name: &'static str,
    },
    /// The library exists but could not be loaded or initialised.
    #[error("ONNX Runtime library {path} could not be loaded: {message}")]
    Load {
        /// The library loaded.
        path: PathBuf,
        /// What ONNX Runtime said.
        message: String,
    },
    /// A second, different library was asked for after one was loaded.
    #[error(
        "ONNX Runtime is already loaded from {loaded}; a process can hold only one (asked for {requested})"
    )]
    AlreadyLoaded {
        /// The library in use.
        loaded: PathBuf,
        /// The library asked for now.
        requested: PathBuf,
    },
}

/// The process-wide ONNX Runtime environment and where its library came from.
pub struct Runtime {
    /// The library file in use.
    pub library: PathBuf,
    pub(crate) environment: ort::environment::Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Starts ONNX Runtime once per process, from `configured` if given, else by discovery.
/// Later calls return the same runtime.
pub fn init(configured: Option<&Path>) -> Result<&'static Runtime, RuntimeError> {
    if let Some(runtime) = RUNTIME.get() {
        if let Some(path) = configured
            && path != runtime.library
        {
            return Err(RuntimeError::AlreadyLoaded {
                loaded: runtime.library.clone(),
                requested: path.to_path_buf(),
            });
        }
        return Ok(runtime);
    }
    let library = resolve_library(configured)?;
    let load_error = |e: &dyn std::fmt::Display| RuntimeError::Load {
        path: library.clone(),
        message: e.to_string(),
    };
    let environment = ort::init_from(&library)
        .map_err(|e| load_error(&e))?
        .with_name("meshserve")
        .build()
        .map_err(|e| load_error(&e))?;
    tracing::info!(library = %library.display(), "ONNX Runtime loaded");
    // A racing initialiser may have won; its runtime is as good as ours.
    Ok(RUNTIME.get_or_init(|| Runtime {
        library,
        environment,
    }))
}

/// Finds the library file: `configured`, then `ORT_DYLIB_PATH`, then discovery.
pub fn resolve_library(configured: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    if let Some(path) = configured {
        return existing(path, "the config");
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return existing(Path::new(&path), "ORT_DYLIB_PATH");
    }
    let beside_binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    discover(beside_binary.as_deref(), &discovery_roots())
}

/// The library in `beside_binary` itself, else in the first Python prefix of `roots` that
/// has the wheel.
fn discover(beside_binary: Option<&Path>, roots: &[PathBuf]) -> Result<PathBuf, RuntimeError> {
    if let Some(found) = beside_binary.and_then(newest_library_in) {
        return Ok(found);
    }
    roots
        .iter()
        .find_map(|root| find_in_prefix(root))
        .ok_or_else(|| RuntimeError::NotFound {
            searched: beside_binary
                .into_iter()
                .chain(roots.iter().map(PathBuf::as_path))
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn existing(path: &Path, source_name: &'static str) -> Result<PathBuf, RuntimeError> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(RuntimeError::Missing {
            path: path.to_path_buf(),
            source_name,
        })
    }
}

/// Python prefixes where `pip install onnxruntime` may have put the wheel, most specific first.
fn discovery_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(venv));
    }
    // The repository's own virtual environment, seen from the working directory or from the
    // binary (target/release/meshserve sits two levels below the checkout).
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd.join(".venv"));
    }
    if let Ok(exe) = std::env::current_exe() {
        for ancestor in exe.ancestors().skip(1).take(4) {
            roots.push(ancestor.join(".venv"));
        }
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        roots.push(home.join(".local"));
        if let Ok(versions) = std::fs::read_dir(home.join(".pyenv/versions")) {
            let mut found: Vec<PathBuf> = versions.flatten().map(|e| e.path()).collect();
            found.sort();
            roots.extend(found.into_iter().rev());
        }
    }
    roots.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    roots.dedup();
    roots
}

/// Looks for `lib/python3.*/{site,dist}-packages/onnxruntime/capi/libonnxruntime.so.*` under `prefix`.
fn find_in_prefix(prefix: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(prefix.join("lib")).ok()?;
    let mut pythons: Vec<PathBuf> = lib
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3"))
        })
        .collect();
    pythons.sort();
    pythons.iter().rev().find_map(|python| {
        ["site-packages", "dist-packages"]
            .iter()
            .find_map(|packages| {
                let capi = python.join(packages).join("onnxruntime/capi");
                newest_library_in(&capi)
            })
    })
}

/// The wheel ships only a versioned file (`libonnxruntime.so.1.31.1`), with no plain `.so` link.
fn newest_library_in(dir: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libonnxruntime.so") || n.starts_with("libonnxruntime.dylib")
            })
        })
        .collect();
    candidates.sort();
    candidates.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Python prefix with the wheel's library in it, and the library's folder.
    fn wheel_prefix() -> (tempfile::TempDir, PathBuf) {
        let prefix = tempfile::tempdir().unwrap();
        let capi = prefix
            .path()
            .join("lib/python3.12/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        (prefix, capi)
    }

    #[test]
    fn finds_the_versioned_library_in_a_wheel_layout() {
        let (prefix, capi) = wheel_prefix();
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        assert_eq!(
            find_in_prefix(prefix.path()),
            Some(capi.join("libonnxruntime.so.1.31.1"))
        );
    }

    #[test]
    fn a_library_beside_the_binary_comes_before_any_wheel() {
        let (prefix, capi) = wheel_prefix();
        let bin = tempfile::tempdir().unwrap();
        let roots = [prefix.path().to_path_buf()];
        assert_eq!(
            discover(Some(bin.path()), &roots).unwrap(),
            capi.join("libonnxruntime.so.1.31.1"),
            "nothing beside the binary: the wheel"
        );
        std::fs::write(bin.path().join("libonnxruntime.so.1.31.1"), b"").unwrap();
        assert_eq!(
            discover(Some(bin.path()), &roots).unwrap(),
            bin.path().join("libonnxruntime.so.1.31.1")
        );
        let empty = tempfile::tempdir().unwrap();
        let message = discover(Some(empty.path()), &[]).unwrap_err().to_string();
        assert!(
            message.contains(&empty.path().display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn an_explicit_missing_path_says_how_to_fix_it() {
        let err = resolve_library(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("/nonexistent/libonnxruntime.so"),
            "{message}"
        );
        assert!(message.contains(INSTALL_HINT), "{message}");
    }
}
