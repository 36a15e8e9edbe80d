//! Stored blobs: job outputs (`images/{job}/{index}.{ext}`) and edit inputs (`inputs/{folder}/{name}`).
//!
//! [`ImageFiles`] is the one door to them, whichever backend keeps them: a local or shared folder under
//! `data_dir` ([`local`]) or an S3-compatible bucket ([`object`]). The database stores each blob's *key*
//! (the relative path above), never a location, so the same rows work with either backend. Both backends
//! keep the same promise: a blob is stored whole before [`ImageFiles`] returns its key, so a row that
//! commits afterwards never points at a missing or half-written blob. This module alone knows how keys are
//! laid out and which keys belong to a job.

mod local;
mod object;

use uuid::Uuid;

pub use local::LocalFiles;
pub use object::BucketFiles;

use crate::config::{StorageBackend, StorageConfig};

/// Why a blob could not be stored, read or removed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No blob has this key.
    #[error("no stored blob `{0}`")]
    NotFound(String),
    /// The key would leave the storage area (`..`, an absolute path, an empty part).
    #[error("unsafe stored key `{0}`")]
    UnsafeKey(String),
    /// A file operation of the local backend failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation and the path.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A request to the bucket failed.
    #[error("{what}: {source}")]
    Bucket {
        /// The operation and the key.
        what: String,
        /// The object store's error.
        source: Box<object_store::Error>,
    },
    /// The bucket cannot be used as configured (checked at start-up).
    #[error("{0}")]
    Unusable(String),
    /// A blocking file task did not finish (it panicked or the runtime is shutting down).
    #[error("a storage task stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The blob store of the server: cheap to clone, shared by the jobs service and the dispatcher.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Local(LocalFiles),
    Bucket(BucketFiles),
}

impl ImageFiles {
    /// Blobs as files under `data_dir`, without the start-up checks of [`ImageFiles::open`] (tests and tools
    /// that open the folder of a server).
    pub fn local(data_dir: &std::path::Path) -> Self {
        Self { backend: Backend::Local(LocalFiles::new(data_dir)) }
    }

    /// The store `config` names, ready for use: a folder is cleared of the temporaries a crash left behind; a
    /// bucket is checked by writing, reading, listing and deleting a probe object, so that a wrong bucket,
    /// endpoint or credential stops the server at start-up instead of failing every job.
    pub async fn open(config: &StorageConfig) -> Result<Self, StorageError> {
        let backend = match (config.backend, &config.s3) {
            (StorageBackend::S3, Some(s3)) => {
                let bucket = BucketFiles::new(s3)?;
                bucket.probe().await?;
                tracing::info!(storage = %bucket, "images are stored in a bucket");
                Backend::Bucket(bucket)
            }
            (StorageBackend::S3, None) => {
                return Err(StorageError::Unusable("storage.backend = \"s3\" needs [storage.s3]".into()));
            }
            (StorageBackend::Local, _) => {
                let files = LocalFiles::new(&config.data_dir);
                let stray = files.remove_stray_temporaries().await?;
                if stray > 0 {
                    tracing::info!(stray, "removed temporary files left by an interrupted write");
                }
                tracing::info!(storage = %config.data_dir.display(), "images are stored in a folder");
                Backend::Local(files)
            }
        };
        Ok(Self { backend })
    }

    /// The key of image `index` of `job`.
    pub fn image_key(job: Uuid, index: u32, extension: &str) -> String {
        format!("images/{job}/{index}.{extension}")
    }

    /// The key of the mask a DiffEdit job computed, beside its images (so it goes with them).
    pub fn mask_key(job: Uuid) -> String {
        format!("images/{job}/mask.png")
    }

    /// Stores the computed mask of `job` whole; returns its key.
    pub async fn write_mask(&self, job: Uuid, bytes: Vec<u8>) -> Result<String, StorageError> {
        self.put(Self::mask_key(job), bytes).await
    }

    /// The key of the input `name` stored under `folder`.
    pub fn input_key(folder: Uuid, name: &str) -> String {
        format!("inputs/{folder}/{name}")
    }

    /// Stores image `index` of `job` whole; returns its key.
    pub async fn write_image(
        &self,
        job: Uuid,
        index: u32,
        extension: &str,
        bytes: Vec<u8>,
    ) -> Result<String, StorageError> {
        self.put(Self::image_key(job, index, extension), bytes).await
    }

    /// Stores an uploaded input (the prepared picture or mask of an edit, the client's latents) under
    /// `inputs/{folder}/{name}` whole; returns its key.
    pub async fn write_input(&self, folder: Uuid, name: &str, bytes: Vec<u8>) -> Result<String, StorageError> {
        self.put(Self::input_key(folder, name), bytes).await
    }

    async fn put(&self, key: String, bytes: Vec<u8>) -> Result<String, StorageError> {
        check_key(&key)?;
        match &self.backend {
            Backend::Local(files) => files.put(&key, bytes).await?,
            Backend::Bucket(bucket) => bucket.put(&key, bytes).await?,
        }
        Ok(key)
    }

    /// Reads a stored blob by its key (as the database recorded it); a key that would leave the storage
    /// area is refused.
    pub async fn read(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(files) => files.get(key).await,
            Backend::Bucket(bucket) => bucket.get(key).await,
        }
    }

    /// Removes the inputs stored under `folder` (missing ones are fine).
    pub async fn remove_input(&self, folder: Uuid) -> Result<(), StorageError> {
        self.remove_folder(&format!("inputs/{folder}")).await
    }

    /// Removes every stored image of `job` (missing ones are fine).
    pub async fn remove_job(&self, job: Uuid) -> Result<(), StorageError> {
        self.remove_folder(&format!("images/{job}")).await
    }

    /// Removes everything a job stored: its images and, for a job with stored inputs, the input folder that
    /// holds `input` (one of its `inputs/{folder}/…` keys). The one place that knows which blobs belong to a
    /// job (deletion and retention both call it).
    pub async fn remove_job_files(&self, job: Uuid, input: Option<&str>) -> Result<(), StorageError> {
        if let Some(folder) = input.and_then(input_folder) {
            self.remove_input(folder).await?;
        }
        self.remove_job(job).await
    }

    async fn remove_folder(&self, folder: &str) -> Result<(), StorageError> {
        match &self.backend {
            Backend::Local(files) => files.remove_folder(folder).await,
            Backend::Bucket(bucket) => bucket.remove_folder(folder).await,
        }
    }
}

/// The folder of an `inputs/{folder}/…` key, if it is one.
fn input_folder(key: &str) -> Option<Uuid> {
    let mut parts = key.split('/');
    match (parts.next(), parts.next().and_then(|f| Uuid::parse_str(f).ok())) {
        (Some("inputs"), Some(folder)) => Some(folder),
        _ => None,
    }
}

/// Refuses keys that could reach outside the storage area: each `/`-separated part must be a plain name
/// (not empty, `.` or `..`, without `\` or NUL). The same rule for every backend.
fn check_key(key: &str) -> Result<(), StorageError> {
    let plain = |part: &str| !part.is_empty() && part != "." && part != ".." && !part.contains(['\\', '\0']);
    if key.split('/').all(plain) {
        Ok(())
    } else {
        Err(StorageError::UnsafeKey(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_plain_relative_paths() {
        let job = Uuid::now_v7();
        assert_eq!(ImageFiles::image_key(job, 2, "png"), format!("images/{job}/2.png"));
        for good in ["images/a/0.png", "inputs/x/image.png", "a"] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in ["../etc/passwd", "/etc/passwd", "a//b", "a/./b", "a/", "", "a\\..\\b", "images/..", "a\0b"] {
            assert!(matches!(check_key(bad), Err(StorageError::UnsafeKey(_))), "{bad:?}");
        }
    }

    #[test]
    fn only_input_keys_name_an_input_folder() {
        let folder = Uuid::new_v4();
        assert_eq!(input_folder(&ImageFiles::input_key(folder, "mask.png")), Some(folder));
        assert_eq!(input_folder(&format!("images/{folder}/0.png")), None);
        assert_eq!(input_folder("inputs/not-a-uuid/image.png"), None);
    }
}
