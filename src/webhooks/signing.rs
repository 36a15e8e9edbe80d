//! Signing secrets and signatures as the Standard Webhooks specification defines them: a secret is `whsec_`
//! followed by the standard base64 of its bytes, and a delivery's `webhook-signature` is `v1,` followed by the
//! base64 of HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}` keyed with those bytes. Any receiver
//! with the secret can check it with a Standard Webhooks library. No I/O beyond the random source.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a secret's text form.
pub const SECRET_PREFIX: &str = "whsec_";

/// Bytes of a secret this server makes (the specification asks for 24 to 64).
const GENERATED_BYTES: usize = 32;

/// The secret lengths the specification allows, in bytes.
const ALLOWED_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// Why a text is not a usable signing secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// It does not start with `whsec_`.
    #[error("a webhook secret starts with `{SECRET_PREFIX}`")]
    Prefix,
    /// What follows the prefix is not standard base64.
    #[error("the part after `{SECRET_PREFIX}` is not standard base64")]
    Base64,
    /// It decodes to too few or too many bytes.
    #[error("a webhook secret must hold 24 to 64 bytes; this one holds {0}")]
    Length(usize),
}

/// A signing secret. Its `Debug` leaves the bytes out, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// A new secret of 32 bytes from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = vec![0u8; GENERATED_BYTES];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// Reads the text form `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text.trim().strip_prefix(SECRET_PREFIX).ok_or(SecretError::Prefix)?;
        let bytes = STANDARD.decode(encoded).map_err(|_| SecretError::Base64)?;
        if !ALLOWED_BYTES.contains(&bytes.len()) {
            return Err(SecretError::Length(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// The text form, `whsec_<base64>`: what operators hand to receivers, and what the database keeps.
    pub fn reveal(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.0))
    }

    /// The `webhook-signature` header value of a message: `v1,` and the base64 HMAC-SHA256 of
    /// `{id}.{timestamp}.{body}`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC takes keys of any length, so `new_from_slice` cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HMAC-SHA256 written out from RFC 2104 over the crate's SHA-256, so the signature is checked against
    /// the formula itself rather than against the `hmac` crate that produced it.
    fn reference_hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        const BLOCK: usize = 64;
        let mut block_key = if key.len() > BLOCK { Sha256::digest(key).to_vec() } else { key.to_vec() };
        block_key.resize(BLOCK, 0);
        let inner_pad: Vec<u8> = block_key.iter().map(|b| b ^ 0x36).collect();
        let outer_pad: Vec<u8> = block_key.iter().map(|b| b ^ 0x5c).collect();
        let inner = Sha256::new().chain_update(&inner_pad).chain_update(message).finalize();
        Sha256::new().chain_update(&outer_pad).chain_update(inner).finalize().to_vec()
    }

    #[test]
    fn signatures_follow_the_specification_formula() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let (id, timestamp, body) = ("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        let expected = format!(
            "v1,{}",
            STANDARD.encode(reference_hmac(
                &STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
                format!("{id}.{timestamp}.{}", std::str::from_utf8(body).unwrap()).as_bytes()
            ))
        );
        assert_eq!(secret.sign(id, timestamp, body), expected);
        // The same message under another id, time or body signs differently.
        assert_ne!(secret.sign("msg_other", timestamp, body), expected);
        assert_ne!(secret.sign(id, timestamp + 1, body), expected);
        assert_ne!(secret.sign(id, timestamp, b"{}"), expected);
    }

    #[test]
    fn the_reference_hmac_matches_rfc_4231_case_2() {
        // RFC 4231 test case 2, so the independent reference above is itself right.
        let mac = reference_hmac(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn secrets_round_trip_and_bad_ones_are_refused() {
        let secret = Secret::generate().unwrap();
        let text = secret.reveal();
        assert!(text.starts_with("whsec_"));
        assert_eq!(Secret::parse(&text).unwrap(), secret);
        assert_ne!(Secret::generate().unwrap(), secret);
        assert!(!format!("{secret:?}").contains(&text[6..]), "Debug must not show the secret");
        assert_eq!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Err(SecretError::Prefix));
        assert_eq!(Secret::parse("whsec_not base64!"), Err(SecretError::Base64));
        assert_eq!(Secret::parse(&format!("whsec_{}", STANDARD.encode([1u8; 16]))), Err(SecretError::Length(16)));
        assert_eq!(Secret::parse(&format!("whsec_{}", STANDARD.encode([1u8; 65]))), Err(SecretError::Length(65)));
        assert!(Secret::parse(&format!("whsec_{}", STANDARD.encode([1u8; 24]))).is_ok());
    }
}
