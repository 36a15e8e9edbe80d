//! The folder backend: blobs as files under `data_dir` (a local disk, or a folder every server mounts),
//! written so that a crash at any moment leaves either no file or a whole one, never a file the database
//! points at but that is half written. File work that syncs runs on tokio's blocking threads.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::StorageError;

/// The folder of stored files and the rules for writing and removing them. Keys reach it checked
/// ([`super::ImageFiles`] refuses any that would leave the folder).
#[derive(Debug, Clone)]
pub struct LocalFiles {
    root: PathBuf,
}

impl LocalFiles {
    /// Files live under `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self { root: data_dir.to_path_buf() }
    }

    /// Writes `bytes` at `key` with [`write_atomic`], off the async threads.
    pub(super) async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        let target = self.root.join(key);
        tokio::task::spawn_blocking(move || {
            write_atomic(&target, &bytes)
                .map_err(|source| StorageError::Io { what: format!("writing {}", target.display()), source })
        })
        .await?
    }

    /// Reads the file at `key`.
    pub(super) async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let path = self.root.join(key);
        tokio::fs::read(&path).await.map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => StorageError::NotFound(key.to_string()),
            _ => StorageError::Io { what: format!("reading {}", path.display()), source },
        })
    }

    /// Removes the folder `folder` (a key prefix) with everything in it; a missing one is fine.
    pub(super) async fn remove_folder(&self, folder: &str) -> Result<(), StorageError> {
        let path = self.root.join(folder);
        tokio::task::spawn_blocking(move || match fs::remove_dir_all(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                Err(StorageError::Io { what: format!("removing {}", path.display()), source })
            }
            _ => Ok(()),
        })
        .await?
    }

    /// Removes the temporary files a crash left in the middle of a write (`.NAME.UUID.tmp` in a job's image
    /// folder or an input folder); nothing refers to them. Called at start-up; returns how many went.
    pub(super) async fn remove_stray_temporaries(&self) -> Result<usize, StorageError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            remove_stray_temporaries(&root).map_err(|source| StorageError::Io {
                what: format!("removing temporary files left by a crash under {}", root.display()),
                source,
            })
        })
        .await?
    }
}

/// The one crash-safe write: a temporary file beside the target, synced, renamed into place, and the folder
/// synced.
fn write_atomic(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let folder = target.parent().ok_or_else(|| std::io::Error::other("a stored file needs a folder"))?;
    fs::create_dir_all(folder)?;
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = folder.join(format!(".{name}.{}.tmp", Uuid::new_v4()));
    {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&temporary, target)?;
    File::open(folder)?.sync_all()
}

/// A temporary file younger than this may be another process's write in progress (a fleet shares one
/// folder), so start-up leaves it; a write takes milliseconds, so an older one was left by a crash.
const STRAY_AGE: std::time::Duration = std::time::Duration::from_secs(600);

fn remove_stray_temporaries(root: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for area in ["images", "inputs"] {
        let Ok(folders) = fs::read_dir(root.join(area)) else { continue };
        for folder in folders.filter_map(Result::ok).filter(|e| e.path().is_dir()) {
            for file in fs::read_dir(folder.path())?.filter_map(Result::ok) {
                let name = file.file_name().to_string_lossy().into_owned();
                let age = file.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                if name.starts_with('.') && name.ends_with(".tmp") && age.is_some_and(|age| age >= STRAY_AGE) {
                    fs::remove_file(file.path())?;
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::super::ImageFiles;
    use super::*;

    /// Writes a temporary file as a crash an hour ago would have left it.
    fn old_temporary(path: &Path) {
        fs::write(path, b"half").unwrap();
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        File::options().write(true).open(path).unwrap().set_modified(an_hour_ago).unwrap();
    }

    fn leftovers(folder: &Path) -> usize {
        fs::read_dir(folder)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count()
    }

    #[tokio::test]
    async fn writes_atomically_and_removes_a_job_s_images() {
        let dir = tempfile::tempdir().unwrap();
        let files = ImageFiles::local(dir.path());
        let job = Uuid::now_v7();
        let key = files.write_image(job, 0, "png", b"abc".to_vec()).await.unwrap();
        assert_eq!(key, format!("images/{job}/0.png"));
        assert_eq!(fs::read(dir.path().join(&key)).unwrap(), b"abc");
        assert_eq!(files.read(&key).await.unwrap(), b"abc");
        assert_eq!(leftovers(&dir.path().join("images").join(job.to_string())), 0);
        files.remove_job(job).await.unwrap();
        assert!(!dir.path().join("images").join(job.to_string()).exists());
        files.remove_job(job).await.unwrap();
    }

    #[tokio::test]
    async fn a_job_s_files_go_together() {
        let dir = tempfile::tempdir().unwrap();
        let files = ImageFiles::local(dir.path());
        let (job, folder) = (Uuid::now_v7(), Uuid::new_v4());
        files.write_image(job, 0, "png", b"out".to_vec()).await.unwrap();
        let input = files.write_input(folder, "image.png", b"in".to_vec()).await.unwrap();
        assert_eq!(input, format!("inputs/{folder}/image.png"));
        assert_eq!(leftovers(&dir.path().join("inputs").join(folder.to_string())), 0);
        files.remove_job_files(job, Some(&input)).await.unwrap();
        assert!(!dir.path().join("images").join(job.to_string()).exists());
        assert!(!dir.path().join("inputs").join(folder.to_string()).exists());
        files.remove_job_files(job, Some(&input)).await.unwrap();
    }

    #[tokio::test]
    async fn stray_temporaries_are_removed_and_real_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let files = ImageFiles::local(dir.path());
        let job = Uuid::now_v7();
        let kept = files.write_image(job, 0, "png", b"whole".to_vec()).await.unwrap();
        let folder = dir.path().join("images").join(job.to_string());
        old_temporary(&folder.join(format!(".1.png.{}.tmp", Uuid::new_v4())));
        let inputs = dir.path().join("inputs").join(Uuid::new_v4().to_string());
        fs::create_dir_all(&inputs).unwrap();
        old_temporary(&inputs.join(format!(".image.png.{}.tmp", Uuid::new_v4())));
        // Another process's write in progress, in a folder the fleet shares: kept.
        let in_flight = folder.join(format!(".2.png.{}.tmp", Uuid::new_v4()));
        fs::write(&in_flight, b"being written").unwrap();
        assert_eq!(LocalFiles::new(dir.path()).remove_stray_temporaries().await.unwrap(), 2);
        assert_eq!(leftovers(&folder) + leftovers(&inputs), 1);
        assert!(in_flight.exists());
        assert!(dir.path().join(&kept).exists());
        assert_eq!(LocalFiles::new(&dir.path().join("nothing")).remove_stray_temporaries().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn opening_a_folder_removes_stray_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("images").join(Uuid::now_v7().to_string());
        fs::create_dir_all(&folder).unwrap();
        old_temporary(&folder.join(format!(".0.png.{}.tmp", Uuid::new_v4())));
        let config = crate::config::StorageConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
        ImageFiles::open(&config).await.unwrap();
        assert_eq!(leftovers(&folder), 0);
    }

    #[tokio::test]
    async fn reads_refuse_paths_outside_the_data_dir_and_name_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("secret"), b"no").unwrap();
        let files = ImageFiles::local(&dir.path().join("data"));
        let key = files.write_image(Uuid::now_v7(), 1, "png", b"xyz".to_vec()).await.unwrap();
        assert_eq!(files.read(&key).await.unwrap(), b"xyz");
        assert!(matches!(files.read("../secret").await, Err(StorageError::UnsafeKey(_))));
        assert!(matches!(files.read("/etc/passwd").await, Err(StorageError::UnsafeKey(_))));
        let missing = format!("images/{}/0.png", Uuid::now_v7());
        assert!(matches!(files.read(&missing).await, Err(StorageError::NotFound(k)) if k == missing));
    }
}
