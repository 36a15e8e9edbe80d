//! Image files under `data_dir`: written so that a crash at any moment leaves either no file or a whole one,
//! never a file the database points at but that is half written.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use uuid::Uuid;

/// The folder of stored images and the rules for naming and writing them.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    root: PathBuf,
}

impl ImageFiles {
    /// Images live in `data_dir/images/`.
    pub fn new(data_dir: &Path) -> Self {
        Self { root: data_dir.to_path_buf() }
    }

    /// The path, relative to `data_dir`, where image `index` of `job` is stored.
    pub fn relative_path(job: Uuid, index: u32, extension: &str) -> String {
        format!("images/{job}/{index}.{extension}")
    }

    /// Writes `bytes` to a temporary file, syncs it, renames it into place and syncs the folder.
    /// Returns the path relative to `data_dir`.
    pub fn write(&self, job: Uuid, index: u32, extension: &str, bytes: &[u8]) -> std::io::Result<String> {
        let relative = Self::relative_path(job, index, extension);
        let target = self.root.join(&relative);
        let folder = target.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        fs::create_dir_all(&folder)?;
        let temporary = folder.join(format!(".{index}.{extension}.{}.tmp", Uuid::new_v4()));
        {
            let mut file = File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        fs::rename(&temporary, &target)?;
        File::open(&folder)?.sync_all()?;
        Ok(relative)
    }

    /// Stores an uploaded input (the prepared picture or mask of an edit) under `inputs/{folder}/{name}`,
    /// written the same crash-safe way as outputs. Returns the path relative to `data_dir`.
    pub fn write_input(&self, folder: Uuid, name: &str, bytes: &[u8]) -> std::io::Result<String> {
        let relative = format!("inputs/{folder}/{name}");
        let target = self.root.join(&relative);
        let dir = target.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        fs::create_dir_all(&dir)?;
        let temporary = dir.join(format!(".{name}.{}.tmp", Uuid::new_v4()));
        {
            let mut file = File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        fs::rename(&temporary, &target)?;
        File::open(&dir)?.sync_all()?;
        Ok(relative)
    }

    /// Removes the inputs stored under `folder` (best effort).
    pub fn remove_input(&self, folder: Uuid) -> std::io::Result<()> {
        match fs::remove_dir_all(self.root.join("inputs").join(folder.to_string())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
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

    /// Removes every stored image of `job` (best effort).
    pub fn remove_job(&self, job: Uuid) -> std::io::Result<()> {
        match fs::remove_dir_all(self.root.join("images").join(job.to_string())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_resolves_safely() {
        let dir = tempfile::tempdir().unwrap();
        let files = ImageFiles::new(dir.path());
        let job = Uuid::now_v7();
        let rel = files.write(job, 0, "png", b"abc").unwrap();
        assert_eq!(fs::read(files.resolve(&rel).unwrap()).unwrap(), b"abc");
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("images").join(job.to_string()))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        assert!(files.resolve("../etc/passwd").is_none());
        assert!(files.resolve("/etc/passwd").is_none());
        files.remove_job(job).unwrap();
        assert!(!dir.path().join("images").join(job.to_string()).exists());
    }
}
