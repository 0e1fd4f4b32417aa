//! Feature tables: key → bytes maps loaded at start from files, queried by plugins through
//! the `lookup` host import (card history for fraud scoring, item embeddings for ranking).
//!
//! A table is immutable once loaded, so lookups take no lock.

use bytes::Bytes;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How a row's value columns become the bytes a plugin receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ValueFormat {
    /// Every value column parsed as a number, stored as little-endian f32s in column order.
    #[default]
    F32,
    /// The value columns as UTF-8 text, joined by commas.
    Text,
}

/// A table declared in the node config (`[features.NAME]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeatureTableConfig {
    /// CSV file with a header row.
    pub path: PathBuf,
    /// The key column; default: the first.
    #[serde(default)]
    pub key_column: Option<String>,
    /// The encoding of the other columns.
    #[serde(default)]
    pub format: ValueFormat,
}

/// Why a table could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// The file could not be read or is not valid CSV.
    #[error("feature table '{table}' ({path}): {message}")]
    Load {
        /// The table.
        table: String,
        /// Its file.
        path: String,
        /// What went wrong, with the line where known.
        message: String,
    },
}

/// Every feature table of a node.
#[derive(Debug, Default)]
pub struct FeatureTables {
    tables: HashMap<String, HashMap<String, Bytes>>,
}

impl FeatureTables {
    /// Loads every configured table; any failure fails the whole load, naming table and line.
    pub fn load(
        configs: &HashMap<String, FeatureTableConfig>,
    ) -> Result<FeatureTables, FeatureError> {
        let mut tables = HashMap::new();
        for (name, config) in configs {
            let rows = load_csv(name, config)?;
            tracing::info!(table = %name, rows = rows.len(), path = %config.path.display(), "feature table loaded");
            tables.insert(name.clone(), rows);
        }
        Ok(FeatureTables { tables })
    }

    /// The value of `key` in `table`.
    pub fn lookup(&self, table: &str, key: &str) -> Option<&Bytes> {
        self.tables.get(table)?.get(key)
    }

    /// Whether `table` exists.
    pub fn has_table(&self, table: &str) -> bool {
        self.tables.contains_key(table)
    }
}

fn load_csv(
    table: &str,
    config: &FeatureTableConfig,
) -> Result<HashMap<String, Bytes>, FeatureError> {
    let error = |message: String| FeatureError::Load {
        table: table.to_string(),
        path: config.path.display().to_string(),
        message,
    };
    let mut reader = csv::Reader::from_path(&config.path).map_err(|e| error(e.to_string()))?;
    let headers = reader.headers().map_err(|e| error(e.to_string()))?.clone();
    let key_index = match &config.key_column {
        None => 0,
        Some(column) => headers
            .iter()
            .position(|h| h == column)
            .ok_or_else(|| error(format!("no column '{column}' in the header")))?,
    };
    let mut rows = HashMap::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| error(format!("line {line}: {e}")))?;
        let key = record
            .get(key_index)
            .ok_or_else(|| error(format!("line {line}: no key column")))?
            .to_string();
        let values = record
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != key_index)
            .map(|(_, v)| v);
        let bytes = match config.format {
            ValueFormat::F32 => {
                let mut out = Vec::new();
                for value in values {
                    let number: f32 = value
                        .trim()
                        .parse()
                        .map_err(|_| error(format!("line {line}: '{value}' is not a number")))?;
                    out.extend_from_slice(&number.to_le_bytes());
                }
                out
            }
            ValueFormat::Text => values.collect::<Vec<_>>().join(",").into_bytes(),
        };
        rows.insert(key, Bytes::from(bytes));
    }
    Ok(rows)
}

/// Resolves a table's relative path against `base` (the config file's folder).
pub fn resolve_path(config: &mut FeatureTableConfig, base: &Path) {
    if config.path.is_relative() {
        config.path = base.join(&config.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_numbers_and_text_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("cards.csv");
        std::fs::write(&csv, "card,avg_amount,count\nc1,12.5,3\nc2,100,1\n").unwrap();
        let mut configs = HashMap::new();
        configs.insert(
            "cards".to_string(),
            FeatureTableConfig {
                path: csv.clone(),
                key_column: None,
                format: ValueFormat::F32,
            },
        );
        configs.insert(
            "names".to_string(),
            FeatureTableConfig {
                path: csv.clone(),
                key_column: Some("count".into()),
                format: ValueFormat::Text,
            },
        );
        let tables = FeatureTables::load(&configs).unwrap();
        let c1 = tables.lookup("cards", "c1").unwrap();
        assert_eq!(&c1[..4], &12.5f32.to_le_bytes());
        assert_eq!(&c1[4..], &3.0f32.to_le_bytes());
        assert_eq!(tables.lookup("names", "1").unwrap().as_ref(), b"c2,100");
        assert!(tables.lookup("cards", "c9").is_none());
        assert!(tables.lookup("nope", "c1").is_none());

        configs.remove("names");
        std::fs::write(&csv, "card,avg\nc1,abc\n").unwrap();
        let err = FeatureTables::load(&configs).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("abc"), "{err}");
    }
}
