//! Model files as they travel over the mesh: every file of a model's folder (its versions and
//! its config), addressed by the SHA-256 of their canonical encoding, so a node that is placed
//! a model it lacks fetches exactly what the holders advertise, and verifies it.

use crate::wire::ModelFile;
use meshserve_host::model::repository::{InvalidName, Repository};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Deepest file accepted: `<version>/<subfolder>/<file>`.
const MAX_DEPTH: usize = 3;

/// Why model files could not be read, verified or installed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading or writing the repository failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file path from a peer that could reach outside the model's folder.
    #[error("unsafe path '{0}' in model files")]
    UnsafePath(String),
    /// The files do not hash to the digest asked for.
    #[error("model files hash to {actual}, expected {expected}")]
    DigestMismatch {
        /// The advertised digest.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// The model already exists here.
    #[error("model folder {0} already exists")]
    Exists(String),
    /// A model name that is not a plain folder name (from a peer: hostile until checked).
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The digest of model files: SHA-256 over each file's path and bytes, in path order, each
/// length-prefixed so that no two different sets of files encode alike.
pub fn digest(files: &[ModelFile]) -> [u8; 32] {
    let mut sorted: Vec<&ModelFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut hasher = Sha256::new();
    for file in sorted {
        hasher.update((file.path.len() as u64).to_le_bytes());
        hasher.update(file.path.as_bytes());
        hasher.update((file.data.len() as u64).to_le_bytes());
        hasher.update(&file.data);
    }
    hasher.finalize().into()
}

/// Lower-case hex of a digest, for logs and errors.
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn safe_relative(path: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = path.split('/').collect();
    let ok = !parts.is_empty()
        && parts.len() <= MAX_DEPTH
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    let relative: PathBuf = parts.iter().collect();
    (ok && relative
        .components()
        .all(|c| matches!(c, Component::Normal(_))))
    .then_some(relative)
}

/// Every file of `root/model`, with paths relative to it (`/`-separated), sorted.
pub fn read(root: &Path, model: &str) -> Result<Vec<ModelFile>, BundleError> {
    Repository::check_name(model)?;
    let base = root.join(model);
    let mut files = Vec::new();
    let mut pending = vec![(base.clone(), String::new(), 0usize)];
    while let Some((dir, prefix, depth)) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let relative = format!("{prefix}{name}");
            let path = entry.path();
            if path.is_dir() && depth + 1 < MAX_DEPTH {
                pending.push((path, format!("{relative}/"), depth + 1));
            } else if path.is_file() {
                let data = std::fs::read(&path).map_err(io(&path))?;
                files.push(ModelFile {
                    path: relative,
                    data: data.into(),
                });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Verifies `files` against `expected` and installs them as `root/model`, atomically: they are
/// written to a hidden folder (which the repository ignores) and renamed into place.
pub fn install(
    root: &Path,
    model: &str,
    files: &[ModelFile],
    expected: &[u8; 32],
) -> Result<(), BundleError> {
    Repository::check_name(model)?;
    let actual = digest(files);
    if &actual != expected {
        return Err(BundleError::DigestMismatch {
            expected: hex(expected),
            actual: hex(&actual),
        });
    }
    let target = root.join(model);
    if target.exists() {
        return Err(BundleError::Exists(target.display().to_string()));
    }
    let staging = root.join(format!(".incoming-{model}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    for file in files {
        let relative =
            safe_relative(&file.path).ok_or_else(|| BundleError::UnsafePath(file.path.clone()))?;
        let path = staging.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, &file.data).map_err(io(&path))?;
    }
    // Its config came from a peer: the node clamps its resource settings (hidden, so the
    // digest and what this node serves to others stay the publisher's).
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let marker = staging.join(meshserve_host::model::repository::FROM_MESH_MARKER);
    std::fs::write(&marker, b"").map_err(io(&marker))?;
    std::fs::rename(&staging, &target).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staging);
        BundleError::Io {
            path: target.display().to_string(),
            source: e,
        }
    })
}

/// Digests of local models, recomputed only when a file's size or modification time changes:
/// adverts are rebuilt every second and hashing a large model each time would waste a core.
#[derive(Default)]
pub struct DigestCache {
    entries: Mutex<HashMap<String, Cached>>,
}

/// Each file's path, size and modification time: what says a model folder changed.
type Stamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// A model's stamp, digest and total size.
type Cached = (Stamp, [u8; 32], u64);

fn stamp(root: &Path, model: &str) -> Stamp {
    let mut stamps = Vec::new();
    let mut pending = vec![(root.join(model), 0usize)];
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() && depth + 1 < MAX_DEPTH {
                pending.push((path, depth + 1));
            } else if meta.is_file() {
                stamps.push((path, meta.len(), meta.modified().ok()));
            }
        }
    }
    stamps.sort();
    stamps
}

impl DigestCache {
    /// The digest and total size of `root/model`'s files.
    pub fn get(&self, root: &Path, model: &str) -> Result<([u8; 32], u64), BundleError> {
        let current = stamp(root, model);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((stamps, digest, size)) = entries.get(model)
            && *stamps == current
        {
            return Ok((*digest, *size));
        }
        let files = read(root, model)?;
        let size = files.iter().map(|f| f.data.len() as u64).sum();
        let digest = digest(&files);
        entries.insert(model.to_string(), (current, digest, size));
        Ok((digest, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, data: &'static [u8]) -> ModelFile {
        ModelFile {
            path: path.into(),
            data: bytes::Bytes::from_static(data),
        }
    }

    #[test]
    fn files_round_trip_through_install_and_read() {
        let from = tempfile::tempdir().unwrap();
        let files = vec![
            file("1/model.onnx", b"onnx"),
            file("config.toml", b"replicas = 2\n"),
        ];
        let expected = digest(&files);
        install(from.path(), "m", &files, &expected).unwrap();
        let read_back = read(from.path(), "m").unwrap();
        assert_eq!(digest(&read_back), expected);
        assert!(
            from.path()
                .join("m")
                .join(meshserve_host::model::repository::FROM_MESH_MARKER)
                .exists(),
            "a fetched model is marked as not the operator's own"
        );
        assert!(matches!(
            install(from.path(), "m", &files, &expected),
            Err(BundleError::Exists(_))
        ));
        let cache = DigestCache::default();
        assert_eq!(cache.get(from.path(), "m").unwrap(), (expected, 17));
    }

    #[test]
    fn tampered_or_escaping_files_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let files = vec![file("1/model.onnx", b"onnx")];
        let wrong = [0u8; 32];
        assert!(matches!(
            install(root.path(), "m", &files, &wrong),
            Err(BundleError::DigestMismatch { .. })
        ));
        for path in [
            "../evil",
            "/etc/passwd",
            "1/../../x",
            ".hidden",
            "a/b/c/d",
            "",
        ] {
            let files = vec![ModelFile {
                path: path.into(),
                data: bytes::Bytes::from_static(b"x"),
            }];
            let expected = digest(&files);
            assert!(
                matches!(
                    install(root.path(), "m", &files, &expected),
                    Err(BundleError::UnsafePath(_))
                ),
                "{path}"
            );
        }
        assert!(!root.path().join("m").exists());
        // A model name from the mesh is a folder name, never a path.
        let inside = root.path().join("repo");
        std::fs::create_dir_all(&inside).unwrap();
        let files = vec![file("1/model.onnx", b"onnx")];
        let expected = digest(&files);
        for name in ["../escaped", "/tmp/abs", "a/b", "..", ".hidden", ""] {
            assert!(
                matches!(
                    install(&inside, name, &files, &expected),
                    Err(BundleError::InvalidName(_))
                ),
                "{name}"
            );
            assert!(
                matches!(read(&inside, name), Err(BundleError::InvalidName(_))),
                "{name}"
            );
        }
        assert!(!root.path().join("escaped").exists());
        assert_eq!(
            std::fs::read_dir(&inside).unwrap().count(),
            0,
            "nothing staged"
        );
        assert_ne!(
            digest(&[file("a", b"bc")]),
            digest(&[file("ab", b"c")]),
            "lengths separate path from data"
        );
    }
}
