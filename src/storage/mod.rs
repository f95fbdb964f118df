//! Where checkpoints (and the final model) live. The checkpoint plane is written against
//! `Store`, not against paths: today the local filesystem, with every write made durable
//! (temp file, fsync, rename, directory fsync); an object-store backend (S3, MinIO) is another
//! variant of the same API.

pub mod local;

pub use local::LocalStore;

type Bytes = Vec<u8>;

/// A checkpoint store rooted at one job's checkpoint location. Keys are `/`-separated.
#[derive(Debug, Clone)]
pub enum Store {
    Local(LocalStore),
}

impl Store {
    /// Opens the store for a location: a filesystem path.
    pub fn open(location: &str) -> anyhow::Result<Self> {
        if location.contains("://") && !location.starts_with("file://") {
            anyhow::bail!("unsupported checkpoint location {location:?}: only local paths for now");
        }
        let path = location.strip_prefix("file://").unwrap_or(location);
        Ok(Store::Local(LocalStore::new(path)))
    }

    /// Writes `key` atomically and durably: readers see the old value or the whole new one.
    pub async fn put(&self, key: &str, data: Bytes) -> std::io::Result<()> {
        match self {
            Store::Local(s) => s.put(key, data).await,
        }
    }

    /// Writes `key` atomically but without waiting for the disk: for hints such as LATEST,
    /// which readers never trust blindly. After a power loss it may hold an older value.
    pub async fn put_hint(&self, key: &str, data: Bytes) -> std::io::Result<()> {
        match self {
            Store::Local(s) => s.put_hint(key, data).await,
        }
    }

    /// The value of `key`, or None if absent.
    pub async fn get(&self, key: &str) -> std::io::Result<Option<Bytes>> {
        match self {
            Store::Local(s) => s.get(key).await,
        }
    }

    /// Size of `key` in bytes, or None if absent.
    pub async fn size(&self, key: &str) -> std::io::Result<Option<u64>> {
        match self {
            Store::Local(s) => s.size(key).await,
        }
    }

    /// Names directly under the root that start with `prefix` (files or directories).
    pub async fn list(&self, prefix: &str) -> std::io::Result<Vec<String>> {
        match self {
            Store::Local(s) => s.list(prefix).await,
        }
    }

    /// Deletes `key` and everything under it.
    pub async fn delete_all(&self, key: &str) -> std::io::Result<()> {
        match self {
            Store::Local(s) => s.delete_all(key).await,
        }
    }

    /// A human-readable location of `key` (for logs and the API).
    pub fn describe(&self, key: &str) -> String {
        match self {
            Store::Local(s) => s.path(key).display().to_string(),
        }
    }
}
