//! Sequence-classification examples from CSV or JSONL, and batches with dynamic padding.

use candle_core::{Device, Tensor};
use std::collections::BTreeSet;
use std::path::Path;

use crate::io::tokenizer::{Encoded, Tokenizer};
use crate::models::Inputs;
use crate::{Error, Result};

/// Where the columns are and how long sequences may be.
#[derive(Debug, Clone)]
pub struct Columns {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: String,
}

/// A raw example: text (and optional pair) with a label as written in the file.
#[derive(Debug, Clone)]
pub struct Row {
    pub text: String,
    pub pair: Option<String>,
    pub label: String,
    /// 1-based line (JSONL) or record number (CSV, counting the header) for error messages.
    pub line: usize,
}

/// Reads `.csv` or `.jsonl` rows.
pub fn read_rows(path: &Path, cols: &Columns) -> Result<Vec<Row>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let rows = match ext.as_str() {
        "csv" => read_csv(path, cols)?,
        "jsonl" | "json" => read_jsonl(path, cols)?,
        _ => {
            return Err(Error::Data(format!(
                "{}: unsupported data file type `.{ext}`; use .csv or .jsonl",
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

fn read_csv(path: &Path, cols: &Columns) -> Result<Vec<Row>> {
    let mut rdr = csv::Reader::from_path(path)
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    let headers = rdr
        .headers()
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?
        .clone();
    let find = |name: &str| -> Result<usize> {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            Error::Data(format!(
                "{}: no column `{name}`; columns: {}",
                path.display(),
                headers.iter().collect::<Vec<_>>().join(", ")
            ))
        })
    };
    let (ti, li) = (find(&cols.text)?, find(&cols.label)?);
    let pi = cols.text_pair.as_deref().map(find).transpose()?;
    let mut rows = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i + 2;
        let rec =
            rec.map_err(|e| Error::Data(format!("{}: record {line}: {e}", path.display())))?;
        let get = |j: usize| {
            rec.get(j).map(str::to_string).ok_or_else(|| {
                Error::Data(format!("{}: record {line}: too few fields", path.display()))
            })
        };
        rows.push(Row {
            text: get(ti)?,
            pair: pi.map(get).transpose()?,
            label: get(li)?,
            line,
        });
    }
    Ok(rows)
}

fn read_jsonl(path: &Path, cols: &Columns) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(l).map_err(|e| {
            Error::Data(format!(
                "{}: line {line}: malformed JSON: {e}",
                path.display()
            ))
        })?;
        let field = |name: &str| -> Result<String> {
            match v.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(serde_json::Value::Bool(b)) => Ok(b.to_string()),
                Some(other) => Err(Error::Data(format!(
                    "{}: line {line}: `{name}` is {other}, expected a string or number",
                    path.display()
                ))),
                None => Err(Error::Data(format!(
                    "{}: line {line}: no field `{name}`",
                    path.display()
                ))),
            }
        };
        rows.push(Row {
            text: field(&cols.text)?,
            pair: cols.text_pair.as_deref().map(field).transpose()?,
            label: field(&cols.label)?,
            line,
        });
    }
    Ok(rows)
}

/// The label set: integer labels are used as given; string labels map to their sorted order.
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    Ids,
    Names(Vec<String>),
}

impl Labels {
    pub fn infer(rows: &[Row]) -> Labels {
        if rows.iter().all(|r| r.label.trim().parse::<i64>().is_ok()) {
            Labels::Ids
        } else {
            Labels::Names(
                rows.iter()
                    .map(|r| r.label.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            )
        }
    }

    /// Number of classes the labels need (at least).
    pub fn num_classes(&self, rows: &[Row]) -> usize {
        match self {
            Labels::Names(n) => n.len(),
            Labels::Ids => rows
                .iter()
                .filter_map(|r| r.label.trim().parse::<i64>().ok())
                .max()
                .map_or(0, |m| m as usize + 1),
        }
    }

    pub fn id(&self, row: &Row, num_labels: usize, file: &Path) -> Result<i64> {
        let id = match self {
            Labels::Ids => row.label.trim().parse::<i64>().map_err(|_| {
                Error::Data(format!(
                    "{}: line {}: label `{}` is not an integer",
                    file.display(),
                    row.line,
                    row.label
                ))
            })?,
            Labels::Names(names) => names
                .iter()
                .position(|n| n == &row.label)
                .map(|i| i as i64)
                .ok_or_else(|| {
                    Error::Data(format!(
                        "{}: line {}: label `{}` is not in the label set {names:?}",
                        file.display(),
                        row.line,
                        row.label
                    ))
                })?,
        };
        if id < 0 || id as usize >= num_labels {
            return Err(Error::Data(format!(
                "{}: line {}: label {id} is out of range for num_labels = {num_labels}",
                file.display(),
                row.line
            )));
        }
        Ok(id)
    }
}

/// A tokenised example with its label id.
#[derive(Debug, Clone)]
pub struct Example {
    pub enc: Encoded,
    pub label: i64,
}

pub fn encode_rows(
    rows: &[Row],
    labels: &Labels,
    num_labels: usize,
    tok: &mut Tokenizer,
    max_length: usize,
    file: &Path,
) -> Result<Vec<Example>> {
    rows.iter()
        .map(|r| {
            Ok(Example {
                enc: tok.encode(&r.text, r.pair.as_deref(), max_length)?,
                label: labels.id(r, num_labels, file)?,
            })
        })
        .collect()
}

/// Pads a batch to its longest example (right padding, as BERT expects).
pub fn collate(batch: &[&Example], pad_id: u32, device: &Device) -> Result<(Inputs, Tensor)> {
    let t = batch
        .iter()
        .map(|e| e.enc.input_ids.len())
        .max()
        .unwrap_or(0);
    let b = batch.len();
    let mut ids = vec![pad_id; b * t];
    let mut types = vec![0u32; b * t];
    let mut mask = vec![0u32; b * t];
    for (i, e) in batch.iter().enumerate() {
        let n = e.enc.input_ids.len();
        ids[i * t..i * t + n].copy_from_slice(&e.enc.input_ids);
        types[i * t..i * t + n].copy_from_slice(&e.enc.token_type_ids);
        mask[i * t..i * t + n].iter_mut().for_each(|m| *m = 1);
    }
    let labels: Vec<i64> = batch.iter().map(|e| e.label).collect();
    let inputs = Inputs {
        input_ids: Some(Tensor::from_vec(ids, (b, t), device)?),
        attention_mask: Some(Tensor::from_vec(mask, (b, t), device)?),
        token_type_ids: Some(Tensor::from_vec(types, (b, t), device)?),
        ..Default::default()
    };
    Ok((inputs, Tensor::new(labels.as_slice(), device)?))
}
