//! `peft export`: a LoRA adapter rewritten in another community's format — llama.cpp's GGUF
//! LoRA (what `llama-cli --lora` and `llama-server --lora` read) from a PEFT adapter, or a PEFT
//! adapter directory from a GGUF LoRA.

use clap::{Args, ValueEnum};
use peft::io::read_base_config;
use peft::tuners::lora::gguf::{export_gguf, read_gguf_lora, GgufOutType};
use peft::{Error, Result};
use std::path::PathBuf;

/// `--format` of `peft export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// llama.cpp's GGUF LoRA file, as its convert_lora_to_gguf.py writes it (llama-family
    /// bases; q/k rows permuted as llama.cpp wants).
    Gguf,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors), from a GGUF
    /// LoRA file.
    Peft,
}

/// `--outtype` of `peft export --format gguf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutTypeArg {
    /// 32-bit floats (the converter's default; exact).
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The adapter: a PEFT adapter directory (for --format gguf) or a GGUF LoRA file (for
    /// --format peft).
    #[arg(long, value_name = "PATH")]
    pub adapter: PathBuf,
    /// The base model the adapter belongs to (a Hugging Face directory or a GGUF model); only
    /// its config is read (head counts for the q/k permutation).
    #[arg(long, value_name = "PATH")]
    pub base: PathBuf,
    /// The format to write.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Where to write: the .gguf file (--format gguf) or the adapter directory (--format peft).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Tensor type of a GGUF adapter.
    #[arg(long, value_enum, default_value_t = OutTypeArg::F32)]
    pub outtype: OutTypeArg,
}

pub fn export(a: ExportArgs) -> Result<()> {
    let base = read_base_config(&a.base)?;
    match a.format {
        ExportFormat::Gguf => {
            if a.out.is_dir() {
                return Err(Error::Config(format!(
                    "--out {}: is a directory; --format gguf writes one .gguf file",
                    a.out.display()
                )));
            }
            let ty = match a.outtype {
                OutTypeArg::F32 => GgufOutType::F32,
                OutTypeArg::F16 => GgufOutType::F16,
                OutTypeArg::Bf16 => GgufOutType::Bf16,
            };
            export_gguf(&a.adapter, &base, ty, &a.out)?;
        }
        ExportFormat::Peft => {
            if a.out.is_file() {
                return Err(Error::Config(format!(
                    "--out {}: is a file; --format peft writes an adapter directory",
                    a.out.display()
                )));
            }
            let lora = read_gguf_lora(&a.adapter, &base, &candle_core::Device::Cpu)?;
            lora.save_pretrained(&a.out)?;
        }
    }
    tracing::info!("adapter written to {}", a.out.display());
    println!("{}", a.out.display());
    Ok(())
}
