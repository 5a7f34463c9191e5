//! The adapter-aware embedding table.

use candle_core::Tensor;

use super::adapter::{AdapterList, AdapterSite, Adapters, EmbeddingAdapter};
use super::mixed;
use super::param::Param;
use crate::Result;

#[derive(Debug)]
pub struct Embedding {
    pub name: String,
    /// `[num_embeddings, dim]`.
    pub weight: Param,
    pub adapters: Adapters<dyn EmbeddingAdapter>,
}

impl Embedding {
    pub fn new(name: impl Into<String>, weight: Tensor) -> Self {
        let name = name.into();
        Self {
            weight: Param::new(format!("{name}.weight"), weight),
            name,
            adapters: Adapters::default(),
        }
    }

    pub fn num_embeddings(&self) -> usize {
        self.weight.base().dims()[0]
    }

    pub fn dim(&self) -> usize {
        self.weight.base().dims()[1]
    }

    /// `ids`: integer tensor of any shape → `[..., dim]`.
    pub fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(self.dim());
        let flat = ids.flatten_all()?;
        let routes =
            (self.weight.has_copies() || !self.adapters.is_empty()) && !self.adapters.is_disabled();
        let y = match mixed::current() {
            Some(names) if routes => {
                self.forward_mixed(&flat, &names, ids.dims().first().copied())?
            }
            _ => {
                let mut y = self.weight.value().index_select(&flat, 0)?;
                for adapter in self.adapters.running() {
                    y = adapter.forward(&flat, y, train)?;
                }
                y
            }
        };
        Ok(y.reshape(out_dims)?)
    }

    /// PEFT's mixed-batch embedding: each row group looks up its adapter's table (a
    /// `modules_to_save` copy, or the base plus its LoRA update); `__base__` rows the bare one.
    fn forward_mixed(
        &self,
        flat: &Tensor,
        names: &[String],
        lead: Option<usize>,
    ) -> Result<Tensor> {
        let g = mixed::groups(names, lead, flat.dim(0)?, &self.name, flat.device())?;
        let mut outs = Vec::with_capacity(g.groups.len());
        for (name, idx) in &g.groups {
            let ids = flat.index_select(idx, 0)?;
            let table = match self.weight.copy(name) {
                Some(v) => crate::grad::live(v.as_tensor()),
                None => crate::grad::live(self.weight.base()),
            };
            let mut y = table.index_select(&ids, 0)?;
            if name != mixed::BASE {
                if let Some(adapter) = self.adapters.get(name) {
                    y = adapter.forward(&ids, y, false)?;
                }
            }
            outs.push(y);
        }
        Ok(Tensor::cat(&outs, 0)?.index_select(&g.inverse, 0)?)
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_t(ids, false)
    }

    pub fn merge(&mut self, names: &[String]) -> Result<()> {
        for name in names {
            if self.adapters.merged().contains(name) {
                continue;
            }
            let Some(adapter) = self.adapters.get(name) else {
                continue;
            };
            let w = adapter.merge(&self.weight.value())?;
            self.weight.set_base(w)?;
            self.adapters.mark_merged(name, true);
        }
        Ok(())
    }

    pub fn unmerge(&mut self) -> Result<()> {
        while let Some(name) = self.adapters.merged().last().cloned() {
            if let Some(adapter) = self.adapters.get(&name) {
                let w = adapter.unmerge(&self.weight.value())?;
                self.weight.set_base(w)?;
            }
            self.adapters.mark_merged(&name, false);
        }
        Ok(())
    }
}

impl AdapterSite for Embedding {
    fn site_name(&self) -> &str {
        &self.name
    }
    fn adapters(&self) -> &dyn AdapterList {
        &self.adapters
    }
    fn adapters_mut(&mut self) -> &mut dyn AdapterList {
        &mut self.adapters
    }
    fn merge(&mut self, names: &[String]) -> Result<()> {
        Embedding::merge(self, names)
    }
    fn unmerge(&mut self) -> Result<()> {
        Embedding::unmerge(self)
    }
}
