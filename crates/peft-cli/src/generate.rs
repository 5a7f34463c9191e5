//! `peft generate`: tokenize, generate (streaming the first prompt's text to stdout as it comes),
//! report throughput (a log line on stderr).

use clap::Args;
use peft::generation::{generate_stream as run_generate, GenerationConfig, SamplingConfig};
use peft::io::tokenizer::Tokenizer;
use peft::models::{self, LoadOptions};
use peft::peft_model::CONFIG_NAME;
use peft::{Error, Result, TaskType};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use crate::args::{parse_device, DeviceArg, DEVICE_HELP};

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory, .gguf file, or directory holding one; default: the adapter's
    /// base_model_name_or_path (a local path or the Hugging Face cache).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// An adapter directory, or NAME=DIR; repeat for several adapters (the first is active).
    #[arg(long, value_name = "[NAME=]DIR")]
    pub adapter: Vec<String>,
    /// One adapter name per prompt, comma-separated (`__base__`: no adapter).
    #[arg(long, value_name = "NAME,NAME,...")]
    pub adapter_names: Option<String>,
    /// The prompt; repeat for a batch (left-padded, generated together).
    #[arg(long = "prompt", required = true, value_name = "TEXT")]
    pub prompts: Vec<String>,
    /// New tokens per prompt at most.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_new_tokens: usize,
    /// Sample instead of greedy decoding.
    #[arg(long)]
    pub do_sample: bool,
    /// Sampling temperature (with --do-sample).
    #[arg(long, default_value_t = 1.0, value_name = "T")]
    pub temperature: f32,
    /// Sampling keeps the k most likely tokens (transformers' default 50; 0: off).
    #[arg(long, default_value_t = 50, value_name = "K")]
    pub top_k: usize,
    /// Sampling keeps the smallest set of tokens whose probabilities sum to P (1: off).
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
    /// Divides the logits of tokens already in the sequence (CTRL's penalty; 1: off).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repetition_penalty: f32,
    /// Stop a sequence once its text contains this; repeatable.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Format each prompt as a user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also print the generated token ids of each prompt as a JSON line.
    #[arg(long)]
    pub print_ids: bool,
    /// One task id per prompt as JSON, e.g. '[0, 2]': PEFT's `task_ids`, for adapters with a
    /// prompt per task (multitask prompt tuning).
    #[arg(long, value_name = "JSON")]
    pub task_ids: Option<String>,
    #[arg(long, value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Option<DeviceArg>,
    #[command(flatten)]
    pub quant: crate::args::QuantArgs,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let specs = crate::adapters::parse_specs(&a.adapter)?;
    let model_path = match (&a.model, specs.first().map(|(_, d)| d)) {
        (Some(m), _) => m.clone(),
        (None, Some(adapter)) => {
            let cfg = peft::io::read_json(&adapter.join(CONFIG_NAME))?;
            let base = cfg
                .get("base_model_name_or_path")
                .and_then(|v| v.as_str())
                .ok_or_else(|| {
                    Error::Adapter(format!(
                        "{}: no base_model_name_or_path; pass --model",
                        adapter.join(CONFIG_NAME).display()
                    ))
                })?;
            peft::io::hub::resolve_model(base, Some(adapter))?
        }
        (None, None) => {
            return Err(Error::Config(
                "pass --model (a model directory or .gguf file) or --adapter".into(),
            ))
        }
    };
    let mut tok = Tokenizer::for_model(&model_path)?;
    let prompts: Vec<Vec<u32>> = a
        .prompts
        .iter()
        .map(|p| {
            if a.chat {
                let mut msgs = Vec::new();
                if let Some(s) = &a.system {
                    msgs.push(("system".to_string(), s.clone()));
                }
                msgs.push(("user".to_string(), p.clone()));
                let text = tok.apply_chat_template(&msgs, true)?;
                tok.encode_text(&text, false)
            } else {
                tok.encode_text(p, true)
            }
        })
        .collect::<Result<_>>()?;
    // Encoder-decoder models (T5) generate through their SEQ_2_SEQ_LM head.
    let encoder_decoder = model_path.join("config.json").exists()
        && peft::io::read_json(&model_path.join("config.json"))?
            .get("is_encoder_decoder")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
    let opts = LoadOptions {
        task: Some(if encoder_decoder {
            TaskType::Seq2SeqLm
        } else {
            TaskType::CausalLm
        }),
        device: crate::args::device(a.device)?,
        quantization: a.quant.config()?,
        keep_gguf_quantized: a.quant.keep_gguf_quantized,
        ..Default::default()
    };
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingConfig {
            do_sample: a.do_sample,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
        },
        stop_strings: a.stop.clone(),
        seed: a.seed,
        task_ids: a
            .task_ids
            .as_deref()
            .map(|t| crate::commands::parse_task_ids(t, prompts.len()))
            .transpose()?,
        ..Default::default()
    };
    let stream = a.prompts.len() == 1;
    let mut shown = String::new();
    let mut so_far: Vec<u32> = Vec::new();
    let mut stdout = std::io::stdout();
    let mut on_token = |row: usize, t: u32| {
        if !stream || row != 0 {
            return;
        }
        so_far.push(t);
        // Print only complete characters: a token can end inside a multi-byte one.
        if let Ok(text) = tok.decode(&so_far, true) {
            if !text.ends_with('\u{FFFD}') && text.len() >= shown.len() && text.starts_with(&shown)
            {
                let _ = write!(stdout, "{}", &text[shown.len()..]);
                let _ = stdout.flush();
                shown = text;
            }
        }
    };
    let start;
    let out = match (specs.is_empty(), &a.adapter_names) {
        (true, Some(_)) => {
            return Err(Error::Config(
                "--adapter-names needs the adapters it names: pass --adapter NAME=DIR".into(),
            ))
        }
        (false, Some(list)) => {
            let model = crate::adapters::load(&model_path, &specs, opts)?;
            let names = crate::adapters::parse_row_names(list);
            crate::adapters::check_rows(&names, prompts.len())?;
            let mixed = model.with_adapter_names(&names)?;
            start = Instant::now();
            run_generate(&mixed, &prompts, &cfg, Some(&tok), &mut on_token)?
        }
        (false, None) => {
            let model = crate::adapters::load(&model_path, &specs, opts)?;
            start = Instant::now();
            run_generate(&model, &prompts, &cfg, Some(&tok), &mut on_token)?
        }
        (true, None) => {
            let model = models::load(&model_path, &opts)?;
            start = Instant::now();
            run_generate(model.as_ref(), &prompts, &cfg, Some(&tok), &mut on_token)?
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    if stream {
        let full = tok.decode(&out.tokens[0], true)?;
        if let Some(rest) = full.strip_prefix(shown.as_str()) {
            print!("{rest}");
        }
        println!();
    } else {
        for (i, toks) in out.tokens.iter().enumerate() {
            println!("[{i}] {}", tok.decode(toks, true)?);
        }
    }
    if a.print_ids {
        println!(
            "{}",
            serde_json::to_string(&out.tokens).map_err(|e| Error::Data(e.to_string()))?
        );
    }
    let n: usize = out.tokens.iter().map(Vec::len).sum();
    tracing::info!(
        "generated {n} tokens for {} prompt(s) in {seconds:.2} s: {:.1} tokens/s (finish: {:?})",
        prompts.len(),
        n as f64 / seconds.max(1e-9),
        out.finish
    );
    Ok(())
}
