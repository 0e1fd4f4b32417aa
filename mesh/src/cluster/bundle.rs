//! Model files as they travel over the mesh: every file of a model's folder (its versions and
//! its config), addressed by the SHA-256 of their canonical encoding, so a node that is placed
//! a model it lacks fetches exactly what the holders advertise, and verifies it. Folders travel
//! in chunks staged on disk, so neither end holds more than one chunk of a model in memory.

use crate::wire::{ManifestFile, ModelFile, ModelManifest};
use meshserve_host::model::repository::{InvalidName, Repository};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
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
    /// A manifest listing more files than [`MAX_FILES`].
    #[error("{0} files in a model folder; at most {MAX_FILES} travel")]
    TooManyFiles(usize),
    /// A chunk that is not the length asked for.
    #[error("{path}: asked for {asked} bytes, got {got}")]
    ShortChunk {
        /// The file.
        path: String,
        /// Bytes asked for.
        asked: u64,
        /// Bytes that came.
        got: u64,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// SHA-256 over a model folder's files in path order, each path and each file's bytes
/// length-prefixed so that no two different sets of files encode alike. Fed from memory or
/// streamed from disk, the result is the same.
struct FolderHasher(Sha256);

impl FolderHasher {
    fn new() -> Self {
        FolderHasher(Sha256::new())
    }

    fn file_header(&mut self, path: &str, size: u64) {
        self.0.update((path.len() as u64).to_le_bytes());
        self.0.update(path.as_bytes());
        self.0.update(size.to_le_bytes());
    }

    fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

/// The digest of model files (see [`FolderHasher`]).
pub fn digest(files: &[ModelFile]) -> [u8; 32] {
    let mut sorted: Vec<&ModelFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut hasher = FolderHasher::new();
    for file in sorted {
        hasher.file_header(&file.path, file.data.len() as u64);
        hasher.0.update(&file.data);
    }
    hasher.finish()
}

/// The digest of the files `(path, size)` under `base`, in the given (path) order, read in
/// bounded pieces so a model of any size hashes in constant memory. A file whose size is not
/// the one listed (it changed meanwhile) is an error.
fn digest_on_disk<'a>(
    base: &Path,
    files: impl IntoIterator<Item = (&'a str, u64)>,
) -> Result<[u8; 32], BundleError> {
    let mut hasher = FolderHasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    for (relative, size) in files {
        hasher.file_header(relative, size);
        let path = base.join(relative);
        let mut file = std::fs::File::open(&path).map_err(io(&path))?;
        let mut left = size;
        loop {
            let read = file.read(&mut buffer).map_err(io(&path))?;
            if read == 0 {
                break;
            }
            left = left
                .checked_sub(read as u64)
                .ok_or_else(|| changed(&path))?;
            hasher.0.update(&buffer[..read]);
        }
        if left != 0 {
            return Err(changed(&path));
        }
    }
    Ok(hasher.finish())
}

fn changed(path: &Path) -> BundleError {
    BundleError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other("the file changed while it was read"),
    }
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

/// One file of a model folder on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Path relative to the folder, `/`-separated.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it last changed, where the file system says.
    modified: Option<SystemTime>,
}

/// Every file of `root/model` that travels (hidden names and deeper files stay behind),
/// sorted by path, without reading any.
pub fn list(root: &Path, model: &str) -> Result<Vec<Listed>, BundleError> {
    Repository::check_name(model)?;
    let mut files = Vec::new();
    let mut pending = vec![(root.join(model), String::new(), 0usize)];
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
            // Follows links, as reading the file does.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() && depth + 1 < MAX_DEPTH {
                pending.push((path, format!("{relative}/"), depth + 1));
            } else if meta.is_file() {
                files.push(Listed {
                    path: relative,
                    size: meta.len(),
                    modified: meta.modified().ok(),
                });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Every file of `root/model` with its bytes, sorted by path.
pub fn read(root: &Path, model: &str) -> Result<Vec<ModelFile>, BundleError> {
    let base = root.join(model);
    list(root, model)?
        .into_iter()
        .map(|listed| {
            let path = base.join(&listed.path);
            let data = std::fs::read(&path).map_err(io(&path))?;
            Ok(ModelFile {
                path: listed.path,
                data: data.into(),
            })
        })
        .collect()
}

/// Reads `length` bytes at `offset` of the file `relative` of `root/model`, which the caller
/// found in the model's listing (never a path taken from a peer as it came).
pub fn read_range(
    root: &Path,
    model: &str,
    relative: &str,
    offset: u64,
    length: usize,
) -> Result<Vec<u8>, BundleError> {
    let path = root.join(model).join(relative);
    let mut file = std::fs::File::open(&path).map_err(io(&path))?;
    file.seek(SeekFrom::Start(offset)).map_err(io(&path))?;
    let mut data = vec![0u8; length];
    file.read_exact(&mut data).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => changed(&path),
        _ => io(&path)(e),
    })?;
    Ok(data)
}

/// Most files a model folder from a peer may have.
pub const MAX_FILES: usize = 4096;

/// A model folder arriving in pieces: its files are written under a hidden staging folder of
/// the repository (which the repository ignores), named after the model and digest so that a
/// transfer cut short resumes where it stopped, by this process or the next. Once every file
/// is whole, the folder is hashed from disk, checked against the digest and renamed into place.
#[derive(Debug, Clone)]
pub struct Staging {
    root: PathBuf,
    model: String,
    digest: [u8; 32],
    folder: PathBuf,
    files: Vec<(String, u64)>,
}

/// The next piece a [`Staging`] needs: bytes `offset..offset + length` of file `file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Index of the file in the manifest.
    pub file: usize,
    /// Its path.
    pub path: String,
    /// The first byte wanted.
    pub offset: u64,
    /// How many bytes.
    pub length: u64,
}

impl Staging {
    /// Prepares to receive `manifest` into `root`: its name and paths are checked (a peer's
    /// manifest is hostile until checked), the staging folder of any other version of the
    /// model is removed and this version's is created, or kept with what it already holds.
    pub fn open(root: &Path, manifest: &ModelManifest) -> Result<Staging, BundleError> {
        let model = manifest.model.as_str();
        Repository::check_name(model)?;
        if manifest.files.len() > MAX_FILES {
            return Err(BundleError::TooManyFiles(manifest.files.len()));
        }
        let mut files: Vec<(String, u64)> = Vec::with_capacity(manifest.files.len());
        for file in &manifest.files {
            safe_relative(&file.path).ok_or_else(|| BundleError::UnsafePath(file.path.clone()))?;
            // Sorted and unique, so a path is never two files and the digest order is known.
            if files.last().is_some_and(|(last, _)| *last >= file.path) {
                return Err(BundleError::UnsafePath(file.path.clone()));
            }
            files.push((file.path.clone(), file.size));
        }
        let prefix = format!(".incoming-{model}@");
        let name = format!("{prefix}{}", &hex(&manifest.digest)[..16]);
        for entry in std::fs::read_dir(root).map_err(io(root))?.flatten() {
            let other = entry.file_name();
            let other = other.to_string_lossy();
            if other.starts_with(&prefix) && other != name.as_str() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let folder = root.join(name);
        std::fs::create_dir_all(&folder).map_err(io(&folder))?;
        Ok(Staging {
            root: root.to_path_buf(),
            model: model.to_string(),
            digest: manifest.digest,
            folder,
            files,
        })
    }

    /// Bytes already staged, out of the total.
    pub fn progress(&self) -> (u64, u64) {
        let total = self.files.iter().map(|(_, size)| size).sum();
        let staged = self
            .files
            .iter()
            .map(|(path, size)| self.staged_len(path).min(*size))
            .sum();
        (staged, total)
    }

    fn staged_len(&self, relative: &str) -> u64 {
        std::fs::metadata(self.folder.join(relative)).map_or(0, |m| m.len())
    }

    /// The next piece to ask for, at most `chunk` bytes, judged from what is on disk; `None`
    /// when every file is whole. A staged file longer than the manifest says is started over.
    pub fn next_wanted(&self, chunk: u64) -> Result<Option<Wanted>, BundleError> {
        for (index, (relative, size)) in self.files.iter().enumerate() {
            let path = self.folder.join(relative);
            let mut have = self.staged_len(relative);
            if have > *size {
                std::fs::remove_file(&path).map_err(io(&path))?;
                have = 0;
            }
            if *size == 0 && !path.exists() {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io(parent))?;
                }
                std::fs::File::create(&path).map_err(io(&path))?;
            }
            if have < *size {
                return Ok(Some(Wanted {
                    file: index,
                    path: relative.clone(),
                    offset: have,
                    length: (size - have).min(chunk),
                }));
            }
        }
        Ok(None)
    }

    /// Appends `data` to the file `wanted` names, which must be exactly what it asked for.
    pub fn write(&self, wanted: &Wanted, data: &[u8]) -> Result<(), BundleError> {
        let (relative, _) = &self.files[wanted.file];
        let path = self.folder.join(relative);
        if data.len() as u64 != wanted.length {
            return Err(BundleError::ShortChunk {
                path: relative.clone(),
                asked: wanted.length,
                got: data.len() as u64,
            });
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        if file.metadata().map_err(io(&path))?.len() != wanted.offset {
            return Err(changed(&path));
        }
        file.write_all(data).map_err(io(&path))
    }

    /// Verifies the staged files against the digest and moves them into place, marked as
    /// having come from the mesh. Files that do not hash to the digest are deleted, so the
    /// next attempt starts clean.
    pub fn finish(self) -> Result<(), BundleError> {
        self.verify()?;
        let target = self.root.join(&self.model);
        if target.exists() {
            return Err(BundleError::Exists(target.display().to_string()));
        }
        std::fs::rename(&self.folder, &target).map_err(io(&target))
    }

    /// As [`Staging::finish`], replacing the folder's older version if there is one: the two
    /// are exchanged in one step (`renameat2` with `RENAME_EXCHANGE`), so whoever watches the
    /// repository sees the old folder or the new one, never none; the old one is then removed.
    pub fn finish_replacing(self) -> Result<(), BundleError> {
        let target = self.root.join(&self.model);
        if !target.exists() {
            return self.finish();
        }
        self.verify()?;
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &self.folder,
            rustix::fs::CWD,
            &target,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .map_err(|e| io(&target)(e.into()))?;
        // The staging path now holds the old version.
        std::fs::remove_dir_all(&self.folder).map_err(io(&self.folder))
    }

    /// Checks the staged files against the digest (removing them if they do not match) and
    /// marks them as delivered by the mesh.
    fn verify(&self) -> Result<(), BundleError> {
        let files = self.files.iter().map(|(path, size)| (path.as_str(), *size));
        let actual = match digest_on_disk(&self.folder, files) {
            Ok(actual) => actual,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&self.folder);
                return Err(e);
            }
        };
        if actual != self.digest {
            let _ = std::fs::remove_dir_all(&self.folder);
            return Err(BundleError::DigestMismatch {
                expected: hex(&self.digest),
                actual: hex(&actual),
            });
        }
        // Its config came from a peer: the node clamps its resource settings (hidden, so the
        // digest and what this node serves to others stay the publisher's).
        let marker = self
            .folder
            .join(meshserve_host::model::repository::FROM_MESH_MARKER);
        std::fs::write(&marker, b"").map_err(io(&marker))
    }
}

/// Digests of local models, recomputed only when a file's size or modification time changes:
/// adverts are rebuilt every second and hashing a large model each time would waste a core.
#[derive(Default)]
pub struct DigestCache {
    entries: Mutex<HashMap<String, Cached>>,
}

/// A model's listing (what says its folder changed) and digest.
type Cached = (Vec<Listed>, [u8; 32]);

impl DigestCache {
    /// The digest and total size of `root/model`'s files.
    pub fn get(&self, root: &Path, model: &str) -> Result<([u8; 32], u64), BundleError> {
        let (listing, digest) = self.listing(root, model)?;
        Ok((digest, listing.iter().map(|f| f.size).sum()))
    }

    /// The files of `root/model` and their digest, hashing them only when the listing changed.
    pub fn listing(&self, root: &Path, model: &str) -> Result<Cached, BundleError> {
        let current = list(root, model)?;
        if let Some(cached) = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            && cached.0 == current
        {
            return Ok(cached.clone());
        }
        // Hashed without the lock: one large model does not hold up the others' adverts.
        let base = root.join(model);
        let digest = digest_on_disk(&base, current.iter().map(|f| (f.path.as_str(), f.size)))?;
        let cached = (current, digest);
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.to_string(), cached.clone());
        Ok(cached)
    }
}

/// The manifest of a model's files, as [`DigestCache::listing`] gave them.
pub fn manifest(model: &str, digest: [u8; 32], listing: &[Listed]) -> ModelManifest {
    ModelManifest {
        model: model.to_string(),
        digest,
        files: listing
            .iter()
            .map(|f| ManifestFile {
                path: f.path.clone(),
                size: f.size,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshserve_host::model::repository::FROM_MESH_MARKER;

    fn folder(root: &Path, model: &str, files: &[(&str, &[u8])]) {
        for (path, data) in files {
            let path = root.join(model).join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
    }

    fn manifest_of(root: &Path, model: &str) -> ModelManifest {
        let (listing, digest) = DigestCache::default().listing(root, model).unwrap();
        manifest(model, digest, &listing)
    }

    /// Moves pieces from `from` into `staging` until it is whole or `limit` pieces went;
    /// returns how many went.
    fn copy_pieces(from: &Path, staging: &Staging, chunk: u64, limit: usize) -> usize {
        let mut sent = 0;
        while sent < limit {
            let Some(wanted) = staging.next_wanted(chunk).unwrap() else {
                break;
            };
            let data = read_range(
                from,
                &staging.model,
                &wanted.path,
                wanted.offset,
                wanted.length as usize,
            )
            .unwrap();
            staging.write(&wanted, &data).unwrap();
            sent += 1;
        }
        sent
    }

    const FILES: &[(&str, &[u8])] = &[
        ("1/model.onnx", b"0123456789abcdef"),
        ("1/weights/part.bin", b"xyz"),
        ("1/empty.txt", b""),
        ("config.toml", b"replicas = 2\n"),
    ];

    #[test]
    fn a_folder_travels_in_chunks_and_hashes_as_it_did_in_memory() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        folder(from.path(), "m", FILES);
        folder(from.path(), "m", &[(".hidden", b"stays")]);
        let manifest = manifest_of(from.path(), "m");
        assert_eq!(manifest.digest, digest(&read(from.path(), "m").unwrap()));
        assert_eq!(manifest.files.len(), 4, "hidden files do not travel");

        let staging = Staging::open(to.path(), &manifest).unwrap();
        // 16, 3 and 13 bytes in pieces of 5: 4 + 1 + 3 (the empty file is made, not asked).
        assert_eq!(copy_pieces(from.path(), &staging, 5, 100), 8);
        assert_eq!(staging.progress(), (32, 32));
        staging.finish().unwrap();
        assert_eq!(manifest_of(to.path(), "m").digest, manifest.digest);
        assert!(to.path().join("m").join(FROM_MESH_MARKER).exists());
        assert_eq!(
            std::fs::read_dir(to.path()).unwrap().count(),
            1,
            "no staging folder is left behind"
        );
        // Again: a new folder is never put over one that is there; a replacement is, in one
        // step, and leaves nothing of the old version behind.
        let again = Staging::open(to.path(), &manifest).unwrap();
        copy_pieces(from.path(), &again, 64, 100);
        assert!(matches!(again.finish(), Err(BundleError::Exists(_))));
        std::fs::write(to.path().join("m/stale.txt"), b"old").unwrap();
        let again = Staging::open(to.path(), &manifest).unwrap();
        copy_pieces(from.path(), &again, 64, 100);
        again.finish_replacing().unwrap();
        assert!(!to.path().join("m/stale.txt").exists());
        assert_eq!(manifest_of(to.path(), "m").digest, manifest.digest);
        assert_eq!(std::fs::read_dir(to.path()).unwrap().count(), 1);
        let cache = DigestCache::default();
        assert_eq!(cache.get(from.path(), "m").unwrap(), (manifest.digest, 32));
    }

    #[test]
    fn a_transfer_cut_short_resumes_where_it_stopped() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        folder(from.path(), "m", FILES);
        let manifest = manifest_of(from.path(), "m");
        let first = Staging::open(to.path(), &manifest).unwrap();
        assert_eq!(copy_pieces(from.path(), &first, 4, 3), 3);
        drop(first);
        // As after a restart: what is on disk is kept, and only the rest is asked for.
        let again = Staging::open(to.path(), &manifest).unwrap();
        assert_eq!(again.progress(), (12, 32));
        let next = again.next_wanted(4).unwrap().unwrap();
        assert_eq!((next.path.as_str(), next.offset), ("1/model.onnx", 12));
        // 4 of 16, then 3, then 13 in pieces of 4.
        assert_eq!(copy_pieces(from.path(), &again, 4, 100), 6);
        again.finish().unwrap();
        assert_eq!(manifest_of(to.path(), "m").digest, manifest.digest);
    }

    #[test]
    fn pieces_that_do_not_hash_to_the_digest_are_deleted_not_installed() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        folder(from.path(), "m", FILES);
        let manifest = manifest_of(from.path(), "m");
        let staging = Staging::open(to.path(), &manifest).unwrap();
        let wanted = staging.next_wanted(1 << 20).unwrap().unwrap();
        assert!(matches!(
            staging.write(&wanted, b"short"),
            Err(BundleError::ShortChunk { .. })
        ));
        staging
            .write(&wanted, &vec![b'!'; wanted.length as usize])
            .unwrap();
        copy_pieces(from.path(), &staging, 1 << 20, 100);
        assert!(matches!(
            staging.finish(),
            Err(BundleError::DigestMismatch { .. })
        ));
        assert!(!to.path().join("m").exists());
        assert_eq!(std::fs::read_dir(to.path()).unwrap().count(), 0);

        // A replacement (an endpoint's new version) that does not hash to its digest leaves
        // the version in place untouched.
        folder(to.path(), "m", &[("endpoint.toml", b"model = \"fraud\"\n")]);
        let before = manifest_of(to.path(), "m").digest;
        let staging = Staging::open(to.path(), &manifest).unwrap();
        let wanted = staging.next_wanted(1 << 20).unwrap().unwrap();
        staging
            .write(&wanted, &vec![b'!'; wanted.length as usize])
            .unwrap();
        copy_pieces(from.path(), &staging, 1 << 20, 100);
        assert!(matches!(
            staging.finish_replacing(),
            Err(BundleError::DigestMismatch { .. })
        ));
        assert_eq!(manifest_of(to.path(), "m").digest, before);
        assert_eq!(std::fs::read_dir(to.path()).unwrap().count(), 1);
    }

    #[test]
    fn staging_another_version_clears_the_old_one_and_no_other_models() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        folder(from.path(), "m", FILES);
        folder(from.path(), "m-b", FILES);
        let old = Staging::open(to.path(), &manifest_of(from.path(), "m")).unwrap();
        let other_model = Staging::open(to.path(), &manifest_of(from.path(), "m-b")).unwrap();
        copy_pieces(from.path(), &old, 4, 1);
        folder(from.path(), "m", &[("config.toml", b"replicas = 3\n")]);
        let new = Staging::open(to.path(), &manifest_of(from.path(), "m")).unwrap();
        assert!(!old.folder.exists());
        assert!(other_model.folder.exists());
        assert_eq!(new.progress().0, 0);
    }

    #[test]
    fn manifests_that_escape_or_repeat_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let with_paths = |model: &str, paths: &[&str]| ModelManifest {
            model: model.into(),
            digest: [0; 32],
            files: paths
                .iter()
                .map(|p| ManifestFile {
                    path: p.to_string(),
                    size: 1,
                })
                .collect(),
        };
        for path in [
            "../evil",
            "/etc/passwd",
            "1/../../x",
            ".hidden",
            "1/.hidden",
            "a/b/c/d",
            "",
        ] {
            assert!(
                matches!(
                    Staging::open(root.path(), &with_paths("m", &[path])),
                    Err(BundleError::UnsafePath(_))
                ),
                "{path}"
            );
        }
        for paths in [&["a", "a"][..], &["b", "a"]] {
            assert!(
                matches!(
                    Staging::open(root.path(), &with_paths("m", paths)),
                    Err(BundleError::UnsafePath(_))
                ),
                "{paths:?}"
            );
        }
        let many: Vec<String> = (0..=MAX_FILES).map(|i| format!("f{i:05}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            Staging::open(root.path(), &with_paths("m", &many)),
            Err(BundleError::TooManyFiles(_))
        ));
        // A model name from the mesh is a folder name, never a path.
        for name in ["../escaped", "/tmp/abs", "a/b", "..", ".hidden", ""] {
            assert!(
                matches!(
                    Staging::open(root.path(), &with_paths(name, &["a"])),
                    Err(BundleError::InvalidName(_))
                ),
                "{name}"
            );
            assert!(
                matches!(read(root.path(), name), Err(BundleError::InvalidName(_))),
                "{name}"
            );
        }
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "nothing staged"
        );
        let file = |path: &str, data: &'static [u8]| ModelFile {
            path: path.into(),
            data: bytes::Bytes::from_static(data),
        };
        assert_ne!(
            digest(&[file("a", b"bc")]),
            digest(&[file("ab", b"c")]),
            "lengths separate path from data"
        );
    }
}
