//! Where checkpoints (and the final model) live. The checkpoint plane is written against
//! `BlobStore`, not against paths: the local filesystem, with every write made durable (temp
//! file, fsync, rename, directory fsync), or an S3-compatible object store (`s3://bucket/prefix`:
//! AWS S3, MinIO, Garage, ...) through `object_store`.

pub mod bucket;
pub mod local;
pub mod s3;

pub use local::LocalStore;
pub use s3::{S3Config, S3Store, S3Url};

use object_store::UpdateVersion;

type Bytes = Vec<u8>;

/// Bytes by key (checkpoints, models, dataset shards), rooted at one location. Keys are
/// `/`-separated. (Named apart from `crate::store`, the SQLite database.)
#[derive(Debug, Clone)]
pub enum BlobStore {
    Local(LocalStore),
    S3(S3Store),
}

impl BlobStore {
    /// Opens the store for a location: a filesystem path, `file://` path or `s3://` URL.
    /// S3 settings come from the environment (`S3_ENDPOINT`, `S3_ACCESS_KEY`, ...): what a
    /// worker gets from the server.
    pub fn open(location: &str) -> anyhow::Result<Self> {
        if S3Url::is_s3(location) {
            return Self::open_with(location, &S3Config::from_env()?);
        }
        Self::open_with(location, &S3Config::default())
    }

    /// Opens the store for a location with explicit S3 settings (the server's).
    pub fn open_with(location: &str, s3: &S3Config) -> anyhow::Result<Self> {
        if S3Url::is_s3(location) {
            return Ok(BlobStore::S3(S3Store::open(location, s3)?));
        }
        if location.contains("://") && !location.starts_with("file://") {
            anyhow::bail!(
                "unsupported location {location:?}: a local path, file:// or s3://bucket/prefix"
            );
        }
        let path = location.strip_prefix("file://").unwrap_or(location);
        Ok(BlobStore::Local(LocalStore::new(path)))
    }

    /// Writes `key` atomically and durably: readers see the old value or the whole new one.
    /// On S3, parts above `s3::MULTIPART_THRESHOLD` go up as a multipart upload.
    pub async fn put(&self, key: &str, data: Bytes) -> std::io::Result<()> {
        match self {
            BlobStore::Local(s) => s.put(key, data).await,
            BlobStore::S3(s) => s.put(key, data).await,
        }
    }

    /// Writes `key` atomically but without waiting for the disk: for hints such as LATEST,
    /// which readers never trust blindly. After a power loss it may hold an older value.
    pub async fn put_hint(&self, key: &str, data: Bytes) -> std::io::Result<()> {
        match self {
            BlobStore::Local(s) => s.put_hint(key, data).await,
            BlobStore::S3(s) => s.put(key, data).await,
        }
    }

    /// Creates `key` durably unless it exists; `Ok(false)` when it did. A store that ignores
    /// conditional writes (Garage) may overwrite instead: callers must not rely on refusal.
    pub async fn put_if_absent(&self, key: &str, data: Bytes) -> std::io::Result<bool> {
        match self {
            BlobStore::Local(s) => s.put_if_absent(key, data).await,
            BlobStore::S3(s) => s.put_if_absent(key, data).await,
        }
    }

    /// The value of `key` and its version (for `put_hint_if`), or None if absent.
    pub async fn get_versioned(
        &self,
        key: &str,
    ) -> std::io::Result<Option<(Bytes, UpdateVersion)>> {
        match self {
            BlobStore::Local(s) => Ok(s.get(key).await?.map(|d| {
                (
                    d,
                    UpdateVersion {
                        e_tag: None,
                        version: None,
                    },
                )
            })),
            BlobStore::S3(s) => s.get_versioned(key).await,
        }
    }

    /// A hint write that only happens if `key` is still at `expected` (absent when None):
    /// compare-and-swap where the store supports it, a plain write elsewhere. `Ok(false)`:
    /// the value changed under us.
    pub async fn put_hint_if(
        &self,
        key: &str,
        data: Bytes,
        expected: Option<UpdateVersion>,
    ) -> std::io::Result<bool> {
        match self {
            // One committer per job writes LATEST, and a rename is atomic.
            BlobStore::Local(s) => s.put_hint(key, data).await.map(|()| true),
            BlobStore::S3(s) => s.put_if_version(key, data, expected).await,
        }
    }

    /// The value of `key`, or None if absent.
    pub async fn get(&self, key: &str) -> std::io::Result<Option<Bytes>> {
        match self {
            BlobStore::Local(s) => s.get(key).await,
            BlobStore::S3(s) => s.get(key).await,
        }
    }

    /// Size of `key` in bytes, or None if absent.
    pub async fn size(&self, key: &str) -> std::io::Result<Option<u64>> {
        match self {
            BlobStore::Local(s) => s.size(key).await,
            BlobStore::S3(s) => s.size(key).await,
        }
    }

    /// Names directly under the root that start with `prefix` (files or directories).
    pub async fn list(&self, prefix: &str) -> std::io::Result<Vec<String>> {
        match self {
            BlobStore::Local(s) => s.list(prefix).await,
            BlobStore::S3(s) => s.list(prefix).await,
        }
    }

    /// Deletes `key` and everything under it.
    pub async fn delete_all(&self, key: &str) -> std::io::Result<()> {
        match self {
            BlobStore::Local(s) => s.delete_all(key).await,
            BlobStore::S3(s) => s.delete_all(key).await,
        }
    }

    /// A human-readable location of `key` (for logs and the API).
    pub fn describe(&self, key: &str) -> String {
        match self {
            BlobStore::Local(s) => s.path(key).display().to_string(),
            BlobStore::S3(s) => s.describe(key),
        }
    }
}
