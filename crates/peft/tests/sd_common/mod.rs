//! Shared helpers for the Stable Diffusion tests. Fixtures come from
//! tools/fixtures/make_sd_fixtures.py (diffusers 0.42 + transformers 5.23 + PEFT 0.21).
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn sd_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd")
}

pub fn load_st(path: &Path) -> HashMap<String, Tensor> {
    peft::io::load_safetensors(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn fixture(name: &str) -> HashMap<String, Tensor> {
    load_st(&sd_fixtures().join(name))
}

pub fn pipeline(sd: &str) -> peft::StableDiffusion {
    peft::StableDiffusion::load(&sd_fixtures().join(sd), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{sd}: {e}"))
}

/// Largest absolute difference; panics on shape mismatch.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `a` is within `tol` of `b` (and that `b` is not trivially zero).
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let d = max_diff(a, b);
    assert!(d <= tol, "{what}: max |diff| = {d:e} > {tol:e}");
}
