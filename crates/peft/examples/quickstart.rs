//! The library in a few calls: wrap a model with LoRA, train a step, save, load, merge.
//!
//!     cargo run --release -p peft --example quickstart -- .assets/all-MiniLM-L6-v2

use peft::candle::Tensor;
use peft::{
    classification_loss, get_peft_model, load_model, AdamW, AdamWParams, FromPretrained, Inputs,
    LoadOptions, LoraConfig, PeftModel, TaskType, TunerConfig,
};
use std::path::PathBuf;

fn main() -> peft::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or(".assets/all-MiniLM-L6-v2".into()),
    );
    let opts = LoadOptions {
        task: Some(TaskType::SeqCls),
        num_labels: Some(2),
        ..Default::default()
    };
    let config = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.1,
        target_modules: Some(["query", "value"].into()),
        ..Default::default()
    }
    .with_task_type(TaskType::SeqCls);
    let model = get_peft_model(load_model(&dir, &opts)?, config, "default")?;
    println!("{}", model.trainable_parameters_line());

    // One training step on a toy batch.
    let device = model.base_model().device().clone();
    let inputs = Inputs::new(Tensor::new(
        &[[101u32, 2023, 3185, 2003, 2307, 102]],
        &device,
    )?);
    let labels = Tensor::new(&[1i64], &device)?;
    let mut opt = AdamW::new(model.trainable_parameters(), AdamWParams::default())?;
    let loss = classification_loss(&model.forward(&inputs, true)?, &labels)?;
    opt.step(&loss.backward()?, 1e-3, 1.0)?;

    let out = std::env::temp_dir().join("peft-quickstart-adapter");
    model.save_pretrained(&out)?;

    let mut model =
        PeftModel::from_pretrained(load_model(&dir, &opts)?, &out, FromPretrained::default())?;
    let adapted = peft::no_grad(|| model.forward(&inputs, false))?;
    let base = {
        let base_only = model.disable_adapter()?; // the adapter is back when this scope ends
        peft::no_grad(|| base_only.forward(&inputs, false))?
    };
    model.merge_adapter()?;
    let merged = model.merge_and_unload()?.forward(&inputs, false)?;
    println!("base   {}", base);
    println!("lora   {}", adapted);
    println!("merged {}", merged);
    Ok(())
}
