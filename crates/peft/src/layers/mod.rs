//! Adapter-aware building blocks, and the one way a model exposes them: [`Modules`], a walk over
//! its parameterised layers under their Hugging Face module paths. Tuners and the PEFT wrapper
//! only ever see models through this walk, which keeps model code free of tuner knowledge.

pub mod adapter;
pub mod attention;
pub mod cache;
pub mod conv;
pub mod embedding;
pub mod hook;
pub mod linear;
pub mod loader;
pub mod mixed;
pub mod norm;
pub mod param;
pub mod rotary;

pub use adapter::{
    Adapter, AdapterList, AdapterSite, Adapters, Conv2dAdapter, EmbeddingAdapter, LinearAdapter,
    LinearBase, LowRank,
};
pub use cache::{Cache, KeyValue};
pub use conv::{Conv2d, Conv2dBase, ConvParams};
pub use embedding::Embedding;
pub use hook::{HookAdapter, HookInput, HookLocation, HookPoint};
pub use linear::Linear;
pub use loader::{HeadInit, Loader};
pub use norm::{GroupNorm, LayerNorm, RmsNorm};
pub use param::Param;

/// A borrowed parameterised layer.
pub enum ModuleRef<'a> {
    Linear(&'a Linear),
    Embedding(&'a Embedding),
    Conv2d(&'a Conv2d),
    LayerNorm(&'a LayerNorm),
    GroupNorm(&'a GroupNorm),
    RmsNorm(&'a RmsNorm),
    /// A hook point: no parameters of its own, a site for hook methods.
    Hook(&'a HookPoint),
}

/// A mutably borrowed parameterised layer.
pub enum ModuleMut<'a> {
    Linear(&'a mut Linear),
    Embedding(&'a mut Embedding),
    Conv2d(&'a mut Conv2d),
    LayerNorm(&'a mut LayerNorm),
    GroupNorm(&'a mut GroupNorm),
    RmsNorm(&'a mut RmsNorm),
    Hook(&'a mut HookPoint),
}

impl<'a> ModuleRef<'a> {
    pub fn name(&self) -> &str {
        match self {
            ModuleRef::Linear(l) => &l.name,
            ModuleRef::Embedding(e) => &e.name,
            ModuleRef::Conv2d(c) => &c.name,
            ModuleRef::LayerNorm(n) => &n.name,
            ModuleRef::GroupNorm(n) => &n.name,
            ModuleRef::RmsNorm(n) => &n.name,
            ModuleRef::Hook(h) => &h.name,
        }
    }

    pub fn params(&self) -> Vec<&Param> {
        match self {
            ModuleRef::Linear(l) => std::iter::once(&l.weight).chain(l.bias.as_ref()).collect(),
            ModuleRef::Embedding(e) => vec![&e.weight],
            ModuleRef::Conv2d(c) => std::iter::once(&c.weight).chain(c.bias.as_ref()).collect(),
            ModuleRef::LayerNorm(n) => std::iter::once(&n.weight).chain(n.bias.as_ref()).collect(),
            ModuleRef::GroupNorm(n) => vec![&n.weight, &n.bias],
            ModuleRef::RmsNorm(n) => vec![&n.weight],
            ModuleRef::Hook(_) => Vec::new(),
        }
    }

    /// The module as a place that carries adapters, if it is one.
    pub fn site(&self) -> Option<&'a dyn AdapterSite> {
        match *self {
            ModuleRef::Linear(l) => Some(l),
            ModuleRef::Embedding(e) => Some(e),
            ModuleRef::Conv2d(c) => Some(c),
            ModuleRef::Hook(h) => Some(h),
            ModuleRef::LayerNorm(_) | ModuleRef::GroupNorm(_) | ModuleRef::RmsNorm(_) => None,
        }
    }

    /// True for a site that carries at least one adapter.
    pub fn has_adapters(&self) -> bool {
        self.site().is_some_and(|s| !s.adapters().is_empty())
    }
}

impl<'a> ModuleMut<'a> {
    pub fn name(&self) -> &str {
        match self {
            ModuleMut::Linear(l) => &l.name,
            ModuleMut::Embedding(e) => &e.name,
            ModuleMut::Conv2d(c) => &c.name,
            ModuleMut::LayerNorm(n) => &n.name,
            ModuleMut::GroupNorm(n) => &n.name,
            ModuleMut::RmsNorm(n) => &n.name,
            ModuleMut::Hook(h) => &h.name,
        }
    }

    /// The module as a place that carries adapters, if it is one.
    pub fn site_mut(self) -> Option<&'a mut dyn AdapterSite> {
        match self {
            ModuleMut::Linear(l) => Some(l),
            ModuleMut::Embedding(e) => Some(e),
            ModuleMut::Conv2d(c) => Some(c),
            ModuleMut::Hook(h) => Some(h),
            ModuleMut::LayerNorm(_) | ModuleMut::GroupNorm(_) | ModuleMut::RmsNorm(_) => None,
        }
    }

    pub fn params_mut(self) -> Vec<&'a mut Param> {
        match self {
            ModuleMut::Linear(l) => std::iter::once(&mut l.weight)
                .chain(l.bias.as_mut())
                .collect(),
            ModuleMut::Embedding(e) => vec![&mut e.weight],
            ModuleMut::Conv2d(c) => std::iter::once(&mut c.weight)
                .chain(c.bias.as_mut())
                .collect(),
            ModuleMut::LayerNorm(n) => std::iter::once(&mut n.weight)
                .chain(n.bias.as_mut())
                .collect(),
            ModuleMut::GroupNorm(n) => vec![&mut n.weight, &mut n.bias],
            ModuleMut::RmsNorm(n) => vec![&mut n.weight],
            ModuleMut::Hook(_) => Vec::new(),
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
        leaf_module!($ty, $ty);
    };
    ($ty:ident, $variant:ident) => {
        impl Modules for $ty {
            fn visit<'a>(&'a self, out: &mut Vec<ModuleRef<'a>>) {
                out.push(ModuleRef::$variant(self));
            }
            fn visit_mut<'a>(&'a mut self, out: &mut Vec<ModuleMut<'a>>) {
                out.push(ModuleMut::$variant(self));
            }
        }
    };
}
leaf_module!(Linear);
leaf_module!(Embedding);
leaf_module!(Conv2d);
leaf_module!(LayerNorm);
leaf_module!(GroupNorm);
leaf_module!(RmsNorm);
leaf_module!(HookPoint, Hook);

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
