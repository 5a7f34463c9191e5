//! Training data: rows from JSONL, CSV or Parquet files ([`read_records`]), turned into tokenised
//! examples for each task ([`tasks`]) and padded into batches ([`collate`]).
//!
//! Every reader yields the same thing, a [`Record`]: the row as a JSON object plus the line (or
//! row) number that error messages cite, so the task code never cares where a row came from.

pub mod collate;
mod parquet;
pub mod tasks;

use serde_json::Value;
use std::path::Path;

use crate::{Error, Result};

pub use collate::{collate, Batch, CollateOptions, PaddingSide, Targets};
pub use tasks::{build_examples, Example, LabelSet, Target, TaskData};

/// One row of a data file.
#[derive(Debug, Clone)]
pub struct Record {
    /// 1-based line (JSONL, CSV counting the header) or row (Parquet) number.
    pub line: usize,
    pub fields: serde_json::Map<String, Value>,
}

/// Reads every row of a `.jsonl`, `.json` (JSON lines), `.csv` or `.parquet` file.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let rows = match ext.as_str() {
        "csv" => read_csv(path)?,
        "jsonl" | "json" => read_jsonl(path)?,
        "parquet" => parquet::read(path)?,
        _ => {
            return Err(Error::Data(format!(
                "{}: unsupported data file type `.{ext}`; use .jsonl, .csv or .parquet",
                path.display()
            )))
        }
    };
    if rows.is_empty() {
        return Err(Error::Data(format!(
            "{}: no examples in the file",
            path.display()
        )));
    }
    Ok(rows)
}

fn read_csv(path: &Path) -> Result<Vec<Record>> {
    let mut rdr = csv::Reader::from_path(path)
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    let headers = rdr
        .headers()
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?
        .clone();
    let mut rows = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i + 2;
        let rec = rec.map_err(|e| {
            Error::Data(format!(
                "{}: line {line}: malformed CSV: {e}",
                path.display()
            ))
        })?;
        let fields = headers
            .iter()
            .zip(rec.iter())
            .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
            .collect();
        rows.push(Record { line, fields });
    }
    Ok(rows)
}

fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l).map_err(|e| {
            Error::Data(format!(
                "{}: line {line}: malformed JSON: {e}",
                path.display()
            ))
        })?;
        match v {
            Value::Object(fields) => rows.push(Record { line, fields }),
            other => {
                return Err(Error::Data(format!(
                    "{}: line {line}: expected a JSON object per line, got {}",
                    path.display(),
                    short(&other)
                )))
            }
        }
    }
    Ok(rows)
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

impl Record {
    fn missing(&self, name: &str, file: &Path) -> Error {
        let mut cols: Vec<&str> = self.fields.keys().map(String::as_str).collect();
        cols.sort();
        Error::Data(format!(
            "{}: line {}: no column `{name}`; columns: {} (set the column name in [data])",
            file.display(),
            self.line,
            cols.join(", ")
        ))
    }

    /// A text field; numbers and booleans are taken as their text.
    pub fn text(&self, name: &str, file: &Path) -> Result<String> {
        match self.fields.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::Bool(b)) => Ok(b.to_string()),
            Some(other) => Err(Error::Data(format!(
                "{}: line {}: `{name}` is {}, expected a string or number",
                file.display(),
                self.line,
                short(other)
            ))),
            None => Err(self.missing(name, file)),
        }
    }

    /// A list field: a JSON array, a string holding one (`["EU", "rejects"]`), or a
    /// whitespace-separated string (`EU rejects`), which is how lists fit in a CSV cell.
    pub fn list(&self, name: &str, file: &Path) -> Result<Vec<String>> {
        let bad = |what: String| {
            Error::Data(format!(
                "{}: line {}: `{name}` {what}",
                file.display(),
                self.line
            ))
        };
        let items = |a: &Vec<Value>| -> Result<Vec<String>> {
            a.iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(bad(format!(
                        "holds {}, expected strings or numbers",
                        short(other)
                    ))),
                })
                .collect()
        };
        match self.fields.get(name) {
            Some(Value::Array(a)) => items(a),
            Some(Value::String(s)) if s.trim_start().starts_with('[') => {
                match serde_json::from_str::<Value>(s) {
                    Ok(Value::Array(a)) => items(&a),
                    _ => Err(bad("is not a valid JSON list".into())),
                }
            }
            Some(Value::String(s)) => Ok(s.split_whitespace().map(String::from).collect()),
            Some(other) => Err(bad(format!("is {}, expected a list", short(other)))),
            None => Err(self.missing(name, file)),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.fields.contains_key(name)
    }
}

/// A fixed validation split: `fraction` of the records (at least one, leaving one to train on),
/// drawn with `seed`. Returns `(train, eval)`, each in file order.
pub fn split_validation(
    records: Vec<Record>,
    fraction: f64,
    seed: u64,
) -> (Vec<Record>, Vec<Record>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if fraction <= 0.0 || records.len() < 2 {
        return (records, Vec::new());
    }
    let n = records.len();
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut held = vec![false; n];
    for &i in &idx[..k] {
        held[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (r, h) in records.into_iter().zip(held) {
        if h {
            eval.push(r)
        } else {
            train.push(r)
        }
    }
    (train, eval)
}
