//! A short model card (`README.md`) in the adapter directory, shaped like the one PEFT's
//! `save_pretrained` writes: YAML front matter that the Hugging Face Hub reads (`base_model`,
//! `library_name: peft`, tags), then what was trained, how, and how well.

use std::fmt::Write;
use std::path::Path;

use super::config::TrainingArguments;
use super::metrics::Metrics;
use crate::peft_model::PeftModel;
use crate::Result;

pub fn write_model_card(
    dir: &Path,
    model: &PeftModel,
    args: &TrainingArguments,
    train_examples: usize,
    steps: usize,
    eval: Option<&Metrics>,
) -> Result<()> {
    let config = model.peft_config(model.active_adapter());
    let base = config
        .and_then(|c| c.base_model_name_or_path())
        .unwrap_or("unknown")
        .to_string();
    let method = config
        .map(|c| c.peft_type().to_string())
        .unwrap_or_default();
    let task = model.base_model().info().task.as_str();
    let mut s = String::new();
    let _ = writeln!(s, "---\nbase_model: {base}\nlibrary_name: peft\ntags:");
    let _ = writeln!(
        s,
        "- base_model:adapter:{base}\n- {}\n- peft\n---\n",
        method.to_lowercase()
    );
    let _ = writeln!(s, "# Model Card for {} adapter of {base}\n", method);
    let _ = writeln!(
        s,
        "A {method} adapter for `{}` ({task}), trained with `peft` (Rust). It loads with PEFT:\n",
        model.base_model().info().architecture
    );
    let _ = writeln!(
        s,
        "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"<this directory>\")\n```\n"
    );
    let _ = writeln!(s, "## Training Details\n");
    let _ = writeln!(s, "- {}", model.trainable_parameters_line());
    let _ = writeln!(
        s,
        "- training examples: {train_examples}; optimizer steps: {steps}"
    );
    let _ = writeln!(
        s,
        "- learning_rate: {}; lr_scheduler_type: {:?}; warmup_ratio: {}; warmup_steps: {}",
        args.learning_rate, args.lr_scheduler_type, args.warmup_ratio, args.warmup_steps
    );
    let _ = writeln!(
        s,
        "- per_device_train_batch_size: {}; gradient_accumulation_steps: {}; num_train_epochs: {}; max_steps: {}",
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.num_train_epochs,
        args.max_steps
    );
    let _ = writeln!(
        s,
        "- optimizer: AdamW (betas {}, {}; eps {}; weight_decay {}); max_grad_norm: {}; seed: {}; bf16: {}",
        args.adam_beta1,
        args.adam_beta2,
        args.adam_epsilon,
        args.weight_decay,
        args.max_grad_norm,
        args.seed,
        args.bf16
    );
    if let Some(m) = eval {
        let _ = writeln!(s, "\n## Evaluation\n\n| metric | value |\n| --- | --- |");
        for (k, v) in m {
            let _ = writeln!(s, "| {k} | {v:.4} |");
        }
    }
    let _ = writeln!(
        s,
        "\n### Framework versions\n\n- peft (Rust) {}",
        env!("CARGO_PKG_VERSION")
    );
    crate::io::write_atomic(&dir.join("README.md"), s.as_bytes())
}
