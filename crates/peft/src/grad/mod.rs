//! A switch for recording the autograd graph, like `torch.no_grad()`.
//!
//! candle records operations on any tensor that depends on a variable. Adapter weights are
//! variables, so an inference forward pass would keep every activation alive until its output is
//! dropped — for an evaluation batch of 64 sequences, gigabytes. Inside [`no_grad`], layers read
//! their variables detached and nothing is recorded.

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use std::cell::Cell;

pub mod checkpoint;

pub use checkpoint::Checkpointing;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Runs `f` without recording gradients on this thread.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(ENABLED.with(|e| e.replace(false)));
    f()
}

/// Runs `f` recording gradients on this thread (a checkpointed block recomputed in backward).
pub(crate) fn with_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(ENABLED.with(|e| e.replace(true)));
    f()
}

/// The gradients of `loss`, including those of variables inside checkpointed blocks (which
/// `loss.backward()` alone would leave with the blocks), detached: candle leaves a variable's
/// gradient attached to the graph it was computed through, which would keep the step's
/// activations alive for as long as the gradients are.
pub fn backward(loss: &Tensor) -> crate::Result<GradStore> {
    let _ = checkpoint::take_pending();
    let mut grads = loss.backward()?;
    if let Some(inner) = checkpoint::take_pending() {
        grads.extend(inner)?;
    }
    detach_all(&mut grads);
    Ok(grads)
}

/// Every gradient in `grads` without its graph (same storage).
pub(crate) fn detach_all(grads: &mut GradStore) {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(t) = grads
            .get_id(id)
            .filter(|t| t.track_op())
            .map(Tensor::detach)
        {
            grads.insert_id(id, t);
        }
    }
}

/// Whether operations are being recorded for backward.
pub fn is_enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// `t` itself while recording, else a detached handle on the same storage.
pub fn live(t: &Tensor) -> Tensor {
    if is_enabled() {
        t.clone()
    } else {
        t.detach()
    }
}
