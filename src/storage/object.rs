//! The bucket backend: blobs as objects in an S3-compatible bucket (AWS S3, MinIO, R2, …) through the
//! `object_store` crate, under an optional key prefix. A single PUT is atomic in S3 — an object is either
//! absent or whole — so a finished [`BucketFiles::put`] gives the promise the folder backend's rename gives.
//! Objects are never half visible, so there are no temporaries to clean up after a crash.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use uuid::Uuid;

use super::StorageError;
use crate::config::S3Config;

/// How long the start-up check may take before the bucket counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The folder, under the prefix, where the start-up check writes (and then deletes) its probe object.
const PROBE_FOLDER: &str = ".denoised-probe";

/// A bucket and the prefix its keys go under. Its `Debug` and `Display` show where it points, never the
/// credentials.
#[derive(Clone)]
pub struct BucketFiles {
    store: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
}

impl BucketFiles {
    /// A client for the bucket `config` names: the `AWS_*` environment variables first, then the keys set in
    /// `[storage.s3]` over them. Nothing is sent yet (see [`BucketFiles::probe`]).
    pub fn new(config: &S3Config) -> Result<Self, StorageError> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&config.bucket);
        if let Some(endpoint) = &config.endpoint {
            // Also as the S3-only endpoint, which `AWS_ENDPOINT_URL_S3` sets and which beats the plain one.
            builder = builder.with_endpoint(endpoint).with_config(AmazonS3ConfigKey::S3Endpoint, endpoint);
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret.expose());
        }
        if config.allow_http {
            builder = builder.with_allow_http(true);
        }
        let store = builder
            .build()
            .map_err(|e| StorageError::Unusable(format!("bucket `{}` cannot be configured: {e}", config.bucket)))?;
        Ok(Self {
            store: Arc::new(store),
            bucket: config.bucket.clone(),
            prefix: config.prefix.trim_matches('/').to_string(),
            endpoint: config.endpoint.clone(),
        })
    }

    /// Checks at start-up that the bucket answers and that these credentials may do what the server does —
    /// write, read, list and delete — with a probe object under `{prefix}/.denoised-probe/`, removed again.
    pub async fn probe(&self) -> Result<(), StorageError> {
        let key = format!("{PROBE_FOLDER}/{}", Uuid::new_v4());
        let check = async {
            self.put(&key, b"probe".to_vec()).await?;
            if self.get(&key).await? != b"probe" {
                return Err(StorageError::Unusable("the probe object read back different bytes".into()));
            }
            let folder = self.location(PROBE_FOLDER)?;
            let listed = self.store.list_with_delimiter(Some(&folder)).await;
            listed.map_err(|e| bucket_error(format!("listing {folder}"), e))?;
            let probe = self.location(&key)?;
            self.store.delete(&probe).await.map_err(|e| bucket_error(format!("deleting {probe}"), e))
        };
        match tokio::time::timeout(PROBE_TIMEOUT, check).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StorageError::Unusable(format!("the image bucket {self} cannot be used: {e}"))),
            Err(_) => Err(StorageError::Unusable(format!(
                "the image bucket {self} did not answer within {} s (endpoint, network or credentials?)",
                PROBE_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Stores `bytes` at `key` in one PUT.
    pub(super) async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        let location = self.location(key)?;
        self.store
            .put(&location, PutPayload::from(bytes))
            .await
            .map_err(|e| bucket_error(format!("storing {location}"), e))?;
        Ok(())
    }

    /// Reads the object at `key`.
    pub(super) async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let location = self.location(key)?;
        let read = async { self.store.get(&location).await?.bytes().await };
        match read.await {
            Ok(bytes) => Ok(Vec::from(bytes)),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound(key.to_string())),
            Err(e) => Err(bucket_error(format!("reading {location}"), e)),
        }
    }

    /// Removes every object whose key lies under `folder` (listed by prefix, then deleted in batches); none
    /// is fine.
    pub(super) async fn remove_folder(&self, folder: &str) -> Result<(), StorageError> {
        let prefix = self.location(folder)?;
        let listed = self.store.list(Some(&prefix)).map_ok(|meta| meta.location).boxed();
        let mut deleted = self.store.delete_stream(listed);
        while let Some(outcome) = deleted.next().await {
            match outcome {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(bucket_error(format!("removing {prefix}"), e)),
            }
        }
        Ok(())
    }

    /// Where `key` lives in the bucket: under the prefix.
    fn location(&self, key: &str) -> Result<Path, StorageError> {
        let full = if self.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.prefix) };
        Path::parse(&full).map_err(|_| StorageError::UnsafeKey(key.to_string()))
    }
}

fn bucket_error(what: String, source: object_store::Error) -> StorageError {
    StorageError::Bucket { what, source: Box::new(source) }
}

impl std::fmt::Display for BucketFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)?;
        if let Some(endpoint) = &self.endpoint {
            write!(f, " at {endpoint}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for BucketFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketFiles")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn config() -> S3Config {
        S3Config {
            bucket: "images".into(),
            prefix: "/denoised/prod/".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("eu-west-1".into()),
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some(Secret::new("very-secret-value")),
            allow_http: true,
        }
    }

    #[test]
    fn keys_go_under_the_prefix_and_unsafe_ones_are_refused() {
        let bucket = BucketFiles::new(&config()).unwrap();
        assert_eq!(bucket.location("images/j/0.png").unwrap().as_ref(), "denoised/prod/images/j/0.png");
        assert!(matches!(bucket.location("images/../x"), Err(StorageError::UnsafeKey(_))));
        let root = BucketFiles::new(&S3Config { prefix: String::new(), ..config() }).unwrap();
        assert_eq!(root.location("inputs/f/mask.png").unwrap().as_ref(), "inputs/f/mask.png");
    }

    #[test]
    fn credentials_never_show() {
        let config = config();
        let bucket = BucketFiles::new(&config).unwrap();
        for shown in [format!("{bucket:?}"), bucket.to_string(), format!("{config:?}")] {
            assert!(!shown.contains("very-secret-value"), "{shown}");
        }
        assert_eq!(bucket.to_string(), "s3://images/denoised/prod at http://127.0.0.1:9");
    }

    #[tokio::test]
    async fn an_unreachable_bucket_fails_the_check_with_its_address() {
        // Port 9 (discard) on loopback: refused at once.
        let error = BucketFiles::new(&config()).unwrap().probe().await.unwrap_err().to_string();
        assert!(error.contains("s3://images/denoised/prod"), "{error}");
    }
}
