//! The `api_keys` table: create, list, revoke, and authenticate.

use super::key::{self, GeneratedKey};
use super::Principal;
use crate::jobs::store::{on_read, on_write};
use crate::jobs::time::now_millis;
use crate::jobs::{JobStore, StoreError};

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Names are what operators type: 1 to 64 of `A-Z a-z 0-9 . _ -`.
    #[error("invalid key name `{0}`: use 1 to 64 letters, digits, `.`, `_` or `-`")]
    InvalidName(String),
    /// A live key already has this name.
    #[error("a key named `{0}` already exists")]
    NameTaken(String),
    /// No live key has this name.
    #[error("no key named `{0}`")]
    NotFound(String),
    /// The operating system's random source failed.
    #[error("cannot read random bytes: {0}")]
    Random(#[from] getrandom::Error),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for KeyError {
    fn from(e: sqlx::Error) -> Self {
        KeyError::Store(StoreError::Database(e))
    }
}

/// A key as `denoised keys list` shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Public id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Sees every job.
    pub admin: bool,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds, once revoked.
    pub revoked_at: Option<i64>,
}

/// Handle on the `api_keys` table (shares the job store's connections and backend).
#[derive(Debug, Clone)]
pub struct KeyStore {
    store: JobStore,
}

impl KeyStore {
    /// Uses the database of `store`, which has had the migrations applied.
    pub fn new(store: &JobStore) -> Self {
        Self { store: store.clone() }
    }

    /// Makes a key named `name`; returns the key string, which is shown once and never stored.
    pub async fn create(&self, name: &str, admin: bool) -> Result<(KeyInfo, String), KeyError> {
        let valid = (1..=64).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(KeyError::InvalidName(name.into()));
        }
        let GeneratedKey { key, id, hash } = key::generate()?;
        let created_at = now_millis();
        let result = on_write!(self.store, pool, _d => sqlx::query(
            "INSERT INTO api_keys (id, name, secret_hash, admin, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(name)
        .bind(&hash)
        .bind(i64::from(admin))
        .bind(created_at)
        .execute(pool)
        .await
        .map(|_| ()));
        match result {
            Ok(_) => Ok((KeyInfo { id, name: name.into(), admin, created_at, revoked_at: None }, key)),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(KeyError::NameTaken(name.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Every key, live and revoked, oldest first.
    pub async fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        let rows: Vec<(String, String, i64, i64, Option<i64>)> = on_read!(self.store, pool, _d =>
            sqlx::query_as("SELECT id, name, admin, created_at, revoked_at FROM api_keys ORDER BY created_at, id")
                .fetch_all(pool)
                .await?);
        Ok(rows
            .into_iter()
            .map(|(id, name, admin, created_at, revoked_at)| KeyInfo {
                id,
                name,
                admin: admin != 0,
                created_at,
                revoked_at,
            })
            .collect())
    }

    /// Revokes the live key named `name`: from then on it authenticates nothing (its jobs stay).
    pub async fn revoke(&self, name: &str) -> Result<KeyInfo, KeyError> {
        let row: Option<(String, String, i64, i64, Option<i64>)> = on_write!(self.store, pool, _d => sqlx::query_as(
            "UPDATE api_keys SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL \
             RETURNING id, name, admin, created_at, revoked_at",
        )
        .bind(name)
        .bind(now_millis())
        .fetch_optional(pool)
        .await?);
        let (id, name_, admin, created_at, revoked_at) = row.ok_or_else(|| KeyError::NotFound(name.into()))?;
        Ok(KeyInfo { id, name: name_, admin: admin != 0, created_at, revoked_at })
    }

    /// Whether any live key exists (the server warns at start-up when auth is on and none does).
    pub async fn any_live(&self) -> Result<bool, KeyError> {
        let (n,): (i64,) = on_read!(self.store, pool, _d =>
            sqlx::query_as("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetch_one(pool).await?);
        Ok(n > 0)
    }

    /// Whether the key with this id exists and is not revoked (open event streams re-check their key with it).
    pub async fn is_live(&self, id: &str) -> Result<bool, KeyError> {
        let row: Option<(i64,)> = on_read!(self.store, pool, _d =>
            sqlx::query_as("SELECT CAST(1 AS BIGINT) FROM api_keys WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .fetch_optional(pool)
                .await?);
        Ok(row.is_some())
    }

    /// The caller a key string belongs to; `None` for a malformed, unknown or revoked key.
    pub async fn authenticate(&self, presented: &str) -> Result<Option<Principal>, KeyError> {
        let Some(id) = key::key_id(presented) else { return Ok(None) };
        let row: Option<(String, String, i64)> = on_read!(self.store, pool, _d =>
            sqlx::query_as("SELECT name, secret_hash, admin FROM api_keys WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .fetch_optional(pool)
                .await?);
        let Some((name, hash, admin)) = row else { return Ok(None) };
        if !key::matches(presented, &hash) {
            return Ok(None);
        }
        Ok(Some(Principal { key_id: Some(id.into()), name, admin: admin != 0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn keys() -> (tempfile::TempDir, KeyStore) {
        let dir = tempfile::TempDir::new().unwrap();
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        let store = JobStore::connect(&url).await.unwrap();
        (dir, KeyStore::new(&store))
    }

    #[tokio::test]
    async fn created_keys_authenticate_until_revoked() {
        let (_dir, keys) = keys().await;
        let (info, key) = keys.create("alice", false).await.unwrap();
        let (_, admin_key) = keys.create("ops", true).await.unwrap();
        let alice = keys.authenticate(&key).await.unwrap().unwrap();
        assert_eq!(alice.key_id.as_deref(), Some(info.id.as_str()));
        assert!(!alice.admin);
        assert!(keys.authenticate(&admin_key).await.unwrap().unwrap().admin);
        // Same id, other secret: refused.
        let forged = format!("{}{}", &key[..key.len() - 1], if key.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(keys.authenticate(&forged).await.unwrap(), None);
        assert!(matches!(keys.create("alice", true).await, Err(KeyError::NameTaken(_))));
        assert!(matches!(keys.create("bad name", false).await, Err(KeyError::InvalidName(_))));
        keys.revoke("alice").await.unwrap();
        assert_eq!(keys.authenticate(&key).await.unwrap(), None);
        assert!(matches!(keys.revoke("alice").await, Err(KeyError::NotFound(_))));
        // The name is free again; the list shows both, and never a secret.
        keys.create("alice", false).await.unwrap();
        let list = keys.list().await.unwrap();
        assert_eq!(list.iter().filter(|k| k.name == "alice").count(), 2);
        assert_eq!(list.iter().filter(|k| k.revoked_at.is_some()).count(), 1);
        assert!(keys.any_live().await.unwrap());
    }
}
