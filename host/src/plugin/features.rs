//! Feature tables: key → bytes maps loaded from files, queried by plugins through the `lookup`
//! host import (card history for fraud scoring, user and item features for ranking).
//!
//! A table is a CSV file with a header row, or a Parquet file (`.parquet`), with the same
//! meaning: one row per key, the other columns its values. While the node runs, each file is
//! watched ([`FeatureTables::watch`]): a changed file is read again once it has stopped
//! changing for one poll (so a file being written is not read half-way), and swapped in whole;
//! a file that fails to load leaves the table it had, and says why. A lookup takes a read lock
//! only long enough to clone the row's `Bytes` handle.

use bytes::Bytes;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

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
    /// CSV file with a header row, or a Parquet file (by its `.parquet` extension).
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
    /// The file could not be read or is not valid CSV or Parquet.
    #[error("feature table '{table}' ({path}): {message}")]
    Load {
        /// The table.
        table: String,
        /// Its file.
        path: String,
        /// What went wrong, with the line (CSV) or row (Parquet) where known.
        message: String,
    },
}

type Rows = HashMap<String, Bytes>;

/// What identifies one version of a file: its modification time and length.
type Stamp = (Option<SystemTime>, u64);

fn stamp_of(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok(), meta.len()))
}

/// When to read a watched file again: once its stamp differs from the loaded one and has
/// stayed the same for one poll.
#[derive(Debug, Default, Clone, PartialEq)]
struct Freshness {
    loaded: Option<Stamp>,
    pending: Option<Stamp>,
}

impl Freshness {
    /// Sees the file's stamp now; true when it should be read.
    fn observe(&mut self, now: Option<Stamp>) -> bool {
        let Some(now) = now else {
            // Gone (being replaced, or deleted): keep serving what was loaded.
            self.pending = None;
            return false;
        };
        if Some(now) == self.loaded {
            self.pending = None;
            return false;
        }
        if self.pending == Some(now) {
            return true;
        }
        self.pending = Some(now);
        false
    }

    fn loaded(&mut self, stamp: Option<Stamp>) {
        self.loaded = stamp;
        self.pending = None;
    }
}

struct Table {
    config: FeatureTableConfig,
    rows: RwLock<Arc<Rows>>,
    freshness: Mutex<Freshness>,
}

/// Every feature table of a node.
#[derive(Default)]
pub struct FeatureTables {
    tables: HashMap<String, Table>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for FeatureTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureTables")
            .field("tables", &self.tables.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl FeatureTables {
    /// Loads every configured table; any failure fails the whole load, naming table and line.
    pub fn load(
        configs: &HashMap<String, FeatureTableConfig>,
    ) -> Result<FeatureTables, FeatureError> {
        let mut tables = HashMap::new();
        for (name, config) in configs {
            let stamp = stamp_of(&config.path);
            let rows = load_rows(name, config)?;
            tracing::info!(table = %name, rows = rows.len(), path = %config.path.display(), "feature table loaded");
            tables.insert(
                name.clone(),
                Table {
                    config: config.clone(),
                    rows: RwLock::new(Arc::new(rows)),
                    freshness: Mutex::new(Freshness {
                        loaded: stamp,
                        pending: None,
                    }),
                },
            );
        }
        Ok(FeatureTables {
            tables,
            stop: Arc::default(),
        })
    }

    /// The value of `key` in `table`.
    pub fn lookup(&self, table: &str, key: &str) -> Option<Bytes> {
        let rows = self
            .tables
            .get(table)?
            .rows
            .read()
            .unwrap_or_else(|e| e.into_inner());
        rows.get(key).cloned()
    }

    /// Whether `table` exists.
    pub fn has_table(&self, table: &str) -> bool {
        self.tables.contains_key(table)
    }

    /// Reads again every table whose file changed and has settled; returns the tables
    /// replaced. A file that fails to load keeps its table as it was (logged).
    pub fn refresh(&self) -> Vec<String> {
        let mut replaced = Vec::new();
        for (name, table) in &self.tables {
            let stamp = stamp_of(&table.config.path);
            let due = table
                .freshness
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe(stamp);
            if !due {
                continue;
            }
            let result = load_rows(name, &table.config);
            // Whatever the outcome, this version of the file has been tried: a broken file is
            // read again only once it changes.
            table
                .freshness
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .loaded(stamp);
            match result {
                Ok(rows) => {
                    tracing::info!(table = %name, rows = rows.len(), path = %table.config.path.display(), "feature table reloaded");
                    *table.rows.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rows);
                    replaced.push(name.clone());
                }
                Err(e) => {
                    tracing::error!(error = %e, "feature table not reloaded; the previous one stays");
                }
            }
        }
        replaced
    }

    /// Watches the tables' files every `interval` on a thread of its own (reading a large table
    /// must not hold up requests), until the tables are dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> std::io::Result<()> {
        if self.tables.is_empty() {
            return Ok(());
        }
        let weak = Arc::downgrade(self);
        let stop = self.stop.clone();
        std::thread::Builder::new()
            .name("feature-watch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    let Some(tables) = weak.upgrade() else {
                        return;
                    };
                    tables.refresh();
                }
            })?;
        Ok(())
    }
}

impl Drop for FeatureTables {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn load_rows(table: &str, config: &FeatureTableConfig) -> Result<Rows, FeatureError> {
    let parquet = config
        .path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    if parquet {
        load_parquet(table, config)
    } else {
        load_csv(table, config)
    }
}

/// A row's value columns as the bytes a plugin receives.
fn encode<'v>(
    format: ValueFormat,
    values: impl Iterator<Item = Value<'v>>,
) -> Result<Vec<u8>, String> {
    match format {
        ValueFormat::F32 => {
            let mut out = Vec::new();
            for value in values {
                let number = value
                    .number()
                    .ok_or_else(|| format!("'{}' is not a number", value.text()))?;
                out.extend_from_slice(&number.to_le_bytes());
            }
            Ok(out)
        }
        ValueFormat::Text => Ok(values
            .map(|v| v.text())
            .collect::<Vec<_>>()
            .join(",")
            .into_bytes()),
    }
}

/// One cell, from either file kind.
enum Value<'v> {
    Csv(&'v str),
    Parquet(&'v parquet::record::Field),
}

impl Value<'_> {
    fn number(&self) -> Option<f32> {
        use parquet::record::Field;
        match self {
            Value::Csv(text) => text.trim().parse().ok(),
            Value::Parquet(field) => match field {
                Field::Float(v) => Some(*v),
                Field::Double(v) => Some(*v as f32),
                Field::Byte(v) => Some(f32::from(*v)),
                Field::Short(v) => Some(f32::from(*v)),
                Field::Int(v) => Some(*v as f32),
                Field::Long(v) => Some(*v as f32),
                Field::UByte(v) => Some(f32::from(*v)),
                Field::UShort(v) => Some(f32::from(*v)),
                Field::UInt(v) => Some(*v as f32),
                Field::ULong(v) => Some(*v as f32),
                Field::Bool(v) => Some(f32::from(u8::from(*v))),
                Field::Str(text) => text.trim().parse().ok(),
                _ => None,
            },
        }
    }

    fn text(&self) -> String {
        use parquet::record::Field;
        match self {
            Value::Csv(text) => text.to_string(),
            Value::Parquet(Field::Str(text)) => text.clone(),
            Value::Parquet(Field::Null) => String::new(),
            // As a CSV would hold them (parquet's own Display writes `-7.5E-1`).
            Value::Parquet(Field::Double(v)) => v.to_string(),
            Value::Parquet(Field::Float(v)) => v.to_string(),
            Value::Parquet(field) => field.to_string(),
        }
    }
}

fn load_parquet(table: &str, config: &FeatureTableConfig) -> Result<Rows, FeatureError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let error = |message: String| FeatureError::Load {
        table: table.to_string(),
        path: config.path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(&config.path).map_err(|e| error(e.to_string()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| error(e.to_string()))?;
    let columns: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let key_index =
        key_index(columns.iter().map(String::as_str), config, "schema").map_err(error)?;
    let mut rows = HashMap::new();
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| error(e.to_string()))?;
    for (i, row) in iter.enumerate() {
        let at = i + 1;
        let row = row.map_err(|e| error(format!("row {at}: {e}")))?;
        let fields: Vec<&parquet::record::Field> =
            row.get_column_iter().map(|(_, field)| field).collect();
        let key = fields
            .get(key_index)
            .map(|f| Value::Parquet(f).text())
            .ok_or_else(|| error(format!("row {at}: no key column")))?;
        let values = fields
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != key_index)
            .map(|(_, f)| Value::Parquet(f));
        let bytes = encode(config.format, values).map_err(|e| error(format!("row {at}: {e}")))?;
        rows.insert(key, Bytes::from(bytes));
    }
    Ok(rows)
}

/// Where the key column is among a table's `columns` (named in its `where_named`): the
/// configured `key_column`, else the first.
fn key_index<'c>(
    mut columns: impl Iterator<Item = &'c str>,
    config: &FeatureTableConfig,
    where_named: &str,
) -> Result<usize, String> {
    match &config.key_column {
        None => Ok(0),
        Some(column) => columns
            .position(|c| c == column)
            .ok_or_else(|| format!("no column '{column}' in the {where_named}")),
    }
}

fn load_csv(table: &str, config: &FeatureTableConfig) -> Result<Rows, FeatureError> {
    let error = |message: String| FeatureError::Load {
        table: table.to_string(),
        path: config.path.display().to_string(),
        message,
    };
    let mut reader = csv::Reader::from_path(&config.path).map_err(|e| error(e.to_string()))?;
    let headers = reader.headers().map_err(|e| error(e.to_string()))?.clone();
    let key_index = key_index(headers.iter(), config, "header").map_err(error)?;
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
            .map(|(_, v)| Value::Csv(v));
        let bytes =
            encode(config.format, values).map_err(|e| error(format!("line {line}: {e}")))?;
        rows.insert(key, Bytes::from(bytes));
    }
    Ok(rows)
}

/// The tables one plugin may read: its endpoint's own (from the endpoint's folder in the
/// repository), then the node's (`[features]` in node.toml); the endpoint's win a name both
/// have.
#[derive(Debug, Clone)]
pub struct TableScope {
    own: Option<Arc<FeatureTables>>,
    node: Arc<FeatureTables>,
}

impl TableScope {
    /// The node's tables, and an endpoint's own if it has some.
    pub fn new(own: Option<Arc<FeatureTables>>, node: Arc<FeatureTables>) -> TableScope {
        TableScope { own, node }
    }

    fn holding(&self, table: &str) -> &FeatureTables {
        match &self.own {
            Some(own) if own.has_table(table) => own,
            _ => &self.node,
        }
    }

    /// The value of `key` in `table`.
    pub fn lookup(&self, table: &str, key: &str) -> Option<Bytes> {
        self.holding(table).lookup(table, key)
    }

    /// Whether `table` exists.
    pub fn has_table(&self, table: &str) -> bool {
        self.holding(table).has_table(table)
    }
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

    fn config(path: &Path, format: ValueFormat) -> FeatureTableConfig {
        FeatureTableConfig {
            path: path.to_path_buf(),
            key_column: None,
            format,
        }
    }

    fn one_table(path: &Path, format: ValueFormat) -> FeatureTables {
        FeatureTables::load(&HashMap::from([("t".to_string(), config(path, format))])).unwrap()
    }

    /// A Parquet file of cards (snappy-compressed): a string key, a double, a 64-bit integer,
    /// and with `country` a string column.
    fn write_parquet(path: &Path, rows: &[(&str, f64, i64, &str)], country: bool) {
        use parquet::basic::Compression;
        use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        let extra = if country {
            "required binary country (UTF8);"
        } else {
            ""
        };
        let schema = parse_message_type(&format!(
            "message cards {{ required binary card (UTF8); required double avg_amount; \
             required int64 count; {extra} }}"
        ))
        .unwrap();
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut writer =
            SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let strings = |values: Vec<&str>| -> Vec<ByteArray> {
            values.into_iter().map(ByteArray::from).collect()
        };
        write_column::<ByteArrayType>(&mut group, &strings(rows.iter().map(|r| r.0).collect()));
        write_column::<DoubleType>(&mut group, &rows.iter().map(|r| r.1).collect::<Vec<_>>());
        write_column::<Int64Type>(&mut group, &rows.iter().map(|r| r.2).collect::<Vec<_>>());
        if country {
            write_column::<ByteArrayType>(&mut group, &strings(rows.iter().map(|r| r.3).collect()));
        }
        group.close().unwrap();
        writer.close().unwrap();
    }

    /// Writes the next column of `group` with `values`.
    fn write_column<T: parquet::data_type::DataType>(
        group: &mut parquet::file::writer::SerializedRowGroupWriter<'_, std::fs::File>,
        values: &[T::T],
    ) {
        let mut column = group.next_column().unwrap().unwrap();
        column.typed::<T>().write_batch(values, None, None).unwrap();
        column.close().unwrap();
    }

    const CARDS: [(&str, f64, i64, &str); 4] = [
        ("c1", 12.5, 3, "fr"),
        ("c2", 100.25, 1, "de"),
        ("c3", -0.75, 42, "us"),
        ("c4", 0.1234, 7, "it"),
    ];

    #[test]
    fn a_parquet_table_serves_the_same_lookups_as_its_csv_twin() {
        let dir = tempfile::tempdir().unwrap();
        let csv_path = dir.path().join("cards.csv");
        let mut text = String::from("card,avg_amount,count\n");
        for (card, avg, count, _) in &CARDS {
            text.push_str(&format!("{card},{avg},{count}\n"));
        }
        std::fs::write(&csv_path, text).unwrap();
        let parquet_path = dir.path().join("cards.parquet");
        write_parquet(&parquet_path, &CARDS, false);
        let csv = one_table(&csv_path, ValueFormat::F32);
        let parquet = one_table(&parquet_path, ValueFormat::F32);
        for (card, ..) in &CARDS {
            let (a, b) = (
                csv.lookup("t", card).unwrap(),
                parquet.lookup("t", card).unwrap(),
            );
            assert_eq!(a, b, "{card}");
            assert_eq!(a.len(), 8, "two f32 values");
        }
        for missing in ["c9", "", "card"] {
            assert!(parquet.lookup("t", missing).is_none(), "{missing}");
        }
    }

    #[test]
    fn parquet_strings_are_text_keys_or_errors_as_csv_cells_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cards.parquet");
        write_parquet(&path, &CARDS, true);
        let words = one_table(&path, ValueFormat::Text);
        assert_eq!(words.lookup("t", "c3").unwrap().as_ref(), b"-0.75,42,us");
        let keyed = FeatureTables::load(&HashMap::from([(
            "t".to_string(),
            FeatureTableConfig {
                key_column: Some("country".into()),
                ..config(&path, ValueFormat::Text)
            },
        )]))
        .unwrap();
        assert_eq!(keyed.lookup("t", "de").unwrap().as_ref(), b"c2,100.25,1");
        let err = FeatureTables::load(&HashMap::from([(
            "t".to_string(),
            config(&path, ValueFormat::F32),
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("row 1") && err.contains("'fr' is not a number"),
            "{err}"
        );
        std::fs::write(&path, b"PAR1 not really").unwrap();
        let err = FeatureTables::load(&HashMap::from([(
            "t".to_string(),
            config(&path, ValueFormat::Text),
        )]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("cards.parquet"), "{err}");
    }

    #[test]
    fn a_file_is_read_again_once_it_has_settled() {
        let mut fresh = Freshness::default();
        let a = (None, 1);
        fresh.loaded(Some(a));
        assert!(!fresh.observe(Some(a)), "unchanged");
        let b = (None, 2);
        assert!(!fresh.observe(Some(b)), "changed: wait one poll");
        let c = (None, 3);
        assert!(!fresh.observe(Some(c)), "still changing");
        assert!(fresh.observe(Some(c)), "settled");
        fresh.loaded(Some(c));
        assert!(!fresh.observe(None), "gone: keep what is loaded");
        assert!(!fresh.observe(Some(c)));
    }

    #[test]
    fn a_changed_table_is_swapped_in_and_a_broken_one_leaves_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cards.csv");
        std::fs::write(&path, "card,v\nc1,1\n").unwrap();
        let tables = one_table(&path, ValueFormat::F32);
        assert!(tables.refresh().is_empty(), "nothing changed");
        std::fs::write(&path, "card,v\nc1,2\nc2,5\n").unwrap();
        assert!(
            tables.refresh().is_empty(),
            "changed: waits for the file to settle"
        );
        assert_eq!(
            tables.lookup("t", "c1").unwrap().as_ref(),
            1f32.to_le_bytes()
        );
        assert_eq!(tables.refresh(), vec!["t".to_string()]);
        assert_eq!(
            tables.lookup("t", "c1").unwrap().as_ref(),
            2f32.to_le_bytes()
        );
        assert!(tables.lookup("t", "c2").is_some());
        std::fs::write(&path, "card,v\nc1,oops,and more\n").unwrap();
        tables.refresh();
        assert!(
            tables.refresh().is_empty(),
            "a broken file replaces nothing"
        );
        assert_eq!(
            tables.lookup("t", "c1").unwrap().as_ref(),
            2f32.to_le_bytes()
        );
        std::fs::write(&path, "card,v\nc1,3\n").unwrap();
        tables.refresh();
        assert_eq!(tables.refresh(), vec!["t".to_string()]);
        assert_eq!(
            tables.lookup("t", "c1").unwrap().as_ref(),
            3f32.to_le_bytes()
        );
        assert!(tables.lookup("t", "c2").is_none());
    }
}
