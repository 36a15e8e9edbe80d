//! C2PA content credentials: a manifest, signed with the operator's certificate (`[content_credentials]`),
//! embedded in every output picture before it is stored. It states who made the picture (`denoised` and its
//! version, as the claim generator and the action's software agent), how (`c2pa.created` with the IPTC digital
//! source type `trainedAlgorithmicMedia`; an edit is `c2pa.opened` of its input, recorded as the `parentOf`
//! ingredient, then `c2pa.edited` as `compositeWithTrainedAlgorithmicMedia`), and with what: the
//! [`GENERATION_LABEL`] assertion names the model, the job, the image's index and seed, and the SHA-256 of the
//! job's parameters ([`parameters_sha256`]), so that whoever holds the parameters can prove them while the
//! manifest does not reveal the prompt.
//!
//! Signing is synchronous and CPU-only (pure-Rust crypto); no timestamp authority is contacted, so a validator
//! judges the signature by the certificate's validity at validation time.

use std::io::Cursor;

use c2pa::{Builder, BuilderIntent, DigitalSourceType, SigningAlg};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::ContentCredentialsConfig;
use crate::engine::image::OutputFormat;

/// Label of the assertion that records the model, the job and the parameters' hash.
pub const GENERATION_LABEL: &str = "org.denoised.generation";

/// IPTC digital source type of a picture made by a generative model.
const TRAINED: &str = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";
/// IPTC digital source type of a picture that mixes its input with generated pixels.
const COMPOSITE: &str = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia";

/// What C2PA asks of a signing certificate, for error messages.
const PROFILE: &str = "C2PA wants a certificate issued by a CA (not self-signed) with key usage digitalSignature, \
an extended key usage such as emailProtection or documentSigning, an authority key identifier, and an EC P-256, \
P-384 or P-521 key or an RSA key of 2048 bits or more, valid now, whose private key is the one given";

/// Why credentials could not be loaded or a picture could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// A configured file could not be read.
    #[error("reading content_credentials.{field} `{path}`: {source}")]
    Read {
        /// The config field naming the file.
        field: &'static str,
        /// The path as configured.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate chain and key do not make a signer.
    #[error("the content-credential certificate chain and private key are not usable: {0}")]
    Signer(String),
    /// Signing a test picture at start-up failed or gave a manifest that does not validate (for example a key
    /// that does not belong to the certificate).
    #[error("content credentials fail their start-up check: {0}")]
    SelfCheck(String),
    /// Building or embedding one picture's manifest failed.
    #[error("signing the picture's content credentials: {0}")]
    Sign(String),
}

/// The picture an edit started from, recorded as the manifest's `parentOf` ingredient. When it carries C2PA
/// credentials of its own, they become part of the new picture's history.
#[derive(Debug, Clone, Copy)]
pub struct Parent<'a> {
    /// The picture's bytes, as the client sent them.
    pub bytes: &'a [u8],
    /// Its media type (`image/png`, `image/jpeg`, `image/webp`).
    pub media_type: &'a str,
}

impl<'a> Parent<'a> {
    /// `bytes` with the media type their content shows (`application/octet-stream` when it is none of the
    /// accepted picture formats).
    pub fn of(bytes: &'a [u8]) -> Self {
        Self { bytes, media_type: OutputFormat::of_bytes(bytes).map_or("application/octet-stream", OutputFormat::mime) }
    }
}

/// What one output's manifest states about it.
#[derive(Debug, Clone)]
pub struct OutputClaim<'a> {
    /// The job that made the picture.
    pub job: Uuid,
    /// The picture's index in its job.
    pub index: u32,
    /// The picture's seed.
    pub seed: u64,
    /// The model's id, as clients name it.
    pub model: &'a str,
    /// [`parameters_sha256`] of the job's parameters.
    pub parameters_sha256: &'a str,
    /// An edit's input; `None` for text to image.
    pub parent: Option<Parent<'a>>,
}

/// A loaded signer; shared by the worker side of a process.
pub struct ContentCredentials {
    signer: c2pa::BoxedSigner,
    /// The SDK's settings (its defaults), shared by every builder and reader rather than thread-local.
    context: std::sync::Arc<c2pa::Context>,
}

impl std::fmt::Debug for ContentCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentCredentials").finish_non_exhaustive()
    }
}

impl ContentCredentials {
    /// The signer `config` names, or `None` when it names none. The chain and key are checked by signing a
    /// small picture and validating the result, so a wrong key or chain stops the start-up, not every job.
    pub fn load(config: &ContentCredentialsConfig) -> Result<Option<Self>, CredentialsError> {
        let (Some(chain_path), Some(key_path)) = (&config.certificate_chain, &config.private_key) else {
            return Ok(None);
        };
        let read = |field: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| CredentialsError::Read {
                field,
                path: path.display().to_string(),
                source,
            })
        };
        let chain = read("certificate_chain", chain_path)?;
        let key = read("private_key", key_path)?;
        let algorithm = match &config.algorithm {
            Some(name) => name.parse::<SigningAlg>().map_err(|e| CredentialsError::Signer(e.to_string()))?,
            None => SigningAlg::Es256,
        };
        let anchors = config.trust_anchors.as_deref().map(|path| read("trust_anchors", path)).transpose()?;
        Self::from_pem(&chain, &key, algorithm, anchors.as_deref()).map(Some)
    }

    /// A signer from a PEM certificate chain (signing certificate first) and its PEM private key, checked by a
    /// test signature; `trust_anchors` (PEM roots) judge the credentials of edits' inputs.
    pub fn from_pem(
        chain: &[u8],
        key: &[u8],
        algorithm: SigningAlg,
        trust_anchors: Option<&[u8]>,
    ) -> Result<Self, CredentialsError> {
        let signer = c2pa::create_signer::from_keys(chain, key, algorithm, None)
            .map_err(|e| CredentialsError::Signer(format!("{e} ({PROFILE})")))?;
        let mut context = c2pa::Context::new();
        if let Some(anchors) = trust_anchors {
            let anchors = String::from_utf8_lossy(anchors);
            context = context
                .with_settings(json!({ "trust": { "trust_anchors": anchors } }))
                .map_err(|e| CredentialsError::Signer(format!("content_credentials.trust_anchors: {e}")))?;
        }
        let credentials = Self { signer, context: std::sync::Arc::new(context) };
        credentials.self_check()?;
        Ok(credentials)
    }

    /// Signs a 8×8 picture and reads it back: the manifest must be there and nothing in it may fail
    /// validation except trust in the chain's root, which only the validator's trust list decides.
    fn self_check(&self) -> Result<(), CredentialsError> {
        let picture = image::RgbImage::from_pixel(8, 8, image::Rgb([40, 90, 160]));
        let png = crate::engine::image::encode(&picture, OutputFormat::Png, None)
            .map_err(|e| CredentialsError::SelfCheck(e.to_string()))?;
        let claim = OutputClaim {
            job: Uuid::nil(),
            index: 0,
            seed: 0,
            model: "self-check",
            parameters_sha256: "",
            parent: None,
        };
        let signed = self
            .sign(&png, OutputFormat::Png, &claim)
            .map_err(|e| CredentialsError::SelfCheck(format!("{e} ({PROFILE})")))?;
        let reader = c2pa::Reader::from_shared_context(&self.context)
            .with_stream("image/png", Cursor::new(signed))
            .map_err(|e| CredentialsError::SelfCheck(e.to_string()))?;
        let failures: Vec<String> = reader
            .validation_status()
            .unwrap_or_default()
            .iter()
            .map(|status| status.code().to_string())
            .filter(|code| code != "signingCredential.untrusted")
            .collect();
        if !failures.is_empty() {
            return Err(CredentialsError::SelfCheck(format!(
                "the test manifest does not validate: {}",
                failures.join(", ")
            )));
        }
        Ok(())
    }

    /// `picture` (encoded as `format`) with a signed manifest for `claim` embedded.
    pub fn sign(
        &self,
        picture: &[u8],
        format: OutputFormat,
        claim: &OutputClaim<'_>,
    ) -> Result<Vec<u8>, CredentialsError> {
        let failed = |e: c2pa::Error| CredentialsError::Sign(e.to_string());
        let title = format!("{}-{}.{}", claim.job, claim.index, format.extension());
        let mut builder =
            Builder::from_shared_context(&self.context).with_definition(json!({ "title": title })).map_err(failed)?;
        builder.set_claim_generator_info(generator());
        builder.add_assertion_json(GENERATION_LABEL, &generation_assertion(claim)).map_err(failed)?;
        match claim.parent {
            None => {
                builder.set_intent(BuilderIntent::Create(DigitalSourceType::TrainedAlgorithmicMedia));
                builder.add_action(action("c2pa.created", TRAINED, "generated from a text prompt")).map_err(failed)?;
            }
            Some(parent) => {
                builder.set_intent(BuilderIntent::Edit);
                let ingredient = json!({ "title": "input", "relationship": "parentOf" }).to_string();
                builder
                    .add_ingredient_from_stream(ingredient, parent.media_type, &mut Cursor::new(parent.bytes))
                    .map_err(failed)?;
                builder
                    .add_action(action("c2pa.edited", COMPOSITE, "edited by a diffusion model from a text prompt"))
                    .map_err(failed)?;
            }
        }
        let mut source = Cursor::new(picture);
        let mut signed = Cursor::new(Vec::with_capacity(picture.len() + 16 * 1024));
        builder.sign(self.signer.as_ref(), format.mime(), &mut source, &mut signed).map_err(failed)?;
        Ok(signed.into_inner())
    }
}

/// `denoised` and its version, as a C2PA claim generator or software agent.
fn generator() -> c2pa::ClaimGeneratorInfo {
    let mut info = c2pa::ClaimGeneratorInfo::new(env!("CARGO_PKG_NAME"));
    info.set_version(env!("CARGO_PKG_VERSION"));
    info
}

/// A `c2pa.actions` entry done by denoised.
fn action(name: &str, source_type: &str, description: &str) -> Value {
    json!({
        "action": name,
        "digitalSourceType": source_type,
        "softwareAgent": { "name": env!("CARGO_PKG_NAME"), "version": env!("CARGO_PKG_VERSION") },
        "description": description,
    })
}

/// The [`GENERATION_LABEL`] assertion of `claim`.
fn generation_assertion(claim: &OutputClaim<'_>) -> Value {
    json!({
        "model": claim.model,
        "job": claim.job.to_string(),
        "image_index": claim.index,
        "seed": claim.seed,
        "parameters_sha256": claim.parameters_sha256,
    })
}

/// SHA-256 (lowercase hex) of `params` written as compact JSON with object keys sorted and non-ASCII text as
/// UTF-8: the same bytes Python's `json.dumps(params, sort_keys=True, separators=(",", ":"),
/// ensure_ascii=False)` gives, so a client can recompute it from the job's `params`.
pub fn parameters_sha256(params: &Value) -> String {
    let mut text = String::new();
    write_canonical(params, &mut text);
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root and a signing certificate under it, made for the test, as (chain PEM, key PEM, root PEM).
    fn test_chain() -> (String, String, String) {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
        };
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
        root.distinguished_name.push(DnType::CommonName, "denoised test root");
        root.distinguished_name.push(DnType::OrganizationName, "denoised tests");
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let root_cert = root.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::new(root, root_key);
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "denoised test signer");
        leaf.distinguished_name.push(DnType::OrganizationName, "denoised tests");
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
        leaf.use_authority_key_identifier_extension = true;
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        (leaf_cert.pem(), leaf_key.serialize_pem(), root_cert.pem())
    }

    fn credentials() -> ContentCredentials {
        let (chain, key, _) = test_chain();
        ContentCredentials::from_pem(chain.as_bytes(), key.as_bytes(), SigningAlg::Es256, None).unwrap()
    }

    fn picture(format: OutputFormat) -> Vec<u8> {
        let picture = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 16, y as u8 * 16, 128]));
        crate::engine::image::encode(&picture, format, Some(90)).unwrap()
    }

    fn claim(parent: Option<Parent<'_>>) -> OutputClaim<'_> {
        OutputClaim { job: Uuid::now_v7(), index: 1, seed: 43, model: "tiny-shapes", parameters_sha256: "ab12", parent }
    }

    fn read(format: OutputFormat, bytes: &[u8]) -> c2pa::Reader {
        c2pa::Reader::from_context(c2pa::Context::new())
            .with_stream(format.mime(), Cursor::new(bytes.to_vec()))
            .unwrap()
    }

    #[test]
    fn every_output_format_carries_a_manifest_naming_the_generator_the_model_and_the_source_type() {
        let credentials = credentials();
        for format in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp] {
            let original = picture(format);
            let signed = credentials.sign(&original, format, &claim(None)).unwrap();
            assert!(image::load_from_memory(&signed).is_ok(), "{format:?}: the signed file still decodes");
            let reader = read(format, &signed);
            let manifest = reader.active_manifest().expect("a manifest");
            let generation: Value = manifest.find_assertion(GENERATION_LABEL).unwrap();
            assert_eq!(generation["model"], "tiny-shapes");
            assert_eq!(generation["seed"], 43);
            let json: Value = serde_json::from_str(&reader.json()).unwrap();
            let text = json.to_string();
            assert!(text.contains("trainedAlgorithmicMedia"), "{format:?}: {text}");
            assert!(text.contains("c2pa.created"), "{format:?}");
            let untrusted_only = reader
                .validation_status()
                .unwrap_or_default()
                .iter()
                .all(|status| status.code() == "signingCredential.untrusted");
            assert!(untrusted_only, "{format:?}: {:?}", reader.validation_status());
        }
    }

    #[test]
    fn an_edit_records_its_input_as_the_parent_ingredient_with_the_inputs_own_credentials() {
        let credentials = credentials();
        let input = credentials.sign(&picture(OutputFormat::Png), OutputFormat::Png, &claim(None)).unwrap();
        let parent = Parent::of(&input);
        assert_eq!(parent.media_type, "image/png");
        let signed = credentials.sign(&picture(OutputFormat::Jpeg), OutputFormat::Jpeg, &claim(Some(parent))).unwrap();
        let reader = read(OutputFormat::Jpeg, &signed);
        let manifest = reader.active_manifest().unwrap();
        let ingredients = manifest.ingredients();
        assert_eq!(ingredients.len(), 1);
        assert_eq!(ingredients[0].relationship(), &c2pa::Relationship::ParentOf);
        assert!(ingredients[0].active_manifest().is_some(), "the input's own manifest is kept");
        let text = reader.json();
        assert!(text.contains("c2pa.opened") && text.contains("c2pa.edited"), "{text}");
        assert!(text.contains("compositeWithTrainedAlgorithmicMedia"));
    }

    #[test]
    fn trust_anchors_judge_the_credentials_an_edits_input_brings() {
        let (chain, key, root) = test_chain();
        let judged = |anchors: Option<&[u8]>| {
            let credentials =
                ContentCredentials::from_pem(chain.as_bytes(), key.as_bytes(), SigningAlg::Es256, anchors).unwrap();
            let input = credentials.sign(&picture(OutputFormat::Png), OutputFormat::Png, &claim(None)).unwrap();
            let signed = credentials
                .sign(&picture(OutputFormat::Png), OutputFormat::Png, &claim(Some(Parent::of(&input))))
                .unwrap();
            let trusting = c2pa::Context::new().with_settings(json!({ "trust": { "trust_anchors": root } })).unwrap();
            let reader = c2pa::Reader::from_context(trusting).with_stream("image/png", Cursor::new(signed)).unwrap();
            reader.json()
        };
        assert!(judged(Some(root.as_bytes())).matches("signingCredential.untrusted").next().is_none());
        assert!(
            judged(None).contains("signingCredential.untrusted"),
            "without anchors the input's signer is untrusted"
        );
    }

    #[test]
    fn a_key_that_does_not_belong_to_the_certificate_fails_at_load() {
        let (chain, _, _) = test_chain();
        let (_, other_key, _) = test_chain();
        let err =
            ContentCredentials::from_pem(chain.as_bytes(), other_key.as_bytes(), SigningAlg::Es256, None).unwrap_err();
        assert!(matches!(err, CredentialsError::SelfCheck(_) | CredentialsError::Signer(_)), "{err}");
    }

    #[test]
    fn bytes_that_are_not_the_named_format_fail_to_sign() {
        let credentials = credentials();
        let jpeg = picture(OutputFormat::Jpeg);
        let err = credentials.sign(&jpeg, OutputFormat::Png, &claim(None)).unwrap_err();
        assert!(matches!(err, CredentialsError::Sign(_)), "{err}");
        assert_eq!(Parent::of(b"not a picture").media_type, "application/octet-stream");
    }

    #[test]
    fn missing_files_name_the_field() {
        let config = ContentCredentialsConfig {
            certificate_chain: Some("/nonexistent/chain.pem".into()),
            private_key: Some("/nonexistent/key.pem".into()),
            algorithm: None,
            trust_anchors: None,
        };
        let err = ContentCredentials::load(&config).unwrap_err();
        assert!(err.to_string().contains("content_credentials.certificate_chain"), "{err}");
        assert!(ContentCredentials::load(&ContentCredentialsConfig::default()).unwrap().is_none());
    }

    #[test]
    fn the_parameters_hash_is_of_sorted_compact_json() {
        let params = json!({"steps": 20, "prompt": "un cercle rouge — grand", "guidance_scale": 2.5, "a": [1, {"z": null, "b": true}]});
        let expected =
            r#"{"a":[1,{"b":true,"z":null}],"guidance_scale":2.5,"prompt":"un cercle rouge — grand","steps":20}"#;
        let digest = Sha256::digest(expected.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parameters_sha256(&params), hex);
    }
}
