//! The adapter-aware embedding table.

use candle_core::Tensor;

use super::adapter::{Adapters, EmbeddingAdapter};
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
        let mut y = self.weight.value().index_select(&flat, 0)?;
        for adapter in self.adapters.running() {
            y = adapter.forward(&flat, y, train)?;
        }
        Ok(y.reshape(out_dims)?)
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
