//! The model repository on disk, Triton's layout: `ROOT/<model>/<version>/model.onnx`, with an
//! optional `ROOT/<model>/config.toml`. This module only reads the directory; loading is the
//! engine's job.

use crate::model::config::{ConfigError, ModelConfig};
use std::path::{Path, PathBuf};

/// The file name of a model inside a version folder.
pub const MODEL_FILE: &str = "model.onnx";
/// The file name of a model's optional config.
pub const CONFIG_FILE: &str = "config.toml";
/// A hidden file in a model folder that came over the mesh rather than from the operator:
/// its config's resource settings are clamped to this machine ([`ModelConfig::clamped_to`]).
/// Hidden, so it is neither part of the model's digest nor sent to other nodes.
pub const FROM_MESH_MARKER: &str = ".from-mesh";

/// A model repository directory.
#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
}

/// A name that cannot be a model folder (empty, hidden, or with path separators).
#[derive(Debug, thiserror::Error)]
#[error(
    "'{0}' is not a valid model name (letters, digits, '-', '_' and '.' only, not starting with '.')"
)]
pub struct InvalidName(pub String);

impl Repository {
    /// A repository rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Repository {
        Repository { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Checks that `name` is a plain folder name, so a request cannot reach outside the root.
    pub fn check_name(name: &str) -> Result<(), InvalidName> {
        let valid = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if valid {
            Ok(())
        } else {
            Err(InvalidName(name.to_string()))
        }
    }

    /// Model folders in the repository, sorted: those with at least one version folder.
    pub fn model_names(&self) -> std::io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)?
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| Repository::check_name(n).is_ok())
            .filter(|n| !self.versions(n).is_empty())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Version numbers of `name` that hold a model file, ascending.
    pub fn versions(&self, name: &str) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(self.root.join(name)) else {
            return Vec::new();
        };
        let mut versions: Vec<u64> = entries
            .flatten()
            .filter(|e| e.path().join(MODEL_FILE).is_file())
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        versions.sort_unstable();
        versions
    }

    /// The model file of `name` at `version`.
    pub fn model_path(&self, name: &str, version: u64) -> PathBuf {
        self.root
            .join(name)
            .join(version.to_string())
            .join(MODEL_FILE)
    }

    /// The config of `name`, or the defaults if it has no `config.toml`; clamped to this
    /// machine when the model came over the mesh ([`FROM_MESH_MARKER`]).
    pub fn config(&self, name: &str) -> Result<ModelConfig, ConfigError> {
        let folder = self.root.join(name);
        let config = ModelConfig::load_or_default(&folder.join(CONFIG_FILE))?;
        if folder.join(FROM_MESH_MARKER).exists() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            return Ok(config.clamped_to(cores));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_models_with_versions_and_ignores_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for path in [
            "a/1/model.onnx",
            "a/3/model.onnx",
            "b/2/model.onnx",
            "c/notes.txt",
            "d/x/model.onnx",
        ] {
            std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
            std::fs::write(root.join(path), b"").unwrap();
        }
        std::fs::create_dir_all(root.join("a/7")).unwrap();
        let repo = Repository::new(root);
        assert_eq!(repo.model_names().unwrap(), vec!["a", "b"]);
        assert_eq!(repo.versions("a"), vec![1, 3]);
        assert!(repo.versions("missing").is_empty());
    }

    #[test]
    fn a_config_that_came_over_the_mesh_is_clamped_to_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("m");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(
            folder.join(CONFIG_FILE),
            "instances = 50
intra_op_threads = 8000
queue_capacity = 1000000
",
        )
        .unwrap();
        let repo = Repository::new(dir.path());
        let own = repo.config("m").unwrap();
        assert_eq!(
            (own.instances, own.queue_capacity),
            (Some(50), 1_000_000),
            "the operator's own"
        );
        std::fs::write(folder.join(FROM_MESH_MARKER), b"").unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let fetched = repo.config("m").unwrap();
        assert_eq!(fetched.instances, Some(50.min(cores)));
        assert_eq!(fetched.intra_op_threads, Some(cores));
        assert_eq!(fetched.queue_capacity, 1024);
    }

    #[test]
    fn names_cannot_escape_the_root() {
        for bad in ["", "..", ".hidden", "a/b", "a\\b", "é"] {
            assert!(Repository::check_name(bad).is_err(), "{bad}");
        }
        for good in ["fraud", "fraud-v2", "a.b_c"] {
            assert!(Repository::check_name(good).is_ok(), "{good}");
        }
    }
}
