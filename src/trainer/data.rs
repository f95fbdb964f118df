//! Datasets: the generator behind `make-dataset`, and a rank's deterministic stream of
//! examples over the shard files it owns (shard `i` belongs to rank `i mod world_size`).

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::model::Example;
use super::rng::SplitMix64;
use crate::storage::{S3Config, S3Store, S3Url};

#[derive(Debug, Clone)]
pub struct DatasetParams {
    pub shards: usize,
    pub rows_per_shard: usize,
    pub features: usize,
    pub classes: usize,
    pub seed: u64,
    /// Fraction of labels replaced by a random class.
    pub label_noise: f64,
    pub test_rows: usize,
}

impl Default for DatasetParams {
    fn default() -> Self {
        DatasetParams {
            shards: 8,
            rows_per_shard: 10_000,
            features: 32,
            classes: 4,
            seed: 42,
            label_noise: 0.03,
            test_rows: 5_000,
        }
    }
}

impl DatasetParams {
    /// A dataset small enough to train in a second: 4 shards × 400 rows, 8 features, 3
    /// classes (what `trainvisor validate` and the tests use).
    pub fn small() -> Self {
        DatasetParams {
            shards: 4,
            rows_per_shard: 400,
            features: 8,
            classes: 3,
            seed: 7,
            label_noise: 0.02,
            test_rows: 500,
        }
    }
}

/// Writes `shard-00000.jsonl` … and `test.jsonl` into `out`: features drawn from N(0, 1),
/// labels from a fixed random linear teacher, a fraction of them replaced at random. The
/// same parameters always give the same bytes. Files are written to temp names and renamed,
/// so a half-written dataset is never mistaken for a whole one.
pub fn make_dataset(out: &Path, p: &DatasetParams) -> anyhow::Result<()> {
    if p.shards == 0 || p.features == 0 || p.classes < 2 {
        bail!("need at least one shard, one feature and two classes");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut teacher_rng = SplitMix64::new(p.seed);
    let teacher: Vec<f64> = (0..p.classes * p.features)
        .map(|_| teacher_rng.normal())
        .collect();
    let mut files: Vec<(String, usize)> = (0..p.shards)
        .map(|i| (format!("shard-{i:05}.jsonl"), p.rows_per_shard))
        .collect();
    files.push(("test.jsonl".to_string(), p.test_rows));
    for (index, (name, rows)) in files.iter().enumerate() {
        // Each file has its own stream, so shards can be regenerated independently.
        let mut rng = SplitMix64::new(
            p.seed
                .wrapping_mul(1_000_003)
                .wrapping_add(index as u64 + 1),
        );
        let mut text = String::with_capacity(rows * p.features * 10);
        for _ in 0..*rows {
            let x: Vec<f64> = (0..p.features)
                .map(|_| (rng.normal() * 1e4).round() / 1e4)
                .collect();
            let mut y = (0..p.classes)
                .map(|k| {
                    let w = &teacher[k * p.features..(k + 1) * p.features];
                    w.iter().zip(&x).map(|(a, b)| a * b).sum::<f64>()
                })
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(k, _)| k)
                .unwrap_or(0);
            if rng.next_f64() < p.label_noise {
                y = rng.below(p.classes as u64) as usize;
            }
            text.push_str("{\"x\":[");
            for (j, v) in x.iter().enumerate() {
                if j > 0 {
                    text.push(',');
                }
                let _ = write!(text, "{v}");
            }
            let _ = writeln!(text, "],\"y\":{y}}}");
        }
        write_file(&out.join(name), text.as_bytes())?;
    }
    let meta = serde_json::json!({
        "features": p.features, "classes": p.classes, "shards": p.shards,
        "rows_per_shard": p.rows_per_shard, "seed": p.seed, "label_noise": p.label_noise,
    });
    write_file(&out.join(META), (meta.to_string() + "\n").as_bytes())
}

/// Makes the demo dataset and uploads it to `location` (`s3://...`) unless shards are there.
pub async fn upload_demo_if_empty(location: &str, s3: &S3Config) -> anyhow::Result<()> {
    let store = crate::storage::BlobStore::open_with(location, s3)?;
    if !store.list("shard-").await?.is_empty() {
        return Ok(());
    }
    let tmp = std::env::temp_dir().join(format!(
        "trainvisor-demo-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    let dir = tmp.clone();
    tokio::task::spawn_blocking(move || make_dataset(&dir, &DatasetParams::default())).await??;
    let result = upload_dir(&tmp, &store).await;
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Uploads the files of a dataset directory (shards last but `dataset.json` first, so a
/// reader never sees shards without their description).
pub async fn upload_dir(dir: &Path, store: &crate::storage::BlobStore) -> anyhow::Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort_by_key(|n| (n != META, n.clone()));
    for name in names {
        let data = std::fs::read(dir.join(&name))?;
        store
            .put(&name, data)
            .await
            .with_context(|| format!("uploading {name} to {}", store.describe("")))?;
    }
    Ok(())
}

/// Describes a generated dataset: `{"features": F, "classes": C, ...}`.
pub const META: &str = "dataset.json";

fn write_file(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Features and classes of a dataset: from `dataset.json`, else from every shard's records
/// (every rank reads the same files, so every rank agrees).
pub fn shape(dir: &Path) -> anyhow::Result<(usize, usize)> {
    if let Ok(raw) = std::fs::read(dir.join(META)) {
        let v: serde_json::Value = serde_json::from_slice(&raw)?;
        if let (Some(f), Some(c)) = (v["features"].as_u64(), v["classes"].as_u64()) {
            return Ok((f as usize, c as usize));
        }
    }
    let (mut features, mut classes) = (0, 0);
    for f in shard_files(dir)? {
        for e in read_examples(&f)? {
            features = features.max(e.x.len());
            classes = classes.max(e.y + 1);
        }
    }
    Ok((features, classes.max(2)))
}

/// Sorted `shard-*.jsonl` files of a dataset directory.
pub fn shard_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading dataset dir {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("shard-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Whether `dir` holds no shard files (missing counts as empty).
pub fn is_empty(dir: &Path) -> bool {
    shard_files(dir).map(|f| f.is_empty()).unwrap_or(true)
}

pub fn read_examples(path: &Path) -> anyhow::Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

/// Counts the records of a shard without parsing them.
pub fn count_lines(path: &Path) -> anyhow::Result<usize> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(data
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count())
}

/// Where a rank is in its stream: which of its shards (`pos` in its own list, `shard_idx` in
/// the dataset), which line, which pass over its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub pos: usize,
    pub shard_idx: usize,
    pub line_idx: usize,
}

/// A dataset location: a local directory, or an S3 prefix whose shards are fetched on demand
/// into a local cache keyed by each object's ETag (reused across restarts and jobs; an object
/// that changed has a new ETag and is fetched again).
pub enum Dataset {
    Local(PathBuf),
    S3 { store: S3Store, cache: PathBuf },
}

/// One shard file of a dataset, not yet read.
#[derive(Debug, Clone)]
pub struct Shard {
    pub name: String,
    source: ShardSource,
}

#[derive(Debug, Clone)]
enum ShardSource {
    Local(PathBuf),
    S3 {
        path: object_store::path::Path,
        size: u64,
        etag: Option<String>,
    },
}

impl Dataset {
    /// A path or `s3://bucket/prefix`. S3 settings come from the environment (a worker's);
    /// fetched shards go under `cache`.
    pub fn open(location: &str, cache: &Path) -> anyhow::Result<Self> {
        if S3Url::is_s3(location) {
            let store = S3Store::open(location, &S3Config::from_env()?)?;
            return Ok(Dataset::S3 {
                store,
                cache: cache.join("datasets"),
            });
        }
        let path = location.strip_prefix("file://").unwrap_or(location);
        Ok(Dataset::Local(PathBuf::from(path)))
    }

    pub fn describe(&self) -> String {
        match self {
            Dataset::Local(dir) => dir.display().to_string(),
            Dataset::S3 { store, .. } => store.describe(""),
        }
    }

    /// The sorted `shard-*.jsonl` files (listed, not read).
    pub async fn shards(&self) -> anyhow::Result<Vec<Shard>> {
        match self {
            Dataset::Local(dir) => Ok(shard_files(dir)?
                .into_iter()
                .map(|p| Shard {
                    name: file_name(&p),
                    source: ShardSource::Local(p),
                })
                .collect()),
            Dataset::S3 { store, .. } => Ok(store
                .list_objects("shard-")
                .await
                .with_context(|| format!("listing the dataset {}", self.describe()))?
                .into_iter()
                .filter_map(|o| {
                    let name = o.location.filename()?.to_string();
                    name.ends_with(".jsonl").then_some(Shard {
                        name,
                        source: ShardSource::S3 {
                            path: o.location,
                            size: o.size,
                            etag: o.e_tag,
                        },
                    })
                })
                .collect()),
        }
    }

    /// `dataset.json`, if the dataset has one.
    async fn meta(&self) -> anyhow::Result<Option<serde_json::Value>> {
        let raw = match self {
            Dataset::Local(dir) => std::fs::read(dir.join(META)).ok(),
            Dataset::S3 { store, .. } => store.get(META).await?,
        };
        Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()))
    }

    /// Features and classes: from `dataset.json`, else from every shard's records (every rank
    /// reads the same files, so every rank agrees).
    pub async fn shape(&self, shards: &[Shard]) -> anyhow::Result<(usize, usize)> {
        if let Some(v) = self.meta().await?
            && let (Some(f), Some(c)) = (v["features"].as_u64(), v["classes"].as_u64())
        {
            return Ok((f as usize, c as usize));
        }
        let (mut features, mut classes) = (0, 0);
        for shard in shards {
            for e in self.load(shard).await? {
                features = features.max(e.x.len());
                classes = classes.max(e.y + 1);
            }
        }
        Ok((features, classes.max(2)))
    }

    /// Records in a shard: counted locally; on S3 taken from `dataset.json` when it says
    /// (so counting fetches nothing), else the shard is fetched and counted.
    pub async fn count_rows(&self, shard: &Shard) -> anyhow::Result<usize> {
        if let Dataset::S3 { .. } = self
            && let Some(v) = self.meta().await?
            && let Some(rows) = v["rows_per_shard"].as_u64()
        {
            return Ok(rows as usize);
        }
        count_lines(&self.local_file(shard).await?)
    }

    /// The shard's records.
    pub async fn load(&self, shard: &Shard) -> anyhow::Result<Vec<Example>> {
        read_examples(&self.local_file(shard).await?)
    }

    /// A local file with the shard's bytes: the file itself, or the cached copy of the object
    /// (fetched now if the cache has no copy with the object's current ETag).
    pub async fn local_file(&self, shard: &Shard) -> anyhow::Result<PathBuf> {
        let (store, cache) = match self {
            Dataset::Local(_) => match &shard.source {
                ShardSource::Local(p) => return Ok(p.clone()),
                ShardSource::S3 { .. } => bail!("shard {} is not local", shard.name),
            },
            Dataset::S3 { store, cache } => (store, cache),
        };
        let ShardSource::S3 { path, size, etag } = &shard.source else {
            bail!("shard {} is not in object storage", shard.name);
        };
        let dir = cache.join(cache_key(&store.describe(""), &shard.name));
        // Some servers (s3s-fs) list objects without their ETags: ask for it.
        let etag = match etag {
            Some(e) => Some(e.clone()),
            None => store
                .head_etag(path)
                .await
                .with_context(|| format!("looking up shard {}", shard.name))?,
        };
        if let Some(etag) = &etag {
            let cached = dir.join(format!("{}.jsonl", etag_file_name(etag)));
            if std::fs::metadata(&cached).is_ok_and(|m| m.len() == *size) {
                println!("dataset: {} from the cache (ETag {etag})", shard.name);
                return Ok(cached);
            }
        }
        let (data, fetched_etag) = store
            .fetch(path)
            .await
            .with_context(|| format!("fetching shard {}", shard.name))?;
        let tag = fetched_etag
            .as_deref()
            .map(etag_file_name)
            .unwrap_or_else(|| format!("sha256-{}", crate::checkpoint::sha256_hex(&data)));
        let file = dir.join(format!("{tag}.jsonl"));
        let len = data.len();
        let (dir2, file2) = (dir.clone(), file.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            std::fs::create_dir_all(&dir2)?;
            write_file(&file2, &data)?;
            // Older versions of this object are stale now.
            for entry in std::fs::read_dir(&dir2)?.flatten() {
                if entry.path() != file2 {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            Ok(())
        })
        .await??;
        println!(
            "dataset: {} fetched from {} ({len} bytes, ETag {})",
            shard.name,
            store.describe(&shard.name),
            fetched_etag.as_deref().unwrap_or("none")
        );
        Ok(file)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string()
}

/// One cache directory per object: a hash of its full location.
fn cache_key(root: &str, name: &str) -> String {
    let digest = crate::checkpoint::sha256_hex(format!("{root}/{name}").as_bytes());
    format!("{}-{}", &digest[..16], name.trim_end_matches(".jsonl"))
}

/// An ETag as a file name: quotes dropped, anything unusual hashed.
fn etag_file_name(etag: &str) -> String {
    let t = etag.trim_matches('"');
    if !t.is_empty() && t.len() <= 100 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        t.to_string()
    } else {
        format!("h{}", &crate::checkpoint::sha256_hex(etag.as_bytes())[..32])
    }
}

/// A rank's examples, in order, wrapping to the start for the next epoch. Shards are read
/// when the stream reaches them (`prepare`), not up front.
pub struct RankStream {
    shards: Vec<(usize, Shard, Option<Vec<Example>>)>,
    pub cursor: Cursor,
}

impl RankStream {
    /// The shards of `rank` among `all` (round-robin), none read yet.
    pub fn new(
        all: Vec<Shard>,
        rank: usize,
        world_size: usize,
        where_: &str,
    ) -> anyhow::Result<Self> {
        let count = all.len();
        let shards: Vec<_> = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % world_size == rank)
            .map(|(i, s)| (i, s, None))
            .collect();
        if shards.is_empty() {
            bail!(
                "rank {rank} has no data: {count} shard file(s) in {where_} for world size {world_size}"
            );
        }
        let first = shards[0].0;
        Ok(RankStream {
            shards,
            cursor: Cursor {
                shard_idx: first,
                ..Cursor::default()
            },
        })
    }

    /// Reads the shards the next `n` examples come from, if not read yet.
    pub async fn prepare(&mut self, dataset: &Dataset, n: usize) -> anyhow::Result<()> {
        let count = self.shards.len();
        let (mut pos, mut line, mut need) =
            (self.cursor.pos.min(count - 1), self.cursor.line_idx, n);
        loop {
            if self.shards[pos].2.is_none() {
                let rows = dataset.load(&self.shards[pos].1).await?;
                self.shards[pos].2 = Some(rows);
            }
            let len = self.shards[pos].2.as_ref().map_or(0, Vec::len);
            let avail = len.saturating_sub(line);
            if avail >= need || self.shards.iter().all(|s| s.2.is_some()) {
                break;
            }
            need -= avail;
            pos = (pos + 1) % count;
            line = 0;
        }
        if self
            .shards
            .iter()
            .all(|s| s.2.as_ref().is_some_and(Vec::is_empty))
        {
            bail!(
                "this rank's {count} shard file(s) in {} hold no records",
                dataset.describe()
            );
        }
        Ok(())
    }

    /// The next `n` examples, advancing the cursor (after `prepare(n)`).
    pub fn next_batch(&mut self, n: usize) -> Vec<&Example> {
        let mut c = self.cursor;
        let mut picks = Vec::with_capacity(n);
        while picks.len() < n {
            let rows = self.shards[c.pos].2.as_deref().unwrap_or(&[]);
            if c.line_idx < rows.len() {
                picks.push((c.pos, c.line_idx));
                c.line_idx += 1;
                continue;
            }
            c.line_idx = 0;
            c.pos += 1;
            if c.pos == self.shards.len() {
                c.pos = 0;
                c.epoch += 1;
            }
            c.shard_idx = self.shards[c.pos].0;
        }
        self.cursor = c;
        picks
            .into_iter()
            .map(|(p, l)| &self.shards[p].2.as_ref().expect("prepared")[l])
            .collect()
    }
}
