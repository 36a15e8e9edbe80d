//! Making, parsing and checking key strings. No I/O.

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "dn_";
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;

/// A freshly made key: the string to hand to its user once, and what the database keeps. Its `Debug` leaves
/// the key out, so it cannot reach a log by accident.
pub struct GeneratedKey {
    /// `dn_<id>_<secret>`: shown once, never stored.
    pub key: String,
    /// The public id.
    pub id: String,
    /// Lowercase hex SHA-256 of `key`.
    pub hash: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey").field("id", &self.id).field("key", &"<redacted>").finish()
    }
}

/// Makes a key from the operating system's CSPRNG.
pub fn generate() -> Result<GeneratedKey, getrandom::Error> {
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut id)?;
    getrandom::fill(&mut secret)?;
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let key = format!("{PREFIX}{id}_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
    let hash = hash(&key);
    Ok(GeneratedKey { key, id, hash })
}

/// The public id of a well-formed key string, or `None` for anything that cannot be a key.
pub fn key_id(key: &str) -> Option<&str> {
    let (id, secret) = key.strip_prefix(PREFIX)?.split_once('_')?;
    let well_formed = id.len() == 2 * ID_BYTES
        && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && secret.len() == 43
        && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    well_formed.then_some(id)
}

/// Lowercase hex SHA-256 of a key string.
pub fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `key` hashes to `stored`, compared in constant time.
pub fn matches(key: &str, stored: &str) -> bool {
    hash(key).as_bytes().ct_eq(stored.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_match_only_their_own_hash() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a.key, b.key);
        assert_eq!(key_id(&a.key), Some(a.id.as_str()));
        assert!(matches(&a.key, &a.hash));
        assert!(!matches(&b.key, &a.hash));
        assert!(!a.hash.contains(&a.key) && a.hash.len() == 64);
        assert!(!format!("{a:?}").contains(&a.key), "Debug must not show the key");
    }

    #[test]
    fn malformed_keys_have_no_id() {
        let good = generate().unwrap().key;
        for bad in ["", "dn_", "sk-123", &good[..good.len() - 1], &good.replacen("dn_", "xx_", 1), &good.to_uppercase()]
        {
            assert_eq!(key_id(bad), None, "{bad}");
        }
        let mut extra = good.clone();
        extra.push('x');
        assert_eq!(key_id(&extra), None);
    }
}
