//! The MiniLM tokenizer gives transformers' ids although its tokenizer.json carries fixed
//! padding and truncation at 128 (cases from tools/fixtures/tokenizer_cases.py).

use peft::io::tokenizer::Tokenizer;
use std::path::Path;

#[test]
fn minilm_tokenizer_matches_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_tokenizer");
    let mut tok = Tokenizer::from_path(&dir).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let pair = c.get("text_pair").and_then(|p| p.as_str());
        let enc = tok.encode(text, pair, 128).unwrap();
        let ids: Vec<u32> = serde_json::from_value(c["input_ids"].clone()).unwrap();
        let types: Vec<u32> = serde_json::from_value(c["token_type_ids"].clone()).unwrap();
        assert_eq!(enc.input_ids, ids, "{text:?}");
        assert_eq!(enc.token_type_ids, types, "{text:?}");
    }
}
