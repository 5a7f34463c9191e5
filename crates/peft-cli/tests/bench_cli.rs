//! `peft bench --peft-config`: every method's config file in tools/reference/methods/ builds the
//! adapter PyTorch + PEFT builds from the same file, on the real MiniLM of the default job.

mod common;

use common::peft;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn minilm() -> PathBuf {
    let assets = std::env::var_os("PEFT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".assets"));
    let p = assets.join("all-MiniLM-L6-v2");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-assets.sh",
        p.display()
    );
    p
}

/// One tiny timed step; the printed JSON line.
fn bench(config: &Path) -> (bool, String) {
    let model = minilm();
    let args = [
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--peft-config",
        config.to_str().unwrap(),
        "--batch",
        "1",
        "--seq-len",
        "8",
        "--steps",
        "2",
        "--warmup",
        "0",
    ];
    peft(&args)
}

#[test]
fn every_method_config_trains_peft_s_parameter_count() {
    // Trainable parameters (adapter + classifier head) that PEFT 0.21.2 creates from the same
    // files, printed by `tools/reference/bench_train.py --peft-config FILE` ("trainable").
    let peft_counts = [
        ("lora", "LORA", 74_498),
        ("dora", "DORA", 79_106),
        ("adalora", "ADALORA", 111_506),
        ("loha", "LOHA", 148_226),
        ("lokr", "LOKR", 8_450),
        ("ia3", "IA3", 5_378),
        ("vera", "VERA", 8_450),
    ];
    let dir = root().join("tools/reference/methods");
    for (file, method, trainable) in peft_counts {
        let (ok, out) = bench(&dir.join(format!("{file}.json")));
        assert!(ok, "{file}: {out}");
        let line = out
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("{file}: no JSON line in {out}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["method"], method, "{file}: {line}");
        assert_eq!(v["trainable"], trainable, "{file}: {line}");
        assert!(v["seq_per_s"].as_f64().unwrap() > 0.0, "{file}: {line}");
    }
}

#[test]
fn a_bad_method_config_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("peft-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let typo = dir.join("typo.json");
    std::fs::write(&typo, r#"{"peft_type": "LOHA", "r": 8, "alhpa": 16}"#).unwrap();
    let (ok, out) = bench(&typo);
    assert!(
        !ok && out.contains("alhpa") && out.contains("alpha"),
        "{out}"
    );
    let (ok, out) = bench(&dir.join("missing.json"));
    assert!(!ok && out.contains("missing.json"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inference_mode_times_the_forward_with_the_adapter_on_and_off() {
    let model = minilm();
    let m = model.to_str().unwrap();
    let (ok, out) = peft(&[
        "bench",
        "--model",
        m,
        "--inference",
        "--batch",
        "2",
        "--seq-len",
        "8",
        "--steps",
        "2",
        "--warmup",
        "0",
    ]);
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with('{')).expect(&out);
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["mode"], "inference", "{line}");
    let (on, off) = (
        v["adapter_s"].as_f64().unwrap(),
        v["base_s"].as_f64().unwrap(),
    );
    assert!(on > 0.0 && off > 0.0, "{line}");
    let overhead = v["overhead"].as_f64().unwrap();
    // The times are printed to 0.1 ms, the overhead from the unrounded times.
    assert!(((1.0 + overhead) * off - on).abs() < 1.5e-4, "{line}");
    // Timing a forward pass and generating are different benchmarks.
    let (ok, out) = peft(&["bench", "--model", m, "--inference", "--generate", "4"]);
    assert!(!ok && out.contains("cannot be used with"), "{out}");
}
