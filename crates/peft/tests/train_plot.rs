//! `curves.png` / `curves.svg`: the PNG has text (title, axis and tick labels, legend) drawn with
//! the embedded font, and both plot the evaluation metrics beside the training loss.

use peft::train::plot::{curves_from_history, write_curves};

/// A short run's metrics.jsonl: a log every step, an evaluation every 5 steps.
fn history() -> Vec<serde_json::Value> {
    let mut h = Vec::new();
    for step in 1..=20 {
        h.push(serde_json::json!({
            "step": step, "loss": 0.7 * (-(step as f64) / 8.0).exp() + 0.1,
            "learning_rate": 1e-3, "grad_norm": 1.0,
        }));
        if step % 5 == 0 {
            h.push(serde_json::json!({
                "step": step, "eval_loss": 0.5 - 0.01 * step as f64,
                "eval_accuracy": 0.6 + 0.015 * step as f64,
                "eval_f1": 0.55 + 0.016 * step as f64,
            }));
        }
    }
    h
}

/// RGB rows of a PNG file.
fn decode(path: &std::path::Path) -> (usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "plotters writes RGB");
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

/// Pixels darker than the grid lines (text, axes, curves; anti-aliased text is grey) in a
/// rectangle.
fn dark_pixels(
    img: &(usize, usize, Vec<u8>),
    x: std::ops::Range<usize>,
    y: std::ops::Range<usize>,
) -> usize {
    let (w, _, px) = img;
    y.flat_map(|r| x.clone().map(move |c| (r, c)))
        .filter(|&(r, c)| {
            let i = 3 * (r * w + c);
            px[i..i + 3].iter().all(|&v| v < 200)
        })
        .count()
}

#[test]
fn curves_have_a_title_axes_ticks_legend_and_eval_metrics() {
    let panels = curves_from_history(&history(), "loss");
    let names: Vec<Vec<&str>> = panels
        .iter()
        .map(|p| p.curves.iter().map(|c| c.name.as_str()).collect())
        .collect();
    assert_eq!(
        names,
        vec![
            vec!["train loss", "eval loss"],
            vec!["eval accuracy", "eval f1"]
        ]
    );
    assert_eq!(panels[1].y_label, "accuracy, f1");

    let tmp = tempfile::tempdir().unwrap();
    let stem = tmp.path().join("curves");
    write_curves(&stem, "Training curves: test-run", &panels).unwrap();
    // PEFT_KEEP_CURVES=DIR keeps the two files there, to look at.
    if let Some(keep) = std::env::var_os("PEFT_KEEP_CURVES") {
        for ext in ["png", "svg"] {
            let name = format!("curves.{ext}");
            std::fs::copy(
                stem.with_extension(ext),
                std::path::Path::new(&keep).join(name),
            )
            .unwrap();
        }
    }

    let img = decode(&stem.with_extension("png"));
    let (w, h, _) = img;
    assert_eq!((w, h), (1280, 460));
    // The title band holds only the title: without a font it was blank.
    let title = dark_pixels(&img, 0..w, 0..28);
    assert!(
        title > 200,
        "no title text in the PNG ({title} dark pixels)"
    );
    // Left of each panel's y axis (12 px margin + 70 px label area) there is only text: the
    // tick labels and the axis description.
    for panel in 0..2 {
        let left = panel * 640 + 12;
        let ticks = dark_pixels(&img, left..left + 60, 60..400);
        assert!(
            ticks > 200,
            "panel {panel}: no y tick labels ({ticks} dark pixels)"
        );
    }
    // Below the plot: x tick labels and "step".
    let bottom = dark_pixels(&img, 100..600, h - 40..h - 5);
    assert!(bottom > 50, "no x tick labels ({bottom} dark pixels)");

    let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| Some(t.split_once('>')?.1.split("</text>").next()?.trim()))
        .collect();
    for label in [
        "Training curves: test-run",
        "Loss",
        "Evaluation metrics",
        "step",
        "loss",
        "accuracy, f1",
        "train loss",
        "eval loss",
        "eval accuracy",
        "eval f1",
        "0.5",
        "10",
    ] {
        assert!(
            texts.contains(&label),
            "{label} is not a text of the SVG: {texts:?}"
        );
    }
}

#[test]
fn the_metric_that_picks_the_best_model_is_plotted_first() {
    let panels = curves_from_history(&history(), "f1");
    let names: Vec<&str> = panels[1].curves.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["eval f1", "eval accuracy"]);
    // Without evaluations only the training loss is drawn.
    let train_only: Vec<serde_json::Value> = history()
        .into_iter()
        .filter(|e| e.get("loss").is_some())
        .collect();
    let panels = curves_from_history(&train_only, "accuracy");
    assert_eq!(panels.len(), 1);
    assert_eq!(panels[0].curves.len(), 1);
}
