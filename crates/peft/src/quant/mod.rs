//! Quantized frozen weights: bitsandbytes' 4-bit (NF4, FP4, double quantization) and 8-bit
//! formats bit for bit, and transformers' `BitsAndBytesConfig` that asks for them. A quantized
//! weight stays quantized; products dequantize it a band of rows at a time.

pub mod bnb4;
pub mod config;
pub mod int8;

pub use bnb4::{Absmax, Quant4, QuantType};
pub use config::{BitsAndBytesConfig, Scheme};
pub use int8::Int8Rows;
