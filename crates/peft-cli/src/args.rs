//! Values the command line takes from a fixed set (clap `ValueEnum`s, so `--help` lists them and
//! a bad one is refused before anything loads), and `--device`.

use candle_core::Device;
use clap::ValueEnum;
use peft::tuners::lora::weighted::{CombinationType, MajoritySign};
use peft::{Error, Result, TaskType};

/// PEFT's task types, spelled as PEFT spells them (any case accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskTypeArg {
    /// Sequence classification (a classifier on the pooled or last token).
    #[value(name = "SEQ_CLS")]
    SeqCls,
    /// Token classification (one label per token, e.g. NER).
    #[value(name = "TOKEN_CLS")]
    TokenCls,
    /// Causal language modelling (decoder-only models).
    #[value(name = "CAUSAL_LM")]
    CausalLm,
    /// Sequence-to-sequence language modelling (T5).
    #[value(name = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
    /// Extractive question answering (start/end logits).
    #[value(name = "QUESTION_ANS")]
    QuestionAns,
    /// The last hidden states, no head.
    #[value(name = "FEATURE_EXTRACTION")]
    FeatureExtraction,
}

impl From<TaskTypeArg> for TaskType {
    fn from(t: TaskTypeArg) -> TaskType {
        match t {
            TaskTypeArg::SeqCls => TaskType::SeqCls,
            TaskTypeArg::TokenCls => TaskType::TokenCls,
            TaskTypeArg::CausalLm => TaskType::CausalLm,
            TaskTypeArg::Seq2SeqLm => TaskType::Seq2SeqLm,
            TaskTypeArg::QuestionAns => TaskType::QuestionAns,
            TaskTypeArg::FeatureExtraction => TaskType::FeatureExtraction,
        }
    }
}

/// `combination_type` of PEFT's `add_weighted_adapter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum CombinationArg {
    /// Weighted sum of the A and B factors (adapters of equal rank).
    Linear,
    /// Concatenate the factors (rank = sum of the ranks).
    Cat,
    /// Weighted sum of the full deltas, refactored by SVD.
    Svd,
    /// TIES merging (trim to --density, elect signs, disjoint mean).
    Ties,
    /// TIES on the full deltas, refactored by SVD.
    TiesSvd,
    /// DARE: random drop to --density and rescale, then a weighted sum.
    DareLinear,
    /// DARE drop, then TIES sign election.
    DareTies,
    /// dare_linear on the full deltas, refactored by SVD.
    DareLinearSvd,
    /// dare_ties on the full deltas, refactored by SVD.
    DareTiesSvd,
    /// Keep the --density largest-magnitude entries, then a weighted sum.
    MagnitudePrune,
    /// magnitude_prune on the full deltas, refactored by SVD.
    MagnitudePruneSvd,
}

impl CombinationArg {
    /// The name PEFT uses.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// The library's value (the names are PEFT's on both sides).
    pub fn to_peft(self) -> Result<CombinationType> {
        self.name().parse()
    }
}

/// TIES' `majority_sign_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MajoritySignArg {
    /// The sign of the sum of the values.
    Total,
    /// The more frequent sign.
    Frequency,
}

impl From<MajoritySignArg> for MajoritySign {
    fn from(m: MajoritySignArg) -> MajoritySign {
        match m {
            MajoritySignArg::Total => MajoritySign::Total,
            MajoritySignArg::Frequency => MajoritySign::Frequency,
        }
    }
}

/// `--load-in-4bit` / `--load-in-8bit`: quantize the base model's Linear layers at load, as
/// transformers' `BitsAndBytesConfig` does (embeddings, norms, `lm_head` and a bias-less
/// `score` stay dense; a classifier with a bias in the checkpoint is quantized, as transformers 5
/// does: keep it dense with `--llm-int8-skip-modules classifier`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct QuantArgs {
    /// Store the base's Linear weights in 4 bits (bitsandbytes NF4/FP4; QLoRA).
    #[arg(long, conflicts_with = "load_in_8bit")]
    pub load_in_4bit: bool,
    /// Store the base's Linear weights in 8 bits (LLM.int8 row-wise).
    #[arg(long)]
    pub load_in_8bit: bool,
    /// The 4-bit data type: nf4 or fp4 (transformers' default fp4).
    #[arg(long, value_name = "TYPE", requires = "load_in_4bit")]
    pub bnb_4bit_quant_type: Option<String>,
    /// Quantize the 4-bit block scales again (QLoRA's double quantization).
    #[arg(long, requires = "load_in_4bit")]
    pub bnb_4bit_use_double_quant: bool,
    /// The dtype the 4-bit products run in: float32 (transformers' default) or bfloat16 (on
    /// the native bf16 kernel where the CPU has one).
    #[arg(long, value_name = "DTYPE", requires = "load_in_4bit")]
    pub bnb_4bit_compute_dtype: Option<String>,
    /// Modules (names or name suffixes) kept dense when quantizing at load, replacing
    /// transformers' default skips (`llm_int8_skip_modules`), e.g. `classifier` to train a
    /// checkpoint's classification head as `modules_to_save`.
    #[arg(long, value_name = "NAME,NAME,...", value_delimiter = ',')]
    pub llm_int8_skip_modules: Option<Vec<String>>,
    /// Keep a GGUF base's quantized Linear weights in their GGUF blocks (QLoRA on a GGUF file;
    /// products as llama.cpp's, 8-bit activations) instead of dequantizing them to f32 at load,
    /// as transformers does.
    #[arg(long)]
    pub keep_gguf_quantized: bool,
}

impl QuantArgs {
    /// The config the flags ask for (checked), or `None` without a flag.
    pub fn config(&self) -> Result<Option<peft::quant::BitsAndBytesConfig>> {
        if !self.load_in_4bit && !self.load_in_8bit {
            if self.llm_int8_skip_modules.is_some() {
                return Err(Error::Config(
                    "--llm-int8-skip-modules needs --load-in-4bit or --load-in-8bit".into(),
                ));
            }
            return Ok(None);
        }
        let mut c = peft::quant::BitsAndBytesConfig {
            load_in_4bit: self.load_in_4bit,
            load_in_8bit: self.load_in_8bit,
            bnb_4bit_use_double_quant: self.bnb_4bit_use_double_quant,
            llm_int8_skip_modules: self.llm_int8_skip_modules.clone(),
            bnb_4bit_compute_dtype: self.bnb_4bit_compute_dtype.clone(),
            ..Default::default()
        };
        if let Some(t) = &self.bnb_4bit_quant_type {
            c.bnb_4bit_quant_type = t.clone();
        }
        c.scheme().map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("--bnb-4bit-*: {m}")),
            other => other,
        })?;
        Ok(Some(c))
    }

    /// Sets the config's `[model] quantization` from the flags, when any is given.
    pub fn apply(&self, quantization: &mut Option<peft::quant::BitsAndBytesConfig>) -> Result<()> {
        if let Some(c) = self.config()? {
            *quantization = Some(c);
        }
        Ok(())
    }
}

/// `--device`: where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    /// A GPU by its CUDA index.
    Cuda(usize),
}

/// The help text of every `--device`.
pub const DEVICE_HELP: &str = "Where the model runs: cpu, cuda (GPU 0) or cuda:N [default: cuda:0 \
     when this peft is built with --features cuda and a GPU is present, else cpu]";

/// Parses `cpu`, `cuda` or `cuda:N` (clap value parser). A CUDA device in a build without the
/// `cuda` feature is refused here, before anything loads.
pub fn parse_device(s: &str) -> std::result::Result<DeviceArg, String> {
    let d = match s.trim().to_ascii_lowercase().as_str() {
        "cpu" => DeviceArg::Cpu,
        "cuda" | "gpu" => DeviceArg::Cuda(0),
        other => match other.strip_prefix("cuda:") {
            Some(n) => DeviceArg::Cuda(n.parse().map_err(|_| {
                format!("`{n}` is not a GPU index; expected cpu, cuda or cuda:N (N = 0, 1, ...)")
            })?),
            None => return Err("expected cpu, cuda or cuda:N (N = 0, 1, ...)".into()),
        },
    };
    if matches!(d, DeviceArg::Cuda(_)) && !cfg!(feature = "cuda") {
        return Err("this peft was built without CUDA support; rebuild it with \
             `cargo build --release -p peft-cli --features cuda` (needs the CUDA toolkit), or use \
             --device cpu"
            .into());
    }
    Ok(d)
}

/// The device of `--device`, or by default the first GPU when there is one (and this build
/// has CUDA), else the CPU.
pub fn device(arg: Option<DeviceArg>) -> Result<Device> {
    match arg {
        Some(DeviceArg::Cpu) => Ok(Device::Cpu),
        Some(DeviceArg::Cuda(n)) => cuda(n),
        None => {
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                cuda(0)
            } else {
                Ok(Device::Cpu)
            }
        }
    }
}

fn cuda(n: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::Config(
            "--device cuda: this peft was built without CUDA support; rebuild it with \
             `--features cuda`, or use --device cpu"
                .into(),
        ));
    }
    Device::new_cuda(n).map_err(|e| {
        Error::Config(format!(
            "--device cuda:{n}: cannot open GPU {n} ({e}); `nvidia-smi -L` lists this \
             machine's GPUs, numbered from 0"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_syntax() {
        assert_eq!(parse_device("cpu"), Ok(DeviceArg::Cpu));
        assert_eq!(parse_device("CPU"), Ok(DeviceArg::Cpu));
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x")
            .unwrap_err()
            .contains("not a GPU index"));
        if cfg!(feature = "cuda") {
            assert_eq!(parse_device("cuda"), Ok(DeviceArg::Cuda(0)));
            assert_eq!(parse_device("cuda:3"), Ok(DeviceArg::Cuda(3)));
        } else {
            assert!(parse_device("cuda:1").unwrap_err().contains("without CUDA"));
        }
    }

    #[test]
    fn every_combination_type_is_the_library_s() {
        for c in CombinationArg::value_variants() {
            assert_eq!(c.to_peft().unwrap().as_str(), c.name());
        }
    }
}

#[cfg(test)]
mod quant_tests {
    use super::QuantArgs;

    #[test]
    fn skip_modules_flag_replaces_the_default_skips_and_needs_a_quantization_flag() {
        let q = QuantArgs {
            load_in_4bit: true,
            llm_int8_skip_modules: Some(vec!["classifier".into()]),
            ..Default::default()
        };
        let c = q.config().unwrap().unwrap();
        assert!(c.skips("classifier") && c.replaces_default_skips());
        let bf16 = QuantArgs {
            load_in_4bit: true,
            bnb_4bit_compute_dtype: Some("bfloat16".into()),
            ..Default::default()
        };
        match bf16.config().unwrap().unwrap().scheme().unwrap() {
            Some(peft::quant::Scheme::FourBit { compute_dtype, .. }) => {
                assert_eq!(compute_dtype, peft::candle::DType::BF16)
            }
            other => panic!("{other:?}"),
        }
        let bad = QuantArgs {
            load_in_4bit: true,
            bnb_4bit_compute_dtype: Some("float8".into()),
            ..Default::default()
        };
        let e = bad.config().unwrap_err().to_string();
        assert!(e.contains("float8"), "{e}");
        assert!(!c.skips("bert.encoder.layer.0.attention.self.query"));
        let e = QuantArgs {
            llm_int8_skip_modules: Some(vec!["classifier".into()]),
            ..Default::default()
        }
        .config()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--load-in-4bit"), "{e}");
    }

    #[test]
    fn quant_flags_make_transformers_configs_and_refuse_bad_types() {
        assert!(QuantArgs::default().config().unwrap().is_none());
        let q = QuantArgs {
            load_in_4bit: true,
            bnb_4bit_quant_type: Some("nf4".into()),
            bnb_4bit_use_double_quant: true,
            ..Default::default()
        };
        let c = q.config().unwrap().unwrap();
        assert!(c.load_in_4bit && c.bnb_4bit_use_double_quant && c.bnb_4bit_quant_type == "nf4");
        let e = QuantArgs {
            load_in_4bit: true,
            bnb_4bit_quant_type: Some("int3".into()),
            ..Default::default()
        }
        .config()
        .unwrap_err()
        .to_string();
        assert!(e.contains("int3"), "{e}");
        let c = QuantArgs {
            load_in_8bit: true,
            ..Default::default()
        }
        .config()
        .unwrap()
        .unwrap();
        assert!(c.load_in_8bit && !c.load_in_4bit);
    }
}
