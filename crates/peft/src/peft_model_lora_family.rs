//! `PeftModel` methods for the LoRA family's extras: AdaLoRA's training hooks (the orthogonal
//! regulariser and the rank allocation step) and saving a PiSSA / OLoRA adapter as a plain LoRA.

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use std::path::Path;

use super::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use crate::io::{load_safetensors, read_json, save_safetensors, write_atomic};
use crate::tuners::adalora;
use crate::tuners::lora::convert;
use crate::tuners::PeftConfig;
use crate::{Error, Result};

impl PeftModel {
    /// The config of adapter `name`, to change before saving (e.g. PEFT's recipe of setting
    /// `init_lora_weights = true` before saving a PiSSA adapter's initial state).
    pub fn peft_config_mut(&mut self, name: &str) -> Option<&mut PeftConfig> {
        self.adapters
            .iter_mut()
            .find(|a| a.name == name)
            .map(|a| &mut a.config)
    }

    /// What the method adds to the training loss, if anything: AdaLoRA's orthogonal
    /// regularisation of the trainable adapter (`orth_reg_weight · mean ‖P Pᵀ - I‖_F`).
    pub fn regularization_loss(&self) -> Result<Option<Tensor>> {
        let Some(alloc) = &self.allocator else {
            return Ok(None);
        };
        let Some(PeftConfig::AdaLora(c)) = self.peft_config(&alloc.adapter) else {
            return Ok(None);
        };
        if c.orth_reg_weight == 0.0 {
            return Ok(None);
        }
        let layers = adalora::layers(self.model.as_ref(), &alloc.adapter);
        adalora::orth_reg_loss(&layers, c.orth_reg_weight)
    }

    /// AdaLoRA's per-step hook (PEFT's `model.base_model.update_and_allocate(global_step)`): call
    /// it after the optimizer step with that step's gradients and the 0-based step number. It
    /// updates the importance scores, prunes ranks on the budget schedule and records
    /// `rank_pattern` in the adapter's config. Does nothing for other methods.
    pub fn update_and_allocate(&mut self, global_step: usize, grads: &GradStore) -> Result<()> {
        self.update_and_allocate_by(global_step, &|t| grads.get(t).cloned())
    }

    /// [`PeftModel::update_and_allocate`] with the gradients given by a lookup from parameter to
    /// gradient (a trainer that accumulates micro-batches holds sums, not a `GradStore`).
    pub fn update_and_allocate_by(
        &mut self,
        global_step: usize,
        grads: &dyn Fn(&Tensor) -> Option<Tensor>,
    ) -> Result<()> {
        let Some(mut alloc) = self.allocator.take() else {
            return Ok(());
        };
        let name = alloc.adapter.clone();
        let mut config = match self.peft_config(&name) {
            Some(PeftConfig::AdaLora(c)) => c.clone(),
            _ => return Ok(()),
        };
        let result = {
            let layers = adalora::layers(self.model.as_ref(), &name);
            adalora::update_and_allocate(&mut alloc, &mut config, &layers, global_step, grads)
        };
        self.allocator = Some(alloc);
        result?;
        if let Some(PeftConfig::AdaLora(c)) = self.peft_config_mut(&name) {
            c.rank_pattern = config.rank_pattern;
        }
        Ok(())
    }

    /// Saves adapter `default` (others under `dir/<name>/`) like [`PeftModel::save_pretrained`],
    /// but a PiSSA / OLoRA adapter is first turned back into a plain LoRA of rank 2r that applies
    /// to the *original* base weights (PEFT's `path_initial_model_for_weight_conversion`).
    /// `initial` holds the same adapter saved before training with `init_lora_weights = true`;
    /// like PEFT, its `adapter_config.json` is rewritten with that setting.
    pub fn save_pretrained_converted(&self, dir: &Path, initial: &Path) -> Result<()> {
        let init_cfg = PeftConfig::from_adapter_json(&read_json(&initial.join(CONFIG_NAME))?)?;
        let PeftConfig::Lora(init_cfg) = init_cfg else {
            return Err(Error::Adapter(format!(
                "{}: the initial adapter is not a LoRA adapter",
                initial.display()
            )));
        };
        convert::check_initial_config(&init_cfg)?;
        let init_weights = load_safetensors(&initial.join(WEIGHTS_NAME), self.model.device())?;
        for entry in &self.adapters {
            let PeftConfig::Lora(c) = &entry.config else {
                return Err(Error::Adapter(format!(
                    "adapter `{}` is not a LoRA adapter; only PiSSA / OLoRA adapters convert",
                    entry.name
                )));
            };
            convert::check_convertible(c)?;
            let target = if entry.name == "default" {
                dir.to_path_buf()
            } else {
                dir.join(&entry.name)
            };
            std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
            let state =
                convert::convert_state_dict(self.adapter_state_dict(&entry.name)?, &init_weights)?;
            save_safetensors(&target.join(WEIGHTS_NAME), &state)?;
            let mut initial_cfg = c.clone();
            initial_cfg.init_lora_weights = crate::tuners::lora::InitLoraWeights::Bool(true);
            write_json(&initial.join(CONFIG_NAME), &PeftConfig::Lora(initial_cfg))?;
            write_json(
                &target.join(CONFIG_NAME),
                &PeftConfig::Lora(convert::converted_config(c)),
            )?;
        }
        Ok(())
    }
}

fn write_json(path: &Path, config: &PeftConfig) -> Result<()> {
    let json = serde_json::to_string_pretty(&config.to_adapter_json())
        .map_err(|e| Error::Adapter(e.to_string()))?;
    write_atomic(path, json.as_bytes())
}
