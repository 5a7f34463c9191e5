//! CUDA kernels for the training ops whose composed candle versions cost a host round trip or
//! many passes over memory: dropout (whose mask the composed path drew on the host and uploaded,
//! twice per node) and the exact GELU (eight elementwise launches in backward).
//!
//! The kernels are CUDA C compiled once per process with NVRTC (already a dependency of candle's
//! CUDA backend), so the `cuda` build needs no extra build step. The dropout mask is the CPU
//! kernels' counter-based hash of `(seed, element index)` (`fused::hash32`): a mask drawn on the
//! GPU is bit for bit the mask the CPU draws for the same seed, it is drawn again in backward
//! from the seed alone, and nothing crosses the bus.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;

use super::with_backward;
use crate::Result;

const SOURCE: &str = r#"
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 hash32(u64 seed, u64 index) {
    u64 z = seed + index * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (u32)((z ^ (z >> 31)) >> 32);
}

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

#define GRID_LOOP(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)

extern "C" __global__ void peft_dropout_f32(const float *x, float *y, u64 n, u64 seed, u32 threshold, float scale) {
    GRID_LOOP(i, n) { y[i] = x[i] * (hash32(seed, i) < threshold ? 0.0f : scale); }
}

extern "C" __global__ void peft_dropout_bf16(const u16 *x, u16 *y, u64 n, u64 seed, u32 threshold, float scale) {
    GRID_LOOP(i, n) { y[i] = f32_to_bf16(bf16_to_f32(x[i]) * (hash32(seed, i) < threshold ? 0.0f : scale)); }
}

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

__device__ __forceinline__ float gelu_grad(float x) {
    float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
    float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
    return cdf + x * pdf;
}

extern "C" __global__ void peft_gelu_f32(const float *x, float *y, u64 n) {
    GRID_LOOP(i, n) { y[i] = gelu(x[i]); }
}

extern "C" __global__ void peft_gelu_bf16(const u16 *x, u16 *y, u64 n) {
    GRID_LOOP(i, n) { y[i] = f32_to_bf16(gelu(bf16_to_f32(x[i]))); }
}

extern "C" __global__ void peft_gelu_bwd_f32(const float *x, const float *g, float *dx, u64 n) {
    GRID_LOOP(i, n) { dx[i] = g[i] * gelu_grad(x[i]); }
}

extern "C" __global__ void peft_gelu_bwd_bf16(const u16 *x, const u16 *g, u16 *dx, u64 n) {
    GRID_LOOP(i, n) { dx[i] = f32_to_bf16(bf16_to_f32(g[i]) * gelu_grad(bf16_to_f32(x[i]))); }
}

// One AdamW update of one tensor (torch's rule, as train::optim composes it): reads the weight,
// its gradient and the packed moments [m; v], writes [weight; m; v].
extern "C" __global__ void peft_adamw_f32(const float *theta, const float *g, const float *mv, float *out, u64 n,
                                          float lr_over_bc1, float beta1, float beta2, float eps, float decay,
                                          float inv_bc2_sqrt, float gscale) {
    GRID_LOOP(i, n) {
        float gi = g[i] * gscale;
        float m = mv[i] * beta1 + gi * (1.0f - beta1);
        float v = mv[n + i] * beta2 + (gi * gi) * (1.0f - beta2);
        float denom = sqrtf(v) * inv_bc2_sqrt + eps;
        out[i] = theta[i] * decay - (m / denom) * lr_over_bc1;
        out[n + i] = m;
        out[2 * n + i] = v;
    }
}

// The cross-entropy gradient in one pass: (softmax(x) - onehot(target)) * rowscale per row, from
// the logits x [rows, classes], each row's log-sum-exp and scale (ls = [lse; rowscale]) and its
// target.
extern "C" __global__ void peft_ce_grad_f32(const float *x, const float *ls, const u32 *target, float *dx,
                                            u64 rows, u64 classes) {
    GRID_LOOP(i, rows * classes) {
        u64 row = i / classes;
        u64 j = i - row * classes;
        float p = expf(x[i] - ls[row]);
        dx[i] = (p - (j == (u64)target[row] ? 1.0f : 0.0f)) * ls[rows + row];
    }
}
"#;

/// The PTX of [`SOURCE`], compiled on first use (tens of milliseconds, once per process).
fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling peft's CUDA kernels with NVRTC: {e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// Whether the kernels here serve `x`: on a CUDA device, f32 or bf16. `PEFT_CUDA_KERNELS=0`
/// turns them off (the composed candle ops then run), for measuring what they save.
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) && super::device_kernels()
}

fn launch_config(n: usize) -> LaunchConfig {
    // Grid-stride loops: enough blocks to fill the GPU, not one thread per element.
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn kernel_name(base: &str, dtype: DType) -> candle_core::Result<String> {
    match dtype {
        DType::F32 => Ok(format!("{base}_f32")),
        DType::BF16 => Ok(format!("{base}_bf16")),
        other => candle_core::bail!("peft CUDA kernel {base}: {other:?} is not supported"),
    }
}

/// The elements of `storage` under a contiguous `layout`, as a device view.
fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: expected a contiguous tensor")))?;
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// The module name the kernels are loaded under on each device.
const MODULE: &str = "peft_ops";

/// One input, one output of the same shape and dtype; a dropout kernel also takes its
/// `(seed, threshold, scale)`.
fn unary(
    storage: &CudaStorage,
    layout: &Layout,
    base: &str,
    dropout: Option<&Dropout>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = storage.device().clone();
    let n = layout.shape().elem_count();
    let func = dev.get_or_load_custom_func(&kernel_name(base, storage.dtype())?, MODULE, ptx()?)?;
    let n64 = n as u64;
    macro_rules! run {
        ($t:ty) => {{
            let src = view::<$t>(storage, layout, base)?;
            // SAFETY: every element is written by the kernel before it is read.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut b = func.builder();
            b.arg(&src);
            b.arg(&out);
            b.arg(&n64);
            if let Some(d) = dropout {
                b.arg(&d.seed);
                b.arg(&d.threshold);
                b.arg(&d.scale);
            }
            // SAFETY: the kernel's signature matches the arguments pushed above.
            unsafe { b.launch(launch_config(n)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match storage.dtype() {
        DType::F32 => run!(f32),
        DType::BF16 => run!(bf16),
        other => candle_core::bail!("{base}: {other:?} is not supported"),
    };
    Ok((out, layout.shape().clone()))
}

/// `x ⊙ mask(seed) · scale`, the mask's zeros where `hash32(seed, i) < threshold`.
struct Dropout {
    seed: u64,
    threshold: u32,
    scale: f32,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "peft-cuda-dropout"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("peft-cuda-dropout runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        unary(storage, layout, "peft_dropout", Some(self))
    }
}

/// Inverted dropout on the GPU, recording nothing: the same mask as the CPU kernels for the same
/// seed (`ops::dropout` redraws it from the seed in backward).
pub(crate) fn dropout(x: &Tensor, threshold: u32, scale: f32, seed: u64) -> Result<Tensor> {
    let op = Dropout {
        seed,
        threshold,
        scale,
    };
    Ok(x.detach().contiguous()?.apply_op1_no_bwd(&op)?)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "peft-cuda-gelu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("peft-cuda-gelu runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        unary(storage, layout, "peft_gelu", None)
    }
}

/// `dy · (Φ(x) + x φ(x))` in one pass.
struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "peft-cuda-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("peft-cuda-gelu-backward runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = lx.shape().elem_count();
        if lg.shape().elem_count() != n || x.dtype() != g.dtype() {
            candle_core::bail!("gelu backward: the gradient does not match the input");
        }
        let n64 = n as u64;
        let func =
            dev.get_or_load_custom_func(&kernel_name("peft_gelu_bwd", x.dtype())?, MODULE, ptx()?)?;
        macro_rules! run {
            ($t:ty) => {{
                let xv = view::<$t>(x, lx, "gelu backward")?;
                let gv = view::<$t>(g, lg, "gelu backward")?;
                // SAFETY: every element is written by the kernel before it is read.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let mut b = func.builder();
                b.arg(&xv);
                b.arg(&gv);
                b.arg(&out);
                b.arg(&n64);
                // SAFETY: the kernel's signature matches the arguments pushed above.
                unsafe { b.launch(launch_config(n)) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match x.dtype() {
            DType::F32 => run!(f32),
            DType::BF16 => run!(bf16),
            other => candle_core::bail!("gelu backward: {other:?} is not supported"),
        };
        Ok((out, lx.shape().clone()))
    }
}

/// The exact GELU on the GPU, one pass forward and one backward.
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let y = x.detach().contiguous()?.apply_op1_no_bwd(&Gelu)?;
    with_backward(x, y, |x, _y, g| {
        x.contiguous()?
            .apply_op2_no_bwd(&g.contiguous()?, &GeluBackward)
    })
}

/// The scalars of one AdamW update (see `train::optim::AdamW::step_with`).
#[derive(Clone, Copy)]
pub(crate) struct AdamW {
    pub lr_over_bc1: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 - lr · weight_decay`, or 1.
    pub decay: f32,
    pub inv_bc2_sqrt: f32,
    pub grad_scale: f32,
}

impl candle_core::CustomOp3 for AdamW {
    fn name(&self) -> &'static str {
        "peft-cuda-adamw"
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
        candle_core::bail!("peft-cuda-adamw runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        theta: &CudaStorage,
        lt: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        mv: &CudaStorage,
        lm: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = theta.device().clone();
        let tv = view::<f32>(theta, lt, "adamw")?;
        let gv = view::<f32>(g, lg, "adamw")?;
        let mvv = view::<f32>(mv, lm, "adamw")?;
        let n = tv.len();
        if gv.len() != n || mvv.len() != 2 * n {
            candle_core::bail!("adamw: the gradient or the moments do not match the weight");
        }
        let func = dev.get_or_load_custom_func("peft_adamw_f32", MODULE, ptx()?)?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<f32>(3 * n)? };
        let n64 = n as u64;
        let mut b = func.builder();
        b.arg(&tv);
        b.arg(&gv);
        b.arg(&mvv);
        b.arg(&out);
        b.arg(&n64);
        b.arg(&self.lr_over_bc1);
        b.arg(&self.beta1);
        b.arg(&self.beta2);
        b.arg(&self.eps);
        b.arg(&self.decay);
        b.arg(&self.inv_bc2_sqrt);
        b.arg(&self.grad_scale);
        // SAFETY: the kernel's signature matches the arguments pushed above.
        unsafe { b.launch(launch_config(n)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from_dims(&[3, n]),
        ))
    }
}

/// Whether [`adamw`] serves this weight and gradient: f32, on a CUDA device.
pub(crate) fn adamw_applies(theta: &Tensor, g: &Tensor) -> bool {
    applies(theta) && theta.dtype() == DType::F32 && g.dtype() == DType::F32
}

/// One fused AdamW update: `[weight; m; v]` (`[3, n]`) from the weight, its gradient and the
/// packed moments `mv` (`[2, n]`), in one launch instead of a dozen.
pub(crate) fn adamw(theta: &Tensor, g: &Tensor, mv: &Tensor, h: AdamW) -> Result<Tensor> {
    let flat = |t: &Tensor| t.detach().flatten_all()?.contiguous();
    Ok(flat(theta)?.apply_op3_no_bwd(&flat(g)?, &flat(mv)?, &h)?)
}

/// `(softmax(x) - onehot) · rowscale` for [`cross_entropy_grad`].
struct CrossEntropyGrad;

impl candle_core::CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "peft-cuda-cross-entropy-grad"
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
        candle_core::bail!("peft-cuda-cross-entropy-grad runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        ls: &CudaStorage,
        ll: &Layout,
        t: &CudaStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (rows, classes) = lx.shape().dims2()?;
        let xv = view::<f32>(x, lx, "cross-entropy grad")?;
        let sv = view::<f32>(ls, ll, "cross-entropy grad")?;
        let tv = view::<u32>(t, lt, "cross-entropy grad")?;
        if sv.len() != 2 * rows || tv.len() != rows {
            candle_core::bail!("cross-entropy grad: per-row inputs do not match the logits");
        }
        let func = dev.get_or_load_custom_func("peft_ce_grad_f32", MODULE, ptx()?)?;
        let n = rows * classes;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let (rows64, classes64) = (rows as u64, classes as u64);
        let mut b = func.builder();
        b.arg(&xv);
        b.arg(&sv);
        b.arg(&tv);
        b.arg(&out);
        b.arg(&rows64);
        b.arg(&classes64);
        // SAFETY: the kernel's signature matches the arguments pushed above.
        unsafe { b.launch(launch_config(n)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), lx.shape().clone()))
    }
}

/// The gradient of the mean cross-entropy with respect to f32 logits `x` (`[rows, classes]`):
/// one pass and one allocation, where the composed version takes five logits-sized tensors.
/// `lse` and `rowscale` (`[rows, 1]`: `kept · dy / kept_count`) and `targets` (`[rows, 1]`, u32)
/// stay on the device.
pub(crate) fn cross_entropy_grad(
    x: &Tensor,
    lse: &Tensor,
    rowscale: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<Tensor> {
    let ls = Tensor::cat(&[lse.flatten_all()?, rowscale.flatten_all()?], 0)?;
    x.detach().contiguous()?.apply_op3_no_bwd(
        &ls,
        &targets.flatten_all()?.contiguous()?,
        &CrossEntropyGrad,
    )
}
