//! Loss and metric curves from the log history, as `curves.svg` (with axis labels and a legend)
//! and `curves.png` (the same lines and grid, without text: plotters draws bitmap text only
//! through system fonts, which a training machine may not have).

use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

use crate::{Error, Result};

/// One line: `(step, value)` points.
pub struct Curve {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Curves worth drawing from a log history: training loss, eval loss, and one eval metric.
pub fn curves_from_history(history: &[serde_json::Value], metric: &str) -> Vec<Vec<Curve>> {
    let series = |key: &str, name: &str| Curve {
        name: name.into(),
        points: history
            .iter()
            .filter_map(|h| Some((h.get("step")?.as_f64()?, h.get(key)?.as_f64()?)))
            .filter(|(_, v)| v.is_finite())
            .collect(),
    };
    let mut panels = vec![vec![
        series("loss", "train loss"),
        series("eval_loss", "eval loss"),
    ]];
    if metric != "loss" {
        panels.push(vec![series(
            &format!("eval_{metric}"),
            &format!("eval {metric}"),
        )]);
    }
    panels
        .into_iter()
        .map(|p| {
            p.into_iter()
                .filter(|c| !c.points.is_empty())
                .collect::<Vec<_>>()
        })
        .filter(|p| !p.is_empty())
        .collect()
}

/// Writes `<stem>.png` and `<stem>.svg` side by side (one panel per entry of `panels`).
pub fn write_curves(stem: &Path, panels: &[Vec<Curve>]) -> Result<()> {
    if panels.is_empty() {
        return Ok(());
    }
    let size = (640 * panels.len() as u32, 420);
    let err = |e: String| Error::Training(format!("drawing {}: {e}", stem.display()));
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw(&root, panels, false).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw(&root, panels, true).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

const COLORS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Vec<Curve>],
    text: bool,
) -> std::result::Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    for (area, curves) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        let pts = curves.iter().flat_map(|c| c.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        let (y0, y1) = (y0 - pad, y1 + pad);
        let mut builder = ChartBuilder::on(area);
        builder.margin(15);
        if text {
            builder.x_label_area_size(35).y_label_area_size(55).caption(
                curves
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                ("sans-serif", 18),
            );
        }
        let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(e)?;
        if text {
            chart
                .configure_mesh()
                .x_desc("step")
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(e)?;
        } else {
            // The grid and frame the mesh would draw, without its labels.
            let grid = RGBColor(225, 225, 225);
            for i in 0..=10 {
                let f = i as f64 / 10.0;
                let x = x0 + f * (x1 - x0);
                let y = y0 + f * (y1 - y0);
                chart
                    .draw_series(LineSeries::new([(x, y0), (x, y1)], grid))
                    .map_err(e)?;
                chart
                    .draw_series(LineSeries::new([(x0, y), (x1, y)], grid))
                    .map_err(e)?;
            }
        }
        for (i, c) in curves.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let style = ShapeStyle::from(color).stroke_width(2);
            let s = chart
                .draw_series(LineSeries::new(c.points.iter().copied(), style))
                .map_err(e)?;
            if text {
                s.label(c.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            }
            if c.points.len() < 30 {
                chart
                    .draw_series(
                        c.points
                            .iter()
                            .map(|&p| Circle::new(p, 3, ShapeStyle::from(color).filled())),
                    )
                    .map_err(e)?;
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
    }
    Ok(())
}
