//! Data-parallel training: one process per CPU socket, machine or GPU, launched by `mpirun` /
//! `srun`, each training on its shard of every batch ([`sampler`]) and summing the adapter's
//! gradients with the others after every micro-batch group, before the optimizer step (so every
//! rank steps with the same gradients and stays bit-identical). Frozen base weights are never
//! sent. The engines are the ones clusters already run: MPI between processes ([`mpi`], CPU
//! tensors) and NCCL between GPUs ([`nccl`], the unique id shared through MPI).
//!
//! A [`ProcessGroup`] of one process (every run outside a launcher) is the old single-process
//! path: every call below returns at once.

pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod sampler;

use candle_core::{DType, Device, Tensor};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use crate::{Error, Result};

/// What a data-parallel engine does for the trainer. Implementations: [`mpi::Mpi`] (host
/// buffers) and [`nccl::Nccl`] (GPU buffers, host scalars through MPI).
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// This process's index among the processes of its machine (picks its GPU).
    fn local_rank(&self) -> usize;
    /// Element-wise sum over all ranks, in place (step counts, losses, flags).
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// Rank 0's `bytes` on every rank.
    fn broadcast_bytes(&self, bytes: &mut [u8]) -> Result<()>;
    /// The element-wise sum over all ranks of a 1-D contiguous tensor, in its dtype and on its
    /// device.
    fn all_reduce_sum(&self, bucket: &Tensor) -> Result<Tensor>;
    /// Ends every process of the job (this one failed; the others must not wait for it).
    fn abort(&self, code: i32) -> !;
}

/// Gradients go out in buckets of at most this many bytes (PyTorch DDP's `bucket_cap_mb`
/// default): few enough calls for latency, small enough buffers for memory.
pub const BUCKET_BYTES: usize = 25 << 20;

/// The processes of a data-parallel job; [`ProcessGroup::single`] for a plain run. Clones
/// share the engine (one thread's: MPI is called from the main thread only; it is finalised when the last clone drops).
#[derive(Clone, Default)]
pub struct ProcessGroup {
    engine: Option<Rc<dyn Collective>>,
    /// Seconds spent in collectives so far.
    comm_seconds: Rc<Cell<f64>>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ProcessGroup(rank {} of {})",
            self.rank(),
            self.world_size()
        )
    }
}

/// What the ranks of one optimizer step add up to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTotals {
    /// The step's loss over the global batch.
    pub loss: f64,
    /// Examples seen by all ranks.
    pub seen: usize,
    /// Some rank was asked to stop (Ctrl-C).
    pub stop: bool,
}

impl ProcessGroup {
    /// One process: no communication at all.
    pub fn single() -> Self {
        Self::default()
    }

    /// A group over `engine` (a world of one is still [`ProcessGroup::single`]'s no-op path).
    pub fn with(engine: Rc<dyn Collective>) -> Self {
        if engine.world_size() <= 1 {
            return Self::single();
        }
        Self {
            engine: Some(engine),
            comm_seconds: Default::default(),
        }
    }

    /// The group this process was launched into: MPI's world under `mpirun` / `srun` (with the
    /// `mpi` feature), else a single process. A launch of several processes on a build without
    /// MPI is an error (each would train alone and overwrite the others' output).
    pub fn from_env() -> Result<Self> {
        match launch::launcher_world_size() {
            Some((n, var)) if n > 1 => {
                #[cfg(feature = "mpi")]
                {
                    let _ = var;
                    Ok(Self::with(Rc::new(mpi::Mpi::init()?)))
                }
                #[cfg(not(feature = "mpi"))]
                Err(launch::without_mpi_error(n, var))
            }
            _ => Ok(Self::single()),
        }
    }

    /// The same group, its gradients all-reduced where `device` keeps them: with NCCL between
    /// GPUs when built with the `nccl` feature, else through host memory with MPI.
    pub fn for_device(self, device: &Device) -> Result<Self> {
        #[cfg(feature = "nccl")]
        if let (Some(engine), Device::Cuda(_)) = (&self.engine, device) {
            let nccl = nccl::Nccl::new(engine.clone(), device)?;
            return Ok(Self::with(Rc::new(nccl)));
        }
        if self.is_distributed() && device.is_cuda() {
            tracing::warn!(
                "GPU gradients go through host memory and MPI (this peft was built without \
                 --features nccl)"
            );
        }
        Ok(self)
    }

    pub fn rank(&self) -> usize {
        self.engine.as_ref().map_or(0, |e| e.rank())
    }

    pub fn world_size(&self) -> usize {
        self.engine.as_ref().map_or(1, |e| e.world_size())
    }

    pub fn local_rank(&self) -> usize {
        self.engine.as_ref().map_or(0, |e| e.local_rank())
    }

    /// Rank 0: the process that logs, evaluates and writes.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    pub fn is_distributed(&self) -> bool {
        self.engine.is_some()
    }

    /// Seconds this process spent in collectives so far.
    pub fn communication_seconds(&self) -> f64 {
        self.comm_seconds.get()
    }

    fn timed<T>(&self, f: impl FnOnce(&dyn Collective) -> Result<T>, single: T) -> Result<T> {
        let Some(e) = &self.engine else {
            return Ok(single);
        };
        let t = Instant::now();
        let out = f(e.as_ref());
        self.comm_seconds
            .set(self.comm_seconds.get() + t.elapsed().as_secs_f64());
        out
    }

    /// Ends the whole job after an error on this process (no-op on a single process).
    pub fn abort(&self, code: i32) {
        if let Some(e) = &self.engine {
            e.abort(code)
        }
    }

    /// The sum over ranks of `value`.
    pub fn sum(&self, value: f64) -> Result<f64> {
        self.timed(
            |e| {
                let mut v = [value];
                e.sum_f64(&mut v)?;
                Ok(v[0])
            },
            value,
        )
    }

    /// Fails on every rank, alike, unless all ranks computed the same `fingerprint` (of their
    /// config, data and adapter: [`Fingerprint`]).
    pub fn check_agreement(&self, fingerprint: u64, what: &str) -> Result<()> {
        let all = self.timed(|e| e.all_gather_u64(fingerprint), vec![fingerprint])?;
        match all.iter().position(|&h| h != all[0]) {
            None => Ok(()),
            Some(r) => Err(Error::Config(format!(
                "rank {r} disagrees with rank 0 on {what} (fingerprint {:016x} vs {:016x}): \
                 every process must run the same peft build with the same config, data and \
                 checkpoint",
                all[r], all[0]
            ))),
        }
    }

    /// Every rank's `value`, in rank order.
    pub fn all_gather(&self, value: u64) -> Result<Vec<u64>> {
        self.timed(|e| e.all_gather_u64(value), vec![value])
    }

    /// Sums this step's gradients (each rank's already weighted by its share of the global
    /// batch's targets, so the sum is the global batch's gradient), its loss share, examples
    /// and stop requests over all ranks. `vars` are the parameters the gradients belong to: a
    /// gradient missing here (no target reached it on this rank) counts as zeros, and one
    /// missing on every rank stays `None`. Buckets of [`BUCKET_BYTES`], in the gradients' dtype.
    pub fn reduce_step(
        &self,
        grads: Vec<Option<Tensor>>,
        vars: &[Tensor],
        loss: f64,
        seen: usize,
        stop: bool,
    ) -> Result<(Vec<Option<Tensor>>, StepTotals)> {
        let Some(engine) = &self.engine else {
            return Ok((grads, StepTotals { loss, seen, stop }));
        };
        let t = Instant::now();
        let mut scalars = vec![loss, seen as f64, stop as u8 as f64];
        scalars.extend(grads.iter().map(|g| g.is_some() as u8 as f64));
        engine.sum_f64(&mut scalars)?;
        let totals = StepTotals {
            loss: scalars[0],
            seen: scalars[1].round() as usize,
            stop: scalars[2] > 0.0,
        };
        let present: Vec<bool> = scalars[3..].iter().map(|&c| c > 0.0).collect();
        let mut out: Vec<Option<Tensor>> = vec![None; grads.len()];
        // Buckets of consecutive gradients of one dtype.
        let mut bucket: Vec<(usize, Tensor)> = Vec::new();
        let mut bytes = 0usize;
        for (i, g) in grads.into_iter().enumerate() {
            if !present[i] {
                continue;
            }
            let g = match g {
                Some(g) => g,
                None => vars[i].zeros_like()?,
            };
            let size = g.elem_count() * g.dtype().size_in_bytes();
            let same_dtype = bucket.first().is_none_or(|(_, b)| b.dtype() == g.dtype());
            if !bucket.is_empty() && (bytes + size > BUCKET_BYTES || !same_dtype) {
                reduce_bucket(engine.as_ref(), std::mem::take(&mut bucket), &mut out)?;
                bytes = 0;
            }
            bytes += size;
            bucket.push((i, g));
        }
        if !bucket.is_empty() {
            reduce_bucket(engine.as_ref(), bucket, &mut out)?;
        }
        self.comm_seconds
            .set(self.comm_seconds.get() + t.elapsed().as_secs_f64());
        Ok((out, totals))
    }
}

/// All-reduces one bucket: the gradients flattened end to end, summed, cut back.
fn reduce_bucket(
    engine: &dyn Collective,
    bucket: Vec<(usize, Tensor)>,
    out: &mut [Option<Tensor>],
) -> Result<()> {
    let flat = bucket
        .iter()
        .map(|(_, g)| g.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let summed = engine.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
    let mut offset = 0;
    for (i, g) in bucket {
        let n = g.elem_count();
        out[i] = Some(summed.narrow(0, offset, n)?.reshape(g.shape())?);
        offset += n;
    }
    Ok(())
}

/// The dropout seed of `rank`: the run's seed on rank 0 (so a single process draws the masks
/// it always drew), a distinct, reproducible stream on every other rank.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        return seed;
    }
    // splitmix64 of the rank, so neighbouring seeds and ranks do not collide.
    let mut z = (rank as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    seed ^ z ^ (z >> 31)
}

/// A 64-bit FNV-1a hash of what every rank must agree on (config, data, adapter shapes and
/// values): stable across processes and machines, unlike `std`'s `DefaultHasher`.
#[derive(Debug, Clone, Copy)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes()).bytes(&[0xff])
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// A tensor's dtype, shape and values (as f32 bits: adapter parameters are f32 or narrower).
    pub fn tensor(&mut self, t: &Tensor) -> Result<&mut Self> {
        self.str(&format!("{:?}{:?}", t.dtype(), t.dims()));
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for v in values {
            self.bytes(&v.to_bits().to_le_bytes());
        }
        Ok(self)
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_is_a_no_op() {
        let g = ProcessGroup::single();
        assert_eq!((g.rank(), g.world_size(), g.is_main()), (0, 1, true));
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let (grads, totals) = g
            .reduce_step(vec![Some(t.clone()), None], &[t.clone(), t], 0.5, 8, false)
            .unwrap();
        assert!(grads[1].is_none());
        assert_eq!(
            grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 2.0]
        );
        assert_eq!(
            totals,
            StepTotals {
                loss: 0.5,
                seen: 8,
                stop: false
            }
        );
        g.check_agreement(42, "the config").unwrap();
        assert_eq!(g.communication_seconds(), 0.0);
    }

    #[test]
    fn rank_seeds_keep_rank_0_and_differ_elsewhere() {
        assert_eq!(rank_seed(42, 0), 42);
        let seeds: std::collections::HashSet<u64> = (0..64).map(|r| rank_seed(42, r)).collect();
        assert_eq!(seeds.len(), 64);
        assert_ne!(rank_seed(42, 1), rank_seed(43, 1));
    }

    #[test]
    fn fingerprints_see_every_byte() {
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let a = Fingerprint::default().str("x").tensor(&t).unwrap().finish();
        let b = Fingerprint::default()
            .str("x")
            .tensor(&(t + 1e-6).unwrap())
            .unwrap()
            .finish();
        assert_ne!(a, b);
        assert_eq!(
            a,
            Fingerprint::default()
                .str("x")
                .tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap())
                .unwrap()
                .finish()
        );
    }
}
