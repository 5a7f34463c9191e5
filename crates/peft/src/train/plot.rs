//! Loss and metric curves from the log history, as `curves.png` and `curves.svg`: a title, then
//! one panel for the training and evaluation loss and one for the evaluation metrics, each with
//! axis labels, tick labels and a legend. The PNG's text is drawn with DejaVu Sans compiled into
//! the library (assets/fonts/, its licence beside it), so it needs no system fonts.

use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

use crate::{Error, Result};

/// One line: `(step, value)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart: its caption, the label of its y axis, its lines (x is always the step).
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub curves: Vec<Curve>,
}

/// The metrics worth a line beside `metric` (the one that picks the best model), in order.
const TASK_METRICS: [&str; 4] = ["accuracy", "f1", "exact_match", "perplexity"];

/// Panels worth drawing from a log history (metrics.jsonl): the training loss with the
/// evaluation loss, and the evaluation metrics — `metric` (when it is not the loss) and up to
/// two of accuracy, F1, exact match or perplexity, whichever were logged. Empty series and panels
/// are left out.
pub fn curves_from_history(history: &[serde_json::Value], metric: &str) -> Vec<Panel> {
    let series = |key: &str, name: &str| Curve {
        name: name.into(),
        points: history
            .iter()
            .filter_map(|h| Some((h.get("step")?.as_f64()?, h.get(key)?.as_f64()?)))
            .filter(|(_, v)| v.is_finite())
            .collect(),
    };
    let loss = Panel {
        title: "Loss".into(),
        y_label: "loss".into(),
        curves: vec![
            series("loss", "train loss"),
            series("eval_loss", "eval loss"),
        ],
    };
    let mut names: Vec<&str> = Vec::new();
    for m in std::iter::once(metric).chain(TASK_METRICS) {
        if m != "loss" && !names.contains(&m) {
            names.push(m);
        }
    }
    let metric_curves: Vec<Curve> = names
        .iter()
        .map(|m| series(&format!("eval_{m}"), &format!("eval {m}")))
        .filter(|c| !c.points.is_empty())
        .take(2)
        .collect();
    let metrics = Panel {
        title: "Evaluation metrics".into(),
        y_label: metric_curves
            .iter()
            .map(|c| c.name.trim_start_matches("eval ").to_string())
            .collect::<Vec<_>>()
            .join(", "),
        curves: metric_curves,
    };
    [loss, metrics]
        .into_iter()
        .map(|mut p| {
            p.curves.retain(|c| !c.points.is_empty());
            p
        })
        .filter(|p| !p.curves.is_empty())
        .collect()
}

/// The family name the embedded font is registered under.
const FONT: &str = "sans-serif";

/// Registers DejaVu Sans with plotters (once per process).
fn register_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../../assets/fonts/DejaVuSans.ttf"),
        )
        .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the embedded font DejaVuSans.ttf could not be read".into())
    }
}

/// Writes `<stem>.png` and `<stem>.svg` side by side (one panel per entry of `panels`, under
/// `title`). Nothing is written when there is nothing to draw.
pub fn write_curves(stem: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    if panels.is_empty() {
        return Ok(());
    }
    let err = |e: String| Error::Training(format!("drawing {}: {e}", stem.display()));
    register_font().map_err(err)?;
    let size = (640 * panels.len() as u32, 460);
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw(&root, title, panels).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw(&root, title, panels).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Tick labels: short, without float noise (`0.25`, `1.5e-3`, `120`).
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    panels: &[Panel],
) -> std::result::Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let body = root
        .titled(title, (FONT, 24).into_font().color(&BLACK))
        .map_err(e)?;
    for (area, panel) in body.split_evenly((1, panels.len())).iter().zip(panels) {
        let pts = panel.curves.iter().flat_map(|c| c.points.iter());
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
        let pad = ((y1 - y0) * 0.08).max(1e-6);
        let (y0, y1) = (y0 - pad, y1 + pad);
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .caption(&panel.title, (FONT, 18))
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(&panel.y_label)
            .axis_desc_style((FONT, 15))
            .label_style((FONT, 13))
            .x_labels(8)
            .y_labels(8)
            .x_label_formatter(&|x| tick(*x))
            .y_label_formatter(&|y| tick(*y))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(e)?;
        for (i, c) in panel.curves.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let style = ShapeStyle::from(color).stroke_width(2);
            chart
                .draw_series(LineSeries::new(c.points.iter().copied(), style))
                .map_err(e)?
                .label(c.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
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
        // The legend goes in the right-hand corner the lines end away from.
        let ends_high = panel
            .curves
            .iter()
            .filter_map(|c| c.points.last())
            .map(|&(_, y)| (y - y0) / (y1 - y0))
            .sum::<f64>()
            > 0.5 * panel.curves.len() as f64;
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .position(if ends_high {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperRight
            })
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(120.0), "120");
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(0.123456), "0.1235");
        assert_eq!(tick(0.00012), "1.2e-4");
    }
}
