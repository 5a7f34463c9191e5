//! Stable Diffusion's denoiser: diffusers' `UNet2DConditionModel` as SD 1.x and 2.x configure it
//! (`CrossAttnDownBlock2D` / `DownBlock2D` down, `UNetMidBlock2DCrossAttn`, `UpBlock2D` /
//! `CrossAttnUpBlock2D` up; 1×1-conv or linear (`use_linear_projection`) transformer
//! projections; GEGLU feed-forwards). Every convolution and linear layer is built through the
//! [`Loader`] under its diffusers path (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
//! `up_blocks.1.resnets.2.conv_shortcut`, ...), so each is an adaptation site.
//!
//! diffusers' quirk kept as is: `attention_head_dim` is the number of heads (unless
//! `num_attention_heads` is given), so a block's head size is its channels over it.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::Path;

use super::{Cache, Inputs, LoadOptions, Model, ModelDims, ModelInfo, TaskType};
use crate::io::Weights;
use crate::layers::{
    Conv2d, ConvParams, GroupNorm, HeadInit, LayerNorm, Linear, Loader, ModuleMut, ModuleRef,
    Modules,
};
use crate::{impl_modules, ops, Error, Result};

/// One value for every block, or one per block (diffusers accepts both).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value of each of `n` blocks.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(Error::Config(format!(
                "UNet config: `{field}` has {} entries for {n} down blocks",
                v.len()
            ))),
        }
    }
}

/// `UNet2DConditionModel`'s config (the fields SD 1.x / 2.x use; diffusers' defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "no_block")]
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two_block")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "groups32")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    #[serde(default = "cross1280")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "one_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "heads8")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default = "one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn no_block() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn two_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn one_block() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn heads8() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn cross1280() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn silu() -> String {
    "silu".into()
}
fn groups32() -> Option<usize> {
    Some(32)
}
fn eps5() -> f64 {
    1e-5
}
fn default_str() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}

impl UNetConfig {
    /// Refuses what SD 1.x / 2.x do not use and this implementation does not compute, naming
    /// the field.
    fn check(&self) -> Result<()> {
        let refuse = |field: &str, what: String| {
            Err(Error::Config(format!(
                "UNet config: {field} = {what} is not supported (Stable Diffusion 1.x / 2.x \
                 UNets only)"
            )))
        };
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return refuse("act_fn", self.act_fn.clone());
        }
        if self.time_embedding_type != "positional" {
            return refuse("time_embedding_type", self.time_embedding_type.clone());
        }
        if self.resnet_time_scale_shift != "default" {
            return refuse(
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift.clone(),
            );
        }
        for (field, set) in [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_some(),
            ),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
            ("resnet_skip_time_act", self.resnet_skip_time_act),
        ] {
            if set {
                return refuse(field, "a non-default value".into());
            }
        }
        if let PerBlock::One(true) = self.only_cross_attention {
            return refuse("only_cross_attention", "true".into());
        }
        if let PerBlock::Many(v) = &self.only_cross_attention {
            if v.iter().any(|b| *b) {
                return refuse("only_cross_attention", format!("{v:?}"));
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return refuse("mid_block_type", m.clone());
            }
        }
        if self.down_block_types.len() != self.block_out_channels.len()
            || self.up_block_types.len() != self.block_out_channels.len()
        {
            return Err(Error::Config(format!(
                "UNet config: {} down block types and {} up block types for {} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len(),
                self.block_out_channels.len()
            )));
        }
        Ok(())
    }
}

/// A linear layer or a 1×1 convolution: a transformer's `proj_in` / `proj_out`.
pub(crate) enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

impl Modules for Proj {
    fn visit<'a>(&'a self, out: &mut Vec<ModuleRef<'a>>) {
        match self {
            Proj::Conv(c) => c.visit(out),
            Proj::Linear(l) => l.visit(out),
        }
    }
    fn visit_mut<'a>(&'a mut self, out: &mut Vec<ModuleMut<'a>>) {
        match self {
            Proj::Conv(c) => c.visit_mut(out),
            Proj::Linear(l) => l.visit_mut(out),
        }
    }
}

/// `ResnetBlock2D` with the "default" time embedding norm: `x + conv2(silu(norm2(conv1(silu(
/// norm1(x))) + proj(silu(temb)))))`, the shortcut a 1×1 convolution when the channels change.
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    dropout: f64,
}
impl_modules!(ResnetBlock {
    norm1,
    conv1,
    time_emb_proj,
    norm2,
    conv2,
    conv_shortcut
});

/// What a block needs to build its resnets.
#[derive(Clone, Copy)]
pub(crate) struct ResnetOpts {
    pub groups: usize,
    pub eps: f64,
    /// `temb_channels`; `None` in the VAE.
    pub temb: Option<usize>,
    pub output_scale_factor: f64,
    pub dropout: f64,
}

impl ResnetBlock {
    pub(crate) fn load(vb: &Loader, in_ch: usize, out_ch: usize, o: ResnetOpts) -> Result<Self> {
        let conv3 = ConvParams::new(1, 1);
        Ok(Self {
            norm1: vb.pp("norm1").group_norm(o.groups, in_ch, o.eps)?,
            conv1: vb.pp("conv1").conv2d(in_ch, out_ch, 3, conv3, true)?,
            time_emb_proj: match o.temb {
                Some(t) => Some(vb.pp("time_emb_proj").linear(t, out_ch, true)?),
                None => None,
            },
            norm2: vb.pp("norm2").group_norm(o.groups, out_ch, o.eps)?,
            conv2: vb.pp("conv2").conv2d(out_ch, out_ch, 3, conv3, true)?,
            conv_shortcut: if in_ch != out_ch {
                Some(vb.pp("conv_shortcut").conv2d(
                    in_ch,
                    out_ch,
                    1,
                    ConvParams::default(),
                    true,
                )?)
            } else {
                None
            },
            output_scale_factor: o.output_scale_factor,
            dropout: o.dropout,
        })
    }

    /// `temb_act`: the time embedding after its SiLU, `[batch, temb]`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb_act: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.norm1.forward(x)?.silu()?;
        let mut h = self.conv1.forward_t(&h, train)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb_act) {
            let t = proj.forward_t(t, train)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.norm2.forward(&h)?.silu()?;
        let h = ops::dropout(&h, self.dropout, train)?;
        let h = self.conv2.forward_t(&h, train)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward_t(x, train)?,
            None => x.clone(),
        };
        let y = (x + h)?;
        Ok(if self.output_scale_factor != 1.0 {
            (y / self.output_scale_factor)?
        } else {
            y
        })
    }
}

/// `Downsample2D` with a convolution: stride 2, padding 1 (UNet) or 0 after padding the bottom
/// and right by one (VAE).
pub(crate) struct Downsample {
    conv: Conv2d,
    pad_first: bool,
}
impl_modules!(Downsample { conv });

impl Downsample {
    pub(crate) fn load(vb: &Loader, ch: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: vb
                .pp("conv")
                .conv2d(ch, ch, 3, ConvParams::new(2, padding), true)?,
            pad_first: padding == 0,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.pad_first {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            return self.conv.forward_t(&x, train);
        }
        self.conv.forward_t(x, train)
    }
}

/// `Upsample2D` with a convolution: nearest-neighbour to twice the size (or to `size`), then a
/// 3×3 convolution.
pub(crate) struct Upsample {
    conv: Conv2d,
}
impl_modules!(Upsample { conv });

impl Upsample {
    pub(crate) fn load(vb: &Loader, ch: usize) -> Result<Self> {
        Ok(Self {
            conv: vb
                .pp("conv")
                .conv2d(ch, ch, 3, ConvParams::new(1, 1), true)?,
        })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        size: Option<(usize, usize)>,
        train: bool,
    ) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((h * 2, w * 2));
        let x = ops::upsample_nearest(x, th, tw)?;
        self.conv.forward_t(&x, train)
    }
}

/// diffusers' `Attention` as the UNet's transformer blocks use it: `to_q`, `to_k`, `to_v`
/// without bias, `to_out.0` with, over `[batch, tokens, channels]`.
pub(crate) struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}
impl_modules!(Attention {
    to_q,
    to_k,
    to_v,
    to_out
});

impl Attention {
    fn load(vb: &Loader, dim: usize, ctx_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: vb.pp("to_q").linear(dim, dim, false)?,
            to_k: vb.pp("to_k").linear(ctx_dim, dim, false)?,
            to_v: vb.pp("to_v").linear(ctx_dim, dim, false)?,
            to_out: vb.pp("to_out.0").linear(dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward_t(x, train)?;
        let k = self.to_k.forward_t(ctx, train)?;
        let v = self.to_v.forward_t(ctx, train)?;
        let d = q.dim(2)? / self.heads;
        let scale = 1.0 / (d as f64).sqrt();
        let o = ops::attention_merged_heads(&q, &k, &v, self.heads, None, scale, 0.0, train)?;
        self.to_out.forward_t(&o, train)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention on the text, GEGLU feed-forward,
/// each pre-LayerNorm with a residual.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    /// `ff.net.0.proj`: `dim → 2·inner` (value and gate).
    ff_proj: Linear,
    /// `ff.net.2`: `inner → dim`.
    ff_out: Linear,
}
impl_modules!(TransformerBlock {
    norm1,
    attn1,
    norm2,
    attn2,
    norm3,
    ff_proj,
    ff_out
});

impl TransformerBlock {
    fn load(vb: &Loader, dim: usize, ctx_dim: usize, heads: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            norm1: vb.pp("norm1").layer_norm(dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads)?,
            norm2: vb.pp("norm2").layer_norm(dim, 1e-5)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, ctx_dim, heads)?,
            norm3: vb.pp("norm3").layer_norm(dim, 1e-5)?,
            ff_proj: vb.pp("ff.net.0.proj").linear(dim, inner * 2, true)?,
            ff_out: vb.pp("ff.net.2").linear(inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, train: bool) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, train)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context), train)?
            + &x)?;
        let h = self.ff_proj.forward_t(&self.norm3.forward(&x)?, train)?;
        let inner = h.dim(2)? / 2;
        let value = h.narrow(2, 0, inner)?;
        let gate = ops::gelu_erf(&h.narrow(2, inner, inner)?)?;
        let h = self.ff_out.forward_t(&(value * gate)?, train)?;
        Ok((h + x)?)
    }
}

/// `Transformer2DModel` (continuous input): GroupNorm, `proj_in`, transformer blocks over the
/// `h·w` positions, `proj_out`, plus the residual.
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    transformer_blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}
impl_modules!(Transformer2D {
    norm,
    proj_in,
    transformer_blocks,
    proj_out
});

#[derive(Clone, Copy)]
struct AttnOpts {
    heads: usize,
    layers: usize,
    cross_dim: usize,
    groups: usize,
    linear: bool,
}

impl Transformer2D {
    fn load(vb: &Loader, ch: usize, o: AttnOpts) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj> {
            Ok(if o.linear {
                Proj::Linear(vb.pp(name).linear(ch, ch, true)?)
            } else {
                Proj::Conv(vb.pp(name).conv2d(ch, ch, 1, ConvParams::default(), true)?)
            })
        };
        Ok(Self {
            norm: vb.pp("norm").group_norm(o.groups, ch, 1e-6)?,
            proj_in: proj("proj_in")?,
            transformer_blocks: (0..o.layers)
                .map(|i| {
                    TransformerBlock::load(
                        &vb.pp("transformer_blocks").pp(i),
                        ch,
                        o.cross_dim,
                        o.heads,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let to_tokens =
            |t: &Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?) };
        let to_image = |t: &Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(&conv.forward_t(&n, train)?)?,
            Proj::Linear(l) => l.forward_t(&to_tokens(&n)?, train)?,
        };
        for blk in &self.transformer_blocks {
            t = blk.forward(&t, context, train)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward_t(&to_image(&t)?, train)?,
            Proj::Linear(l) => to_image(&l.forward_t(&t, train)?)?,
        };
        Ok((out + x)?)
    }
}

/// A down block: resnets (each followed by a transformer in a cross-attention block), then an
/// optional downsampler; it hands every intermediate state to the up path.
struct DownBlock {
    attentions: Vec<Transformer2D>,
    resnets: Vec<ResnetBlock>,
    downsamplers: Option<Downsample>,
}
impl_modules!(DownBlock {
    attentions,
    resnets,
    downsamplers
});

/// An up block: each resnet takes the state concatenated with a skip from the down path.
struct UpBlock {
    attentions: Vec<Transformer2D>,
    resnets: Vec<ResnetBlock>,
    upsamplers: Option<Upsample>,
}
impl_modules!(UpBlock {
    attentions,
    resnets,
    upsamplers
});

struct MidBlock {
    attentions: Vec<Transformer2D>,
    resnets: Vec<ResnetBlock>,
}
impl_modules!(MidBlock {
    attentions,
    resnets
});

/// diffusers' `UNet2DConditionModel`.
pub struct UNet2DConditionModel {
    info: ModelInfo,
    pub cfg: UNetConfig,
    conv_in: Conv2d,
    linear_1: Linear,
    linear_2: Linear,
    down_blocks: Vec<DownBlock>,
    up_blocks: Vec<UpBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    device: Device,
}
impl_modules!(UNet2DConditionModel {
    conv_in,
    linear_1,
    linear_2,
    down_blocks,
    up_blocks,
    mid_block,
    conv_norm_out,
    conv_out
});

fn is_cross(block_type: &str, known: [&str; 2]) -> Result<bool> {
    if block_type == known[0] {
        Ok(true)
    } else if block_type == known[1] {
        Ok(false)
    } else {
        Err(Error::Config(format!(
            "UNet block type `{block_type}` is not supported; supported: {} and {}",
            known[0], known[1]
        )))
    }
}

impl UNet2DConditionModel {
    pub fn load(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let cfg: UNetConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::Config(format!("{}/config.json: {e}", dir.display())))?;
        cfg.check()?;
        let vb = Loader::new(weights, None, opts.device.clone(), init);
        let n = cfg.block_out_channels.len();
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups.ok_or_else(|| {
            Error::Config("UNet config: norm_num_groups = null is not supported".into())
        })?;
        let layers = cfg.layers_per_block.expand(n, "layers_per_block")?;
        let tlayers = cfg
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let cross = cfg.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let heads = match &cfg.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => cfg.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        let temb = cfg.time_embedding_dim.unwrap_or(ch[0] * 4);
        if cfg.conv_in_kernel != 3 || cfg.conv_out_kernel != 3 {
            return Err(Error::Config(
                "UNet config: conv_in_kernel / conv_out_kernel other than 3 are not supported"
                    .into(),
            ));
        }
        let ropts = ResnetOpts {
            groups,
            eps: cfg.norm_eps,
            temb: Some(temb),
            output_scale_factor: 1.0,
            dropout: cfg.dropout,
        };
        let attn = |i: usize| AttnOpts {
            heads: heads[i],
            layers: tlayers[i],
            cross_dim: cross[i],
            groups,
            linear: cfg.use_linear_projection,
        };
        let conv_in =
            vb.pp("conv_in")
                .conv2d(cfg.in_channels, ch[0], 3, ConvParams::new(1, 1), true)?;
        let te = vb.pp("time_embedding");
        let linear_1 = te.pp("linear_1").linear(ch[0], temb, true)?;
        let linear_2 = te.pp("linear_2").linear(temb, temb, true)?;
        let mut down_blocks = Vec::new();
        let mut out_ch = ch[0];
        for (i, t) in cfg.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch[i];
            let cross_attn = is_cross(t, ["CrossAttnDownBlock2D", "DownBlock2D"])?;
            let b = vb.pp("down_blocks").pp(i);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                let rin = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock::load(
                    &b.pp("resnets").pp(j),
                    rin,
                    out_ch,
                    ropts,
                )?);
                if cross_attn {
                    attentions.push(Transformer2D::load(
                        &b.pp("attentions").pp(j),
                        out_ch,
                        attn(i),
                    )?);
                }
            }
            let downsamplers = if i + 1 < n {
                Some(Downsample::load(
                    &b.pp("downsamplers.0"),
                    out_ch,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                attentions,
                resnets,
                downsamplers,
            });
        }
        let mid = vb.pp("mid_block");
        let last = ch[n - 1];
        let mid_opts = ResnetOpts {
            output_scale_factor: cfg.mid_block_scale_factor,
            ..ropts
        };
        let mid_attn = AttnOpts {
            heads: heads[n - 1],
            layers: tlayers[n - 1],
            cross_dim: cross[n - 1],
            groups,
            linear: cfg.use_linear_projection,
        };
        let mid_block = MidBlock {
            resnets: vec![
                ResnetBlock::load(&mid.pp("resnets.0"), last, last, mid_opts)?,
                ResnetBlock::load(&mid.pp("resnets.1"), last, last, mid_opts)?,
            ],
            attentions: vec![Transformer2D::load(
                &mid.pp("attentions.0"),
                last,
                mid_attn,
            )?],
        };
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out_ch = rev[0];
        for (i, t) in cfg.up_block_types.iter().enumerate() {
            let prev = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let bi = n - 1 - i;
            let cross_attn = is_cross(t, ["CrossAttnUpBlock2D", "UpBlock2D"])?;
            let b = vb.pp("up_blocks").pp(i);
            let num = layers[bi] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num {
                let skip = if j == num - 1 { in_ch } else { out_ch };
                let rin = if j == 0 { prev } else { out_ch };
                resnets.push(ResnetBlock::load(
                    &b.pp("resnets").pp(j),
                    rin + skip,
                    out_ch,
                    ropts,
                )?);
                if cross_attn {
                    attentions.push(Transformer2D::load(
                        &b.pp("attentions").pp(j),
                        out_ch,
                        attn(bi),
                    )?);
                }
            }
            let upsamplers = if i + 1 < n {
                Some(Upsample::load(&b.pp("upsamplers.0"), out_ch)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                attentions,
                resnets,
                upsamplers,
            });
        }
        let conv_norm_out = vb
            .pp("conv_norm_out")
            .group_norm(groups, ch[0], cfg.norm_eps)?;
        let conv_out =
            vb.pp("conv_out")
                .conv2d(ch[0], cfg.out_channels, 3, ConvParams::new(1, 1), true)?;
        let info = ModelInfo {
            model_type: "unet".into(),
            architecture: "UNet2DConditionModel".into(),
            task: TaskType::FeatureExtraction,
            head: Vec::new(),
            config,
            dir: dir.to_path_buf(),
        };
        Ok(Self {
            info,
            cfg,
            conv_in,
            linear_1,
            linear_2,
            down_blocks,
            up_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
            device: opts.device.clone(),
        })
    }

    /// diffusers' `get_timestep_embedding` (`flip_sin_to_cos`, `freq_shift`), `[batch, dim]`.
    fn timestep_embedding(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let half = dim / 2;
        let shift = self.cfg.freq_shift;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp() as f32)
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), &self.device)?;
        let args = t
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.cfg.flip_sin_to_cos {
            Tensor::cat(&[&cos, &sin], 1)?
        } else {
            Tensor::cat(&[&sin, &cos], 1)?
        };
        Ok(if dim % 2 == 1 {
            emb.pad_with_zeros(1, 0, 1)?
        } else {
            emb
        })
    }

    /// The predicted noise (or velocity, or sample, as the scheduler was trained) for `sample`
    /// `[batch, in, h, w]` at `timestep` (`[]`, `[1]` or `[batch]`) under `context` `[batch, seq,
    /// cross_attention_dim]`.
    pub fn predict(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, c, h, w) = sample.dims4()?;
        if c != self.cfg.in_channels {
            return Err(Error::ShapeMismatch {
                name: "UNet sample (channels)".into(),
                expected: vec![b, self.cfg.in_channels, h, w],
                found: sample.dims().to_vec(),
            });
        }
        let expected_ctx = match &self.cfg.cross_attention_dim {
            PerBlock::One(d) => *d,
            PerBlock::Many(v) => v[0],
        };
        let (cb, _, cd) = context.dims3()?;
        if cd != expected_ctx || (cb != b && cb != 1) {
            return Err(Error::ShapeMismatch {
                name: "UNet encoder_hidden_states".into(),
                expected: vec![b, 77, expected_ctx],
                found: context.dims().to_vec(),
            });
        }
        let context = if cb != b {
            context
                .broadcast_as((b, context.dim(1)?, cd))?
                .contiguous()?
        } else {
            context.clone()
        };
        let t = timestep.flatten_all()?;
        let t = match t.dim(0)? {
            1 => t.broadcast_as(b)?.contiguous()?,
            n if n == b => t,
            n => {
                return Err(Error::ShapeMismatch {
                    name: "UNet timestep".into(),
                    expected: vec![b],
                    found: vec![n],
                })
            }
        };
        let ch0 = self.cfg.block_out_channels[0];
        let t_emb = self.timestep_embedding(&t, ch0)?.to_dtype(sample.dtype())?;
        let emb = self
            .linear_2
            .forward_t(&self.linear_1.forward_t(&t_emb, train)?.silu()?, train)?;
        let temb = emb.silu()?;
        let sample = if self.cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut x = self.conv_in.forward_t(&sample, train)?;
        let mut skips = vec![x.clone()];
        for blk in &self.down_blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = r.forward(&x, Some(&temb), train)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, &context, train)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &blk.downsamplers {
                x = d.forward(&x, train)?;
                skips.push(x.clone());
            }
        }
        let mid = &self.mid_block;
        x = mid.resnets[0].forward(&x, Some(&temb), train)?;
        for (a, r) in mid.attentions.iter().zip(&mid.resnets[1..]) {
            x = a.forward(&x, &context, train)?;
            x = r.forward(&x, Some(&temb), train)?;
        }
        for blk in &self.up_blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    Error::Config(
                        "UNet: the up path needs more skips than the down path gave".into(),
                    )
                })?;
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = r.forward(&x, Some(&temb), train)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, &context, train)?;
                }
            }
            if let Some(u) = &blk.upsamplers {
                let size = skips
                    .last()
                    .map(|s| s.dims4().map(|(_, _, h, w)| (h, w)))
                    .transpose()?;
                x = u.forward(&x, size, train)?;
            }
        }
        let x = self.conv_norm_out.forward(&x)?.silu()?;
        self.conv_out.forward_t(&x, train)
    }
}

impl Model for UNet2DConditionModel {
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
            "a UNet takes no token ids (give sample, timestep and encoder_hidden_states)".into(),
        ))
    }

    fn forward_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        if cache.is_some() {
            return Err(Error::Config("a UNet has no key/value cache".into()));
        }
        let need = |t: &Option<Tensor>, name: &str| {
            t.clone().ok_or_else(|| {
                Error::Data(format!(
                    "the UNet needs `{name}` (its inputs: sample, timestep, encoder_hidden_states)"
                ))
            })
        };
        let sample = need(&inputs.sample, "sample")?;
        let t = need(&inputs.timestep, "timestep")?;
        let ctx = need(&inputs.encoder_hidden_states, "encoder_hidden_states")?;
        self.predict(&sample, &t, &ctx, train)
    }

    fn outputs(&self, inputs: &Inputs, train: bool) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![("sample".into(), self.forward(inputs, train)?)])
    }
}
