//! The local filesystem backend. Each write goes to a temp file in the same directory, is
//! fsynced, renamed over the final name, and the directory is fsynced, so a crash at any
//! instant leaves either the old file or the complete new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: root.into() }
    }

    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub async fn put(&self, key: &str, data: Vec<u8>) -> io::Result<()> {
        let path = self.path(key);
        blocking(move || write_durable(&path, &data)).await
    }

    /// Durable create-if-absent: the temp file is hard-linked to the final name, which fails
    /// if the name exists. `Ok(false)`: it existed.
    pub async fn put_if_absent(&self, key: &str, data: Vec<u8>) -> io::Result<bool> {
        let path = self.path(key);
        blocking(move || create_durable(&path, &data)).await
    }

    pub async fn put_hint(&self, key: &str, data: Vec<u8>) -> io::Result<()> {
        let path = self.path(key);
        blocking(move || write_atomic(&path, &data, false)).await
    }

    /// A file ranks wrote (checkpoint parts, the model): no symlink below the root is followed
    /// and only a regular file is read, so a rank cannot make the server read a device, a FIFO
    /// or a file outside the checkpoint dir.
    pub async fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        let root = self.root.clone();
        let key = key.to_string();
        blocking(move || match read_beneath(&root, &key) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    pub async fn size(&self, key: &str) -> io::Result<Option<u64>> {
        // Only a file's own metadata, not its target's: never blocks and never reads.
        let path = self.path(key);
        blocking(move || match fs::symlink_metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    pub async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            let entries = match fs::read_dir(&root) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut names: Vec<String> = entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect();
            names.sort();
            Ok(names)
        })
        .await
    }

    pub async fn delete_all(&self, key: &str) -> io::Result<()> {
        let path = self.path(key);
        blocking(move || {
            let res = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match res {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

/// Creates `dir` and any missing parents, fsyncing each parent whose entry changed.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Writes `data` to `path` via a temp file, fsync, rename, directory fsync.
pub fn write_durable(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic(path, data, true)
}

/// Temp file and rename (readers see the old or the whole new file); with `durable`, the file
/// and the directory are fsynced too.
fn write_atomic(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    let (dir, tmp) = temp_beside(path)?;
    let result = (|| {
        write_new(&tmp, data, durable)?;
        fs::rename(&tmp, path)?;
        if durable {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        undo_dir(path);
    }
    result
}

/// After a failed write of `path`: removes its directory if it is empty, whoever created it
/// (two ranks writing parts of one step race to create it, and the one that did may fail
/// first, while the other's temp file is still there): a full disk must not leave one empty
/// step directory per failed checkpoint.
fn undo_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let _ = fs::remove_dir(dir);
    }
}

/// Like `write_durable`, but refuses to replace an existing file (`Ok(false)`).
fn create_durable(path: &Path, data: &[u8]) -> io::Result<bool> {
    let (dir, tmp) = temp_beside(path)?;
    let result = (|| {
        write_new(&tmp, data, true)?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(e),
        }
        sync_dir(dir)?;
        Ok(true)
    })();
    let _ = fs::remove_file(&tmp);
    if result.is_err() {
        undo_dir(path);
    }
    result
}

/// The (durably created) parent directory of `path` and a fresh temp file name in it.
fn temp_beside(path: &Path) -> io::Result<(&Path, std::path::PathBuf)> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    create_dir_durable(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad file name"))?;
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), unique()));
    Ok((dir, tmp))
}

/// Writes a new file (never an existing one), fsynced when `sync`.
fn write_new(path: &Path, data: &[u8], sync: bool) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(data)?;
    if sync {
        file.sync_all()?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn read_beneath(root: &Path, key: &str) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = crate::untrusted::open_beneath(root, Path::new(key))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok(data)
}
