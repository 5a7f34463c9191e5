//! Several adapters on the command line: `--adapter NAME=DIR` (repeatable; a plain `--adapter DIR`
//! is the adapter `default`) and `--adapter-names` choosing one per input row.

use peft::peft_model::load_with_adapter;
use peft::{Error, LoadOptions, PeftModel, Result};
use std::path::{Path, PathBuf};

/// `NAME=DIR` pairs; a plain `DIR` is named `default`.
pub fn parse_specs(specs: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for s in specs {
        let (name, dir) = match s.split_once('=') {
            Some((n, d)) if !n.is_empty() && !n.contains('/') => (n.to_string(), PathBuf::from(d)),
            _ => ("default".to_string(), PathBuf::from(s)),
        };
        if out.iter().any(|(n, _)| *n == name) {
            return Err(Error::Config(format!(
                "--adapter: the name `{name}` is given twice; name each adapter with NAME=DIR"
            )));
        }
        out.push((name, dir));
    }
    Ok(out)
}

/// `a,__base__,b` → one adapter name per row.
pub fn parse_row_names(list: &str) -> Vec<String> {
    list.split(',').map(|s| s.trim().to_string()).collect()
}

/// The model with every adapter of `specs` loaded (the first active).
pub fn load(model: &Path, specs: &[(String, PathBuf)], opts: LoadOptions) -> Result<PeftModel> {
    match specs {
        [(name, dir)] if name == "default" => load_with_adapter(model, dir, opts),
        _ => PeftModel::load_with_adapters(model, specs, opts),
    }
}

/// Checks `--adapter-names` against the batch: one name per row.
pub fn check_rows(names: &[String], rows: usize) -> Result<()> {
    if names.len() != rows {
        return Err(Error::Data(format!(
            "--adapter-names has {} names but there are {rows} input rows; give one per row \
             (`__base__` for none)",
            names.len()
        )));
    }
    Ok(())
}
