//! Files under `data_dir`: job outputs (`images/{job}/{index}.{ext}`) and edit inputs
//! (`inputs/{folder}/{name}`), written so that a crash at any moment leaves either no file or a whole one,
//! never a file the database points at but that is half written.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use uuid::Uuid;

/// The folder of stored files and the rules for naming, writing and removing them.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    root: PathBuf,
}

impl ImageFiles {
    /// Files live under `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self { root: data_dir.to_path_buf() }
    }

    /// The path, relative to `data_dir`, where image `index` of `job` is stored.
    pub fn relative_path(job: Uuid, index: u32, extension: &str) -> String {
        format!("images/{job}/{index}.{extension}")
    }

    /// Writes image `index` of `job`; returns the path relative to `data_dir`.
    pub fn write(&self, job: Uuid, index: u32, extension: &str, bytes: &[u8]) -> std::io::Result<String> {
        self.write_atomic(Self::relative_path(job, index, extension), bytes)
    }

    /// Stores an uploaded input (the prepared picture or mask of an edit) under `inputs/{folder}/{name}`.
    /// Returns the path relative to `data_dir`.
    pub fn write_input(&self, folder: Uuid, name: &str, bytes: &[u8]) -> std::io::Result<String> {
        self.write_atomic(format!("inputs/{folder}/{name}"), bytes)
    }

    /// The one crash-safe write: a temporary file beside the target, synced, renamed into place, and the
    /// folder synced.
    fn write_atomic(&self, relative: String, bytes: &[u8]) -> std::io::Result<String> {
        let target = self.root.join(&relative);
        let folder = target.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        fs::create_dir_all(&folder)?;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temporary = folder.join(format!(".{name}.{}.tmp", Uuid::new_v4()));
        {
            let mut file = File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        fs::rename(&temporary, &target)?;
        File::open(&folder)?.sync_all()?;
        Ok(relative)
    }

    /// Reads a stored file by its path relative to `data_dir`.
    pub async fn read(&self, relative: &str) -> std::io::Result<Vec<u8>> {
        let path = self.resolve(relative).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("unsafe stored path `{relative}`"))
        })?;
        tokio::fs::read(&path).await.map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// Removes the temporary files a crash left in the middle of a write (`.NAME.UUID.tmp` in a job's image
    /// folder or an input folder); nothing refers to them. Called at start-up; returns how many went.
    pub fn remove_stray_temporaries(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        for area in ["images", "inputs"] {
            let Ok(folders) = fs::read_dir(self.root.join(area)) else { continue };
            for folder in folders.filter_map(Result::ok).filter(|e| e.path().is_dir()) {
                for file in fs::read_dir(folder.path())?.filter_map(Result::ok) {
                    let name = file.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') && name.ends_with(".tmp") {
                        fs::remove_file(file.path())?;
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Removes the inputs stored under `folder` (missing ones are fine).
    pub fn remove_input(&self, folder: Uuid) -> std::io::Result<()> {
        remove_dir(&self.root.join("inputs").join(folder.to_string()))
    }

    /// Removes the input folder that holds `relative` (an `inputs/{folder}/…` path), if it is one.
    pub fn remove_input_of(&self, relative: &str) -> std::io::Result<()> {
        let mut parts = relative.split('/');
        match (parts.next(), parts.next().and_then(|f| Uuid::parse_str(f).ok())) {
            (Some("inputs"), Some(folder)) => self.remove_input(folder),
            _ => Ok(()),
        }
    }

    /// Resolves a stored relative path, refusing anything that would leave `data_dir`.
    pub fn resolve(&self, relative: &str) -> Option<PathBuf> {
        let path = Path::new(relative);
        if path.components().all(|c| matches!(c, Component::Normal(_))) {
            Some(self.root.join(path))
        } else {
            None
        }
    }

    /// Removes every stored image of `job` (missing ones are fine).
    pub fn remove_job(&self, job: Uuid) -> std::io::Result<()> {
        remove_dir(&self.root.join("images").join(job.to_string()))
    }

    /// Removes everything a job left on disk: its images and, for an edit, its stored inputs. The one place
    /// that knows which files belong to a job (deletion and retention both call it).
    pub fn remove_job_files(&self, job: Uuid, input: Option<&str>) -> std::io::Result<()> {
        if let Some(input) = input {
            self.remove_input_of(input)?;
        }
        self.remove_job(job)
    }
}

fn remove_dir(path: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(folder: &Path) -> usize {
        fs::read_dir(folder)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count()
    }

    #[test]
    fn writes_atomically_and_resolves_safely() {
        let dir = tempfile::tempdir().unwrap();
        let files = ImageFiles::new(dir.path());
        let job = Uuid::now_v7();
        let rel = files.write(job, 0, "png", b"abc").unwrap();
        assert_eq!(rel, format!("images/{job}/0.png"));
        assert_eq!(fs::read(files.resolve(&rel).unwrap()).unwrap(), b"abc");
        assert_eq!(leftovers(&dir.path().join("images").join(job.to_string())), 0);
        assert!(files.resolve("../etc/passwd").is_none());
        assert!(files.resolve("/etc/passwd").is_none());
        files.remove_job(job).unwrap();
        assert!(!dir.path().join("images").join(job.to_string()).exists());
    }

    #[test]
    fn a_job_s_files_go_together() {
        let dir = tempfile::tempdir().unwrap();
        let files = ImageFiles::new(dir.path());
        let (job, folder) = (Uuid::now_v7(), Uuid::new_v4());
        files.write(job, 0, "png", b"out").unwrap();
        let input = files.write_input(folder, "image.png", b"in").unwrap();
        assert_eq!(leftovers(&dir.path().join("inputs").join(folder.to_string())), 0);
        files.remove_job_files(job, Some(&input)).unwrap();
        assert!(!dir.path().join("images").join(job.to_string()).exists());
        assert!(!dir.path().join("inputs").join(folder.to_string()).exists());
        files.remove_job_files(job, Some(&input)).unwrap();
    }

    #[test]
    fn stray_temporaries_are_removed_and_real_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let files = ImageFiles::new(dir.path());
        let job = Uuid::now_v7();
        let kept = files.write(job, 0, "png", b"whole").unwrap();
        let folder = dir.path().join("images").join(job.to_string());
        fs::write(folder.join(format!(".1.png.{}.tmp", Uuid::new_v4())), b"half").unwrap();
        let inputs = dir.path().join("inputs").join(Uuid::new_v4().to_string());
        fs::create_dir_all(&inputs).unwrap();
        fs::write(inputs.join(format!(".image.png.{}.tmp", Uuid::new_v4())), b"half").unwrap();
        assert_eq!(files.remove_stray_temporaries().unwrap(), 2);
        assert_eq!(leftovers(&folder) + leftovers(&inputs), 0);
        assert!(files.resolve(&kept).unwrap().exists());
        assert_eq!(ImageFiles::new(&dir.path().join("nothing")).remove_stray_temporaries().unwrap(), 0);
    }

    #[tokio::test]
    async fn reads_refuse_paths_outside_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let files = ImageFiles::new(dir.path());
        let rel = files.write(Uuid::now_v7(), 1, "png", b"xyz").unwrap();
        assert_eq!(files.read(&rel).await.unwrap(), b"xyz");
        assert_eq!(files.read("../x").await.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    }
}
