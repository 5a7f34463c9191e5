//! The NCCL engine: gradient buckets summed on the GPUs (one process per GPU), on candle's own
//! CUDA stream so the sum is ordered after the backward pass that made them. The NCCL unique id
//! goes from rank 0 to the others through MPI, which also carries the host-side scalars.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::rc::Rc;

use super::Collective;
use crate::{Error, Result};

/// An NCCL communicator over the ranks of an MPI job, one GPU each.
pub struct Nccl {
    comm: Comm,
    host: Rc<dyn Collective>,
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Training(format!("NCCL {what}: {e:?}"))
}

impl Nccl {
    /// Joins every rank of `host` (MPI) in an NCCL communicator on `device`, this rank's GPU.
    pub fn new(host: Rc<dyn Collective>, device: &Device) -> Result<Self> {
        let (rank, world) = (host.rank(), host.world_size());
        let mut bytes = [0u8; 128];
        if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error("unique id", e))?;
            for (b, c) in bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        host.broadcast_bytes(&mut bytes)?;
        let comm = Self::comm(device, rank, world, bytes)?;
        Ok(Self { comm, host })
    }

    /// The communicator of `rank` among `world` GPUs that share the unique id `bytes`.
    fn comm(device: &Device, rank: usize, world: usize, bytes: [u8; 128]) -> Result<Comm> {
        let stream = device.as_cuda_device()?.cuda_stream();
        let id = Id::uninit(bytes.map(|b| b as core::ffi::c_char));
        Comm::from_rank(stream, rank, world, id).map_err(|e| nccl_error("init", e))
    }

    /// A communicator of this GPU alone (world size 1): what the single-GPU smoke test runs.
    pub fn sum_alone(bucket: &Tensor) -> Result<Tensor> {
        let id = Id::new().map_err(|e| nccl_error("unique id", e))?;
        let mut bytes = [0u8; 128];
        for (b, c) in bytes.iter_mut().zip(id.internal()) {
            *b = *c as u8;
        }
        let comm = Self::comm(bucket.device(), 0, 1, bytes)?;
        Ok(bucket.apply_op1_no_bwd(&AllReduce(&comm))?)
    }
}

/// `ncclAllReduce(sum)` of a contiguous CUDA tensor into a new one.
struct AllReduce<'a>(&'a Comm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("NCCL all-reduce of a CPU tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("NCCL all-reduce of a non-contiguous tensor")
        };
        let dev = s.device.clone();
        macro_rules! sum {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(start..end);
                // SAFETY: every element is written by the all-reduce before anyone reads it.
                let mut dst = unsafe { dev.alloc::<$t>(end - start) }?;
                self.0
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| candle_core::Error::msg(format!("NCCL all-reduce: {e:?}")))?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => sum!(f32),
            DType::F64 => sum!(f64),
            DType::F16 => sum!(half::f16),
            DType::BF16 => sum!(half::bf16),
            other => bail!("cannot all-reduce {other:?} gradients"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn world_size(&self) -> usize {
        self.host.world_size()
    }

    fn local_rank(&self) -> usize {
        self.host.local_rank()
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.host.sum_f64(values)
    }

    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        self.host.all_gather_u64(value)
    }

    fn broadcast_bytes(&self, bytes: &mut [u8]) -> Result<()> {
        self.host.broadcast_bytes(bytes)
    }

    fn all_reduce_sum(&self, bucket: &Tensor) -> Result<Tensor> {
        if !bucket.device().is_cuda() {
            return self.host.all_reduce_sum(bucket);
        }
        Ok(bucket.apply_op1_no_bwd(&AllReduce(&self.comm))?)
    }

    fn abort(&self, code: i32) -> ! {
        self.host.abort(code)
    }
}
