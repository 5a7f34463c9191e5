//! `peft forward` / `peft merge` with several adapters, against PEFT's outputs in
//! crates/peft/tests/fixtures/multi (tools/fixtures/make_multi_adapter_fixtures.py).

use std::path::Path;

mod common;

use common::{matrix, max_diff, peft, peft_fixtures as fixtures, tensor};

fn bert_inputs() -> Vec<String> {
    let f = fixtures().join("bert/inputs.safetensors");
    ["input_ids", "attention_mask", "token_type_ids"]
        .iter()
        .map(|k| matrix(&tensor(&f, k)))
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn forward_routes_each_row_through_its_named_adapter() {
    let multi = fixtures().join("multi/bert_cls");
    let model = fixtures().join("bert/models/seq_cls");
    let inp = bert_inputs();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let a = format!("a={}", s(&multi.join("adapters/a")));
    let b = format!("b={}", s(&multi.join("adapters/b")));
    let (ok, text) = peft(&[
        "forward",
        "--model",
        s(&model),
        "--adapter",
        &a,
        "--adapter",
        &b,
        "--adapter-names",
        "b,__base__,a",
        "--input-ids",
        &inp[0],
        "--attention-mask",
        &inp[1],
        "--token-type-ids",
        &inp[2],
        "--out",
        s(&out),
    ]);
    assert!(ok, "{text}");
    let want = tensor(&multi.join("expected.safetensors"), "mixed_logits");
    let d = max_diff(&tensor(&out, "logits"), &want);
    assert!(d <= 1e-4, "mixed batch differs from PEFT by {d}");

    // One name per row, and only names that were loaded.
    let (ok, text) = peft(&[
        "forward",
        "--model",
        s(&model),
        "--adapter",
        &a,
        "--adapter",
        &b,
        "--adapter-names",
        "a,b",
        "--input-ids",
        &inp[0],
        "--out",
        s(&out),
    ]);
    assert!(!ok && text.contains("one per row"), "{text}");
    let (ok, text) = peft(&[
        "forward",
        "--model",
        s(&model),
        "--adapter",
        &a,
        "--adapter-names",
        "a,zz,a",
        "--input-ids",
        &inp[0],
        "--out",
        s(&out),
    ]);
    assert!(
        !ok && text.contains("non-existing adapter(s): zz"),
        "{text}"
    );
}

#[test]
fn merge_combines_several_adapters_as_add_weighted_adapter() {
    let multi = fixtures().join("multi/bert");
    let model = fixtures().join("bert/models/seq_cls");
    let inp = bert_inputs();
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    let default = format!("default={}", s(&multi.join("adapters")));
    let other = format!("other={}", s(&multi.join("adapters/other")));
    let (ok, text) = peft(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        &default,
        "--adapter",
        &other,
        "--weights",
        "0.7,-0.4",
        "--combination-type",
        "linear",
        "--out",
        s(&merged),
    ]);
    assert!(ok, "{text}");
    let out = tmp.path().join("logits.safetensors");
    let (ok, text) = peft(&[
        "forward",
        "--model",
        s(&merged),
        "--input-ids",
        &inp[0],
        "--attention-mask",
        &inp[1],
        "--token-type-ids",
        &inp[2],
        "--out",
        s(&out),
    ]);
    assert!(ok, "{text}");
    let want = tensor(&multi.join("weighted/linear.safetensors"), "logits");
    let d = max_diff(&tensor(&out, "logits"), &want);
    assert!(
        d <= 1e-4,
        "merged weighted combination differs from PEFT by {d}"
    );

    let (ok, text) = peft(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        &default,
        "--adapter",
        &other,
        "--combination-type",
        "ties",
        "--out",
        s(&merged),
    ]);
    assert!(!ok && text.contains("density"), "{text}");
}
