//! `peft`: train, run, merge and inspect PEFT adapters from the command line. A thin layer over
//! the `peft` library; every subcommand is a few library calls. Logs go to stderr (`-q` / `-v`),
//! results to stdout.

use clap::{ArgAction, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod adapters;
mod bench;
mod commands;
mod generate;
mod logging;

// Training allocates and frees large activation buffers every step; glibc returns those to the
// kernel each time and pays page faults to get them back. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "peft",
    version,
    about = "Parameter-efficient fine-tuning, compatible with Hugging Face PEFT"
)]
struct Cli {
    /// Show only errors (no progress, no info or warnings).
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Logging"
    )]
    quiet: bool,
    /// More detail in the logs: -v debug, -vv trace (default: warnings, and info from peft;
    /// RUST_LOG=target=level,... sets it when neither -q nor -v is given).
    #[arg(short, long, global = true, action = ArgAction::Count, help_heading = "Logging")]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune an adapter from a TOML config ([model], [peft], [data], [training]).
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Override a config value: `--set training.learning_rate=1e-4` (repeatable).
        #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
        set: Vec<String>,
        /// Continue from a checkpoint directory, or without a value from the newest
        /// `checkpoint-N` in output_dir.
        #[arg(long, num_args = 0..=1, default_missing_value = "last")]
        resume: Option<String>,
    },
    /// Evaluate an adapter on the config's evaluation data (eval_file, or the held-out split)
    /// and print the metrics.
    Eval {
        #[arg(long)]
        config: PathBuf,
        /// Adapter directory; default: the config's output_dir.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
        set: Vec<String>,
    },
    /// Run a model (with an optional adapter) on token ids and write the logits to safetensors.
    Forward {
        #[arg(long)]
        model: PathBuf,
        /// An adapter directory, or NAME=DIR; repeat for several adapters (the first is active).
        #[arg(long)]
        adapter: Vec<String>,
        /// One adapter name per input row, comma-separated (`__base__`: no adapter): a mixed
        /// batch, each row through its own adapter.
        #[arg(long)]
        adapter_names: Option<String>,
        /// Equal-length rows of token ids as JSON, e.g. '[[101, 2023, 102]]'.
        #[arg(long)]
        input_ids: String,
        /// Same shape as --input-ids; 1 for real tokens, 0 for padding.
        #[arg(long)]
        attention_mask: Option<String>,
        /// Same shape as --input-ids; segment ids for BERT-style pairs.
        #[arg(long)]
        token_type_ids: Option<String>,
        /// Encoder-decoder models (T5): the decoder's token ids, equal-length rows as JSON, one
        /// row per --input-ids row; logits are then [batch, decoder positions, vocab].
        #[arg(long)]
        decoder_input_ids: Option<String>,
        /// Head to use when there is no adapter to say (SEQ_CLS, TOKEN_CLS, FEATURE_EXTRACTION, ...).
        #[arg(long)]
        task_type: Option<String>,
        #[arg(long)]
        num_labels: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Merge an adapter into its base model and write a Hugging Face model directory.
    Merge {
        #[arg(long)]
        model: PathBuf,
        /// An adapter directory, or NAME=DIR; repeat to merge a weighted combination of several.
        #[arg(long, required = true)]
        adapter: Vec<String>,
        /// One weight per adapter, comma-separated (default: 1 each); negative subtracts.
        #[arg(long)]
        weights: Option<String>,
        /// How several adapters combine (PEFT's add_weighted_adapter): linear, cat, svd, ties,
        /// ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune,
        /// magnitude_prune_svd.
        #[arg(long, default_value = "svd")]
        combination_type: String,
        /// Rank of the _svd combinations (default: the largest input rank).
        #[arg(long)]
        svd_rank: Option<usize>,
        /// Quantile at which _svd factors are clamped.
        #[arg(long)]
        svd_clamp: Option<f64>,
        /// Fraction of entries TIES / DARE / magnitude pruning keep.
        #[arg(long)]
        density: Option<f64>,
        /// TIES sign election: total or frequency.
        #[arg(long, default_value = "total")]
        majority_sign_method: String,
        /// Seed of DARE's random masks.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Describe an adapter directory or a model directory.
    Inspect { dir: PathBuf },
    /// Generate text from a causal language model (a Hugging Face directory or a GGUF file),
    /// optionally through an adapter, streaming tokens as they come.
    Generate {
        /// Model directory, .gguf file, or directory holding one; default: the adapter's
        /// base_model_name_or_path (a local path or the Hugging Face cache).
        #[arg(long)]
        model: Option<PathBuf>,
        /// An adapter directory, or NAME=DIR; repeat for several adapters (the first is active).
        #[arg(long)]
        adapter: Vec<String>,
        /// One adapter name per prompt, comma-separated (`__base__`: no adapter).
        #[arg(long)]
        adapter_names: Option<String>,
        /// The prompt; repeat for a batch (left-padded, generated together).
        #[arg(long, required = true)]
        prompt: Vec<String>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sample instead of greedy decoding.
        #[arg(long)]
        do_sample: bool,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// Sampling keeps the k most likely tokens (transformers' default 50; 0: off).
        #[arg(long, default_value_t = 50)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        /// Stop a sequence once its text contains this; repeatable.
        #[arg(long)]
        stop: Vec<String>,
        /// Format each prompt as a user message with the model's chat template.
        #[arg(long)]
        chat: bool,
        /// System message for --chat.
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also print the generated token ids of each prompt as a JSON line.
        #[arg(long)]
        print_ids: bool,
    },
    /// Time training steps (LoRA r=8 on PEFT's default targets unless --target-modules, or the
    /// method of --peft-config) on fixed-length random batches, or with --generate the speed of
    /// greedy generation.
    Bench {
        /// A model directory or GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// SEQ_CLS or CAUSAL_LM (training); generation uses the LM head whatever this says.
        #[arg(long, default_value = "SEQ_CLS")]
        task: String,
        /// Comma-separated LoRA target modules (default: PEFT's for the model type).
        #[arg(long, value_delimiter = ',')]
        target_modules: Option<Vec<String>>,
        /// A PEFT config JSON (any method, as in adapter_config.json) to train instead of LoRA.
        #[arg(long, conflicts_with = "target_modules")]
        peft_config: Option<PathBuf>,
        /// Time generating this many new tokens per row (prompts of --seq-len random ids).
        #[arg(long)]
        generate: Option<usize>,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
    },
}

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2): -1 keeps freed memory mapped.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // SAFETY: sets a process-wide allocator option; no allocation is in flight that depends on it.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    // candle's CPU thread pool spins 25,000 times at each barrier before sleeping. On a machine
    // shared with anything else, spinning workers take the cores the working thread needs (a
    // training step measured 3.0 s instead of 1.6 s under load); a short spin costs nothing
    // measurable when the machine is idle. Set before the pool starts; the user's value wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    let cli = Cli::parse();
    logging::init(cli.quiet, cli.verbose);
    let result = match cli.command {
        Command::Train {
            config,
            set,
            resume,
        } => commands::train(&config, &set, resume),
        Command::Eval {
            config,
            adapter,
            set,
        } => commands::eval(&config, &set, adapter.as_deref()),
        Command::Forward {
            model,
            adapter,
            adapter_names,
            input_ids,
            attention_mask,
            token_type_ids,
            decoder_input_ids,
            task_type,
            num_labels,
            out,
        } => commands::forward(commands::ForwardArgs {
            model,
            adapter,
            adapter_names,
            input_ids,
            attention_mask,
            token_type_ids,
            decoder_input_ids,
            task_type,
            num_labels,
            out,
        }),
        Command::Merge {
            model,
            adapter,
            weights,
            combination_type,
            svd_rank,
            svd_clamp,
            density,
            majority_sign_method,
            seed,
            out,
        } => commands::merge(commands::MergeArgs {
            model,
            adapter,
            weights,
            combination_type,
            svd_rank,
            svd_clamp,
            density,
            majority_sign_method,
            seed,
            out,
        }),
        Command::Inspect { dir } => commands::inspect(&dir),
        Command::Generate {
            model,
            adapter,
            adapter_names,
            prompt,
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            stop,
            chat,
            system,
            seed,
            print_ids,
        } => generate::generate(generate::GenerateArgs {
            model,
            adapter,
            adapter_names,
            prompts: prompt,
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            stop,
            chat,
            system,
            seed,
            print_ids,
        }),
        Command::Bench {
            model,
            task,
            target_modules,
            peft_config,
            generate,
            batch,
            seq_len,
            steps,
            warmup,
        } => task.parse().and_then(|task| {
            bench::run(&bench::BenchArgs {
                model,
                task,
                target_modules,
                peft_config,
                batch,
                seq_len,
                steps,
                warmup,
                generate,
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
