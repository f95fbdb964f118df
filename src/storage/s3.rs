//! The object-store backend (AWS S3, MinIO, Garage, s3s, ...) through `object_store`: a custom
//! endpoint, path-style requests, plain HTTP allowed, retries with exponential backoff.
//!
//! Credentials come from the server's environment (`S3_ACCESS_KEY`, `S3_SECRET_KEY`) and reach
//! workers through their environment only; `S3Config`'s `Debug` never prints the secret.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};

mod retried;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion, WriteMultipart,
};
pub use retried::retryable_responses;

/// Parts larger than this are uploaded in chunks of `MULTIPART_CHUNK` (multipart upload), so a
/// transient error retries one chunk, not the whole part. Smaller parts go up as one PUT: on a
/// filesystem-backed server a multipart upload writes every byte twice (chunks, then the
/// assembled object), which cost ~30% of the throughput in the bench at a 64 MiB threshold.
pub const MULTIPART_THRESHOLD: usize = 128 << 20;
pub const MULTIPART_CHUNK: usize = 16 << 20;
/// Chunks of one multipart upload in flight at once.
const MULTIPART_CONCURRENCY: usize = 4;

/// How to reach the object store. The seed's names: `S3_ENDPOINT`, `S3_ACCESS_KEY`,
/// `S3_SECRET_KEY`, plus `S3_REGION` (default `us-east-1`) and the retry policy
/// (`S3_MAX_RETRIES`, default 10; `S3_RETRY_TIMEOUT_S`, default 60).
#[derive(Clone, PartialEq)]
pub struct S3Config {
    /// e.g. `http://minio:9000`; none means AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub max_retries: usize,
    pub retry_timeout: Duration,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "<redacted>"),
            )
            .field("max_retries", &self.max_retries)
            .field("retry_timeout", &self.retry_timeout)
            .finish()
    }
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: "us-east-1".into(),
            access_key: None,
            secret_key: None,
            max_retries: 10,
            retry_timeout: Duration::from_secs(60),
        }
    }
}

/// The environment names a worker gets (and reads back).
pub const ENV_NAMES: &[&str] = &[
    "S3_ENDPOINT",
    "S3_REGION",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "S3_MAX_RETRIES",
    "S3_RETRY_TIMEOUT_S",
];

impl S3Config {
    /// From the environment (the server's seed env, or a worker's env set by the server).
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut c = S3Config {
            endpoint: var("S3_ENDPOINT"),
            access_key: var("S3_ACCESS_KEY"),
            secret_key: var("S3_SECRET_KEY"),
            ..S3Config::default()
        };
        if let Some(r) = var("S3_REGION") {
            c.region = r;
        }
        if let Some(v) = var("S3_MAX_RETRIES") {
            c.max_retries = v
                .parse()
                .map_err(|e| anyhow::anyhow!("S3_MAX_RETRIES={v:?}: {e}"))?;
        }
        if let Some(v) = var("S3_RETRY_TIMEOUT_S") {
            let s: f64 = v
                .parse()
                .map_err(|e| anyhow::anyhow!("S3_RETRY_TIMEOUT_S={v:?}: {e}"))?;
            if !(s.is_finite() && (0.0..=3600.0).contains(&s)) {
                anyhow::bail!("S3_RETRY_TIMEOUT_S={v:?}: must be between 0 and 3600 seconds");
            }
            c.retry_timeout = Duration::from_secs_f64(s);
        }
        Ok(c)
    }

    /// The environment that lets a worker reach the same store (secrets included: the
    /// environment is the only channel they travel by).
    pub fn worker_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("S3_REGION".to_string(), self.region.clone()),
            ("S3_MAX_RETRIES".to_string(), self.max_retries.to_string()),
            (
                "S3_RETRY_TIMEOUT_S".to_string(),
                self.retry_timeout.as_secs_f64().to_string(),
            ),
        ];
        for (name, value) in [
            ("S3_ENDPOINT", &self.endpoint),
            ("S3_ACCESS_KEY", &self.access_key),
            ("S3_SECRET_KEY", &self.secret_key),
        ] {
            if let Some(v) = value {
                env.push((name.to_string(), v.clone()));
            }
        }
        env
    }
}

/// `s3://bucket/prefix`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub prefix: String,
}

impl S3Url {
    /// Whether `location` is meant for this backend.
    pub fn is_s3(location: &str) -> bool {
        location.starts_with("s3://")
    }

    pub fn parse(location: &str) -> Result<Self, String> {
        let rest = location
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{location:?} is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(format!(
                "{location:?}: the bucket name must be 3 to 63 characters of a-z, 0-9, '-' and '.'"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            Path::parse(prefix).map_err(|e| format!("{location:?}: bad key prefix: {e}"))?;
            if prefix.chars().any(|c| c.is_control()) {
                return Err(format!(
                    "{location:?}: the key prefix has control characters"
                ));
            }
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

/// One prefix of one bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    store: Arc<AmazonS3>,
    url: S3Url,
    root: Path,
}

/// A value together with the version that a conditional put can be made against.
pub type Versioned = (Vec<u8>, UpdateVersion);

impl S3Store {
    pub fn open(location: &str, config: &S3Config) -> anyhow::Result<Self> {
        let url = S3Url::parse(location).map_err(anyhow::Error::msg)?;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&url.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(false)
            // Bulk delete (`POST ?delete`) is not implemented alike by every S3-compatible
            // server (s3s-fs answers 500); single DELETEs are core S3.
            .with_disable_bulk_delete(true)
            .with_http_connector(retried::CountingConnector)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(10),
                    base: 2.0,
                },
                max_retries: config.max_retries,
                retry_timeout: config.retry_timeout,
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let (Some(key), Some(secret)) = (&config.access_key, &config.secret_key) {
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
        }
        let store = builder
            .build()
            .map_err(|e| anyhow::anyhow!("cannot open {location}: {e}"))?;
        let root = Path::from(url.prefix.as_str());
        Ok(S3Store {
            store: Arc::new(store),
            url,
            root,
        })
    }

    /// The underlying store (for tools and tests that list the bucket).
    pub fn inner(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    pub fn path(&self, key: &str) -> Path {
        let mut path = self.root.clone();
        for part in key.split('/').filter(|p| !p.is_empty()) {
            path = path.clone().join(part);
        }
        path
    }

    pub fn describe(&self, key: &str) -> String {
        let path = self.path(key);
        format!("s3://{}/{path}", self.url.bucket)
    }

    pub async fn put(&self, key: &str, data: Vec<u8>) -> io::Result<()> {
        let path = self.path(key);
        if data.len() <= MULTIPART_THRESHOLD {
            self.store
                .put(&path, PutPayload::from(data))
                .await
                .map_err(|e| to_io(e, &self.describe(key)))?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| to_io(e, &self.describe(key)))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_CHUNK);
        let data = bytes_of(data);
        let mut offset = 0;
        while offset < data.len() {
            if let Err(e) = writer.wait_for_capacity(MULTIPART_CONCURRENCY).await {
                let _ = writer.abort().await;
                return Err(to_io(e, &self.describe(key)));
            }
            let end = (offset + MULTIPART_CHUNK).min(data.len());
            writer.put(data.slice(offset..end));
            offset = end;
        }
        writer
            .finish()
            .await
            .map_err(|e| to_io(e, &self.describe(key)))?;
        Ok(())
    }

    /// Creates `key` only if it does not exist. `Ok(false)`: it existed. A store that ignores
    /// conditional writes (Garage) overwrites instead, so callers must tolerate that.
    pub async fn put_if_absent(&self, key: &str, data: Vec<u8>) -> io::Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&self.path(key), PutPayload::from(data.clone()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                self.put(key, data).await.map(|()| true)
            }
            Err(e) => Err(to_io(e, &self.describe(key))),
        }
    }

    /// The value of `key` with its version, or None if absent.
    pub async fn get_versioned(&self, key: &str) -> io::Result<Option<Versioned>> {
        match self.store.get(&self.path(key)).await {
            Ok(res) => {
                let version = UpdateVersion {
                    e_tag: res.meta.e_tag.clone(),
                    version: res.meta.version.clone(),
                };
                let bytes = res
                    .bytes()
                    .await
                    .map_err(|e| to_io(e, &self.describe(key)))?;
                Ok(Some((bytes.to_vec(), version)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(to_io(e, &self.describe(key))),
        }
    }

    /// Compare-and-swap: writes `key` if it is still at `expected` (absent when None).
    /// `Ok(false)`: someone changed it first. Stores without conditional writes just write.
    pub async fn put_if_version(
        &self,
        key: &str,
        data: Vec<u8>,
        expected: Option<UpdateVersion>,
    ) -> io::Result<bool> {
        let mode = match expected {
            Some(v) if v.e_tag.is_some() => PutMode::Update(v),
            Some(_) => PutMode::Overwrite,
            None => PutMode::Create,
        };
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&self.path(key), PutPayload::from(data.clone()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                self.put(key, data).await.map(|()| true)
            }
            Err(e) => Err(to_io(e, &self.describe(key))),
        }
    }

    pub async fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.get_versioned(key).await?.map(|(data, _)| data))
    }

    pub async fn size(&self, key: &str) -> io::Result<Option<u64>> {
        match self.store.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(to_io(e, &self.describe(key))),
        }
    }

    /// Names directly under the root (objects and "directories") starting with `prefix`.
    pub async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let root = (!self.root.as_ref().is_empty()).then_some(&self.root);
        let listing = self
            .store
            .list_with_delimiter(root)
            .await
            .map_err(|e| to_io(e, &self.describe("")))?;
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .chain(listing.objects.iter().map(|o| &o.location))
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Objects directly under the root whose names start with `prefix`, with size and ETag.
    pub async fn list_objects(&self, prefix: &str) -> io::Result<Vec<object_store::ObjectMeta>> {
        let root = (!self.root.as_ref().is_empty()).then_some(&self.root);
        let listing = self
            .store
            .list_with_delimiter(root)
            .await
            .map_err(|e| to_io(e, &self.describe("")))?;
        let mut objects: Vec<_> = listing
            .objects
            .into_iter()
            .filter(|o| o.location.filename().is_some_and(|n| n.starts_with(prefix)))
            .collect();
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    /// The current ETag of the object at `path`.
    pub async fn head_etag(&self, path: &Path) -> io::Result<Option<String>> {
        self.store
            .head(path)
            .await
            .map(|m| m.e_tag)
            .map_err(|e| to_io(e, &format!("s3://{}/{path}", self.url.bucket)))
    }

    /// The whole object at `path` with its ETag.
    pub async fn fetch(&self, path: &Path) -> io::Result<(bytes::Bytes, Option<String>)> {
        let res = self
            .store
            .get(path)
            .await
            .map_err(|e| to_io(e, &format!("s3://{}/{path}", self.url.bucket)))?;
        let etag = res.meta.e_tag.clone();
        let data = res
            .bytes()
            .await
            .map_err(|e| to_io(e, &format!("s3://{}/{path}", self.url.bucket)))?;
        Ok((data, etag))
    }

    /// Deletes `key` and every object under `key/`.
    pub async fn delete_all(&self, key: &str) -> io::Result<()> {
        let path = self.path(key);
        let under: Vec<Path> = self
            .store
            .list(Some(&path))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| to_io(e, &self.describe(key)))?;
        // One DELETE per object (a few per step), a handful at a time.
        let (store, was_prefix) = (&self.store, !under.is_empty());
        let mut deleted = futures_util::stream::iter(under)
            .map(|p| async move { store.delete(&p).await })
            .buffer_unordered(8);
        while let Some(res) = deleted.next().await {
            match res {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(to_io(e, &self.describe(key))),
            }
        }
        if was_prefix {
            // A prefix, not an object.
            return Ok(());
        }
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            // Filesystem-backed servers (s3s-fs) refuse to delete what is only a leftover
            // directory: nothing to delete if no object answers to the key.
            Err(e) => match self.store.head(&path).await {
                Err(object_store::Error::NotFound { .. }) => Ok(()),
                _ => Err(to_io(e, &self.describe(key))),
            },
        }
    }

    /// One cheap request that proves the bucket is reachable with these credentials.
    pub async fn check_access(&self) -> io::Result<()> {
        self.list("").await.map(|_| ())
    }
}

/// Checks at submission that an `s3://` location is reachable with the server's credentials
/// (a no-op for local paths), with a short retry budget so a bad endpoint answers quickly.
pub async fn check_location(location: &str, config: &S3Config) -> Result<(), String> {
    if !S3Url::is_s3(location) {
        return Ok(());
    }
    if config.access_key.is_none() || config.secret_key.is_none() {
        return Err(format!(
            "{location}: this server has no S3 credentials; start it with S3_ACCESS_KEY and \
             S3_SECRET_KEY (and S3_ENDPOINT for MinIO, Garage and other S3-compatible servers)"
        ));
    }
    let quick = S3Config {
        max_retries: config.max_retries.min(2),
        retry_timeout: config.retry_timeout.min(Duration::from_secs(5)),
        ..config.clone()
    };
    let store = S3Store::open(location, &quick).map_err(|e| e.to_string())?;
    store.check_access().await.map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            format!("{e} (check the server's S3_ACCESS_KEY and S3_SECRET_KEY)")
        } else {
            e.to_string()
        }
    })
}

fn bytes_of(data: Vec<u8>) -> bytes::Bytes {
    bytes::Bytes::from(data)
}

/// An `io::Error` whose message names the location and says plainly what went wrong.
pub fn to_io(e: object_store::Error, location: &str) -> io::Error {
    use object_store::Error as E;
    let (kind, what) = match &e {
        E::NotFound { .. } => (io::ErrorKind::NotFound, "not found"),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => (
            io::ErrorKind::PermissionDenied,
            "the S3 server refused the credentials",
        ),
        _ => {
            let text = e.to_string();
            if text.contains("InvalidAccessKeyId")
                || text.contains("SignatureDoesNotMatch")
                || text.contains("AccessDenied")
                || text.contains("403 Forbidden")
            {
                (
                    io::ErrorKind::PermissionDenied,
                    "the S3 server refused the credentials",
                )
            } else if text.contains("NoSuchBucket") {
                (io::ErrorKind::NotFound, "no such bucket")
            } else {
                (io::ErrorKind::Other, "S3 request failed")
            }
        }
    };
    io::Error::new(kind, format!("{location}: {what}: {e}"))
}
