//! The `api_keys` table: create, list, update, revoke, and authenticate; and each key's webhook settings
//! (default URL and signing secret).

use sqlx::FromRow;

use super::key::{self, GeneratedKey};
use super::Principal;
use crate::jobs::store::{on_read, on_write};
use crate::jobs::time::now_millis;
use crate::jobs::{JobStore, KeyLimits, StoreError};
use crate::webhooks::Secret;

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

/// A key as `denoised keys list` shows it (never its secrets).
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
    /// Where its jobs' events go when a job names no webhook URL.
    pub webhook_url: Option<String>,
    /// Its share of the workers and its limits.
    pub limits: KeyLimits,
    /// Whether its text-to-image jobs are watermarked unless they say `"watermark": false`.
    pub watermark_on: bool,
    /// Whether it has a watermark secret (its pictures can be detected, even after `--watermark off`).
    pub has_watermark: bool,
}

/// The columns of `api_keys` that make a [`KeyInfo`] (a macro so `concat!` can build static SQL).
macro_rules! key_columns {
    () => {
        "id, name, admin, created_at, revoked_at, webhook_url, weight, rate_per_minute, daily_image_steps, \
         watermark_on, CAST(CASE WHEN watermark_secret IS NULL THEN 0 ELSE 1 END AS BIGINT) AS has_watermark"
    };
}

/// An `api_keys` row as [`key_columns!`] reads it.
#[derive(FromRow)]
struct KeyRow {
    id: String,
    name: String,
    admin: i64,
    created_at: i64,
    revoked_at: Option<i64>,
    webhook_url: Option<String>,
    weight: i64,
    rate_per_minute: Option<i64>,
    daily_image_steps: Option<i64>,
    watermark_on: i64,
    has_watermark: i64,
}

impl From<KeyRow> for KeyInfo {
    fn from(row: KeyRow) -> Self {
        KeyInfo {
            id: row.id,
            name: row.name,
            admin: row.admin != 0,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
            webhook_url: row.webhook_url,
            limits: limits_from_row(row.weight, row.rate_per_minute, row.daily_image_steps),
            watermark_on: row.watermark_on != 0,
            has_watermark: row.has_watermark != 0,
        }
    }
}

/// A key's settings that operators choose (`denoised keys create` and `keys update` options).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySettings {
    /// The default webhook URL of its jobs (checked by the caller: see `crate::webhooks::target`).
    pub webhook_url: Option<String>,
}

/// Changes to a key's settings: `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyChanges {
    /// `Some(None)` removes the default webhook URL; `Some(Some(url))` sets it.
    pub webhook_url: Option<Option<String>>,
}

impl KeyChanges {
    /// Whether nothing would change.
    pub fn is_empty(&self) -> bool {
        self == &KeyChanges::default()
    }
}

/// A key just made: its row, the key string (shown once, never stored) and its webhook signing secret.
#[derive(Debug)]
pub struct CreatedKey {
    /// The row.
    pub info: KeyInfo,
    /// `dn_<id>_<secret>`.
    pub key: String,
    /// Signs its jobs' webhook deliveries; receivers verify with it.
    pub webhook_secret: Secret,
}

/// What a submission needs to know of its key's webhook settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyWebhook {
    /// The key's default URL.
    pub url: Option<String>,
    /// Whether the key has a signing secret (keys made before webhooks have none until rotated).
    pub has_secret: bool,
}

/// A key's watermark, as a submission by that key needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyWatermark {
    /// The secret its ring pattern is derived from (lowercase hex of 32 random bytes).
    pub secret: String,
    /// Whether its jobs are watermarked by default.
    pub on: bool,
}

impl std::fmt::Debug for KeyWatermark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyWatermark").field("secret", &"<redacted>").field("on", &self.on).finish()
    }
}

/// A key whose pictures a detection may test: its id, name and watermark secret.
#[derive(Clone, PartialEq, Eq)]
pub struct WatermarkSecret {
    /// The key's public id.
    pub id: String,
    /// The key's name.
    pub name: String,
    /// The secret.
    pub secret: String,
}

impl std::fmt::Debug for WatermarkSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatermarkSecret").field("id", &self.id).field("name", &self.name).finish()
    }
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
        let created = self.create_with(name, admin, &KeySettings::default()).await?;
        Ok((created.info, created.key))
    }

    /// Makes a key named `name` with `settings` and a new webhook signing secret.
    pub async fn create_with(&self, name: &str, admin: bool, settings: &KeySettings) -> Result<CreatedKey, KeyError> {
        let valid = (1..=64).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(KeyError::InvalidName(name.into()));
        }
        let GeneratedKey { key, id, hash } = key::generate()?;
        let webhook_secret = Secret::generate()?;
        let result: Result<KeyRow, _> = on_write!(self.store, pool, _d => sqlx::query_as(concat!(
            "INSERT INTO api_keys (id, name, secret_hash, admin, created_at, webhook_url, webhook_secret) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING ",
            key_columns!()
        ))
        .bind(&id)
        .bind(name)
        .bind(&hash)
        .bind(i64::from(admin))
        .bind(now_millis())
        .bind(&settings.webhook_url)
        .bind(webhook_secret.reveal())
        .fetch_one(pool)
        .await);
        match result {
            Ok(row) => Ok(CreatedKey { info: row.into(), key, webhook_secret }),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(KeyError::NameTaken(name.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Every key, live and revoked, oldest first.
    pub async fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        let rows: Vec<KeyRow> = on_read!(self.store, pool, _d =>
            sqlx::query_as(concat!("SELECT ", key_columns!(), " FROM api_keys ORDER BY created_at, id"))
                .fetch_all(pool)
                .await?);
        Ok(rows.into_iter().map(KeyInfo::from).collect())
    }

    /// Applies `changes` to the live key named `name` and returns it as it is now.
    pub async fn update(&self, name: &str, changes: &KeyChanges) -> Result<KeyInfo, KeyError> {
        // One CASE per setting: `$n = 1` says whether to change it, the next parameter is its new value.
        let row: Option<KeyRow> = on_write!(self.store, pool, _d => sqlx::query_as(concat!(
            "UPDATE api_keys SET webhook_url = CASE WHEN $2 = 1 THEN $3 ELSE webhook_url END \
             WHERE name = $1 AND revoked_at IS NULL RETURNING ",
            key_columns!()
        ))
        .bind(name)
        .bind(i64::from(changes.webhook_url.is_some()))
        .bind(changes.webhook_url.clone().flatten())
        .fetch_optional(pool)
        .await?);
        row.map(KeyInfo::from).ok_or_else(|| KeyError::NotFound(name.into()))
    }

    /// Gives the live key named `name` a new webhook signing secret (the old one stops signing at once) and
    /// returns it.
    pub async fn rotate_webhook_secret(&self, name: &str) -> Result<(KeyInfo, Secret), KeyError> {
        let secret = Secret::generate()?;
        let row: Option<KeyRow> = on_write!(self.store, pool, _d => sqlx::query_as(concat!(
            "UPDATE api_keys SET webhook_secret = $2 WHERE name = $1 AND revoked_at IS NULL RETURNING ",
            key_columns!()
        ))
        .bind(name)
        .bind(secret.reveal())
        .fetch_optional(pool)
        .await?);
        let info = row.map(KeyInfo::from).ok_or_else(|| KeyError::NotFound(name.into()))?;
        Ok((info, secret))
    }

    /// The webhook settings of the key with id `id` (for a submission by that key); `None` if there is no
    /// such key.
    pub async fn webhook(&self, id: &str) -> Result<Option<KeyWebhook>, KeyError> {
        let row: Option<(Option<String>, i64)> = on_read!(self.store, pool, _d => sqlx::query_as(
            "SELECT webhook_url, CAST(CASE WHEN webhook_secret IS NULL THEN 0 ELSE 1 END AS BIGINT) \
             FROM api_keys WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?);
        Ok(row.map(|(url, has_secret)| KeyWebhook { url, has_secret: has_secret == 1 }))
    }

    /// Turns the live key `name`'s watermark on (making its secret if it has none; an existing secret is
    /// kept, so earlier pictures stay detectable) or off (the secret stays for detection).
    pub async fn set_watermark(&self, name: &str, on: bool) -> Result<KeyInfo, KeyError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        let fresh: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let row: Option<KeyRow> = on_write!(self.store, pool, _d => sqlx::query_as(concat!(
            "UPDATE api_keys SET watermark_on = $2, \
                 watermark_secret = CASE WHEN $2 = 1 THEN COALESCE(watermark_secret, $3) ELSE watermark_secret END \
             WHERE name = $1 AND revoked_at IS NULL RETURNING ",
            key_columns!()
        ))
        .bind(name)
        .bind(i64::from(on))
        .bind(&fresh)
        .fetch_optional(pool)
        .await?);
        row.map(KeyInfo::from).ok_or_else(|| KeyError::NotFound(name.into()))
    }

    /// The watermark of the key with id `id`, if it has a secret.
    pub async fn watermark(&self, id: &str) -> Result<Option<KeyWatermark>, KeyError> {
        let row: Option<(Option<String>, i64)> = on_read!(self.store, pool, _d => sqlx::query_as(
            "SELECT watermark_secret, watermark_on FROM api_keys WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?);
        Ok(row.and_then(|(secret, on)| secret.map(|secret| KeyWatermark { secret, on: on != 0 })))
    }

    /// The keys with a watermark secret, revoked ones included (their pictures stay theirs): every such key,
    /// or only the key with id `only`.
    pub async fn watermark_secrets(&self, only: Option<&str>) -> Result<Vec<WatermarkSecret>, KeyError> {
        let rows: Vec<(String, String, String)> = on_read!(self.store, pool, _d => sqlx::query_as(
            "SELECT id, name, watermark_secret FROM api_keys \
             WHERE watermark_secret IS NOT NULL AND (CAST($1 AS TEXT) IS NULL OR id = $1) ORDER BY created_at, id",
        )
        .bind(only)
        .fetch_all(pool)
        .await?);
        Ok(rows.into_iter().map(|(id, name, secret)| WatermarkSecret { id, name, secret }).collect())
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

    #[tokio::test]
    async fn keys_have_webhook_settings_and_secrets() {
        let (_dir, keys) = keys().await;
        let settings = KeySettings { webhook_url: Some("https://hooks.example.com/a".into()) };
        let created = keys.create_with("alice", false, &settings).await.unwrap();
        assert_eq!(created.info.webhook_url.as_deref(), Some("https://hooks.example.com/a"));
        assert!(created.webhook_secret.reveal().starts_with("whsec_"));
        let id = created.info.id.clone();
        assert_eq!(
            keys.webhook(&id).await.unwrap(),
            Some(KeyWebhook { url: Some("https://hooks.example.com/a".into()), has_secret: true })
        );
        // Changing nothing keeps the URL; `Some(None)` removes it; `Some(url)` sets another.
        assert_eq!(keys.update("alice", &KeyChanges::default()).await.unwrap().webhook_url, settings.webhook_url);
        let cleared = keys.update("alice", &KeyChanges { webhook_url: Some(None) }).await.unwrap();
        assert_eq!(cleared.webhook_url, None);
        let changes = KeyChanges { webhook_url: Some(Some("https://hooks.example.com/b".into())) };
        assert_eq!(
            keys.update("alice", &changes).await.unwrap().webhook_url.as_deref(),
            Some("https://hooks.example.com/b")
        );
        assert!(matches!(keys.update("nobody", &changes).await, Err(KeyError::NotFound(_))));
        // Rotation replaces the secret.
        let (_, rotated) = keys.rotate_webhook_secret("alice").await.unwrap();
        assert_ne!(rotated, created.webhook_secret);
        let stored: (String,) = on_read!(keys.store, pool, _d => sqlx::query_as("SELECT webhook_secret FROM api_keys WHERE id = $1")
            .bind(&id)
            .fetch_one(pool)
            .await
            .unwrap());
        assert_eq!(stored.0, rotated.reveal());
        assert!(matches!(keys.rotate_webhook_secret("nobody").await, Err(KeyError::NotFound(_))));
        assert_eq!(keys.webhook("000000000000").await.unwrap(), None);
        assert_eq!(keys.list().await.unwrap()[0].webhook_url.as_deref(), Some("https://hooks.example.com/b"));
    }

    #[tokio::test]
    async fn watermarks_are_made_once_turned_off_without_losing_the_secret_and_listed_by_scope() {
        let (_dir, keys) = keys().await;
        let (alice, _) = keys.create("alice", false).await.unwrap();
        let (bob, _) = keys.create("bob", false).await.unwrap();
        assert!(!alice.watermark_on && !alice.has_watermark);
        assert_eq!(keys.watermark(&alice.id).await.unwrap(), None);
        let on = keys.set_watermark("alice", true).await.unwrap();
        assert!(on.watermark_on && on.has_watermark);
        let first = keys.watermark(&alice.id).await.unwrap().unwrap();
        assert!(first.on && first.secret.len() == 64);
        assert!(!format!("{first:?}").contains(&first.secret));
        // Off keeps the secret; on again reuses it.
        let off = keys.set_watermark("alice", false).await.unwrap();
        assert!(!off.watermark_on && off.has_watermark);
        keys.set_watermark("alice", true).await.unwrap();
        assert_eq!(keys.watermark(&alice.id).await.unwrap().unwrap().secret, first.secret);
        keys.set_watermark("bob", true).await.unwrap();
        let all = keys.watermark_secrets(None).await.unwrap();
        // Keys made in the same instant list in id order, which is random: compare the names as a set.
        let mut names: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["alice", "bob"]);
        assert_ne!(all[0].secret, all[1].secret);
        let mine = keys.watermark_secrets(Some(&bob.id)).await.unwrap();
        assert_eq!((mine.len(), mine[0].id.as_str()), (1, bob.id.as_str()));
        assert!(matches!(keys.set_watermark("nobody", true).await, Err(KeyError::NotFound(_))));
    }
}
