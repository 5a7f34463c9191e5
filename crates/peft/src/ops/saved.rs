//! A value an op's forward pass keeps for its backward pass.
//!
//! candle's custom ops compute their output inside `cpu_fwd(&self, ...)`, so what the backward
//! needs (an intermediate that is not a graph node) is stored in the op through a lock.

use std::sync::Mutex;

pub(super) struct Saved<T>(Mutex<Option<T>>);

impl<T> Saved<T> {
    pub(super) fn empty() -> Self {
        Saved(Mutex::new(None))
    }

    pub(super) fn holding(value: T) -> Self {
        Saved(Mutex::new(Some(value)))
    }

    fn lock(&self, op: &str) -> candle_core::Result<std::sync::MutexGuard<'_, Option<T>>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: lock poisoned")))
    }

    pub(super) fn put(&self, op: &str, value: T) -> candle_core::Result<()> {
        *self.lock(op)? = Some(value);
        Ok(())
    }

    /// `f` of the kept value; an error when the forward has not run.
    pub(super) fn with<R>(&self, op: &str, f: impl FnOnce(&T) -> R) -> candle_core::Result<R> {
        match self.lock(op)?.as_ref() {
            Some(v) => Ok(f(v)),
            None => candle_core::bail!("{op}: backward before forward"),
        }
    }

    /// The kept value, handed over once.
    pub(super) fn take(&self, op: &str) -> candle_core::Result<T> {
        self.lock(op)?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: value already taken")))
    }
}
