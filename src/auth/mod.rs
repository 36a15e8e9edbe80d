//! API keys: who is calling, and which jobs they may see.
//!
//! A key is `dn_<id>_<secret>`. The `id` is public (it is what `jobs.owner` records and what logs may show);
//! the database keeps only a SHA-256 of the whole key, compared in constant time. Keys are 256-bit random
//! strings, so a fast hash is the right one: there is nothing to brute-force that a slow hash would protect.

mod key;
mod store;

pub use key::{generate, key_id, GeneratedKey};
pub use store::{
    CreatedKey, KeyChanges, KeyError, KeyInfo, KeySettings, KeyStore, KeyWatermark, KeyWebhook, LimitsUpdate,
    WatermarkSecret,
};

/// The caller of one request, as the authentication layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's public id; `None` when authentication is off.
    pub key_id: Option<String>,
    /// The key's name (for logs), or `anonymous`.
    pub name: String,
    /// Admin keys see every job (and `/metrics`).
    pub admin: bool,
    /// The key's share and limits (none when authentication is off).
    pub limits: crate::jobs::KeyLimits,
}

impl Principal {
    /// The caller when `[auth] enabled = false`: everyone is trusted and sees everything.
    pub fn anonymous() -> Self {
        Self { key_id: None, name: "anonymous".into(), admin: true, limits: crate::jobs::KeyLimits::default() }
    }

    /// What new jobs record as their owner.
    pub fn owner(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// Whether this caller may see a job owned by `owner`.
    pub fn can_see(&self, owner: Option<&str>) -> bool {
        self.admin || (self.key_id.is_some() && self.key_id.as_deref() == owner)
    }

    /// The owner to filter listings by: `None` (everything) for admins.
    pub fn list_scope(&self) -> Option<&str> {
        if self.admin {
            None
        } else {
            self.key_id.as_deref()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_see_only_their_own_jobs_and_admins_see_all() {
        let alice =
            Principal { key_id: Some("a1".into()), name: "alice".into(), admin: false, limits: Default::default() };
        assert!(alice.can_see(Some("a1")));
        assert!(!alice.can_see(Some("b2")));
        assert!(!alice.can_see(None));
        assert_eq!(alice.list_scope(), Some("a1"));
        let admin =
            Principal { key_id: Some("c3".into()), name: "ops".into(), admin: true, limits: Default::default() };
        assert!(admin.can_see(Some("a1")) && admin.can_see(None));
        assert_eq!(admin.list_scope(), None);
        assert!(Principal::anonymous().can_see(Some("a1")));
        assert_eq!(Principal::anonymous().owner(), None);
    }
}
