//! What the user sees while a command runs: the `tracing` subscriber (logs on stderr, their level
//! set by `-q` / `-v`) and the training progress bar drawn from the trainer's events. Results
//! (metrics, JSON, generated text) go to stdout, printed by the commands.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use peft::train::metrics::Metrics;
use peft::train::{TrainerCallback, TrainerEvent};
use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The bar being drawn, if any: log lines are written above it instead of through it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Which events are shown: `-q` errors only; by default warnings from everything and info from
/// `peft`; `-v` adds peft's debug events, `-vv` everything down to trace. Without `-q`/`-v`,
/// `RUST_LOG` (`target=level,...`, e.g. `peft=debug,warn`) overrides the default.
pub fn filter(quiet: bool, verbose: u8) -> Targets {
    match (quiet, verbose) {
        (true, _) => Targets::new().with_default(LevelFilter::ERROR),
        (false, 0) => std::env::var("RUST_LOG")
            .ok()
            .and_then(|s| s.parse::<Targets>().ok())
            .unwrap_or_else(|| {
                Targets::new()
                    .with_target("peft", LevelFilter::INFO)
                    .with_default(LevelFilter::WARN)
            }),
        (false, 1) => Targets::new()
            .with_target("peft", LevelFilter::DEBUG)
            .with_default(LevelFilter::WARN),
        (false, _) => Targets::new().with_default(LevelFilter::TRACE),
    }
}

/// Installs the subscriber: one line per event on stderr, `warning: ` / `error: ` before
/// warnings and errors (coloured on a terminal), the event's module too with `-v`.
pub fn init(quiet: bool, verbose: u8) {
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(Stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(Plain {
            show_target: verbose > 0,
        })
        .with_filter(filter(quiet, verbose));
    // Only fails when a subscriber is already installed (then that one is kept).
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

/// Whether `-q`/`-v` let info events through, i.e. whether progress is worth drawing.
pub fn shows_info() -> bool {
    tracing::enabled!(target: "peft", Level::INFO)
}

struct Plain {
    show_target: bool,
}

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let (label, colour) = match *meta.level() {
            Level::ERROR => ("error: ", "31"),
            Level::WARN => ("warning: ", "33"),
            Level::INFO => ("", ""),
            Level::DEBUG => ("debug: ", "34"),
            Level::TRACE => ("trace: ", "35"),
        };
        if !label.is_empty() {
            if w.has_ansi_escapes() {
                write!(w, "\x1b[{colour}m{label}\x1b[0m")?;
            } else {
                write!(w, "{label}")?;
            }
        }
        if self.show_target {
            write!(w, "{}: ", meta.target())?;
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// stderr, with the progress bar (if one is drawn) lifted out of the way of each line.
struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;
    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().ok().and_then(|b| b.clone());
        let write = || std::io::stderr().lock().write_all(buf);
        match bar {
            Some(bar) => bar.suspend(write)?,
            None => write()?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn set_bar(bar: Option<ProgressBar>) {
    if let Ok(mut b) = BAR.lock() {
        *b = bar;
    }
}

/// The trainer's events as `peft train` shows them: a progress bar on a terminal, and a log line
/// per log, evaluation and checkpoint (info events, so `-q` hides them).
pub struct TrainProgress {
    bar: Option<ProgressBar>,
    draw: bool,
}

impl TrainProgress {
    /// `draw`: whether to draw a bar (it is drawn only on a terminal anyway).
    pub fn new(draw: bool) -> Self {
        TrainProgress { bar: None, draw }
    }

    fn start(&mut self, total: usize, start: usize) {
        if !self.draw {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(start as u64);
        if !bar.is_hidden() {
            set_bar(Some(bar.clone()));
            self.bar = Some(bar);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            set_bar(None);
        }
    }
}

impl Drop for TrainProgress {
    /// A run that failed leaves its bar where it stopped, above the error.
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
            set_bar(None);
        }
    }
}

fn show(m: &Metrics) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join("  ")
}

impl TrainerCallback for TrainProgress {
    fn on_event(&mut self, event: &TrainerEvent<'_>) {
        match event {
            TrainerEvent::Begin {
                total_steps,
                start_step,
                ..
            } => self.start(*total_steps, *start_step),
            TrainerEvent::Step(s) => {
                if let Some(bar) = &self.bar {
                    bar.set_position(s.step as u64);
                    bar.set_message(format!(
                        "epoch {:.2} loss {:.4} lr {:.2e} {:.1} ex/s",
                        s.epoch, s.loss, s.learning_rate, s.examples_per_second
                    ));
                }
            }
            TrainerEvent::Log(s) => tracing::info!(
                "step {}/{}  epoch {:.2}  loss {:.4}  lr {:.3e}  {:.1} ex/s",
                s.step,
                s.total_steps,
                s.epoch,
                s.loss,
                s.learning_rate,
                s.examples_per_second
            ),
            TrainerEvent::Evaluate { step, metrics } => {
                tracing::info!("eval at step {step}: {}", show(metrics))
            }
            TrainerEvent::Save { dir, seconds, .. } => {
                tracing::info!("saved {} in {seconds:.3} s", dir.display())
            }
            TrainerEvent::Interrupted { step, checkpoint } => tracing::warn!(
                "stopped at step {step}; resume with --resume {}",
                checkpoint.display()
            ),
            TrainerEvent::LoadedBest { dir } => {
                tracing::info!("loaded the best checkpoint {}", dir.display())
            }
            TrainerEvent::End { .. } => self.finish(),
            _ => {}
        }
    }
}
