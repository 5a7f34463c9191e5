//! Noise schedules and samplers as diffusers 0.42 computes them: the forward process for
//! training (`DDPMScheduler.add_noise` / `get_velocity`), and four samplers — DDIM, Euler, Euler
//! ancestral and DPM-Solver++ (2M) — each built, like diffusers' `from_config`, from whatever
//! scheduler config a pipeline ships (`scheduler/scheduler_config.json` of PNDM, DDIM, ...), the
//! fields it does not know ignored.
//!
//! Arithmetic is in f64 on the schedule (diffusers keeps `alphas_cumprod` in f32; the
//! difference is about 1e-7 relative) and in the latents' dtype on tensors.

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// The scheduler config fields the samplers read (diffusers' defaults; every scheduler class
/// has its own, see [`SchedulerConfig::from_json`]).
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "n1000")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    /// `leading`, `trailing` or `linspace`; `None`: the sampler's own default.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// DDIM: the step after the last uses `alphas_cumprod[0]` unless this is set.
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub thresholding: bool,
    /// The class that wrote the config (`_class_name`).
    #[serde(default, rename = "_class_name")]
    pub class_name: Option<String>,
    // DPM-Solver
    #[serde(default = "two")]
    pub solver_order: usize,
    #[serde(default)]
    pub algorithm_type: Option<String>,
    #[serde(default)]
    pub solver_type: Option<String>,
    #[serde(default = "yes")]
    pub lower_order_final: bool,
    #[serde(default)]
    pub euler_at_final: bool,
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    #[serde(default)]
    pub interpolation_type: Option<String>,
    #[serde(default)]
    pub timestep_type: Option<String>,
}

fn n1000() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.0001
}
fn beta_end() -> f64 {
    0.02
}
fn linear() -> String {
    "linear".into()
}
fn epsilon() -> String {
    "epsilon".into()
}
fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn two() -> usize {
    2
}

impl SchedulerConfig {
    /// Parses `scheduler_config.json` (any diffusers scheduler class).
    pub fn from_json(v: &Value) -> Result<Self> {
        serde_json::from_value(v.clone())
            .map_err(|e| Error::Config(format!("scheduler config: {e}")))
    }

    /// `epsilon`, `v_prediction` or `sample`, checked.
    pub fn prediction(&self) -> Result<Prediction> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::V),
            "sample" => Ok(Prediction::Sample),
            other => Err(Error::Config(format!(
                "scheduler prediction_type `{other}` is not supported; supported: epsilon, \
                 v_prediction, sample"
            ))),
        }
    }

    fn check_common(&self) -> Result<()> {
        if self.thresholding {
            return Err(Error::Config(
                "scheduler thresholding = true is not supported".into(),
            ));
        }
        if self.use_karras_sigmas {
            return Err(Error::Config(
                "scheduler use_karras_sigmas = true is not supported".into(),
            ));
        }
        Ok(())
    }
}

/// What the UNet was trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
    Sample,
}

/// `alphas_cumprod` of the training schedule (diffusers' `betas` → `cumprod(1 - betas)`).
pub fn alphas_cumprod(c: &SchedulerConfig) -> Result<Vec<f64>> {
    let n = c.num_train_timesteps;
    let linspace = |a: f64, b: f64| -> Vec<f64> {
        (0..n)
            .map(|i| {
                if n == 1 {
                    a
                } else {
                    a + (b - a) * i as f64 / (n - 1) as f64
                }
            })
            .collect()
    };
    let betas: Vec<f64> = match (&c.trained_betas, c.beta_schedule.as_str()) {
        (Some(b), _) => b.clone(),
        (None, "linear") => linspace(c.beta_start, c.beta_end),
        (None, "scaled_linear") => linspace(c.beta_start.sqrt(), c.beta_end.sqrt())
            .into_iter()
            .map(|b| b * b)
            .collect(),
        (None, "squaredcos_cap_v2") => {
            let f = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - f(t2) / f(t1)).min(0.999)
                })
                .collect()
        }
        (None, other) => {
            return Err(Error::Config(format!(
                "beta_schedule `{other}` is not supported; supported: linear, scaled_linear, \
                 squaredcos_cap_v2"
            )))
        }
    };
    let mut acp = Vec::with_capacity(betas.len());
    let mut p = 1.0;
    for b in &betas {
        p *= 1.0 - b;
        acp.push(p);
    }
    if c.rescale_betas_zero_snr {
        // diffusers' rescale_zero_terminal_snr, on sqrt(alphas_cumprod).
        let s: Vec<f64> = acp.iter().map(|a| a.sqrt()).collect();
        let (s0, st) = (s[0], s[s.len() - 1]);
        let s: Vec<f64> = s.iter().map(|v| (v - st) * s0 / (s0 - st)).collect();
        acp = s.iter().map(|v| v * v).collect();
        if let Some(last) = acp.last_mut() {
            *last = 2f64.powi(-24);
        }
    }
    Ok(acp)
}

/// The forward (noising) process used in training, diffusers' `DDPMScheduler`.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub alphas_cumprod: Vec<f64>,
    pub prediction: Prediction,
}

impl NoiseSchedule {
    pub fn new(c: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            alphas_cumprod: alphas_cumprod(c)?,
            prediction: c.prediction()?,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Per-row `(sqrt(ᾱ_t), sqrt(1 - ᾱ_t))` as `[batch, 1, 1, 1]` tensors.
    fn coefficients(&self, timesteps: &[usize], like: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.num_train_timesteps();
        if let Some(t) = timesteps.iter().find(|t| **t >= n) {
            return Err(Error::Data(format!(
                "timestep {t} is outside the schedule's 0..{n}"
            )));
        }
        let a: Vec<f32> = timesteps
            .iter()
            .map(|t| self.alphas_cumprod[*t].sqrt() as f32)
            .collect();
        let s: Vec<f32> = timesteps
            .iter()
            .map(|t| (1.0 - self.alphas_cumprod[*t]).sqrt() as f32)
            .collect();
        let shape = (timesteps.len(), 1, 1, 1);
        let dev = like.device();
        Ok((
            Tensor::from_vec(a, shape, dev)?.to_dtype(like.dtype())?,
            Tensor::from_vec(s, shape, dev)?.to_dtype(like.dtype())?,
        ))
    }

    /// `sqrt(ᾱ_t) · x0 + sqrt(1 - ᾱ_t) · noise`, one timestep per row.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0)?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// `sqrt(ᾱ_t) · noise - sqrt(1 - ᾱ_t) · x0` (v-prediction's target).
    pub fn get_velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0)?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }

    /// What the UNet should predict for these latents, noise and timesteps.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::V => self.get_velocity(x0, noise, timesteps),
            Prediction::Sample => Ok(x0.clone()),
        }
    }
}

/// The samplers `peft generate-image` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmSolverPP,
}

impl SamplerKind {
    /// The sampler a diffusers scheduler class corresponds to, if one of ours does.
    pub fn from_class(class: &str) -> Option<Self> {
        Some(match class {
            "DDIMScheduler" => SamplerKind::Ddim,
            "EulerDiscreteScheduler" => SamplerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SamplerKind::EulerAncestral,
            "DPMSolverMultistepScheduler" => SamplerKind::DpmSolverPP,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler-a",
            SamplerKind::DpmSolverPP => "dpm++",
        }
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ddim" => SamplerKind::Ddim,
            "euler" => SamplerKind::Euler,
            "euler-a" | "euler_a" | "euler-ancestral" => SamplerKind::EulerAncestral,
            "dpm++" | "dpmpp" | "dpm++2m" | "dpmsolver++" => SamplerKind::DpmSolverPP,
            other => {
                return Err(Error::Config(format!(
                    "unknown scheduler `{other}`; expected ddim, euler, euler-a or dpm++"
                )))
            }
        })
    }
}

/// A sampler: the timesteps it visits and the update from one to the next.
pub struct Sampler {
    kind: SamplerKind,
    prediction: Prediction,
    alphas_cumprod: Vec<f64>,
    /// The timesteps given to the UNet, in order.
    timesteps: Vec<f64>,
    /// Euler, Euler-a and DPM-Solver: one sigma per timestep and a final one.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    // DDIM
    final_alpha_cumprod: f64,
    step_ratio: usize,
    clip_sample: Option<f64>,
    // DPM-Solver++: the previous step's data prediction, and how many steps ran.
    previous: Option<Tensor>,
    lower_order_nums: usize,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    heun: bool,
}

/// `np.linspace(a, b, n)`.
fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    (0..n)
        .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
        .collect()
}

/// numpy's round (half to even).
fn round(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// `np.interp(x, arange(len(ys)), ys)`.
fn interp(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let f = x - i as f64;
    ys[i] + (ys[i + 1] - ys[i]) * f
}

impl Sampler {
    /// The sampler `kind` over `steps` inference steps, from a pipeline's scheduler config
    /// (diffusers' `Scheduler.from_config(config)` then `set_timesteps(steps)`).
    pub fn new(kind: SamplerKind, c: &SchedulerConfig, steps: usize) -> Result<Self> {
        c.check_common()?;
        let n = c.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(Error::Config(format!(
                "{steps} inference steps: use 1 to {n} (the schedule's training timesteps)"
            )));
        }
        let acp = alphas_cumprod(c)?;
        let prediction = c.prediction()?;
        let spacing_default = match kind {
            SamplerKind::Ddim => "leading",
            _ => "linspace",
        };
        let spacing = c.timestep_spacing.as_deref().unwrap_or(spacing_default);
        let base_sigmas: Vec<f64> = acp.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let mut s = Self {
            kind,
            prediction,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            init_noise_sigma: 1.0,
            final_alpha_cumprod: if c.set_alpha_to_one { 1.0 } else { acp[0] },
            step_ratio: n / steps,
            clip_sample: match (kind, c.clip_sample) {
                // DDIM clips by default (diffusers' DDIMScheduler default clip_sample=True).
                (SamplerKind::Ddim, None) | (SamplerKind::Ddim, Some(true)) => {
                    Some(c.clip_sample_range)
                }
                _ => None,
            },
            alphas_cumprod: acp,
            previous: None,
            lower_order_nums: 0,
            solver_order: c.solver_order,
            lower_order_final: c.lower_order_final,
            euler_at_final: c.euler_at_final,
            final_sigma_zero: c.final_sigmas_type.as_deref().unwrap_or("zero") == "zero",
            heun: c.solver_type.as_deref() == Some("heun"),
        };
        match kind {
            SamplerKind::Ddim => {
                s.timesteps = match spacing {
                    "linspace" => linspace(0.0, (n - 1) as f64, steps)
                        .into_iter()
                        .map(round)
                        .rev()
                        .collect(),
                    "leading" => (0..steps)
                        .rev()
                        .map(|i| (i * (n / steps) + c.steps_offset) as f64)
                        .collect(),
                    "trailing" => trailing(n, steps),
                    other => return Err(spacing_err(other)),
                };
            }
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                if c.interpolation_type
                    .as_deref()
                    .is_some_and(|t| t != "linear")
                {
                    return Err(Error::Config(format!(
                        "Euler interpolation_type `{}` is not supported (linear only)",
                        c.interpolation_type.as_deref().unwrap_or_default()
                    )));
                }
                if c.timestep_type.as_deref().is_some_and(|t| t != "discrete") {
                    return Err(Error::Config(
                        "Euler timestep_type other than `discrete` is not supported".into(),
                    ));
                }
                s.timesteps = match spacing {
                    "linspace" => linspace(0.0, (n - 1) as f64, steps)
                        .into_iter()
                        .rev()
                        .map(|t| t as f32 as f64)
                        .collect(),
                    "leading" => (0..steps)
                        .rev()
                        .map(|i| (i * (n / steps) + c.steps_offset) as f64)
                        .collect(),
                    "trailing" => trailing(n, steps),
                    other => return Err(spacing_err(other)),
                };
                s.sigmas = s
                    .timesteps
                    .iter()
                    .map(|t| interp(*t, &base_sigmas))
                    .collect();
                let last = match (kind, c.final_sigmas_type.as_deref()) {
                    (SamplerKind::Euler, Some("sigma_min")) => base_sigmas[0],
                    _ => 0.0,
                };
                s.sigmas.push(last);
                let max = s.sigmas.iter().cloned().fold(0.0, f64::max);
                s.init_noise_sigma = if spacing == "linspace" || spacing == "trailing" {
                    max
                } else {
                    (max * max + 1.0).sqrt()
                };
            }
            SamplerKind::DpmSolverPP => {
                let algo = c.algorithm_type.as_deref().unwrap_or("dpmsolver++");
                if algo != "dpmsolver++" {
                    return Err(Error::Config(format!(
                        "DPM-Solver algorithm_type `{algo}` is not supported (dpmsolver++ only)"
                    )));
                }
                if s.solver_order == 0 || s.solver_order > 2 {
                    return Err(Error::Config(format!(
                        "DPM-Solver solver_order {} is not supported (1 or 2)",
                        s.solver_order
                    )));
                }
                let ts: Vec<usize> = match spacing {
                    "linspace" => {
                        let v = linspace(0.0, (n - 1) as f64, steps + 1);
                        v.into_iter()
                            .map(round)
                            .rev()
                            .take(steps)
                            .map(|t| t as usize)
                            .collect()
                    }
                    "leading" => {
                        let ratio = n / (steps + 1);
                        (0..=steps)
                            .rev()
                            .take(steps)
                            .map(|i| i * ratio + c.steps_offset)
                            .collect()
                    }
                    "trailing" => trailing(n, steps).into_iter().map(|t| t as usize).collect(),
                    other => return Err(spacing_err(other)),
                };
                s.timesteps = ts.iter().map(|t| *t as f64).collect();
                s.sigmas = ts.iter().map(|t| interp(*t as f64, &base_sigmas)).collect();
                s.sigmas.push(if s.final_sigma_zero {
                    0.0
                } else {
                    base_sigmas[0]
                });
            }
        }
        Ok(s)
    }

    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// The timesteps the UNet sees, in order.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The sigmas (Euler and DPM-Solver; empty for DDIM).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// What the initial Gaussian latents are multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// The UNet input at step `i` (Euler samplers divide by `sqrt(σ² + 1)`).
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        match self.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let sigma = self.sigmas[i];
                Ok((x / (sigma * sigma + 1.0).sqrt())?)
            }
            _ => Ok(x.clone()),
        }
    }

    /// Whether [`Sampler::step`] draws noise (Euler ancestral does, at every step).
    pub fn needs_noise(&self) -> bool {
        self.kind == SamplerKind::EulerAncestral
    }

    /// The latents after step `i` from `sample` and the UNet's `model_output`; `noise` (same
    /// shape) is used by the ancestral sampler.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            return Err(Error::Config(format!(
                "sampler step {i} of {}",
                self.timesteps.len()
            )));
        }
        match self.kind {
            SamplerKind::Ddim => self.ddim(model_output, i, sample),
            SamplerKind::Euler => self.euler(model_output, i, sample),
            SamplerKind::EulerAncestral => {
                let noise = noise.ok_or_else(|| {
                    Error::Config("the Euler ancestral sampler needs noise at every step".into())
                })?;
                self.euler_ancestral(model_output, i, sample, noise)
            }
            SamplerKind::DpmSolverPP => self.dpm(model_output, i, sample),
        }
    }

    fn ddim(&self, eps_or_v: &Tensor, i: usize, x: &Tensor) -> Result<Tensor> {
        let t = self.timesteps[i] as usize;
        let prev = t as i64 - self.step_ratio as i64;
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => (
                ((x - (eps_or_v * b_t.sqrt())?)? / a_t.sqrt())?,
                eps_or_v.clone(),
            ),
            Prediction::Sample => (
                eps_or_v.clone(),
                ((x - (eps_or_v * a_t.sqrt())?)? / b_t.sqrt())?,
            ),
            Prediction::V => (
                ((x * a_t.sqrt())? - (eps_or_v * b_t.sqrt())?)?,
                ((eps_or_v * a_t.sqrt())? + (x * b_t.sqrt())?)?,
            ),
        };
        let x0 = match self.clip_sample {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        // eta = 0: no variance term.
        Ok(((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?)
    }

    fn denoised_euler(&self, out: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(match self.prediction {
            Prediction::Epsilon => (x - (out * sigma)?)?,
            Prediction::V => {
                ((out * (-sigma / (sigma * sigma + 1.0).sqrt()))? + (x / (sigma * sigma + 1.0))?)?
            }
            Prediction::Sample => out.clone(),
        })
    }

    fn euler(&self, out: &Tensor, i: usize, x: &Tensor) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        let x0 = self.denoised_euler(out, x, sigma)?;
        let derivative = ((x - x0)? / sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        Ok((x + (derivative * dt)?)?)
    }

    fn euler_ancestral(
        &self,
        out: &Tensor,
        i: usize,
        x: &Tensor,
        noise: &Tensor,
    ) -> Result<Tensor> {
        if self.prediction == Prediction::Sample {
            return Err(Error::Config(
                "the Euler ancestral sampler does not take prediction_type = sample (as in \
                 diffusers)"
                    .into(),
            ));
        }
        let sigma = self.sigmas[i];
        let x0 = self.denoised_euler(out, x, sigma)?;
        let (from, to) = (sigma, self.sigmas[i + 1]);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let derivative = ((x - x0)? / sigma)?;
        let prev = (x + (derivative * (down - sigma))?)?;
        Ok((prev + (noise * up)?)?)
    }

    fn dpm(&mut self, out: &Tensor, i: usize, x: &Tensor) -> Result<Tensor> {
        let alpha_sigma = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let n = self.timesteps.len();
        let lower_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let (a_s0, s_s0) = alpha_sigma(self.sigmas[i]);
        let x0 = match self.prediction {
            Prediction::Epsilon => ((x - (out * s_s0)?)? / a_s0)?,
            Prediction::Sample => out.clone(),
            Prediction::V => ((x * a_s0)? - (out * s_s0)?)?,
        };
        let (a_t, s_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda = |a: f64, s: f64| a.ln() - s.ln();
        let l_t = lambda(a_t, s_t);
        let l_s0 = lambda(a_s0, s_s0);
        let h = l_t - l_s0;
        let first_order = self.solver_order == 1 || self.lower_order_nums < 1 || lower_final;
        let next = if first_order {
            ((x * (s_t / s_s0))? - (&x0 * (a_t * ((-h).exp() - 1.0)))?)?
        } else {
            let m1 = self.previous.as_ref().ok_or_else(|| {
                Error::Config("DPM-Solver: second-order step without a previous one".into())
            })?;
            let (a_s1, s_s1) = alpha_sigma(self.sigmas[i - 1]);
            let l_s1 = lambda(a_s1, s_s1);
            let h0 = l_s0 - l_s1;
            let r0 = h0 / h;
            let d1 = ((&x0 - m1)? * (1.0 / r0))?;
            let e = (-h).exp() - 1.0;
            let base = ((x * (s_t / s_s0))? - (&x0 * (a_t * e))?)?;
            if self.heun {
                (base + (d1 * (a_t * (e / h + 1.0)))?)?
            } else {
                (base - (d1 * (0.5 * a_t * e))?)?
            }
        };
        self.previous = Some(x0);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(next)
    }
}

/// diffusers' "trailing" spacing: `round(arange(n, 0, -n / steps)) - 1`.
fn trailing(n: usize, steps: usize) -> Vec<f64> {
    let ratio = n as f64 / steps as f64;
    let mut out = Vec::new();
    let mut t = n as f64;
    while t > 0.0 && out.len() < steps {
        out.push(round(t) - 1.0);
        t -= ratio;
    }
    out
}

fn spacing_err(s: &str) -> Error {
    Error::Config(format!(
        "timestep_spacing `{s}` is not supported; supported: leading, trailing, linspace"
    ))
}
