//! The MPI engine (rsmpi over Open MPI, MPICH, Intel MPI...): sums of host buffers in the
//! tensors' own dtype (f32 / f64; f16 / bf16, which MPI has no type for, widened to f32).

use candle_core::{DType, Tensor};
use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::Collective;
use crate::{Error, Result};

/// `MPI_COMM_WORLD` of this job. Dropping the last handle finalises MPI.
pub struct Mpi {
    world: SimpleCommunicator,
    local_rank: usize,
    // Last: finalises MPI after the communicators are gone.
    _universe: Universe,
}

impl Mpi {
    /// Initialises MPI (only the main thread calls it: `MPI_THREAD_FUNNELED`).
    pub fn init() -> Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| Error::Training("MPI is already initialised in this process".into()))?;
        let world = universe.world();
        // The ranks sharing this machine's memory, numbered from 0: this one's GPU.
        let local_rank = world.split_shared(world.rank()).rank() as usize;
        Ok(Self {
            world,
            local_rank,
            _universe: universe,
        })
    }
}

fn sum_in_place<T: Equivalence + Copy>(world: &SimpleCommunicator, values: &mut [T]) {
    let send = values.to_vec();
    world.all_reduce_into(&send[..], values, SystemOperation::sum());
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        sum_in_place(&self.world, values);
        Ok(())
    }

    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let mut all = vec![0u64; self.world_size()];
        self.world.all_gather_into(&value, &mut all[..]);
        Ok(all)
    }

    fn broadcast_bytes(&self, bytes: &mut [u8]) -> Result<()> {
        self.world.process_at_rank(0).broadcast_into(bytes);
        Ok(())
    }

    fn all_reduce_sum(&self, bucket: &Tensor) -> Result<Tensor> {
        let device = bucket.device();
        match bucket.dtype() {
            DType::F64 => {
                let mut v = bucket.to_vec1::<f64>()?;
                sum_in_place(&self.world, &mut v);
                Ok(Tensor::from_vec(v, bucket.elem_count(), device)?)
            }
            DType::F32 => {
                let mut v = bucket.to_vec1::<f32>()?;
                sum_in_place(&self.world, &mut v);
                Ok(Tensor::from_vec(v, bucket.elem_count(), device)?)
            }
            DType::F16 | DType::BF16 => {
                let wide = self.all_reduce_sum(&bucket.to_dtype(DType::F32)?)?;
                Ok(wide.to_dtype(bucket.dtype())?)
            }
            other => Err(Error::Training(format!(
                "cannot all-reduce {other:?} gradients (expected a float dtype)"
            ))),
        }
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
