//! Gradient checkpointing: a block keeps only its input in forward and runs again in backward, so
//! activation memory stays flat in depth (transformers' `gradient_checkpointing_enable`).
//!
//! The recomputation needs the model during backward, after its forward has returned. A
//! [`Checkpointing`] session borrows the model for as long as it is open; only blocks of a model
//! enrolled in the session open on this thread are checkpointed, and backward refuses to
//! recompute once the session is closed. Gradients of the adapter weights inside a block come
//! out of the block's own backward; [`super::backward`] adds them to the loss's gradients.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ops::{self, DropoutState};
use crate::Result;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The session open on this thread (0: none).
    static ACTIVE: Cell<u64> = const { Cell::new(0) };
    /// Gradients of variables inside recomputed blocks, waiting to join the loss's.
    static PENDING: RefCell<Option<GradStore>> = const { RefCell::new(None) };
}

/// A model's mark that it takes part in a [`Checkpointing`] session.
#[derive(Debug, Default)]
pub struct Enrollment(AtomicU64);

impl Enrollment {
    fn active(&self) -> Option<u64> {
        let id = self.0.load(Ordering::Relaxed);
        (id != 0 && ACTIVE.with(Cell::get) == id).then_some(id)
    }
}

/// A model whose blocks can be checkpointed.
///
/// # Safety
/// `enrollment` must return a field of `self`, so that an enrolled model lives as long as the
/// session that enrolled it: a checkpointed block keeps a pointer to its model for backward.
pub unsafe trait Checkpointed: Sync {
    fn enrollment(&self) -> &Enrollment;
}

/// Gradient checkpointing on this thread for the enrolled models, until dropped.
pub struct Checkpointing<'m> {
    id: u64,
    previous: u64,
    enrolled: Vec<&'m Enrollment>,
    /// Sessions belong to the thread whose blocks they checkpoint.
    _thread: PhantomData<*const ()>,
}

impl<'m> Checkpointing<'m> {
    /// Opens a session for the models these enrollments belong to (each borrowed for `'m`).
    pub fn enable(enrolled: impl IntoIterator<Item = &'m Enrollment>) -> Self {
        let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        let enrolled: Vec<_> = enrolled.into_iter().collect();
        for e in &enrolled {
            e.0.store(id, Ordering::Relaxed);
        }
        let previous = ACTIVE.with(|a| a.replace(id));
        PENDING.with(|p| p.borrow_mut().take());
        Checkpointing {
            id,
            previous,
            enrolled,
            _thread: PhantomData,
        }
    }
}

impl Drop for Checkpointing<'_> {
    fn drop(&mut self) {
        for e in &self.enrolled {
            let _ =
                e.0.compare_exchange(self.id, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        ACTIVE.with(|a| a.set(self.previous));
        PENDING.with(|p| p.borrow_mut().take());
    }
}

/// The gradients that recomputed blocks found for variables inside them, taken.
pub(crate) fn take_pending() -> Option<GradStore> {
    PENDING.with(|p| p.borrow_mut().take())
}

/// A raw pointer to a model, for backward; see [`Checkpointed`] for why it stays valid.
struct Owner<M>(*const M);
// SAFETY: only shared references are made from it, and `M: Sync`.
unsafe impl<M: Sync> Send for Owner<M> {}
unsafe impl<M: Sync> Sync for Owner<M> {}

/// `f(owner, x, ctx)`, checkpointed when `owner` is enrolled in the session open on this thread
/// and gradients are being recorded; otherwise simply run.
///
/// `x` is the block's input and `ctx` an optional second input that may need a gradient (the
/// encoder output a decoder block attends to). Anything else `f` uses it must own (it is
/// `'static`) or reach through `owner`; randomness comes from the dropout generator, whose state
/// is replayed so the recomputation draws the forward's masks.
pub fn block<M, F>(owner: &M, x: &Tensor, ctx: Option<&Tensor>, f: F) -> Result<Tensor>
where
    M: Checkpointed + 'static,
    F: Fn(&M, &Tensor, Option<&Tensor>) -> Result<Tensor> + Send + Sync + 'static,
{
    let id = match owner.enrollment().active() {
        Some(id) if super::is_enabled() => id,
        _ => return f(owner, x, ctx),
    };
    let dropout = ops::dropout_state();
    let y = super::no_grad(|| f(owner, &x.detach(), ctx.map(Tensor::detach).as_ref()))?;
    // An input that records nothing (frozen embeddings in front) would leave the block out of
    // the graph and its adapters without gradients: give it one, as PEFT's
    // `enable_input_require_grads` does for checkpointed models.
    let x = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.into_inner()
    };
    let owner = Owner(owner as *const M);
    let recompute = move |x: &Tensor, c: Option<&Tensor>, g: &Tensor| {
        recompute(id, &owner, &f, &dropout, x, c, g).map_err(candle_core::Error::wrap)
    };
    match ctx {
        None => ops::with_backward(&x, y, move |x, _y, g| {
            let (gx, _) = recompute(x, None, g)?;
            match gx {
                Some(gx) => Ok(gx),
                None => x.zeros_like(),
            }
        }),
        Some(c) => ops::with_backward2(&x, c, y, move |x, c, _y, g| recompute(x, Some(c), g)),
    }
}

/// Runs the block again with gradients on, from the forward's dropout state, and backpropagates
/// `g` through it: returns the gradients of its inputs and sets aside those of its variables.
fn recompute<M: Checkpointed, F>(
    id: u64,
    owner: &Owner<M>,
    f: &F,
    dropout: &DropoutState,
    x: &Tensor,
    ctx: Option<&Tensor>,
    g: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)>
where
    F: Fn(&M, &Tensor, Option<&Tensor>) -> Result<Tensor>,
{
    if ACTIVE.with(Cell::get) != id {
        return Err(crate::Error::Training(
            "gradient checkpointing: backward ran after the Checkpointing session that recorded \
             the forward was closed (run forward and backward inside one session)"
                .into(),
        ));
    }
    // SAFETY: the session `id` is still open on this thread, and the model it enrolled is
    // borrowed by it (`Checkpointed`), so `owner` is alive.
    let owner = unsafe { &*owner.0 };
    let xv = Var::from_tensor(&x.detach())?;
    let cv = match ctx {
        Some(c) if c.track_op() => Some(Var::from_tensor(&c.detach())?),
        _ => None,
    };
    let c_in = match (&cv, ctx) {
        (Some(v), _) => Some(v.as_tensor().clone()),
        (None, c) => c.map(Tensor::detach),
    };
    let now = ops::swap_dropout_state(dropout.clone());
    let y = super::with_grad(|| f(owner, xv.as_tensor(), c_in.as_ref()));
    ops::swap_dropout_state(now);
    let mut grads = (y? * g)?.sum_all()?.backward()?;
    // candle leaves the gradients of variables attached to the graph they were computed
    // through: kept as they are, they would keep every recomputed block alive until the step
    // ends, which is what checkpointing is for avoiding.
    super::detach_all(&mut grads);
    let gx = grads.remove(xv.as_tensor());
    let gc = cv.and_then(|v| grads.remove(v.as_tensor()));
    PENDING.with(|p| {
        let mut pending = p.borrow_mut();
        match pending.as_mut() {
            Some(all) => all.extend(grads),
            None => {
                *pending = Some(grads);
                Ok(())
            }
        }
    })?;
    Ok((gx, gc))
}
