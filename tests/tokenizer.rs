//! The CLIP tokenizer against ids produced by Python's `transformers.CLIPTokenizer` for tricky prompts
//! (`tests/fixtures/tokenizer_cases.json`, made by `tests/fixtures/make_fixtures.py`). Where the slow Python
//! tokenizer without ftfy differs from the fast one (CJK splitting), we match the fast one, which is what
//! `CLIPTokenizerFast` and diffusers with `use_fast` produce.

use std::path::Path;

use denoised::engine::tokenizer::ClipTokenizer;
use serde_json::Value;

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn matches_python_clip_tokenizer_on_every_case() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tokenizer = ClipTokenizer::from_dir(&root.join("tiny-sd/tokenizer")).unwrap();
    assert_eq!(tokenizer.max_length(), 77);
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tokenizer_cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "expected the full case list");
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let reference = case.get("fast").unwrap_or(case);
        let expected = ids(&reference["input_ids"]);
        let actual = tokenizer.encode_padded(prompt).unwrap();
        if actual != expected {
            failures.push(format!("{prompt:?}\n  expected {expected:?}\n  actual   {actual:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
