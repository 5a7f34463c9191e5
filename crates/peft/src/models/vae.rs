//! Stable Diffusion's image autoencoder: diffusers' `AutoencoderKL` (`Encoder` of
//! `DownEncoderBlock2D`s, a mid block with one single-head attention, `quant_conv`; the mirror
//! `Decoder` of `UpDecoderBlock2D`s after `post_quant_conv`). Images are `[batch, 3, h, w]` in
//! [-1, 1]; latents `[batch, latent_channels, h / 2^(blocks-1), ...]`, to be multiplied by
//! `scaling_factor` before the UNet sees them.

use candle_core::{Device, Tensor};
use serde::Deserialize;
use std::path::Path;

use super::unet::{Downsample, ResnetBlock, ResnetOpts, Upsample};
use super::{Cache, Inputs, LoadOptions, Model, ModelDims, ModelInfo, TaskType};
use crate::io::Weights;
use crate::layers::{Conv2d, ConvParams, GroupNorm, HeadInit, Linear, Loader};
use crate::{impl_modules, ops, Error, Result};

/// `AutoencoderKL`'s config (diffusers' defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups32")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn silu() -> String {
    "silu".into()
}
fn groups32() -> usize {
    32
}
fn sd_scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

/// The mid block's attention (diffusers' `Attention` with a GroupNorm, one head per
/// `attention_head_dim` = all channels, biases, and the residual added back).
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}
impl_modules!(VaeAttention {
    group_norm,
    to_q,
    to_k,
    to_v,
    to_out
});

impl VaeAttention {
    fn load(vb: &Loader, ch: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: vb.pp("group_norm").group_norm(groups, ch, 1e-6)?,
            to_q: vb.pp("to_q").linear(ch, ch, true)?,
            to_k: vb.pp("to_k").linear(ch, ch, true)?,
            to_v: vb.pp("to_v").linear(ch, ch, true)?,
            to_out: vb.pp("to_out.0").linear(ch, ch, true)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.group_norm.forward(x)?;
        let t = n.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward_t(&t, train)?;
        let k = self.to_k.forward_t(&t, train)?;
        let v = self.to_v.forward_t(&t, train)?;
        let scale = 1.0 / (c as f64).sqrt();
        let o = ops::attention_merged_heads(&q, &k, &v, 1, None, scale, 0.0, train)?;
        let o = self.to_out.forward_t(&o, train)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((o + x)?)
    }
}

struct Mid {
    attentions: Vec<VaeAttention>,
    resnets: Vec<ResnetBlock>,
}
impl_modules!(Mid {
    attentions,
    resnets
});

impl Mid {
    fn load(vb: &Loader, ch: usize, o: ResnetOpts, attention: bool) -> Result<Self> {
        Ok(Self {
            attentions: if attention {
                vec![VaeAttention::load(&vb.pp("attentions.0"), ch, o.groups)?]
            } else {
                Vec::new()
            },
            resnets: vec![
                ResnetBlock::load(&vb.pp("resnets.0"), ch, ch, o)?,
                ResnetBlock::load(&vb.pp("resnets.1"), ch, ch, o)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None, train)?;
        if let Some(a) = self.attentions.first() {
            x = a.forward(&x, train)?;
        }
        self.resnets[1].forward(&x, None, train)
    }
}

struct EncBlock {
    resnets: Vec<ResnetBlock>,
    downsamplers: Option<Downsample>,
}
impl_modules!(EncBlock {
    resnets,
    downsamplers
});

struct DecBlock {
    resnets: Vec<ResnetBlock>,
    upsamplers: Option<Upsample>,
}
impl_modules!(DecBlock {
    resnets,
    upsamplers
});

struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<EncBlock>,
    mid_block: Mid,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}
impl_modules!(Encoder {
    conv_in,
    down_blocks,
    mid_block,
    conv_norm_out,
    conv_out
});

struct Decoder {
    conv_in: Conv2d,
    up_blocks: Vec<DecBlock>,
    mid_block: Mid,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}
impl_modules!(Decoder {
    conv_in,
    up_blocks,
    mid_block,
    conv_norm_out,
    conv_out
});

/// diffusers' `AutoencoderKL`.
pub struct AutoencoderKl {
    info: ModelInfo,
    pub cfg: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    device: Device,
}
impl_modules!(AutoencoderKl {
    encoder,
    decoder,
    quant_conv,
    post_quant_conv
});

impl AutoencoderKl {
    pub fn load(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let cfg: VaeConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::Config(format!("{}/config.json: {e}", dir.display())))?;
        if cfg.act_fn != "silu" {
            return Err(Error::Config(format!(
                "VAE config: act_fn = {} is not supported (silu only)",
                cfg.act_fn
            )));
        }
        for t in &cfg.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(Error::Config(format!(
                    "VAE down block type `{t}` is not supported; supported: DownEncoderBlock2D"
                )));
            }
        }
        for t in &cfg.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(Error::Config(format!(
                    "VAE up block type `{t}` is not supported; supported: UpDecoderBlock2D"
                )));
            }
        }
        let vb = Loader::new(weights, None, opts.device.clone(), init);
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        if cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "VAE config: {} down and {} up block types for {n} block_out_channels",
                cfg.down_block_types.len(),
                cfg.up_block_types.len()
            )));
        }
        let ro = ResnetOpts {
            groups: cfg.norm_num_groups,
            eps: 1e-6,
            temb: None,
            output_scale_factor: 1.0,
            dropout: 0.0,
        };
        let conv3 = ConvParams::new(1, 1);
        let lat = cfg.latent_channels;
        // Encoder.
        let e = vb.pp("encoder");
        let mut down_blocks = Vec::new();
        let mut out_ch = ch[0];
        for (i, &c) in ch.iter().enumerate().take(n) {
            let in_ch = out_ch;
            out_ch = c;
            let b = e.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let rin = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock::load(&b.pp("resnets").pp(j), rin, out_ch, ro)
                })
                .collect::<Result<_>>()?;
            let downsamplers = if i + 1 < n {
                Some(Downsample::load(&b.pp("downsamplers.0"), out_ch, 0)?)
            } else {
                None
            };
            down_blocks.push(EncBlock {
                resnets,
                downsamplers,
            });
        }
        let encoder = Encoder {
            conv_in: e
                .pp("conv_in")
                .conv2d(cfg.in_channels, ch[0], 3, conv3, true)?,
            down_blocks,
            mid_block: Mid::load(
                &e.pp("mid_block"),
                ch[n - 1],
                ro,
                cfg.mid_block_add_attention,
            )?,
            conv_norm_out: e.pp("conv_norm_out").group_norm(
                cfg.norm_num_groups,
                ch[n - 1],
                1e-6,
            )?,
            conv_out: e
                .pp("conv_out")
                .conv2d(ch[n - 1], 2 * lat, 3, conv3, true)?,
        };
        // Decoder.
        let d = vb.pp("decoder");
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out_ch = rev[0];
        for (i, &c) in rev.iter().enumerate().take(n) {
            let prev = out_ch;
            out_ch = c;
            let b = d.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let rin = if j == 0 { prev } else { out_ch };
                    ResnetBlock::load(&b.pp("resnets").pp(j), rin, out_ch, ro)
                })
                .collect::<Result<_>>()?;
            let upsamplers = if i + 1 < n {
                Some(Upsample::load(&b.pp("upsamplers.0"), out_ch)?)
            } else {
                None
            };
            up_blocks.push(DecBlock {
                resnets,
                upsamplers,
            });
        }
        let decoder = Decoder {
            conv_in: d.pp("conv_in").conv2d(lat, ch[n - 1], 3, conv3, true)?,
            up_blocks,
            mid_block: Mid::load(
                &d.pp("mid_block"),
                ch[n - 1],
                ro,
                cfg.mid_block_add_attention,
            )?,
            conv_norm_out: d
                .pp("conv_norm_out")
                .group_norm(cfg.norm_num_groups, ch[0], 1e-6)?,
            conv_out: d
                .pp("conv_out")
                .conv2d(ch[0], cfg.out_channels, 3, conv3, true)?,
        };
        let one = ConvParams::default();
        let quant_conv = if cfg.use_quant_conv {
            Some(vb.pp("quant_conv").conv2d(2 * lat, 2 * lat, 1, one, true)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(vb.pp("post_quant_conv").conv2d(lat, lat, 1, one, true)?)
        } else {
            None
        };
        let info = ModelInfo {
            model_type: "vae".into(),
            architecture: "AutoencoderKL".into(),
            task: TaskType::FeatureExtraction,
            head: Vec::new(),
            config,
            dir: dir.to_path_buf(),
        };
        Ok(Self {
            info,
            cfg,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            device: opts.device.clone(),
        })
    }

    /// The posterior's `(mean, logvar)` for images `[batch, 3, h, w]` in [-1, 1] (diffusers'
    /// `encode(x).latent_dist`, `logvar` clamped to [-30, 20]).
    pub fn encode(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward_t(x, train)?;
        for blk in &e.down_blocks {
            for r in &blk.resnets {
                h = r.forward(&h, None, train)?;
            }
            if let Some(d) = &blk.downsamplers {
                h = d.forward(&h, train)?;
            }
        }
        let h = e.mid_block.forward(&h, train)?;
        let h = e.conv_norm_out.forward(&h)?.silu()?;
        let mut h = e.conv_out.forward_t(&h, train)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward_t(&h, train)?;
        }
        let lat = self.cfg.latent_channels;
        let mean = h.narrow(1, 0, lat)?;
        let logvar = h.narrow(1, lat, lat)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// A draw from the posterior: `mean + exp(logvar / 2) · noise`.
    pub fn sample_posterior(mean: &Tensor, logvar: &Tensor, noise: &Tensor) -> Result<Tensor> {
        Ok((mean + (logvar * 0.5)?.exp()?.mul(noise)?)?)
    }

    /// Images `[batch, out_channels, h, w]` (about [-1, 1]) from latents `[batch,
    /// latent_channels, h', w']` (unscaled: divide the UNet's latents by `scaling_factor`
    /// first).
    pub fn decode(&self, z: &Tensor, train: bool) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward_t(z, train)?,
            None => z.clone(),
        };
        let d = &self.decoder;
        let mut h = d.conv_in.forward_t(&z, train)?;
        h = d.mid_block.forward(&h, train)?;
        for blk in &d.up_blocks {
            for r in &blk.resnets {
                h = r.forward(&h, None, train)?;
            }
            if let Some(u) = &blk.upsamplers {
                h = u.forward(&h, None, train)?;
            }
        }
        let h = d.conv_norm_out.forward(&h)?.silu()?;
        d.conv_out.forward_t(&h, train)
    }

    fn is_latent(&self, sample: &Tensor) -> Result<bool> {
        let c = sample.dim(1)?;
        if c == self.cfg.in_channels {
            Ok(false)
        } else if c == self.cfg.latent_channels {
            Ok(true)
        } else {
            Err(Error::ShapeMismatch {
                name: "VAE sample (channels: image or latents)".into(),
                expected: vec![self.cfg.in_channels],
                found: vec![c],
            })
        }
    }
}

impl Model for AutoencoderKl {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dims(&self) -> ModelDims {
        ModelDims::default()
    }

    fn embed_tokens(&self, _ids: &Tensor, _train: bool) -> Result<Tensor> {
        Err(Error::Config(
            "a VAE takes no token ids (give `sample`: an image or latents)".into(),
        ))
    }

    /// diffusers' `AutoencoderKL.forward(sample)`: `decode(encode(sample).latent_dist.mode())`
    /// for an image; for latents (`latent_channels` channels), their decoding.
    fn forward_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        if cache.is_some() {
            return Err(Error::Config("a VAE has no key/value cache".into()));
        }
        let sample = inputs.sample.as_ref().ok_or_else(|| {
            Error::Data("the VAE needs `sample` (an image, or latents to decode)".into())
        })?;
        if self.is_latent(sample)? {
            return self.decode(sample, train);
        }
        let (mean, _) = self.encode(sample, train)?;
        self.decode(&mean, train)
    }

    /// For an image: `latent_dist.mean`, `latent_dist.logvar` and `sample` (the decoded mean);
    /// for latents: `sample`.
    fn outputs(&self, inputs: &Inputs, train: bool) -> Result<Vec<(String, Tensor)>> {
        let sample = inputs.sample.as_ref().ok_or_else(|| {
            Error::Data("the VAE needs `sample` (an image, or latents to decode)".into())
        })?;
        if self.is_latent(sample)? {
            return Ok(vec![("sample".into(), self.decode(sample, train)?)]);
        }
        let (mean, logvar) = self.encode(sample, train)?;
        let decoded = self.decode(&mean, train)?;
        Ok(vec![
            ("latent_dist.mean".into(), mean),
            ("latent_dist.logvar".into(), logvar),
            ("sample".into(), decoded),
        ])
    }
}
