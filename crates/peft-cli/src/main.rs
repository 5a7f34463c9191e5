//! `peft`: train, run, merge and inspect PEFT adapters from the command line. A thin layer over
//! the `peft` library; every subcommand is a few library calls. Logs go to stderr (`-q` / `-v`),
//! results to stdout.

use clap::{ArgAction, Parser, Subcommand};
use std::process::ExitCode;

mod adapters;
mod args;
mod bench;
mod commands;
mod diffusion;
mod export;
mod generate;
mod logging;
mod serve;

// Training allocates and frees large activation buffers every step; glibc returns those to the
// kernel each time and pays page faults to get them back. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "peft",
    version,
    about = "Parameter-efficient fine-tuning, compatible with Hugging Face PEFT",
    long_about = "Parameter-efficient fine-tuning, compatible with Hugging Face PEFT: train, run, \
                  merge and inspect adapters on Hugging Face models, on CPU or CUDA.\n\n\
                  Logs and progress go to stderr; results (metrics, JSON lines, generated text) \
                  to stdout."
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
    /// Fine-tune an adapter from a TOML config ([model], [peft], [data], [training]) and save it,
    /// with its model card, metrics.jsonl and curves, in the config's output_dir. With [model]
    /// path a Stable Diffusion pipeline folder, a DreamBooth run ([data] instance pictures and
    /// prompt; [peft_text_encoder] to train the text encoder too).
    Train(commands::TrainArgs),
    /// Evaluate an adapter on the config's evaluation data (eval_file, or the held-out split)
    /// and print the metrics.
    Eval(commands::EvalArgs),
    /// Run a model (with optional adapters) on token ids, or on named input tensors (--inputs,
    /// also for a Stable Diffusion UNet, text encoder or VAE), and write its outputs to a
    /// safetensors file.
    Forward(commands::ForwardArgs),
    /// Merge an adapter (or a weighted combination of several) into its base model and write a
    /// Hugging Face model directory (or, for a Stable Diffusion pipeline, the whole pipeline).
    Merge(commands::MergeArgs),
    /// Describe an adapter directory or a model (directory or GGUF file, or a Stable Diffusion
    /// pipeline's components): config, tensors, parameter count, adaptable layers.
    Inspect(commands::InspectArgs),
    /// Generate text from a causal language model (a Hugging Face directory or a GGUF file),
    /// optionally through adapters, streaming tokens as they come.
    Generate(generate::GenerateArgs),
    /// Generate images with a Stable Diffusion pipeline (diffusers folder), optionally through
    /// adapters, with classifier-free guidance; writes PNG files.
    GenerateImage(diffusion::GenerateImageArgs),
    /// Rewrite a Stable Diffusion adapter in PEFT's, diffusers' or kohya's layout.
    Convert(diffusion::ConvertArgs),
    /// Rewrite a LoRA adapter as llama.cpp's GGUF LoRA (--format gguf, from a PEFT adapter on a
    /// llama-family base) or a GGUF LoRA as a PEFT adapter directory (--format peft).
    Export(export::ExportArgs),
    /// Time training steps (LoRA r=8 on PEFT's default targets unless --target-modules, or the
    /// method of --peft-config) on fixed-length random batches, or with --generate the speed of
    /// greedy generation; prints one JSON line.
    Bench(bench::BenchArgs),
    /// Serve a base model and its adapters over HTTP: OpenAI-compatible completions and chat
    /// (continuous batching across adapters), embeddings and /predict for encoders, /metrics.
    Serve(serve::ServeArgs),
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
    // candle would read /proc/cpuinfo on every CPU matrix product to count its threads.
    peft::threads::pin_thread_count();
    // Commands run on a thread of candle's CPU pool (below), whose threads get std's default
    // 2 MiB stack; give them the main thread's 8 MiB (candle's backward walks its graph
    // recursively, one frame per node). Set before any thread starts; the user's value wins.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", (8usize << 20).to_string());
    }
    let cli = Cli::parse();
    // In a data-parallel job only rank 0 logs what the user sees; the others say only
    // warnings and errors.
    let other_rank = peft::train::dist::launch::launcher_rank().is_some_and(|r| r > 0);
    logging::init(cli.quiet || other_rank, cli.verbose);
    let result = match cli.command {
        // The server runs its own threads and blocks on I/O.
        Command::Serve(a) => serve::serve(a),
        // Everything else runs on a thread of candle's CPU pool: candle's products and the
        // fused kernels then split their work inside that pool, instead of the main thread
        // handing each parallel section to a pool and sleeping until it is done (batch-1
        // decoding of SmolLM2: 53 -> 72 tokens/s; the MiniLM training step 6 % faster).
        command => candle_core::Device::Cpu.with_context(move || run(command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One command other than `serve`.
fn run(command: Command) -> peft::Result<()> {
    match command {
        Command::Train(a) => commands::train(a),
        Command::Eval(a) => commands::eval(a),
        Command::Forward(a) => commands::forward(a),
        Command::Merge(a) => commands::merge(a),
        Command::Inspect(a) => commands::inspect(&a.dir),
        Command::Generate(a) => generate::generate(a),
        Command::GenerateImage(a) => diffusion::generate_image(a),
        Command::Convert(a) => diffusion::convert(a),
        Command::Export(a) => export::export(a),
        Command::Bench(a) => bench::run(&a),
        Command::Serve(a) => serve::serve(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_subcommand_and_flag_has_help() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for arg in cli.get_arguments() {
            assert!(arg.get_help().is_some(), "peft --{}", arg.get_id());
        }
        for sub in cli.get_subcommands() {
            assert!(sub.get_about().is_some(), "peft {}", sub.get_name());
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                assert!(
                    arg.get_help().is_some(),
                    "peft {} {} has no help text",
                    sub.get_name(),
                    arg.get_id()
                );
            }
        }
    }
}
