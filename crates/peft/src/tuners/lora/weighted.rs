//! The arithmetic of PEFT's `add_weighted_adapter`: combining several LoRA adapters of one layer
//! into a new one (`linear`, `cat`, `svd`, TIES, DARE, magnitude pruning and their `_svd` forms),
//! as `peft/tuners/lora/model.py` and `peft/utils/merge_utils.py` (0.21) compute it.
//!
//! Everything works on small host-side matrices (one layer's factors at a time) in f32, as torch
//! does; the SVD runs in f64 through `faer`. Matrices use the `[out, in]` convention of
//! [`super::LoraLinear`] (`A`: `[r, in]`, `B`: `[out, r]`); an embedding's `A` is `[r, num]` and
//! its `B` `[dim, r]`, which is the same shape rule.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::str::FromStr;

use crate::{Error, Result};

/// `combination_type` of `add_weighted_adapter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CombinationType {
    Linear,
    Cat,
    Svd,
    Ties,
    TiesSvd,
    DareLinear,
    DareTies,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
}

const COMBINATIONS: [(&str, CombinationType); 11] = [
    ("linear", CombinationType::Linear),
    ("cat", CombinationType::Cat),
    ("svd", CombinationType::Svd),
    ("ties", CombinationType::Ties),
    ("ties_svd", CombinationType::TiesSvd),
    ("dare_linear", CombinationType::DareLinear),
    ("dare_ties", CombinationType::DareTies),
    ("dare_linear_svd", CombinationType::DareLinearSvd),
    ("dare_ties_svd", CombinationType::DareTiesSvd),
    ("magnitude_prune", CombinationType::MagnitudePrune),
    ("magnitude_prune_svd", CombinationType::MagnitudePruneSvd),
];

impl FromStr for CombinationType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        COMBINATIONS
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, c)| *c)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown combination_type `{s}`; expected one of {}",
                    COMBINATIONS.map(|(n, _)| n).join(", ")
                ))
            })
    }
}

impl CombinationType {
    pub fn as_str(self) -> &'static str {
        COMBINATIONS
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("linear", |(n, _)| n)
    }

    /// Combines full delta weights and refactors them by SVD (rank `svd_rank`).
    pub fn is_svd(self) -> bool {
        self.as_str().ends_with("svd")
    }

    /// The task-arithmetic rule applied to the tensors (without the `_svd` step).
    fn rule(self) -> Rule {
        use CombinationType::*;
        match self {
            Linear | Svd | Cat => Rule::TaskArithmetic,
            Ties | TiesSvd => Rule::Ties,
            DareLinear | DareLinearSvd => Rule::DareLinear,
            DareTies | DareTiesSvd => Rule::DareTies,
            MagnitudePrune | MagnitudePruneSvd => Rule::MagnitudePrune,
        }
    }

    /// Needs `density`.
    pub fn needs_density(self) -> bool {
        self.rule() != Rule::TaskArithmetic
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

/// `majority_sign_method` of TIES: the sign elected per entry by the sum of values (`total`) or
/// by counting signs (`frequency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    #[default]
    Total,
    Frequency,
}

impl FromStr for MajoritySign {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(MajoritySign::Total),
            "frequency" => Ok(MajoritySign::Frequency),
            _ => Err(Error::Config(format!(
                "unknown majority_sign_method `{s}`; expected total or frequency"
            ))),
        }
    }
}

/// The options of `add_weighted_adapter` besides the adapters, weights and new name.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedOptions {
    pub combination_type: CombinationType,
    /// Rank of the `_svd` results; default: the largest rank of the inputs.
    pub svd_rank: Option<usize>,
    /// Quantile (0..1) at which the SVD factors are clamped, symmetric around zero.
    pub svd_clamp: Option<f64>,
    /// Fraction of entries TIES / DARE / magnitude pruning keep.
    pub density: Option<f64>,
    pub majority_sign_method: MajoritySign,
    /// Seeds DARE's random masks when no [`MaskSource`] is given.
    pub seed: u64,
}

impl Default for WeightedOptions {
    /// PEFT's defaults: `svd`, no clamp, no density, `total`.
    fn default() -> Self {
        Self {
            combination_type: CombinationType::Svd,
            svd_rank: None,
            svd_clamp: None,
            density: None,
            majority_sign_method: MajoritySign::Total,
            seed: 0,
        }
    }
}

/// Where DARE's keep-masks come from. PEFT draws them with `torch.bernoulli`; tests replay the
/// masks PEFT drew. `part` is `lora_A`, `lora_B` or `delta` (the `_svd` forms).
pub trait MaskSource {
    /// A 0/1 mask of `shape` (row-major, as many entries as the tensor) keeping each entry with
    /// probability `density`.
    fn mask(
        &mut self,
        module: &str,
        part: &str,
        adapter: &str,
        shape: &[usize],
        density: f64,
    ) -> Result<Vec<f32>>;
}

/// Bernoulli masks from a seeded generator.
pub struct RandomMasks(StdRng);

impl RandomMasks {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }
}

impl MaskSource for RandomMasks {
    fn mask(
        &mut self,
        _: &str,
        _: &str,
        _: &str,
        shape: &[usize],
        density: f64,
    ) -> Result<Vec<f32>> {
        let n = shape.iter().product();
        Ok((0..n)
            .map(|_| f32::from(self.0.random::<f64>() < density))
            .collect())
    }
}

/// A row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(rows * cols, data.len());
        Self { rows, cols, data }
    }

    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self::new(rows, cols, vec![0.0; rows * cols])
    }

    fn scaled(&self, s: f32) -> Self {
        Self::new(
            self.rows,
            self.cols,
            self.data.iter().map(|x| x * s).collect(),
        )
    }

    /// The transpose.
    pub fn t(&self) -> Matrix {
        let mut out = vec![0.0f32; self.data.len()];
        for i in 0..self.rows {
            for j in 0..self.cols {
                out[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        Matrix::new(self.cols, self.rows, out)
    }

    /// `self · other`.
    pub fn matmul(&self, other: &Matrix) -> Matrix {
        let mut out = vec![0.0f32; self.rows * other.cols];
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self.data[i * self.cols + k];
                let row = &other.data[k * other.cols..(k + 1) * other.cols];
                for (o, b) in out[i * other.cols..(i + 1) * other.cols]
                    .iter_mut()
                    .zip(row)
                {
                    *o += a * b;
                }
            }
        }
        Matrix::new(self.rows, other.cols, out)
    }
}

/// One source adapter's LoRA factors on the layer being combined.
#[derive(Debug, Clone)]
pub struct Source {
    pub adapter: String,
    pub weight: f64,
    pub scaling: f64,
    pub a: Matrix,
    pub b: Matrix,
}

/// What one layer needs to be combined.
pub struct LayerJob<'a> {
    pub module: &'a str,
    /// The adapters present on this layer, in the order they were given.
    pub sources: Vec<Source>,
    /// The new adapter's rank.
    pub new_rank: usize,
    /// PEFT's delta weight of this layer is `[in, out]` (an embedding, or a `fan_in_fan_out`
    /// linear layer): the `_svd` rules see it that way, which is what DARE's masks are drawn
    /// over.
    pub transposed: bool,
}

/// The new adapter's `(A, B)` on one layer, as PEFT's `add_weighted_adapter` sets them.
pub fn combine_layer(
    job: &LayerJob<'_>,
    opts: &WeightedOptions,
    masks: &mut dyn MaskSource,
) -> Result<(Matrix, Matrix)> {
    let ct = opts.combination_type;
    let first = job.sources.first().ok_or_else(|| {
        Error::Adapter(format!(
            "{}: none of the adapters to combine is on this layer",
            job.module
        ))
    })?;
    let (rows_in, rows_out) = (first.a.cols, first.b.rows);
    match ct {
        CombinationType::Cat => {
            let mut a = Matrix::zeros(job.new_rank, rows_in);
            let mut b = Matrix::zeros(rows_out, job.new_rank);
            let mut at = 0;
            for s in &job.sources {
                let r = s.a.rows;
                if at + r > job.new_rank {
                    return Err(Error::Adapter(format!(
                        "{}: the concatenated ranks exceed the new rank {}",
                        job.module, job.new_rank
                    )));
                }
                let f = (s.weight * s.scaling) as f32;
                for i in 0..r {
                    for j in 0..rows_in {
                        a.data[(at + i) * rows_in + j] = s.a.data[i * rows_in + j] * f;
                    }
                }
                for i in 0..rows_out {
                    for j in 0..r {
                        b.data[i * job.new_rank + at + j] = s.b.data[i * r + j];
                    }
                }
                at += r;
            }
            Ok((a, b))
        }
        ct if ct.is_svd() => {
            // get_delta_weight applies each adapter's scaling; the weights enter the rule.
            let deltas: Vec<Matrix> = job
                .sources
                .iter()
                .map(|s| {
                    let d = s.b.matmul(&s.a).scaled(s.scaling as f32);
                    if job.transposed {
                        d.t()
                    } else {
                        d
                    }
                })
                .collect();
            let weights: Vec<f32> = job.sources.iter().map(|s| s.weight as f32).collect();
            let names: Vec<&str> = job.sources.iter().map(|s| s.adapter.as_str()).collect();
            let delta = apply_rule(
                ct.rule(),
                job.module,
                "delta",
                &names,
                &deltas,
                &weights,
                opts,
                masks,
            )?;
            let delta = if job.transposed { delta.t() } else { delta };
            svd_factors(job.module, &delta, job.new_rank, opts.svd_clamp)
        }
        _ => {
            // The weight (times the scaling) is split as a square root over A and B; its sign
            // goes on A only.
            let mut wa = Vec::new();
            let mut wb = Vec::new();
            for s in &job.sources {
                let ws = s.weight * s.scaling;
                let sign = if ws >= 0.0 { 1.0 } else { -1.0 };
                wa.push((ws.abs().sqrt() * sign) as f32);
                wb.push(ws.abs().sqrt() as f32);
            }
            let names: Vec<&str> = job.sources.iter().map(|s| s.adapter.as_str()).collect();
            let a_list: Vec<Matrix> = job.sources.iter().map(|s| s.a.clone()).collect();
            let b_list: Vec<Matrix> = job.sources.iter().map(|s| s.b.clone()).collect();
            let a = apply_rule(
                ct.rule(),
                job.module,
                "lora_A",
                &names,
                &a_list,
                &wa,
                opts,
                masks,
            )?;
            let b = apply_rule(
                ct.rule(),
                job.module,
                "lora_B",
                &names,
                &b_list,
                &wb,
                opts,
                masks,
            )?;
            Ok((a, b))
        }
    }
}

/// `task_arithmetic`, `ties`, `dare_linear`, `dare_ties` or `magnitude_prune` of merge_utils.
#[allow(clippy::too_many_arguments)]
fn apply_rule(
    rule: Rule,
    module: &str,
    part: &str,
    adapters: &[&str],
    tensors: &[Matrix],
    weights: &[f32],
    opts: &WeightedOptions,
    masks: &mut dyn MaskSource,
) -> Result<Matrix> {
    let density = || {
        opts.density.ok_or_else(|| {
            Error::Config(format!(
                "combination_type {} needs `density` (the fraction of entries to keep, 0..1)",
                opts.combination_type.as_str()
            ))
        })
    };
    let pruned: Vec<Matrix> = match rule {
        Rule::TaskArithmetic => tensors.to_vec(),
        Rule::Ties | Rule::MagnitudePrune => {
            let d = density()?;
            tensors
                .iter()
                .map(|t| magnitude_prune(t, d))
                .collect::<Result<_>>()?
        }
        Rule::DareLinear | Rule::DareTies => {
            let d = density()?;
            let mut out = Vec::new();
            for (t, name) in tensors.iter().zip(adapters) {
                out.push(random_prune(t, d, module, part, name, masks)?);
            }
            out
        }
    };
    let (rows, cols) = (pruned[0].rows, pruned[0].cols);
    let n = rows * cols;
    let mut out = vec![0.0f32; n];
    match rule {
        Rule::TaskArithmetic | Rule::DareLinear | Rule::MagnitudePrune => {
            for (t, w) in pruned.iter().zip(weights) {
                for (o, x) in out.iter_mut().zip(&t.data) {
                    *o += x * w;
                }
            }
        }
        Rule::Ties | Rule::DareTies => {
            for (i, o) in out.iter_mut().enumerate() {
                let elected = match opts.majority_sign_method {
                    MajoritySign::Total => pruned.iter().map(|t| t.data[i]).sum::<f32>(),
                    MajoritySign::Frequency => pruned.iter().map(|t| sign(t.data[i])).sum(),
                };
                let majority = if elected >= 0.0 { 1.0 } else { -1.0 };
                let mut sum = 0.0f32;
                let mut kept = 0.0f32;
                for (t, w) in pruned.iter().zip(weights) {
                    if sign(t.data[i]) == majority {
                        sum += t.data[i] * w;
                        kept += 1.0;
                    }
                }
                *o = sum / kept.max(1.0);
            }
        }
    }
    Ok(Matrix::new(rows, cols, out))
}

/// torch's `sign`: -1, 0 or 1.
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

fn check_density(density: f64) -> Result<bool> {
    if density < 0.0 {
        return Err(Error::Config(format!(
            "density must be in [0, 1], got {density}"
        )));
    }
    // PEFT warns and keeps everything at density >= 1.
    Ok(density < 1.0)
}

/// Keeps the `int(density · n)` entries of largest magnitude.
fn magnitude_prune(t: &Matrix, density: f64) -> Result<Matrix> {
    if !check_density(density)? {
        return Ok(t.clone());
    }
    let k = (density * t.data.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.data.len()).collect();
    order.sort_by(|&i, &j| t.data[j].abs().total_cmp(&t.data[i].abs()));
    let mut out = vec![0.0f32; t.data.len()];
    for &i in &order[..k] {
        out[i] = t.data[i];
    }
    Ok(Matrix::new(t.rows, t.cols, out))
}

/// DARE: keeps entries by a Bernoulli(`density`) mask and rescales by `1 / density`.
fn random_prune(
    t: &Matrix,
    density: f64,
    module: &str,
    part: &str,
    adapter: &str,
    masks: &mut dyn MaskSource,
) -> Result<Matrix> {
    if !check_density(density)? {
        return Ok(t.clone());
    }
    let mask = masks.mask(module, part, adapter, &[t.rows, t.cols], density)?;
    if mask.len() != t.data.len() {
        return Err(Error::Adapter(format!(
            "DARE mask for {module} {part} {adapter} has {} entries, the tensor {}",
            mask.len(),
            t.data.len()
        )));
    }
    let d = density as f32;
    let data = t.data.iter().zip(&mask).map(|(x, m)| x * m / d).collect();
    Ok(Matrix::new(t.rows, t.cols, data))
}

/// `delta ≈ B · A` with `B = U_k S_k` and `A = Vh_k`, optionally clamped at the `clamp` quantile
/// of all their entries (torch.quantile's linear interpolation).
fn svd_factors(
    module: &str,
    delta: &Matrix,
    rank: usize,
    clamp: Option<f64>,
) -> Result<(Matrix, Matrix)> {
    let (m, n) = (delta.rows, delta.cols);
    if rank > m.min(n) {
        return Err(Error::Config(format!(
            "{module}: svd rank {rank} exceeds the layer's size {m}x{n}; choose a smaller svd_rank"
        )));
    }
    let mat = faer::Mat::<f64>::from_fn(m, n, |i, j| delta.data[i * n + j] as f64);
    let svd = mat
        .thin_svd()
        .map_err(|e| Error::Adapter(format!("{module}: SVD did not converge ({e:?})")))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut b = Matrix::zeros(m, rank);
    let mut a = Matrix::zeros(rank, n);
    for k in 0..rank {
        let sk = s[k];
        for i in 0..m {
            b.data[i * rank + k] = (u[(i, k)] * sk) as f32;
        }
        for j in 0..n {
            a.data[k * n + j] = v[(j, k)] as f32;
        }
    }
    if let Some(q) = clamp {
        if !(0.0..=1.0).contains(&q) {
            return Err(Error::Config(format!(
                "svd_clamp must be a quantile in [0, 1], got {q}"
            )));
        }
        let all: Vec<f32> = b.data.iter().chain(&a.data).copied().collect();
        let hi = quantile(&all, q);
        for x in a.data.iter_mut().chain(b.data.iter_mut()) {
            // torch's clamp(min, max): max wins when min > max (a negative quantile).
            *x = x.max(-hi).min(hi);
        }
    }
    Ok((a, b))
}

/// torch.quantile (linear interpolation between the two nearest order statistics) of a
/// non-empty slice.
pub fn quantile(values: &[f32], q: f64) -> f32 {
    let mut all = values.to_vec();
    all.sort_by(f32::total_cmp);
    let pos = q * (all.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi_i = (lo + 1).min(all.len() - 1);
    (all[lo] as f64 + frac * (all[hi_i] as f64 - all[lo] as f64)) as f32
}
