//! The on-disk cache of compiled plugins.
//!
//! Loading a compiled artifact runs its native code unchecked, so the cache is trusted only if
//! it is the node's own: the directory must be owned by the node's user and writable by no one
//! else (else the node warns and compiles in memory), and every artifact is read whole into
//! memory and checked against the SHA-256 the node recorded beside it when it wrote it, before
//! wasmtime sees a byte. Writes go to a temporary file, are synced, then renamed into place.
//!
//! An artifact is named by the SHA-256 of the plugin's source and the engine's compatibility
//! hash, so a new wasmtime or changed settings never read an old one; artifacts of other
//! engines are removed when the cache opens, and a version no loaded plugin uses any more (one
//! replaced by a hot swap, or one whose load failed and that no other endpoint took up in the
//! same round of loads) is removed by [`DiskCache::evict`].

use crate::plugin::sha256_hex;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A trusted cache directory for one engine.
pub struct DiskCache {
    dir: PathBuf,
    engine_tag: String,
}

/// Why the cache directory is not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheRefused {
    /// It could not be created or read.
    #[error("plugin cache {dir}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// The error.
        source: std::io::Error,
    },
    /// Someone other than the node could plant code in it.
    #[error(
        "plugin cache {dir} is not trusted: {reason}; compiled plugins stay in memory (fix: chown the directory to the node's user and chmod go-w)"
    )]
    Untrusted {
        /// The directory.
        dir: String,
        /// What is wrong.
        reason: String,
    },
}

/// The uid this process runs as: the owner of a file it just created.
fn own_uid(dir: &Path) -> std::io::Result<u32> {
    let probe = dir.join(format!(".uid-probe-{}", std::process::id()));
    let uid = std::fs::File::create(&probe).and_then(|file| file.metadata());
    let _ = std::fs::remove_file(&probe);
    Ok(uid?.uid())
}

impl DiskCache {
    /// Opens (creating, mode 0700) the cache directory if it is trustworthy, and removes
    /// artifacts left by other engines.
    pub fn open(dir: &Path, engine: &Engine) -> Result<DiskCache, CacheRefused> {
        let shown = dir.display().to_string();
        let io = |source| CacheRefused::Io {
            dir: shown.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let meta = std::fs::metadata(dir).map_err(io)?;
        let uid = own_uid(dir).map_err(io)?;
        let untrusted = |reason: String| CacheRefused::Untrusted {
            dir: shown.clone(),
            reason,
        };
        if meta.uid() != uid {
            return Err(untrusted(format!(
                "owned by uid {}, the node runs as uid {uid}",
                meta.uid()
            )));
        }
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(untrusted(format!(
                "writable by group or others (mode {:o})",
                meta.permissions().mode() & 0o777
            )));
        }
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            engine_tag: format!("{:016x}", hasher.finish()),
        };
        cache.remove_other_engines();
        Ok(cache)
    }

    fn artifact(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}-{}.cwasm", self.engine_tag))
    }

    fn checksum(artifact: &Path) -> PathBuf {
        artifact.with_extension("cwasm.sha256")
    }

    fn remove_other_engines(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let suffix = format!("-{}.cwasm", self.engine_tag);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(&suffix) || name.ends_with(&format!("{suffix}.sha256"));
            if !ours && (name.ends_with(".cwasm") || name.ends_with(".cwasm.sha256")) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The compiled component for source `digest`, if a checked artifact is cached.
    pub fn read(&self, digest: &str, engine: &Engine) -> Option<Component> {
        let path = self.artifact(digest);
        let bytes = std::fs::read(&path).ok()?;
        let recorded = std::fs::read_to_string(Self::checksum(&path)).ok()?;
        if sha256_hex(&bytes) != recorded.trim() {
            tracing::warn!(path = %path.display(), "compiled plugin does not match its recorded checksum; recompiling");
            return None;
        }
        // SAFETY: deserializing runs no checks on the machine code, so the bytes must be ones
        // this node wrote: they come from a directory only the node's user can write, and they
        // match, byte for byte, the SHA-256 recorded when `write` stored them. They are checked
        // in memory, so the file cannot change between the check and the load.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize(engine, &bytes) };
        match loaded {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable compiled plugin; recompiling");
                None
            }
        }
    }

    /// Stores the compiled form of source `digest`: artifact first, then its checksum, each
    /// written to a temporary file, synced and renamed, so a crash leaves no half file in use.
    pub fn write(&self, digest: &str, component: &Component) {
        let path = self.artifact(digest);
        let write = || -> std::io::Result<()> {
            let bytes = component
                .serialize()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let sum = sha256_hex(&bytes);
            self.write_atomically(&path, &bytes)?;
            self.write_atomically(&Self::checksum(&path), sum.as_bytes())?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "could not cache a compiled plugin");
        }
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&partial, path)
    }

    /// Removes the artifact of source `digest` (a version no endpoint serves any more).
    pub fn evict(&self, digest: &str) {
        let path = self.artifact(digest);
        let _ = std::fs::remove_file(Self::checksum(&path));
        let _ = std::fs::remove_file(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    /// A minimal valid component.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    #[test]
    fn a_cached_artifact_loads_only_while_it_matches_its_checksum() {
        let engine = engine();
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(&dir.path().join("cache"), &engine).unwrap();
        let component = Component::new(&engine, EMPTY_COMPONENT).unwrap();
        cache.write("abc", &component);
        assert!(cache.read("abc", &engine).is_some());

        // One flipped byte: refused, never deserialized.
        let path = cache.artifact("abc");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(cache.read("abc", &engine).is_none());

        cache.evict("abc");
        assert!(!path.exists() && !DiskCache::checksum(&path).exists());
    }

    #[test]
    fn a_directory_others_can_write_is_not_trusted() {
        let engine = engine();
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = DiskCache::open(&shared, &engine).err().unwrap().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
    }

    #[test]
    fn artifacts_of_other_engines_are_removed_when_the_cache_opens() {
        let engine = engine();
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("abc-0000000000000000.cwasm");
        std::fs::write(&stale, b"old").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"keep").unwrap();
        DiskCache::open(dir.path(), &engine).unwrap();
        assert!(!stale.exists());
        assert!(dir.path().join("notes.txt").exists());
    }
}
