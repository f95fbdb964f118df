//! The checkpoint format shared by the server (which commits) and the workers (which write
//! parts and resume): step directories, part names, the manifest, and how to choose the step
//! to resume from.
//!
//! ```text
//! <CHECKPOINT_DIR>/step-0000000010/rank-00000.part   one per rank, written by the rank
//! <CHECKPOINT_DIR>/step-0000000010/manifest.json     written by the server once all parts are durable
//! <CHECKPOINT_DIR>/LATEST                            "step-0000000010\n", a hint
//! <CHECKPOINT_DIR>/model.bin                         the final model (rank 0)
//! ```
//! A step without a manifest does not exist. LATEST is only a hint: resume verifies the
//! manifest and the size and sha256 of every part, and falls back to older steps.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::storage::BlobStore;

pub const LATEST: &str = "LATEST";
pub const MANIFEST: &str = "manifest.json";
pub const FINAL_MODEL: &str = "model.bin";

pub fn step_dir(step: u64) -> String {
    format!("step-{step:010}")
}

pub fn part_name(rank: u32) -> String {
    format!("rank-{rank:05}.part")
}

pub fn part_key(step: u64, rank: u32) -> String {
    format!("{}/{}", step_dir(step), part_name(rank))
}

pub fn manifest_key(step: u64) -> String {
    format!("{}/{MANIFEST}", step_dir(step))
}

/// The step of a `step-NNNNNNNNNN` name.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a rank tells the server about the part it wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartInfo {
    #[serde(default)]
    pub rank: u32,
    #[serde(default)]
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_idx: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_idx: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub job_id: String,
    pub step: u64,
    pub world_size: u32,
    pub committed_at: String,
    pub parts: Vec<PartInfo>,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }
}

/// Why a candidate step was not used (for logs and tests).
#[derive(Debug)]
pub struct Rejected {
    pub step: u64,
    pub why: String,
}

/// A verified checkpoint: the manifest and this rank's part.
#[derive(Debug)]
pub struct Resume {
    pub manifest: Manifest,
    pub part: Vec<u8>,
}

/// Finds the newest step whose manifest is valid and whose every part is present, of the
/// listed size and sha256. LATEST is tried first; then every step, newest first.
pub async fn find_resume(
    store: &BlobStore,
    rank: u32,
    world_size: u32,
) -> std::io::Result<(Option<Resume>, Vec<Rejected>)> {
    let mut candidates: Vec<u64> = store
        .list("step-")
        .await?
        .iter()
        .filter_map(|n| parse_step_dir(n))
        .collect();
    candidates.sort_unstable_by(|a, b| b.cmp(a));
    if let Some(latest) = store.get(LATEST).await?
        && let Some(step) = parse_step_dir(String::from_utf8_lossy(&latest).trim())
    {
        candidates.retain(|s| *s != step);
        candidates.insert(0, step);
    }
    let mut rejected = Vec::new();
    for step in candidates {
        match verify(store, step, rank, world_size).await? {
            Ok(resume) => return Ok((Some(resume), rejected)),
            Err(why) => rejected.push(Rejected { step, why }),
        }
    }
    Ok((None, rejected))
}

async fn verify(
    store: &BlobStore,
    step: u64,
    rank: u32,
    world_size: u32,
) -> std::io::Result<Result<Resume, String>> {
    let Some(raw) = store.get(&manifest_key(step)).await? else {
        return Ok(Err("no manifest (never committed)".into()));
    };
    let manifest: Manifest = match serde_json::from_slice(&raw) {
        Ok(m) => m,
        Err(e) => return Ok(Err(format!("manifest unreadable: {e}"))),
    };
    if manifest.step != step
        || manifest.world_size != world_size
        || manifest.parts.len() != world_size as usize
    {
        return Ok(Err(format!(
            "manifest is for step {} with {} parts of world size {}",
            manifest.step,
            manifest.parts.len(),
            manifest.world_size
        )));
    }
    let mut own = None;
    for part in &manifest.parts {
        let key = format!("{}/{}", step_dir(step), part.name);
        let Some(data) = store.get(&key).await? else {
            return Ok(Err(format!("part {} is missing", part.name)));
        };
        if data.len() as u64 != part.bytes {
            return Ok(Err(format!(
                "part {} has {} bytes, manifest says {}",
                part.name,
                data.len(),
                part.bytes
            )));
        }
        if sha256_hex(&data) != part.sha256 {
            return Ok(Err(format!("part {} fails its sha256", part.name)));
        }
        if part.rank == rank {
            own = Some(data);
        }
    }
    match own {
        Some(part) => Ok(Ok(Resume { manifest, part })),
        None => Ok(Err(format!("no part for rank {rank}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(step_dir(42), "step-0000000042");
        assert_eq!(parse_step_dir("step-0000000042"), Some(42));
        assert_eq!(parse_step_dir("step-42"), None);
        assert_eq!(parse_step_dir("step-00000000x2"), None);
        assert_eq!(part_key(5, 3), "step-0000000005/rank-00003.part");
    }
}

/// Property test: whatever a checkpoint directory holds (garbage manifests, truncated or
/// flipped parts, a lying LATEST), resume never panics and only ever returns a step whose
/// every part verifies.
#[cfg(test)]
mod properties {
    use super::*;
    use crate::trainer::rng::SplitMix64;

    #[tokio::test]
    async fn resume_only_accepts_verified_steps() {
        let mut rng = SplitMix64::new(7);
        for round in 0..60 {
            let dir = std::env::temp_dir().join(format!("tv-prop-{}-{round}", std::process::id()));
            let store = BlobStore::open(dir.to_str().unwrap()).unwrap();
            let world = 1 + rng.below(3) as u32;
            for step in [5u64, 10, 15] {
                let mut parts = Vec::new();
                for rank in 0..world {
                    let data: Vec<u8> = (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect();
                    parts.push(PartInfo {
                        rank,
                        name: part_name(rank),
                        bytes: data.len() as u64,
                        sha256: sha256_hex(&data),
                        shard_idx: None,
                        line_idx: None,
                        metrics: None,
                    });
                    let mut stored = data;
                    match rng.below(6) {
                        0 if !stored.is_empty() => stored[0] ^= 1,
                        1 => stored.push(0),
                        2 => continue, // missing part
                        _ => {}
                    }
                    store.put(&part_key(step, rank), stored).await.unwrap();
                }
                let manifest = Manifest {
                    version: 1,
                    job_id: "j".into(),
                    step,
                    world_size: world,
                    committed_at: "t".into(),
                    parts,
                };
                let mut raw = serde_json::to_vec(&manifest).unwrap();
                match rng.below(6) {
                    0 => raw.truncate(rng.below(raw.len() as u64) as usize),
                    1 => raw = (0..rng.below(50)).map(|_| rng.next_u64() as u8).collect(),
                    2 => continue, // never committed
                    _ => {}
                }
                store.put(&manifest_key(step), raw).await.unwrap();
            }
            let latest =
                ["step-0000000015\n", "step-0000000099\n", "garbage", ""][rng.below(4) as usize];
            store.put(LATEST, latest.as_bytes().to_vec()).await.unwrap();
            let rank = rng.below(world as u64) as u32;
            let (resume, _) = find_resume(&store, rank, world).await.unwrap();
            if let Some(r) = resume {
                assert_eq!(r.manifest.world_size, world);
                for p in &r.manifest.parts {
                    let data = store
                        .get(&format!("{}/{}", step_dir(r.manifest.step), p.name))
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(sha256_hex(&data), p.sha256);
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
