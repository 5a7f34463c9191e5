//! Mixed batches: every row of one batch runs through its own adapter (PEFT's `adapter_names`,
//! with `"__base__"` for the bare model).
//!
//! The choice is made per call, not stored in the model: [`with_adapter_names`] sets it for the
//! current thread while a forward pass runs, and each adapter-aware layer reads it. So models stay
//! free of any tuner argument, as PEFT keeps them free of it with forward hooks.

use candle_core::{Device, Tensor};
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::{Error, Result};

/// The name that routes a row past every adapter.
pub const BASE: &str = "__base__";

/// The per-row adapter names of a mixed batch, and what layers derived from them that stays
/// valid while the model cannot change (see [`MixedRows::cached`]).
pub struct MixedRows {
    names: Rc<[String]>,
    derived: RefCell<HashMap<String, Rc<dyn Any>>>,
}

impl MixedRows {
    pub fn new(names: &[String]) -> Rc<Self> {
        Rc::new(Self {
            names: names.to_vec().into(),
            derived: RefCell::new(HashMap::new()),
        })
    }

    pub fn names(&self) -> &Rc<[String]> {
        &self.names
    }

    /// What layer `key` built from these rows before, or `build()` kept for next time. A
    /// generation step runs every layer again with the same rows and the same (borrowed, so
    /// unchanged) adapters: the rows' gathered adapter factors are built once per generation,
    /// not once per token.
    pub(crate) fn cached<T: 'static>(
        &self,
        key: &str,
        build: impl FnOnce() -> Result<T>,
    ) -> Result<Rc<T>> {
        if let Some(v) = self.derived.borrow().get(key) {
            if let Ok(v) = v.clone().downcast::<T>() {
                return Ok(v);
            }
        }
        let v = Rc::new(build()?);
        self.derived
            .borrow_mut()
            .insert(key.to_string(), v.clone() as Rc<dyn Any>);
        Ok(v)
    }
}

thread_local! {
    static ROWS: RefCell<Option<Rc<MixedRows>>> = const { RefCell::new(None) };
}

/// Runs `f` with row `i` of every batch routed through adapter `names[i]`.
pub fn with_adapter_names<R>(names: &[String], f: impl FnOnce() -> R) -> R {
    with_rows(&MixedRows::new(names), f)
}

/// [`with_adapter_names`] with rows (and what layers cached from them) that outlive the call.
pub fn with_rows<R>(rows: &Rc<MixedRows>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Rc<MixedRows>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            ROWS.with(|r| *r.borrow_mut() = prev);
        }
    }
    let _restore = Restore(ROWS.with(|r| r.borrow_mut().replace(rows.clone())));
    f()
}

/// The per-row adapter names of the forward pass running on this thread, if it is mixed.
pub fn current() -> Option<Rc<[String]>> {
    ROWS.with(|r| r.borrow().as_ref().map(|rows| rows.names.clone()))
}

/// The mixed rows of the forward pass running on this thread, with their cache.
pub(crate) fn current_rows() -> Option<Rc<MixedRows>> {
    ROWS.with(|r| r.borrow().clone())
}

/// Rows of a flattened input grouped by adapter.
pub(crate) struct Groups {
    /// Adapter name and the flat row indices it owns, in order of first appearance.
    pub groups: Vec<(String, Tensor)>,
    /// Puts the groups' concatenated outputs back in row order.
    pub inverse: Tensor,
}

/// Groups the `flat` rows of a layer input whose leading dimension `lead` is the batch: each
/// batch row owns `flat / batch` consecutive flat rows.
pub(crate) fn groups(
    names: &[String],
    lead: Option<usize>,
    flat: usize,
    layer: &str,
    device: &Device,
) -> Result<Groups> {
    let batch = names.len();
    if lead != Some(batch) || batch == 0 || !flat.is_multiple_of(batch) {
        return Err(Error::Data(format!(
            "mixed batch: {batch} adapter names given, but `{layer}` sees a batch of {}; pass one \
             name per input row",
            lead.map_or("none".to_string(), |l| l.to_string())
        )));
    }
    let per = flat / batch;
    let mut order: Vec<(String, Vec<u32>)> = Vec::new();
    for (row, name) in names.iter().enumerate() {
        let rows = (row * per..(row + 1) * per).map(|i| i as u32);
        match order.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.extend(rows),
            None => order.push((name.clone(), rows.collect())),
        }
    }
    let mut inverse = vec![0u32; flat];
    let mut at = 0u32;
    for (_, rows) in &order {
        for &r in rows {
            inverse[r as usize] = at;
            at += 1;
        }
    }
    let groups = order
        .into_iter()
        .map(|(n, rows)| {
            let len = rows.len();
            Ok((n, Tensor::from_vec(rows, len, device)?))
        })
        .collect::<Result<_>>()?;
    Ok(Groups {
        groups,
        inverse: Tensor::from_vec(inverse, flat, device)?,
    })
}
