//! `peft` on AdapterHub directories as `adapters` 1.3.0 saved them (fixtures:
//! tools/fixtures/make_adapterhub_fixtures.py): `--adapter DIR` with its head, `--fusion`,
//! `--skip-layers`, `peft inspect`, and clear errors.

mod common;

use common::{max_diff, peft, peft_fixtures, tensor};
use std::path::PathBuf;

fn ah() -> PathBuf {
    peft_fixtures().join("adapterhub")
}

const IDS: &str = "[[3, 7, 1, 12, 5, 9], [4, 2, 8, 6, 11, 10]]";

fn forward(extra: &[&str], out: &std::path::Path) -> (bool, String) {
    let model = ah().join("models/bert");
    let mut args = vec![
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        IDS,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    peft(&args)
}

#[test]
fn forward_reads_adapterhub_adapters_heads_and_fusions() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("l.safetensors");
    // An adapter with its classification head: AutoAdapterModel's logits.
    let dir = ah().join("heads/bert_cls");
    let (ok, log) = forward(&["--adapter", dir.to_str().unwrap()], &out);
    assert!(ok, "{log}");
    let want = tensor(&ah().join("heads/expected.safetensors"), "bert_cls");
    assert!(max_diff(&tensor(&out, "logits"), &want) < 1e-4);
    // An adapter without a head on BertModel: the last hidden states; with skipped layers.
    let dir = ah().join("bert/double_seq_bn");
    let expected = ah().join("bert/expected.safetensors");
    let (ok, log) = forward(&["--adapter", dir.to_str().unwrap()], &out);
    assert!(ok, "{log}");
    assert!(max_diff(&tensor(&out, "logits"), &tensor(&expected, "double_seq_bn")) < 1e-4);
    let (ok, log) = forward(
        &["--adapter", dir.to_str().unwrap(), "--skip-layers", "0,1"],
        &out,
    );
    assert!(ok, "{log}");
    assert!(
        max_diff(
            &tensor(&out, "logits"),
            &tensor(&expected, "skip_double_seq_bn")
        ) < 1e-4
    );
    // Fuse(a, b) with the head saved beside the fusion.
    let f = ah().join("heads/bert_fusion");
    let a = format!("a={}", f.join("a").display());
    let b = format!("b={}", f.join("b").display());
    let (ok, log) = forward(
        &[
            "--adapter",
            &a,
            "--adapter",
            &b,
            "--fusion",
            f.to_str().unwrap(),
        ],
        &out,
    );
    assert!(ok, "{log}");
    let want = tensor(&ah().join("heads/expected.safetensors"), "bert_fusion");
    assert!(max_diff(&tensor(&out, "logits"), &want) < 1e-4);
    // A skip list outside the model is refused by name.
    let (ok, log) = forward(
        &["--adapter", dir.to_str().unwrap(), "--skip-layers", "0,7"],
        &out,
    );
    assert!(!ok);
    assert!(
        log.contains("skip layer 7") && log.contains("0..4"),
        "{log}"
    );
    // --fusion needs its adapters.
    let (ok, log) = forward(&["--fusion", f.to_str().unwrap()], &out);
    assert!(!ok);
    assert!(log.contains("--adapter"), "{log}");
}

#[test]
fn inspect_describes_adapterhub_directories() {
    let (ok, log) = peft(&["inspect", ah().join("heads/bert_cls").to_str().unwrap()]);
    assert!(ok, "{log}");
    assert!(log.contains("AdapterHub layout"), "{log}");
    assert!(log.contains("heads.bert_cls.1.weight"), "{log}");
    assert!(
        log.contains("encoder.layer.0.output.adapters.bert_cls.adapter_down.0.weight"),
        "{log}"
    );
}
