//! Helpers shared by the CLI tests: run the built `peft` binary, read fixture tensors.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `crates/peft/tests/fixtures`, made by the Python libraries (tools/fixtures/).
pub fn peft_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft/tests/fixtures")
}

pub fn peft(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .expect("run peft");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn tensor(path: &Path, name: &str) -> Tensor {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    t.remove(name)
        .unwrap_or_else(|| panic!("{name} not in {}", path.display()))
}

pub fn matrix(t: &Tensor) -> String {
    serde_json::to_string(&t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()).unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
