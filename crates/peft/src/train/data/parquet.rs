//! Parquet rows through the `parquet` crate's record reader (no Arrow), as JSON objects.

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::Value;
use std::path::Path;

use super::Record;
use crate::{Error, Result};

pub fn read(path: &Path) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: parquet::errors::ParquetError| {
        Error::Data(format!(
            "{}: not a readable Parquet file ({e}); supported codecs: uncompressed, snappy, \
             gzip, lz4",
            path.display()
        ))
    };
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let iter = reader.get_row_iter(None).map_err(bad)?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let row =
            row.map_err(|e| Error::Data(format!("{}: row {}: {e}", path.display(), i + 1)))?;
        let fields = row
            .get_column_iter()
            .map(|(name, f)| (name.clone(), to_json(f)))
            .collect();
        rows.push(Record {
            line: i + 1,
            fields,
        });
    }
    Ok(rows)
}

fn to_json(f: &Field) -> Value {
    match f {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(v) => (*v).into(),
        Field::Short(v) => (*v).into(),
        Field::Int(v) => (*v).into(),
        Field::Long(v) => (*v).into(),
        Field::UByte(v) => (*v).into(),
        Field::UShort(v) => (*v).into(),
        Field::UInt(v) => (*v).into(),
        Field::ULong(v) => (*v).into(),
        Field::Float(v) => (*v as f64).into(),
        Field::Double(v) => (*v).into(),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => Value::String(String::from_utf8_lossy(b.data()).into_owned()),
        Field::ListInternal(l) => Value::Array(l.elements().iter().map(to_json).collect()),
        Field::Group(r) => Value::Object(
            r.get_column_iter()
                .map(|(n, f)| (n.clone(), to_json(f)))
                .collect(),
        ),
        // Dates, times, decimals, maps: their display text is as good as a label gets.
        other => Value::String(other.to_string()),
    }
}
