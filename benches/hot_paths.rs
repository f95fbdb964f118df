//! Criterion micro-benchmarks of the server's hot paths, on the product's own code:
//!
//! - `allreduce`: one round of the Job's all-reduce aggregation (`AllReduce::contribute` for
//!   every rank: collect, sum in rank order, divide, wake the waiters);
//! - `log_batching`: the recorder taking N log lines and committing them to SQLite in its
//!   batched transactions (`Recorder::log` × N, then `Recorder::flush`), on a real database;
//! - `manifest_commit`: the Checkpoint actor's commit (`actors::checkpoint::commit`: durable
//!   manifest, LATEST, retention scan) on the local filesystem.
//!
//! `cargo bench` runs them all; `cargo bench -- allreduce` one group.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use uuid::Uuid;

use trainvisor::actors::checkpoint::commit;
use trainvisor::actors::job::AllReduce;
use trainvisor::bus::{EventBus, LogBus};
use trainvisor::checkpoint::{Manifest, PartInfo, part_name, sha256_hex};
use trainvisor::config::JobDefaults;
use trainvisor::spec::JobRequest;
use trainvisor::storage::BlobStore;
use trainvisor::store::{self, Recorder, recorder::NewLine};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("trainvisor-cbench-{what}-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    dir
}

/// A full round for `world` ranks of `len` values each: the built-in trainer's gradient is
/// 4 classes × 33 = 132 values; 100,000 stands for a larger model.
fn allreduce(c: &mut Criterion) {
    let mut group = c.benchmark_group("allreduce");
    for (world, len) in [(4usize, 132usize), (8, 132), (4, 100_000)] {
        group.throughput(Throughput::Elements((world * len) as u64));
        let inputs: Vec<Vec<f64>> = (0..world)
            .map(|r| (0..len).map(|i| (r * len + i) as f64 * 1e-3).collect())
            .collect();
        group.bench_function(BenchmarkId::new(format!("w{world}"), len), |b| {
            let mut ar = AllReduce::default();
            let mut step = 0u64;
            b.iter_batched(
                || inputs.clone(),
                |inputs| {
                    step += 1;
                    let mut waiting = Vec::with_capacity(world);
                    let mut mean = None;
                    for (rank, values) in inputs.into_iter().enumerate() {
                        match ar.contribute(world, rank as u32, step, values, |_| None) {
                            Ok(Ok(m)) => mean = Some(m),
                            Ok(Err(rx)) => waiting.push(rx),
                            Err(e) => panic!("all-reduce rejected: {e:?}"),
                        }
                    }
                    let mean = mean.expect("the last rank gets the mean");
                    for mut rx in waiting {
                        assert!(Arc::ptr_eq(&rx.try_recv().expect("woken"), &mean));
                    }
                    mean
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// N lines of ~80 bytes through the recorder into SQLite (WAL, synchronous=NORMAL, as the
/// server opens it), timed until the flush says they are committed.
fn log_batching(c: &mut Criterion) {
    let rt = runtime();
    let dir = temp_dir("logs");
    let (recorder, job_id) = rt.block_on(async {
        let pool = store::open(&dir).await.expect("the database opens");
        let spec =
            serde_json::from_value::<JobRequest>(json!({"world_size": 1, "command": ["true"]}))
                .expect("a request")
                .resolve(&JobDefaults::for_data_dir(&dir))
                .expect("a spec");
        let job_id = Uuid::new_v4();
        store::jobs::insert(&pool, job_id, &spec, &store::now())
            .await
            .expect("a job row");
        let recorder = Recorder::start(
            pool,
            dir.clone(),
            Arc::new(LogBus::default()),
            Arc::new(EventBus::default()),
            u64::MAX / 2,
            trainvisor::metrics::Metrics::new(),
        )
        .await
        .expect("the recorder starts");
        (recorder, job_id)
    });
    let mut group = c.benchmark_group("log_batching");
    group.sample_size(20);
    for lines in [100u64, 1_000, 10_000] {
        group.throughput(Throughput::Elements(lines));
        group.bench_function(BenchmarkId::from_parameter(lines), |b| {
            b.iter(|| {
                rt.block_on(async {
                    for i in 0..lines {
                        recorder
                            .log(NewLine {
                                job_id,
                                rank: Some((i % 4) as u32),
                                attempt: Some(0),
                                stream: "stdout",
                                line: format!("step {i} loss 0.4132 lr 0.1 shard 3 line 1234 ok"),
                            })
                            .await;
                    }
                    recorder.flush().await;
                })
            });
        });
    }
    group.finish();
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The commit of a 4-rank step: manifest written durably (fsync, rename, directory fsync),
/// LATEST moved, the retention and garbage scan. The parts themselves are written beforehand
/// by the ranks, so they are set up outside the timing.
fn manifest_commit(c: &mut Criterion) {
    let rt = runtime();
    let dir = temp_dir("commit");
    let store = BlobStore::open(dir.to_str().expect("a UTF-8 path")).expect("a store");
    let world = 4u32;
    let mut group = c.benchmark_group("manifest_commit");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    let mut step = 0u64;
    group.bench_function("w4", |b| {
        b.iter_batched(
            || {
                step += 1;
                let parts = (0..world)
                    .map(|rank| {
                        let data = format!("rank {rank} step {step}").into_bytes();
                        rt.block_on(
                            store.put(&trainvisor::checkpoint::part_key(step, rank), data.clone()),
                        )
                        .expect("a part");
                        PartInfo {
                            rank,
                            name: part_name(rank),
                            bytes: data.len() as u64,
                            sha256: sha256_hex(&data),
                            shard_idx: Some(0),
                            line_idx: Some(step * 32),
                            metrics: Some(json!({"loss": 0.41})),
                        }
                    })
                    .collect();
                Manifest {
                    version: 1,
                    job_id: Uuid::nil().to_string(),
                    step,
                    world_size: world,
                    committed_at: store::now(),
                    parts,
                }
            },
            // keep_last = 3: the fourth-newest step is pruned with each commit.
            |manifest| {
                rt.block_on(commit(&store, &manifest, 3, Instant::now()))
                    .expect("the commit")
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(hot_paths, allreduce, log_batching, manifest_commit);
criterion_main!(hot_paths);
