//! The one `multipart/form-data` reader, for `POST /v1/edits` and `POST /v1/images/edits`: files `image`
//! (or `image[]`) and `mask`, every other part a form value converted to its JSON-form equivalent. A second
//! image or mask, or a part without a name, is a `422` naming the field in both routes.

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::StatusCode;

use super::error::ApiError;
use super::AppState;

/// A read form: the text values as a JSON object (ready for the same deserialiser as the JSON body), and
/// the files.
#[derive(Debug, Default)]
pub struct Form {
    /// Form values by name.
    pub values: serde_json::Map<String, serde_json::Value>,
    /// The `image` file.
    pub image: Option<Vec<u8>>,
    /// The `mask` file.
    pub mask: Option<Vec<u8>>,
}

impl Form {
    /// Removes and returns a text value.
    pub fn take_text(&mut self, name: &str) -> Option<String> {
        self.values.remove(name).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
    }
}

/// Fields whose multipart text is a number in the JSON form.
const NUMERIC_FIELDS: &[&str] = &[
    "strength",
    "image_guidance_scale",
    "mask_blur",
    "width",
    "height",
    "left",
    "right",
    "top",
    "bottom",
    "steps",
    "guidance_scale",
    "guidance_rescale",
    "seed",
    "n",
    "preview_every",
    "output_quality",
    "output_compression",
    "partial_images",
    "inversion_steps",
    "mask_encode_strength",
    "mask_samples",
    "mask_threshold",
];

/// Fields whose multipart text is a list in the JSON form: comma-separated items, or one part per item.
const LIST_FIELDS: &[&str] = &["webhook_events"];

/// A multipart text value as its JSON-form equivalent: a number for numeric fields (when it parses; else
/// left as text, so the field error names it), an array of the comma-separated items for list fields, text
/// otherwise.
fn form_value(name: &str, text: String) -> serde_json::Value {
    if LIST_FIELDS.contains(&name) {
        let items = text.split(',').map(str::trim).filter(|item| !item.is_empty());
        return serde_json::Value::Array(items.map(|item| serde_json::Value::String(item.into())).collect());
    }
    if NUMERIC_FIELDS.contains(&name) {
        if let Some(number) =
            serde_json::from_str::<serde_json::Value>(text.trim()).ok().filter(serde_json::Value::is_number)
        {
            return number;
        }
    }
    serde_json::Value::String(text)
}

/// Reads a multipart body under the body limit.
pub async fn read_form(request: Request, state: &AppState) -> Result<Form, ApiError> {
    let limit = state.http.max_body_bytes;
    let mut multipart =
        Multipart::from_request(request, state).await.map_err(|e| ApiError::MalformedJson(e.body_text()))?;
    let failed = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::MalformedJson(format!("malformed multipart body: {}", e.body_text()))
        }
    };
    let mut form = Form::default();
    while let Some(mut field) = multipart.next_field().await.map_err(failed)? {
        let name = field.name().unwrap_or_default().trim_end_matches("[]").to_string();
        let slot = match name.as_str() {
            "image" => &mut form.image,
            "mask" => &mut form.mask,
            "" => return Err(ApiError::field("form", "every multipart part needs a name")),
            _ => {
                let text = field.text().await.map_err(failed)?;
                let value = form_value(&name, text);
                match (form.values.get_mut(&name), value) {
                    // A list field's later parts add to its items.
                    (Some(serde_json::Value::Array(items)), serde_json::Value::Array(more)) => items.extend(more),
                    (_, value) => {
                        form.values.insert(name, value);
                    }
                }
                continue;
            }
        };
        if slot.is_some() {
            let field = if name == "image" { "image" } else { "mask" };
            return Err(ApiError::field(field, format!("only one `{field}` file is supported")));
        }
        // Chunk by chunk into one buffer: `field.bytes()` would grow its own and `to_vec` copy it again.
        let mut file = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(failed)? {
            file.extend_from_slice(&chunk);
        }
        *slot = Some(file);
    }
    Ok(form)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_become_numbers_and_the_rest_stays_text() {
        assert_eq!(form_value("steps", "12".into()), serde_json::json!(12));
        assert_eq!(form_value("steps", "twelve".into()), serde_json::json!("twelve"));
        assert_eq!(form_value("prompt", "12".into()), serde_json::json!("12"));
        assert_eq!(form_value("webhook_events", "started".into()), serde_json::json!(["started"]));
        assert_eq!(
            form_value("webhook_events", " started, completed ".into()),
            serde_json::json!(["started", "completed"])
        );
        assert_eq!(form_value("webhook_events", "".into()), serde_json::json!([]));
    }
}
