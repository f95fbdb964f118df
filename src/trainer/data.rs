//! Datasets: the generator behind `make-dataset`, and a rank's deterministic stream of
//! examples over the shard files it owns (shard `i` belongs to rank `i mod world_size`).

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::model::Example;
use super::rng::SplitMix64;

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

/// A rank's examples, in order, wrapping to the start for the next epoch.
pub struct RankStream {
    shards: Vec<(usize, Vec<Example>)>,
    pub cursor: Cursor,
}

impl RankStream {
    pub fn load(dir: &Path, rank: usize, world_size: usize) -> anyhow::Result<Self> {
        let files = shard_files(dir)?;
        let mut shards = Vec::new();
        for (i, f) in files.iter().enumerate() {
            if i % world_size == rank {
                shards.push((i, read_examples(f)?));
            }
        }
        if shards.iter().all(|(_, rows)| rows.is_empty()) {
            bail!(
                "rank {rank} has no data: {} shard file(s) in {} for world size {world_size}",
                files.len(),
                dir.display()
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

    /// The next `n` examples, advancing the cursor.
    pub fn next_batch(&mut self, n: usize) -> Vec<&Example> {
        let mut c = self.cursor;
        let mut picks = Vec::with_capacity(n);
        while picks.len() < n {
            let rows = &self.shards[c.pos].1;
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
            .map(|(p, l)| &self.shards[p].1[l])
            .collect()
    }
}
