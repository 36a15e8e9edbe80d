//! The `api_keys` table: create, list, revoke, and authenticate.

use super::key::{self, GeneratedKey};
use super::Principal;
use crate::jobs::store::{on_read, on_write};
use crate::jobs::time::now_millis;
use crate::jobs::{JobStore, KeyLimits, StoreError};

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
    /// A weight or limit of 0.
    #[error("weight, rate_per_minute and daily_image_steps are at least 1")]
    InvalidLimit,
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

/// Changes to a key's share and limits; `None` leaves a setting as it is (`Some(None)` removes a limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsUpdate {
    /// New weight (at least 1).
    pub weight: Option<u32>,
    /// New submissions per minute, or `Some(None)` for unlimited.
    pub rate_per_minute: Option<Option<u32>>,
    /// New image-steps per 24 hours, or `Some(None)` for unlimited.
    pub daily_image_steps: Option<Option<u64>>,
}

impl LimitsUpdate {
    /// Whether it changes anything.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
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
    /// Its share of the workers and its limits.
    pub limits: KeyLimits,
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
            Ok(_) => {
                let limits = KeyLimits::default();
                Ok((KeyInfo { id, name: name.into(), admin, created_at, revoked_at: None, limits }, key))
            }
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(KeyError::NameTaken(name.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Every key, live and revoked, oldest first.
    pub async fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        let rows: Vec<KeyRow> = on_read!(self.store, pool, _d => sqlx::query_as(concat!(
            "SELECT ", key_columns!(), " FROM api_keys ORDER BY created_at, id"
        ))
        .fetch_all(pool)
        .await?);
        Ok(rows.into_iter().map(KeyInfo::from).collect())
    }

    /// Revokes the live key named `name`: from then on it authenticates nothing (its jobs stay).
    pub async fn revoke(&self, name: &str) -> Result<KeyInfo, KeyError> {
        let row: Option<KeyRow> = on_write!(self.store, pool, _d => sqlx::query_as(concat!(
            "UPDATE api_keys SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL RETURNING ",
            key_columns!()
        ))
        .bind(name)
        .bind(now_millis())
        .fetch_optional(pool)
        .await?);
        row.map(KeyInfo::from).ok_or_else(|| KeyError::NotFound(name.into()))
    }

    /// Changes the live key `name`'s weight and limits (what `update` leaves `None` stays).
    pub async fn set_limits(&self, name: &str, update: LimitsUpdate) -> Result<KeyInfo, KeyError> {
        let zero = update.weight == Some(0)
            || update.rate_per_minute == Some(Some(0))
            || update.daily_image_steps == Some(Some(0));
        if zero {
            return Err(KeyError::InvalidLimit);
        }
        let row: Option<KeyRow> = on_write!(self.store, pool, _d => sqlx::query_as(concat!(
            "UPDATE api_keys SET weight = COALESCE($2, weight), \
                 rate_per_minute = CASE WHEN $3 = 1 THEN $4 ELSE rate_per_minute END, \
                 daily_image_steps = CASE WHEN $5 = 1 THEN $6 ELSE daily_image_steps END \
             WHERE name = $1 AND revoked_at IS NULL RETURNING ",
            key_columns!()
        ))
        .bind(name)
        .bind(update.weight.map(i64::from))
        .bind(i64::from(update.rate_per_minute.is_some()))
        .bind(update.rate_per_minute.flatten().map(i64::from))
        .bind(i64::from(update.daily_image_steps.is_some()))
        .bind(update.daily_image_steps.flatten().map(|d| i64::try_from(d).unwrap_or(i64::MAX)))
        .fetch_optional(pool)
        .await?);
        row.map(KeyInfo::from).ok_or_else(|| KeyError::NotFound(name.into()))
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
        type Row = (String, String, i64, i64, Option<i64>, Option<i64>);
        let row: Option<Row> = on_read!(self.store, pool, _d => sqlx::query_as(
            "SELECT name, secret_hash, admin, weight, rate_per_minute, daily_image_steps FROM api_keys \
             WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?);
        let Some((name, hash, admin, weight, rate, daily)) = row else { return Ok(None) };
        if !key::matches(presented, &hash) {
            return Ok(None);
        }
        let limits = limits_from_row(weight, rate, daily);
        Ok(Some(Principal { key_id: Some(id.into()), name, admin: admin != 0, limits }))
    }
}

/// The columns of `api_keys` that make a [`KeyInfo`].
macro_rules! key_columns {
    () => {
        "id, name, admin, created_at, revoked_at, weight, rate_per_minute, daily_image_steps"
    };
}
use key_columns;

/// An `api_keys` row.
type KeyRow = (String, String, i64, i64, Option<i64>, i64, Option<i64>, Option<i64>);

impl From<KeyRow> for KeyInfo {
    fn from((id, name, admin, created_at, revoked_at, weight, rate, daily): KeyRow) -> Self {
        KeyInfo { id, name, admin: admin != 0, created_at, revoked_at, limits: limits_from_row(weight, rate, daily) }
    }
}

/// A key's limits from its columns (out-of-range values, which the schema's checks prevent, read as the
/// nearest valid one).
fn limits_from_row(weight: i64, rate: Option<i64>, daily: Option<i64>) -> KeyLimits {
    KeyLimits {
        weight: u32::try_from(weight.max(1)).unwrap_or(u32::MAX),
        rate_per_minute: rate.map(|r| u32::try_from(r.max(1)).unwrap_or(u32::MAX)),
        daily_image_steps: daily.map(|d| u64::try_from(d.max(1)).unwrap_or(1)),
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
