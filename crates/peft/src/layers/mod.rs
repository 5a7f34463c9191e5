//! Adapter-aware building blocks, and the one way a model exposes them: [`Modules`], a walk over
//! its parameterised layers under their Hugging Face module paths. Tuners and the PEFT wrapper
//! only ever see models through this walk, which keeps model code free of tuner knowledge.

pub mod adapter;
pub mod attention;
pub mod embedding;
pub mod linear;
pub mod mixed;
pub mod norm;
pub mod param;
pub mod rotary;

pub use adapter::{Adapters, EmbeddingAdapter, LinearAdapter, LinearBase};
pub use embedding::Embedding;
pub use linear::Linear;
pub use norm::{LayerNorm, RmsNorm};
pub use param::Param;

/// A borrowed parameterised layer.
pub enum ModuleRef<'a> {
    Linear(&'a Linear),
    Embedding(&'a Embedding),
    LayerNorm(&'a LayerNorm),
    RmsNorm(&'a RmsNorm),
}

/// A mutably borrowed parameterised layer.
pub enum ModuleMut<'a> {
    Linear(&'a mut Linear),
    Embedding(&'a mut Embedding),
    LayerNorm(&'a mut LayerNorm),
    RmsNorm(&'a mut RmsNorm),
}

impl ModuleRef<'_> {
    pub fn name(&self) -> &str {
        match self {
            ModuleRef::Linear(l) => &l.name,
            ModuleRef::Embedding(e) => &e.name,
            ModuleRef::LayerNorm(n) => &n.name,
            ModuleRef::RmsNorm(n) => &n.name,
        }
    }

    pub fn params(&self) -> Vec<&Param> {
        match self {
            ModuleRef::Linear(l) => std::iter::once(&l.weight).chain(l.bias.as_ref()).collect(),
            ModuleRef::Embedding(e) => vec![&e.weight],
            ModuleRef::LayerNorm(n) => std::iter::once(&n.weight).chain(n.bias.as_ref()).collect(),
            ModuleRef::RmsNorm(n) => vec![&n.weight],
        }
    }
}

impl<'a> ModuleMut<'a> {
    pub fn name(&self) -> &str {
        match self {
            ModuleMut::Linear(l) => &l.name,
            ModuleMut::Embedding(e) => &e.name,
            ModuleMut::LayerNorm(n) => &n.name,
            ModuleMut::RmsNorm(n) => &n.name,
        }
    }

    pub fn params_mut(self) -> Vec<&'a mut Param> {
        match self {
            ModuleMut::Linear(l) => std::iter::once(&mut l.weight)
                .chain(l.bias.as_mut())
                .collect(),
            ModuleMut::Embedding(e) => vec![&mut e.weight],
            ModuleMut::LayerNorm(n) => std::iter::once(&mut n.weight)
                .chain(n.bias.as_mut())
                .collect(),
            ModuleMut::RmsNorm(n) => vec![&mut n.weight],
        }
    }
}

/// A walk over the parameterised layers of a model or block, in module order.
pub trait Modules {
    fn visit<'a>(&'a self, out: &mut Vec<ModuleRef<'a>>);
    fn visit_mut<'a>(&'a mut self, out: &mut Vec<ModuleMut<'a>>);

    fn modules(&self) -> Vec<ModuleRef<'_>> {
        let mut v = Vec::new();
        self.visit(&mut v);
        v
    }

    fn modules_mut(&mut self) -> Vec<ModuleMut<'_>> {
        let mut v = Vec::new();
        self.visit_mut(&mut v);
        v
    }
}

macro_rules! leaf_module {
    ($ty:ident) => {
        impl Modules for $ty {
            fn visit<'a>(&'a self, out: &mut Vec<ModuleRef<'a>>) {
                out.push(ModuleRef::$ty(self));
            }
            fn visit_mut<'a>(&'a mut self, out: &mut Vec<ModuleMut<'a>>) {
                out.push(ModuleMut::$ty(self));
            }
        }
    };
}
leaf_module!(Linear);
leaf_module!(Embedding);
leaf_module!(LayerNorm);
leaf_module!(RmsNorm);

impl<T: Modules> Modules for Vec<T> {
    fn visit<'a>(&'a self, out: &mut Vec<ModuleRef<'a>>) {
        self.iter().for_each(|m| m.visit(out));
    }
    fn visit_mut<'a>(&'a mut self, out: &mut Vec<ModuleMut<'a>>) {
        self.iter_mut().for_each(|m| m.visit_mut(out));
    }
}

impl<T: Modules> Modules for Option<T> {
    fn visit<'a>(&'a self, out: &mut Vec<ModuleRef<'a>>) {
        if let Some(m) = self {
            m.visit(out);
        }
    }
    fn visit_mut<'a>(&'a mut self, out: &mut Vec<ModuleMut<'a>>) {
        if let Some(m) = self {
            m.visit_mut(out);
        }
    }
}

/// Implements [`Modules`] for a struct by walking the listed fields in order.
#[macro_export]
macro_rules! impl_modules {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl $crate::layers::Modules for $ty {
            fn visit<'a>(&'a self, out: &mut Vec<$crate::layers::ModuleRef<'a>>) {
                $( $crate::layers::Modules::visit(&self.$field, out); )*
            }
            fn visit_mut<'a>(&'a mut self, out: &mut Vec<$crate::layers::ModuleMut<'a>>) {
                $( $crate::layers::Modules::visit_mut(&mut self.$field, out); )*
            }
        }
    };
}
