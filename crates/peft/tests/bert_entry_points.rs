//! BERT's prompt-method entry points against transformers (tools/fixtures/make_seq2seq_fixtures.py,
//! on the BERT fixture model `seq_cls`): embeddings instead of ids, and per-layer key/value
//! prefixes through `past_key_values` (positions of the real tokens continue after the prefix).

mod common;

use candle_core::{DType, Tensor};
use common::*;
use peft::models::{Cache, KeyValue};

fn entry() -> std::collections::HashMap<String, Tensor> {
    load_st(&fixtures().join("../bert_entry/expected.safetensors"))
}

#[test]
fn inputs_embeds_match_transformers() {
    let want = entry();
    let m = load_model("list_qv");
    let mut i = inputs();
    i.input_ids = None;
    i.inputs_embeds = Some(want["inputs_embeds"].clone());
    let got = m.forward(&i, false).unwrap();
    assert_close("embeds", &got, &want["embeds_logits"], 1e-4);
}

#[test]
fn key_value_prefixes_match_transformers() {
    let want = entry();
    let m = load_model("list_qv");
    let mut cache = Cache {
        self_attn: (0..m.dims().num_layers)
            .map(|l| {
                Some(KeyValue {
                    key: want[&format!("self.{l}.key")].clone(),
                    value: want[&format!("self.{l}.value")].clone(),
                })
            })
            .collect(),
        ..Default::default()
    };
    let mut i = inputs();
    let mask = i.attention_mask.take().unwrap();
    let ones = Tensor::ones((mask.dim(0).unwrap(), 3), DType::U32, mask.device()).unwrap();
    i.attention_mask = Some(Tensor::cat(&[&ones, &mask], 1).unwrap());
    let got = m.forward_with_cache(&i, Some(&mut cache), false).unwrap();
    assert_close("prefix", &got, &want["prefix_logits"], 1e-4);

    // A mask over the new tokens only attends to every prefix position: same logits.
    let mut cache2 = Cache {
        self_attn: cache
            .self_attn
            .iter()
            .map(|kv| {
                kv.as_ref().map(|kv| KeyValue {
                    key: kv.key.narrow(2, 0, 3).unwrap(),
                    value: kv.value.narrow(2, 0, 3).unwrap(),
                })
            })
            .collect(),
        ..Default::default()
    };
    let got = m
        .forward_with_cache(&inputs(), Some(&mut cache2), false)
        .unwrap();
    assert_close("prefix, short mask", &got, &want["prefix_logits"], 1e-4);
}
