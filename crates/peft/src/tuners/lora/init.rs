//! Initialisations that move part of the base weight into the adapter (PiSSA, OLoRA), as PEFT
//! 0.21's `pissa_init` / `olora_init` compute them. Each returns the factors and the residual
//! weight `W - s · B A`, so the model's output is unchanged at the start of training.
//!
//! The decompositions come from `faer`. Singular vectors and QR columns are defined only up to
//! sign, so factors may differ from PyTorch's by the sign of a whole rank component; `B A`, the
//! residual weight and everything the model computes do not.

use candle_core::{DType, Device, Tensor};
use faer::Mat;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::{Error, Result};

/// The adapter factors and the new base weight an initialisation produced (all `[out, in]`-based:
/// `a` is `[r, in]`, `b` `[out, r]`, `residual` `[out, in]`).
pub struct Decomposed {
    pub a: Tensor,
    pub b: Tensor,
    pub residual: Tensor,
}

fn to_mat(t: &Tensor) -> Result<Mat<f64>> {
    let (rows, cols) = t.dims2()?;
    let v: Vec<Vec<f64>> = t.to_dtype(DType::F64)?.to_vec2()?;
    Ok(Mat::from_fn(rows, cols, |i, j| v[i][j]))
}

fn to_tensor(m: faer::MatRef<'_, f64>, device: &Device) -> Result<Tensor> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let v: Vec<f32> = (0..rows)
        .flat_map(|i| (0..cols).map(move |j| m[(i, j)] as f32))
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}

fn check_rank(w: &Tensor, r: usize, what: &str) -> Result<()> {
    let (out, inp) = w.dims2()?;
    if r > out.min(inp) {
        return Err(Error::Config(format!(
            "{what} needs r <= min(out, in) = {}, got r = {r}; lower r",
            out.min(inp)
        )));
    }
    Ok(())
}

/// `W - s · B A` in f32, the order PEFT computes it in.
fn residual(w: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    Ok((w.to_dtype(DType::F32)? - (b.matmul(a)? * scaling)?)?)
}

/// Splits `U S Vh` (top `r` triplets) into `A = sqrt(S/s) Vh`, `B = U sqrt(S/s)`.
fn split_svd(
    w: &Tensor,
    u: faer::MatRef<'_, f64>,
    s: &[f64],
    vh_rows: faer::MatRef<'_, f64>,
    r: usize,
    scaling: f64,
) -> Result<Decomposed> {
    let device = w.device();
    let root: Vec<f64> = s[..r].iter().map(|x| (x / scaling).sqrt()).collect();
    let b = Mat::from_fn(u.nrows(), r, |i, j| u[(i, j)] * root[j]);
    let a = Mat::from_fn(r, vh_rows.ncols(), |i, j| root[i] * vh_rows[(i, j)]);
    let a = to_tensor(a.as_ref(), device)?;
    let b = to_tensor(b.as_ref(), device)?;
    let residual = residual(w, &a, &b, scaling)?;
    Ok(Decomposed { a, b, residual })
}

/// PiSSA with a full SVD: `W = U S Vh`; the top `r` triplets, divided by the scaling, become
/// `B = U_r sqrt(S_r)` and `A = sqrt(S_r) Vh_r`. `w` is `[out, in]`.
pub fn pissa(w: &Tensor, r: usize, scaling: f64) -> Result<Decomposed> {
    check_rank(w, r, "PiSSA")?;
    let m = to_mat(w)?;
    let svd = m
        .thin_svd()
        .map_err(|e| Error::Config(format!("PiSSA: the SVD did not converge ({e:?})")))?;
    let s: Vec<f64> = (0..svd.S().dim()).map(|i| svd.S()[i]).collect();
    let vh = svd.V().transpose().to_owned();
    split_svd(w, svd.U(), &s, vh.as_ref(), r, scaling)
}

/// PiSSA through a randomized SVD (`pissa_niter_N`), torch's `svd_lowrank(W, q=r, niter)`: a
/// Gaussian sketch of W's range, refined by `niter` power iterations (each re-orthonormalised by
/// QR), then the exact SVD of the small projected matrix.
pub fn pissa_niter(
    w: &Tensor,
    r: usize,
    scaling: f64,
    niter: usize,
    rng: &mut StdRng,
) -> Result<Decomposed> {
    check_rank(w, r, "PiSSA")?;
    let m = to_mat(w)?;
    let cols = m.ncols();
    let sketch = Mat::<f64>::from_fn(cols, r, |_, _| {
        let x: f64 = StandardNormal.sample(rng);
        x
    });
    let orth = |x: Mat<f64>| x.qr().compute_thin_Q();
    let mut q = orth(&m * &sketch);
    for _ in 0..niter {
        let z = orth(m.transpose() * &q);
        q = orth(&m * &z);
    }
    let small = q.transpose() * &m; // [r, in]
    let svd = small
        .thin_svd()
        .map_err(|e| Error::Config(format!("PiSSA: the SVD did not converge ({e:?})")))?;
    let u = &q * svd.U();
    let s: Vec<f64> = (0..svd.S().dim()).map(|i| svd.S()[i]).collect();
    let vh = svd.V().transpose().to_owned();
    split_svd(w, u.as_ref(), &s, vh.as_ref(), r, scaling)
}

/// OLoRA: `W = Q R`; `B = Q[:, :r]`, `A = R[:r]`. `w` is the weight as stored (PEFT does not
/// transpose it first, which is why a transposed layer is refused by the caller).
pub fn olora(w: &Tensor, r: usize, scaling: f64) -> Result<Decomposed> {
    check_rank(w, r, "OLoRA")?;
    let m = to_mat(w)?;
    let qr = m.qr();
    let q = qr.compute_thin_Q();
    let rr = qr.thin_R();
    let device = w.device();
    let b = to_tensor(q.as_ref().subcols(0, r), device)?;
    let a = to_tensor(rr.subrows(0, r), device)?;
    let residual = residual(w, &a, &b, scaling)?;
    Ok(Decomposed { a, b, residual })
}
