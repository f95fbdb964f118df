//! Checkpoint upload throughput to a loopback S3 server (s3s-fs), next to a plain
//! `object_store` put loop of the same sizes against the same server in the same run.
//!
//! A checkpoint here is what the checkpoint plane really does: every part through
//! `BlobStore::put` (multipart above `MULTIPART_THRESHOLD`), then the server's commit (manifest
//! create-if-absent, LATEST compare-and-swap, retention). The raw loop puts the same bytes as
//! single `put` requests and nothing else.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use object_store::{ObjectStoreExt, PutPayload};

use super::Figures;
use crate::actors::checkpoint::commit_for_bench;
use crate::checkpoint::{self, Manifest, PartInfo};
use crate::storage::{BlobStore, S3Config};

struct S3sFs {
    child: Child,
    dir: PathBuf,
    config: S3Config,
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME")?)
            .join(".cargo/bin")
            .join(name);
        p.is_file().then_some(p)
    })
}

async fn start() -> anyhow::Result<S3sFs> {
    let Some(exe) = find("s3s-fs") else {
        bail!(
            "s3s-fs is not installed (cargo install s3s-fs --version 0.14.1 --features binary --locked)"
        );
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("trainvisor-bench-s3-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(dir.join("bench"))?;
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let child = Command::new(exe)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "bench", "--secret-key", &secret])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting s3s-fs")?;
    let server = S3sFs {
        child,
        dir,
        config: S3Config {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            access_key: Some("bench".into()),
            secret_key: Some(secret),
            ..S3Config::default()
        },
    };
    let store = BlobStore::open_with("s3://bench", &server.config)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.list("").await.is_err() {
        if Instant::now() > deadline {
            bail!("s3s-fs did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(server)
}

pub async fn run(quick: bool, figures: &mut Figures) -> anyhow::Result<()> {
    let server = match start().await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: S3 figures skipped: {e:#}");
            return Ok(());
        }
    };
    // Part sizes of one checkpoint (4 ranks).
    let mib = 1usize << 20;
    let sizes: Vec<usize> = if quick {
        vec![4 * mib, 4 * mib, 16 * mib, 72 * mib]
    } else {
        vec![16 * mib, 16 * mib, 64 * mib, 96 * mib]
    };
    let rounds = if quick { 2 } else { 4 };
    let total: usize = sizes.iter().sum::<usize>() * rounds;
    let parts: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (j.wrapping_mul(31) ^ i) as u8).collect())
        .collect();

    // Interleaved, so both see the same server state and page cache.
    let (mut ckpt_s, mut raw_s) = (0.0, 0.0);
    let store = BlobStore::open_with("s3://bench/ckpt", &server.config)?;
    let BlobStore::S3(raw) = BlobStore::open_with("s3://bench/raw", &server.config)? else {
        unreachable!("an s3:// location")
    };
    // What ranks report (sizes and sha256s): computed before the upload, as ranks do.
    let infos: Vec<PartInfo> = parts
        .iter()
        .enumerate()
        .map(|(rank, data)| PartInfo {
            rank: rank as u32,
            name: checkpoint::part_name(rank as u32),
            bytes: data.len() as u64,
            sha256: checkpoint::sha256_hex(data),
            shard_idx: None,
            line_idx: None,
            metrics: None,
        })
        .collect();
    for round in 0..rounds {
        let step = round as u64 + 1;
        let started = Instant::now();
        for (rank, data) in parts.iter().enumerate() {
            store
                .put(&checkpoint::part_key(step, rank as u32), data.clone())
                .await?;
        }
        let manifest = Manifest {
            version: 1,
            job_id: "bench".into(),
            step,
            world_size: parts.len() as u32,
            committed_at: crate::store::now(),
            parts: infos.clone(),
        };
        commit_for_bench(&store, &manifest, 2).await?;
        ckpt_s += started.elapsed().as_secs_f64();

        let started = Instant::now();
        for (i, data) in parts.iter().enumerate() {
            raw.inner()
                .put(
                    &raw.path(&format!("r{round}-{i}")),
                    PutPayload::from(data.clone()),
                )
                .await?;
        }
        raw_s += started.elapsed().as_secs_f64();
    }
    let mb = total as f64 / 1e6;
    let ckpt = mb / ckpt_s;
    let plain = mb / raw_s;
    figures.insert("s3_checkpoint_mb_per_s".into(), ckpt);
    figures.insert("s3_raw_put_mb_per_s".into(), plain);
    figures.insert("s3_checkpoint_vs_raw_ratio".into(), ckpt / plain);
    drop(server);
    Ok(())
}
