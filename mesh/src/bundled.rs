//! The example models compiled into the binary, so `meshserve serve` with no arguments has
//! something to serve on any machine. They are written to a private temporary repository at
//! start, which then behaves like any other (load and unload included).

use std::path::Path;
use tempfile::TempDir;

/// `(path inside the repository, bytes)` of every bundled file.
const FILES: &[(&str, &[u8])] = &[
    (
        "image_stats/1/model.onnx",
        include_bytes!("../../examples/models/image_stats/1/model.onnx"),
    ),
    (
        "fraud/1/model.onnx",
        include_bytes!("../../examples/models/fraud/1/model.onnx"),
    ),
    (
        "fraud/config.toml",
        include_bytes!("../../examples/models/fraud/config.toml"),
    ),
    (
        "heavy/1/model.onnx",
        include_bytes!("../../examples/models/heavy/1/model.onnx"),
    ),
    (
        "heavy/config.toml",
        include_bytes!("../../examples/models/heavy/config.toml"),
    ),
    (
        "mixed/1/model.onnx",
        include_bytes!("../../examples/models/mixed/1/model.onnx"),
    ),
    (
        "echo/1/model.onnx",
        include_bytes!("../../examples/models/echo/1/model.onnx"),
    ),
];

/// Writes the bundled models into a new temporary directory, removed when dropped.
pub fn materialize() -> std::io::Result<TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("meshserve-models-")
        .tempdir()?;
    write_into(dir.path())?;
    Ok(dir)
}

fn write_into(root: &Path) -> std::io::Result<()> {
    for (relative, bytes) in FILES {
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_repository_has_every_model() {
        let dir = materialize().unwrap();
        let repo = meshserve_host::model::repository::Repository::new(dir.path());
        assert_eq!(
            repo.model_names().unwrap(),
            vec!["echo", "fraud", "heavy", "image_stats", "mixed"]
        );
    }
}
