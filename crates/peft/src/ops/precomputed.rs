//! A node whose forward result was computed outside the graph and whose backward is a closure.
//!
//! Lets a fast forward kernel that has no backward, a product whose other operand is frozen, or a
//! block that is recomputed in backward (gradient checkpointing) take part in training.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};

use super::saved::Saved;
use crate::Result;

pub(crate) type BackwardFn =
    dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

type Backward2Fn = dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync;

/// Returns `y` (computed by the caller from `x` without recording a graph) as a node whose
/// gradient with respect to `x` is `bwd(x, y, dy)`.
pub fn with_backward<F>(x: &Tensor, y: Tensor, bwd: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        return Ok(y);
    }
    let op = Precomputed {
        out: Saved::holding(y),
        bwd: Box::new(bwd),
    };
    Ok(x.apply_op1(op)?)
}

/// [`with_backward`] for a result of two inputs: `bwd(a, b, y, dy)` gives the gradients with
/// respect to `a` and `b` (`None` for an input that needs none).
pub fn with_backward2<F>(a: &Tensor, b: &Tensor, y: Tensor, bwd: F) -> Result<Tensor>
where
    F: Fn(
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
{
    if !a.track_op() && !b.track_op() {
        return Ok(y);
    }
    let op = Precomputed2 {
        out: Saved::holding(y),
        bwd: Box::new(bwd),
    };
    Ok(a.apply_op2(b, op)?)
}

/// Hands over a precomputed result as its forward pass; taken out of the op once delivered so it
/// is not kept alive twice.
type Backward3Fn = dyn Fn(
        &Tensor,
        &Tensor,
        &Tensor,
        &Tensor,
        &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync;

/// [`with_backward`] for a result of three inputs: `bwd(a, b, c, y, dy)` gives the gradients
/// with respect to `a`, `b` and `c`.
pub fn with_backward3<F>(a: &Tensor, b: &Tensor, c: &Tensor, y: Tensor, bwd: F) -> Result<Tensor>
where
    F: Fn(
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
{
    if !a.track_op() && !b.track_op() && !c.track_op() {
        return Ok(y);
    }
    let op = Precomputed3 {
        out: Saved::holding(y),
        bwd: Box::new(bwd),
    };
    Ok(a.apply_op3(b, c, op)?)
}

struct Precomputed3 {
    out: Saved<Tensor>,
    bwd: Box<Backward3Fn>,
}

impl CustomOp3 for Precomputed3 {
    fn name(&self) -> &'static str {
        "precomputed3"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_storage(self.out.take("precomputed op")?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_storage(self.out.take("precomputed op")?)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(a, b, c, res, grad)
    }
}

struct Precomputed {
    out: Saved<Tensor>,
    bwd: Box<BackwardFn>,
}

struct Precomputed2 {
    out: Saved<Tensor>,
    bwd: Box<Backward2Fn>,
}

/// The CPU storage of `y`, as a fresh contiguous buffer.
fn cpu_storage(y: Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let y = y.contiguous()?;
    let (storage, layout) = y.storage_and_layout();
    let (start, end) = (
        layout.start_offset(),
        layout.start_offset() + y.elem_count(),
    );
    match &*storage {
        Storage::Cpu(s) => {
            let data = match s {
                CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
                CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
                CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
                CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
                _ => candle_core::bail!("precomputed op: unsupported dtype {:?}", y.dtype()),
            };
            Ok((data, y.shape().clone()))
        }
        _ => candle_core::bail!("precomputed op: tensor on an unexpected device"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_storage(y: Tensor) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let y = y.contiguous()?;
    let (storage, layout) = y.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
        _ => candle_core::bail!("precomputed op: tensor on an unexpected device"),
    }
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        "precomputed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_storage(self.out.take("precomputed op")?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_storage(self.out.take("precomputed op")?)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.bwd)(arg, res, grad)?))
    }
}

impl CustomOp2 for Precomputed2 {
    fn name(&self) -> &'static str {
        "precomputed2"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_storage(self.out.take("precomputed op")?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_storage(self.out.take("precomputed op")?)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(a, b, res, grad)
    }
}
