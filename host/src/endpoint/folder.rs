//! Endpoints as folders of the model repository, beside the models:
//!
//! ```text
//! REPO/fraud-check/endpoint.toml      model, version, pre, post, tables
//! REPO/fraud-check/fraud_features.wasm
//! REPO/fraud-check/threshold.wasm
//! REPO/fraud-check/cards.csv
//! ```
//!
//! A folder is one unit: it travels between nodes by its digest as a model folder does, so
//! everything its plugins use (components, feature tables, granted directories) must be inside
//! it. This module reads and checks a folder; it loads nothing.

use crate::endpoint::EndpointConfig;
use crate::model::repository::Repository;
use crate::plugin::features::FeatureTableConfig;
use crate::plugin::spec::PluginSpec;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// The file that makes a repository folder an endpoint.
pub const ENDPOINT_FILE: &str = "endpoint.toml";

/// Files an endpoint folder may hold (its digest and transfer are bounded like a model's).
const MAX_FILES: usize = 4096;

/// `endpoint.toml` as written: paths relative to its folder.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    model: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    pre: Option<PluginSpec>,
    #[serde(default)]
    post: Option<PluginSpec>,
    /// Feature tables its plugins read, by the name they look them up with.
    #[serde(default)]
    tables: HashMap<String, FeatureTableConfig>,
}

/// An endpoint folder, read and checked: every path absolute and inside the folder.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointFolder {
    /// The endpoint's name (its folder's).
    pub name: String,
    /// Model, version and plugins.
    pub config: EndpointConfig,
    /// Its own feature tables.
    pub tables: HashMap<String, FeatureTableConfig>,
}

/// Why a folder is not an endpoint this node accepts.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// The folder's name breaks the repository's name rule.
    #[error(transparent)]
    Name(#[from] crate::model::repository::InvalidName),
    /// `endpoint.toml` could not be read.
    #[error("endpoint '{endpoint}': cannot read {path}: {source}")]
    Read {
        /// The endpoint.
        endpoint: String,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `endpoint.toml` is not a valid endpoint definition.
    #[error("endpoint '{endpoint}': {ENDPOINT_FILE}: {message}")]
    Parse {
        /// The endpoint.
        endpoint: String,
        /// The parser's message.
        message: String,
    },
    /// A path in it leaves the folder, or names nothing.
    #[error("endpoint '{endpoint}': {field} '{path}' {problem}")]
    Path {
        /// The endpoint.
        endpoint: String,
        /// Which setting.
        field: String,
        /// The path as written.
        path: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// It asks for something only a node's own config may grant.
    #[error("endpoint '{endpoint}': {message}")]
    NotMeshWide {
        /// The endpoint.
        endpoint: String,
        /// What and why.
        message: String,
    },
}

/// Whether `dir` is an endpoint folder (it holds [`ENDPOINT_FILE`]).
pub fn is_endpoint(dir: &Path) -> bool {
    dir.join(ENDPOINT_FILE).is_file()
}

/// The endpoint folders of the repository at `root`, sorted by name.
pub fn names(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| Repository::check_name(n).is_ok() && is_endpoint(&root.join(n)))
        .collect();
    names.sort();
    names
}

/// Reads and checks the endpoint folder `name` of the repository at `root`.
pub fn read(root: &Path, name: &str) -> Result<EndpointFolder, FolderError> {
    Repository::check_name(name)?;
    let folder = root.join(name);
    let file = folder.join(ENDPOINT_FILE);
    let text = std::fs::read_to_string(&file).map_err(|source| FolderError::Read {
        endpoint: name.to_string(),
        path: file.display().to_string(),
        source,
    })?;
    let parsed: EndpointFile = toml::from_str(&text).map_err(|e| FolderError::Parse {
        endpoint: name.to_string(),
        message: e.message().to_string(),
    })?;
    // Symlinks are resolved against the folder as it really is, so one that leaves it is seen.
    let base = folder.canonicalize().map_err(|source| FolderError::Read {
        endpoint: name.to_string(),
        path: folder.display().to_string(),
        source,
    })?;
    let inside = |field: String, path: &Path| -> Result<PathBuf, FolderError> {
        let refuse = |problem| FolderError::Path {
            endpoint: name.to_string(),
            field: field.clone(),
            path: path.display().to_string(),
            problem,
        };
        if path.as_os_str().is_empty()
            || !path.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(refuse(
                "must be a relative path inside the endpoint's folder (no '..', no absolute path)",
            ));
        }
        let real = base
            .join(path)
            .canonicalize()
            .map_err(|_| refuse("does not exist in the endpoint's folder"))?;
        if !real.starts_with(&base) {
            return Err(refuse("leaves the endpoint's folder (through a symlink)"));
        }
        Ok(real)
    };
    let mut config = EndpointConfig {
        model: parsed.model,
        version: parsed.version,
        pre: parsed.pre,
        post: parsed.post,
    };
    Repository::check_name(&config.model).map_err(|e| FolderError::Parse {
        endpoint: name.to_string(),
        message: format!("model: {e}"),
    })?;
    for (stage, spec) in [("pre", &mut config.pre), ("post", &mut config.post)] {
        let Some(spec) = spec else { continue };
        spec.path = inside(format!("{stage}.path"), &spec.path)?;
        for (i, grant) in spec.dirs.iter_mut().enumerate() {
            if grant.writable {
                return Err(FolderError::NotMeshWide {
                    endpoint: name.to_string(),
                    message: format!(
                        "{stage}.dirs[{i}] is writable: a folder that travels by its digest cannot change under its plugins; grant writable directories in node.toml's [endpoints]"
                    ),
                });
            }
            grant.host = inside(format!("{stage}.dirs[{i}].host"), &grant.host)?;
        }
        if !spec.env.is_empty() {
            return Err(FolderError::NotMeshWide {
                endpoint: name.to_string(),
                message: format!(
                    "{stage}.env: environment variables are a node's own; grant them in node.toml's [endpoints]"
                ),
            });
        }
    }
    let mut tables = parsed.tables;
    for (table, config) in &mut tables {
        config.path = inside(format!("tables.{table}.path"), &config.path)?;
    }
    Ok(EndpointFolder {
        name: name.to_string(),
        config,
        tables,
    })
}

/// What says a folder changed: each file's relative path, size, inode and change times, in
/// order. Cheap (metadata only); equal stamps mean nothing was written since.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FolderStamp(Vec<(PathBuf, u64, u64, i64, i64)>);

/// The stamp of the folder at `dir` (at most [`MAX_FILES`] files are looked at).
pub fn stamp(dir: &Path) -> FolderStamp {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            if files.len() >= MAX_FILES {
                break;
            }
            let path = entry.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                // Followed symlinks could loop; only real folders are walked.
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(path);
                }
                continue;
            }
            let relative = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
            let changed = meta.ctime() * 1_000_000_000 + meta.ctime_nsec();
            let modified = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            files.push((relative, meta.len(), meta.ino(), changed, modified));
        }
    }
    files.sort();
    FolderStamp(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("check");
        std::fs::create_dir_all(&dir).unwrap();
        for (path, text) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        root
    }

    #[test]
    fn a_folder_resolves_every_path_inside_itself() {
        let root = folder(&[
            (
                ENDPOINT_FILE,
                "model = \"fraud\"\npre = { path = \"pre.wasm\", dirs = [{ host = \"data\", guest = \"/data\" }] }\n[tables.cards]\npath = \"cards.csv\"\n",
            ),
            ("pre.wasm", "x"),
            ("data/a", "x"),
            ("cards.csv", "k,v\n"),
        ]);
        let read = read(root.path(), "check").unwrap();
        let base = root.path().join("check").canonicalize().unwrap();
        assert_eq!(read.config.model, "fraud");
        assert_eq!(
            read.config.pre.as_ref().unwrap().path,
            base.join("pre.wasm")
        );
        assert_eq!(
            read.config.pre.as_ref().unwrap().dirs[0].host,
            base.join("data")
        );
        assert_eq!(read.tables["cards"].path, base.join("cards.csv"));
        assert_eq!(names(root.path()), ["check"]);
    }

    #[test]
    fn paths_that_leave_the_folder_are_refused_with_the_setting_named() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("evil.wasm"), "x").unwrap();
        let cases = [
            (
                "pre = { path = \"../other/pre.wasm\" }",
                "pre.path",
                "no '..'",
            ),
            ("pre = { path = \"/etc/passwd\" }", "pre.path", "no '..'"),
            ("post = { path = \"link.wasm\" }", "post.path", "symlink"),
            (
                "pre = { path = \"pre.wasm\", dirs = [{ host = \"..\", guest = \"/up\" }] }",
                "pre.dirs[0].host",
                "no '..'",
            ),
            (
                "pre = { path = \"missing.wasm\" }",
                "pre.path",
                "does not exist",
            ),
        ];
        for (line, field, problem) in cases {
            let root = folder(&[
                (ENDPOINT_FILE, &format!("model = \"fraud\"\n{line}\n")),
                ("pre.wasm", "x"),
            ]);
            std::os::unix::fs::symlink(
                outside.path().join("evil.wasm"),
                root.path().join("check/link.wasm"),
            )
            .unwrap();
            let error = read(root.path(), "check").unwrap_err().to_string();
            assert!(
                error.contains(field) && error.contains(problem),
                "{line}: {error}"
            );
        }
        let root = folder(&[(
            ENDPOINT_FILE,
            "model = \"fraud\"\n[tables.t]\npath = \"../../t.csv\"\n",
        )]);
        let error = read(root.path(), "check").unwrap_err().to_string();
        assert!(error.contains("tables.t.path"), "{error}");
    }

    #[test]
    fn node_only_grants_and_bad_names_are_refused() {
        for (line, expected) in [
            (
                "pre = { path = \"pre.wasm\", dirs = [{ host = \"d\", guest = \"/d\", writable = true }] }",
                "writable",
            ),
            (
                "pre = { path = \"pre.wasm\", env = { A = \"b\" } }",
                "environment",
            ),
            ("surprise = 1", "unknown field"),
        ] {
            let root = folder(&[
                (ENDPOINT_FILE, &format!("model = \"fraud\"\n{line}\n")),
                ("pre.wasm", "x"),
                ("d/x", "x"),
            ]);
            let error = read(root.path(), "check").unwrap_err().to_string();
            assert!(error.contains(expected), "{line}: {error}");
        }
        let root = folder(&[(ENDPOINT_FILE, "model = \"../fraud\"\n")]);
        assert!(read(root.path(), "check").is_err());
        assert!(read(root.path(), "..").is_err());
    }

    #[test]
    fn a_stamp_moves_when_any_file_changes() {
        let root = folder(&[(ENDPOINT_FILE, "model = \"fraud\"\n"), ("t/x.csv", "a")]);
        let dir = root.path().join("check");
        let before = stamp(&dir);
        assert_eq!(before, stamp(&dir));
        std::fs::write(dir.join("t/x.csv"), "ab").unwrap();
        assert_ne!(before, stamp(&dir));
    }
}
