//! Images in and out (PNG and JPEG through the pure-Rust `image` crate): the training pictures
//! of a DreamBooth folder as tensors in [-1, 1], and generated samples (tensors in [0, 1]) as
//! PNG files, alone or in a grid.

use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use std::path::Path;

use crate::{Error, Result};

/// The file extensions read as images.
pub const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "PNG"];

/// Whether `path` has an image extension this module reads.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Decodes `path` as RGB.
pub fn open_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::load_from_memory(&bytes).map_err(|e| {
        Error::Data(format!(
            "{}: cannot decode the image ({e}); PNG and JPEG files are read",
            path.display()
        ))
    })?;
    Ok(img.to_rgb8())
}

/// How a training picture becomes a square of `resolution` pixels (diffusers' DreamBooth
/// transforms: resize the shorter side, then a center or random crop, optionally flipped).
#[derive(Debug, Clone, Copy)]
pub struct Preprocess {
    pub resolution: usize,
    pub center_crop: bool,
    /// Flip left-right.
    pub flip: bool,
    /// Top-left corner of a random crop, as fractions of the slack (ignored with `center_crop`).
    pub crop_at: (f64, f64),
}

/// `img` as `[3, resolution, resolution]` in [-1, 1] (`Normalize([0.5], [0.5])` of `ToTensor`).
pub fn to_tensor(img: &RgbImage, p: &Preprocess, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let r = p.resolution as u32;
    let img = if w.min(h) != r {
        // Shorter side to `r`, keeping the aspect ratio (torchvision's Resize(int)).
        let (nw, nh) = if w <= h {
            (r, ((h as u64 * r as u64) as f64 / w as f64) as u32)
        } else {
            (((w as u64 * r as u64) as f64 / h as f64) as u32, r)
        };
        DynamicImage::ImageRgb8(img.clone())
            .resize_exact(nw.max(r), nh.max(r), FilterType::Triangle)
            .to_rgb8()
    } else {
        img.clone()
    };
    let (w, h) = img.dimensions();
    let (x0, y0) = if p.center_crop {
        // torchvision's CenterCrop: int(round((size - crop) / 2)).
        (
            ((w - r) as f64 / 2.0).round() as u32,
            ((h - r) as f64 / 2.0).round() as u32,
        )
    } else {
        (
            ((w - r) as f64 * p.crop_at.0).floor() as u32,
            ((h - r) as f64 * p.crop_at.1).floor() as u32,
        )
    };
    let mut data = vec![0f32; 3 * (r * r) as usize];
    let n = (r * r) as usize;
    for y in 0..r {
        for x in 0..r {
            let sx = if p.flip { r - 1 - x } else { x };
            let px = img.get_pixel(x0 + sx, y0 + y);
            for c in 0..3 {
                data[c * n + (y * r + x) as usize] = px[c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(data, (3, r as usize, r as usize), device)?)
}

/// `[3, h, w]` in [0, 1] as 8-bit RGB (`round(x · 255)`, as diffusers' `numpy_to_pil` after
/// `postprocess`).
pub fn to_rgb(t: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        return Err(Error::ShapeMismatch {
            name: "image".into(),
            expected: vec![3, h, w],
            found: t.dims().to_vec(),
        });
    }
    let v: Vec<f32> = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let n = h * w;
    let mut img = RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let px =
                [0, 1, 2].map(|c| (v[c * n + y * w + x].clamp(0.0, 1.0) * 255.0).round() as u8);
            img.put_pixel(x as u32, y as u32, image::Rgb(px));
        }
    }
    Ok(img)
}

/// Writes `img` as a PNG file (atomically).
pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    DynamicImage::ImageRgb8(img.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::Data(format!("{}: cannot encode PNG: {e}", path.display())))?;
    super::write_atomic(path, &bytes)
}

/// Images `[n, 3, h, w]` in [0, 1] side by side in rows of `cols`, with a `gap`-pixel white
/// border.
pub fn grid(images: &[Tensor], cols: usize, gap: u32) -> Result<RgbImage> {
    let tiles: Vec<RgbImage> = images.iter().map(to_rgb).collect::<Result<_>>()?;
    let (tw, th) = tiles
        .first()
        .map(|t| t.dimensions())
        .ok_or_else(|| Error::Data("an image grid needs at least one image".into()))?;
    let cols = cols.max(1).min(tiles.len()) as u32;
    let rows = (tiles.len() as u32).div_ceil(cols);
    let mut out = RgbImage::from_pixel(
        cols * tw + (cols + 1) * gap,
        rows * th + (rows + 1) * gap,
        image::Rgb([255, 255, 255]),
    );
    for (i, t) in tiles.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(
            &mut out,
            t,
            (gap + c * (tw + gap)) as i64,
            (gap + r * (th + gap)) as i64,
        );
    }
    Ok(out)
}
