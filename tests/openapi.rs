//! The committed `openapi/openapi.json` is what the code produces: regenerate it with
//! `cargo run -- openapi > openapi/openapi.json` when the API changes.

use serde_json::Value;

#[test]
fn committed_spec_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let generated = serde_json::to_value(denoised::api::openapi()).unwrap();
    assert!(committed == generated, "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json`");
}

#[test]
fn every_route_and_error_status_is_documented() {
    let spec = serde_json::to_value(denoised::api::openapi()).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = spec["paths"].as_object().unwrap();
    for route in ["/v1/images", "/v1/jobs/{id}", "/v1/jobs/{id}/images/{index}", "/v1/models", "/healthz", "/readyz"] {
        assert!(paths.contains_key(route), "{route} missing from the spec");
    }
    let post = &spec["paths"]["/v1/images"]["post"]["responses"];
    for status in ["202", "400", "413", "415", "422"] {
        assert!(post.get(status).is_some(), "POST /v1/images does not document {status}");
    }
    let request = &spec["components"]["schemas"]["GenerateImageRequest"]["properties"];
    assert_eq!(request["steps"]["maximum"], 150);
    assert_eq!(request["n"]["maximum"], 8);
}
