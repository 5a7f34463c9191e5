//! `peft merge --dequantize f32|bf16` on a transformers 4-bit checkpoint with the LoRA PEFT
//! trained on it (fixtures: tools/fixtures/make_qlora_fixtures.py): a plain dense checkpoint
//! whose logits are PEFT's for the 4-bit model + LoRA.

mod common;

use common::{peft, peft_fixtures, tensor};

#[test]
fn merge_dequantize_writes_a_plain_dense_checkpoint_with_peft_logits() {
    let fx = peft_fixtures().join("qlora");
    let ids = tensor(&fx.join("inputs.safetensors"), "input_ids");
    let rows: Vec<Vec<i64>> = ids
        .to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let want = tensor(&fx.join("expected.safetensors"), "logits_lora");
    for (dtype, tol) in [("f32", 2e-4f32), ("bf16", 0.1)] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let (ok, log) = peft(&[
            "merge",
            "--model",
            fx.join("llama_4bit").to_str().unwrap(),
            "--adapter",
            fx.join("llama_lora").to_str().unwrap(),
            "--dequantize",
            dtype,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{log}");
        let cfg = peft::io::read_json(&out.join("config.json")).unwrap();
        assert!(cfg.get("quantization_config").is_none(), "{cfg}");
        let st =
            peft::io::load_safetensors(&out.join("model.safetensors"), &candle_core::Device::Cpu)
                .unwrap();
        assert!(!st
            .keys()
            .any(|k| k.contains("absmax") || k.contains("quant_state")));
        let logits = tmp.path().join("l.safetensors");
        let (ok, log) = peft(&[
            "forward",
            "--model",
            out.to_str().unwrap(),
            "--input-ids",
            &format!("{rows:?}"),
            "--out",
            logits.to_str().unwrap(),
        ]);
        assert!(ok, "{log}");
        let got = tensor(&logits, "logits")
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        // Row 1 is right-padded from position 6 in the fixture; causal attention keeps the
        // positions before the padding equal.
        for (row, len) in [(0usize, rows[0].len()), (1, 6)] {
            let g = got.get(row).unwrap().narrow(0, 0, len).unwrap();
            let w = want.get(row).unwrap().narrow(0, 0, len).unwrap();
            let d = common::max_diff(&g, &w);
            assert!(d < tol, "{dtype} row {row}: {d}");
        }
    }
}
