//! API and SSE scenarios: request rate and latency at fixed concurrency (an in-repo load
//! generator), and log fan-out to many SSE subscribers with delivery latency and losses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::json;

use super::{Client, Figures, insert_percentiles, percentile};

/// `concurrency` loops issuing GET `path` back to back for `duration`.
async fn load(base: &str, path: &str, concurrency: usize, duration: Duration) -> (f64, Vec<f64>) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("an HTTP client builds");
    let url = Arc::new(format!("{base}{path}"));
    let started = Instant::now();
    let loops = (0..concurrency).map(|_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let mut latencies = Vec::new();
            while started.elapsed() < duration {
                let t = Instant::now();
                if let Ok(res) = http.get(url.as_str()).send().await
                    && res.status().is_success()
                    && res.bytes().await.is_ok()
                {
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            latencies
        }
    });
    let latencies: Vec<f64> = join_all(loops).await.into_iter().flatten().collect();
    let rps = latencies.len() as f64 / started.elapsed().as_secs_f64();
    (rps, latencies)
}

pub async fn requests(
    client: &Client,
    base: &str,
    quick: bool,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let duration = Duration::from_secs(if quick { 1 } else { 5 });
    let concurrency = 32;
    let job = client
        .post(
            "/jobs",
            &json!({"world_size": 4, "command": ["sleep", "100000"]}),
        )
        .await?;
    let id = job["job_id"].as_str().unwrap_or_default().to_string();
    for (name, path) in [
        ("health", "/health".to_string()),
        ("summary", format!("/jobs/{id}/summary")),
    ] {
        let (rps, latencies) = load(base, &path, concurrency, duration).await;
        figures.insert(format!("{name}_rps"), rps);
        insert_percentiles(figures, &format!("{name}_latency"), &latencies);
    }
    figures.insert("api_concurrency".into(), concurrency as f64);
    client.post(&format!("/jobs/{id}/stop"), &json!({})).await?;
    Ok(())
}

/// One subscriber: counts log lines until `end`, and for every 16th line the delay between its
/// commit (its `ts`) and its arrival. The bench shares the server's two cores, so it walks the
/// chunks with memchr and parses a sample of the timestamps, not all of them.
async fn subscribe(http: reqwest::Client, url: String) -> (usize, Vec<f64>) {
    let Ok(mut res) = http.get(&url).send().await else {
        return (0, Vec::new());
    };
    let (mut lines, mut delays) = (0, Vec::new());
    let mut buf: Vec<u8> = Vec::new();
    while let Ok(Some(chunk)) = res.chunk().await {
        let now = chrono::Utc::now();
        buf.extend_from_slice(&chunk);
        let mut at = 0;
        while let Some(len) = find(&buf[at..], b"\n\n") {
            let block = &buf[at..at + len];
            at += len + 2;
            if block.starts_with(b"event: end") {
                return (lines, delays);
            }
            if !block.starts_with(b"event: log") || find(block, b"\"stream\":\"stdout\"").is_none()
            {
                continue;
            }
            lines += 1;
            if lines % 16 == 1
                && let Some(start) = find(block, b"\"ts\":\"").map(|i| i + 6)
                && let Some(len) = memchr::memchr(b'"', &block[start..])
                && let Ok(ts) = std::str::from_utf8(&block[start..start + len])
                && let Ok(ts) = chrono::DateTime::parse_from_rfc3339(ts)
            {
                let d = (now - ts.with_timezone(&chrono::Utc))
                    .num_microseconds()
                    .unwrap_or(0);
                delays.push(d as f64 / 1e3);
            }
        }
        buf.drain(..at);
    }
    (lines, delays)
}

/// The byte patterns the SSE client looks for, each searcher built once.
static FINDERS: std::sync::LazyLock<[memchr::memmem::Finder<'static>; 3]> =
    std::sync::LazyLock::new(|| {
        [
            memchr::memmem::Finder::new(b"\n\n"),
            memchr::memmem::Finder::new(b"\"stream\":\"stdout\""),
            memchr::memmem::Finder::new(b"\"ts\":\""),
        ]
    });

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    match FINDERS.iter().find(|f| f.needle() == needle) {
        Some(finder) => finder.find(haystack),
        None => memchr::memmem::find(haystack, needle),
    }
}

/// `subscribers` streams on one job that prints about 5,000 lines/s for `seconds`.
pub async fn fanout(
    client: &Client,
    base: &str,
    subscribers: usize,
    seconds: u32,
    server_pid: u32,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    // 100 lines every 20 ms, after a pause that lets every subscriber connect.
    let script = format!(
        "sleep 2; i=0; while [ $i -lt {} ]; do seq 1 100; sleep 0.02; i=$((i+1)); done",
        seconds * 50
    );
    let job = client
        .post(
            "/jobs",
            &json!({"world_size": 1, "command": ["sh", "-c", script]}),
        )
        .await?;
    let id = job["job_id"].as_str().unwrap_or_default().to_string();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let url = format!("{base}/jobs/{id}/logs/stream?tail=0");
    let started = Instant::now();
    let cpu_before = super::scale::cpu_seconds(server_pid)?;
    // The subscribers run on a thread per core, each with a runtime of its own: the server
    // needs little CPU here, the clients parsing millions of events a second need a lot.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads: Vec<_> = (0..cores)
        .map(|t| {
            let (http, url) = (http.clone(), url.clone());
            let mine = (t..subscribers).step_by(cores).count();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let all = (0..mine).map(|_| subscribe(http.clone(), url.clone()));
                anyhow::Ok(rt.block_on(join_all(all)))
            })
        })
        .collect();
    let results = tokio::task::spawn_blocking(move || {
        let mut results = Vec::new();
        for t in threads {
            let done = t
                .join()
                .map_err(|_| anyhow::anyhow!("a subscriber thread panicked"))?;
            results.extend(done?);
        }
        anyhow::Ok(results)
    })
    .await??;
    let server_cpu = super::scale::cpu_seconds(server_pid)? - cpu_before;
    let printed = client.get(&format!("/jobs/{id}/logs?tail=100000")).await?;
    let expected = printed["lines"]
        .as_array()
        .map(|l| l.iter().filter(|l| l["stream"] == "stdout").count())
        .unwrap_or(0);
    let lost: usize = results
        .iter()
        .map(|(n, _)| expected.saturating_sub(*n))
        .sum();
    let delays: Vec<f64> = results.into_iter().flat_map(|(_, d)| d).collect();
    let name = format!("sse_fanout_{subscribers}");
    figures.insert(format!("{name}_lines_lost"), lost as f64);
    figures.insert(format!("{name}_lines_per_subscriber"), expected as f64);
    figures.insert(
        format!("{name}_lines_per_s"),
        expected as f64 / (started.elapsed().as_secs_f64() - 2.0).max(0.1),
    );
    // What the server spent to deliver a million lines (connections and replay included).
    let delivered = (expected * subscribers - lost) as f64;
    figures.insert(
        format!("{name}_server_cpu_s_per_million_lines"),
        server_cpu / delivered.max(1.0) * 1e6,
    );
    figures.insert(format!("{name}_delivery_p50_ms"), percentile(&delays, 50.0));
    figures.insert(format!("{name}_delivery_p99_ms"), percentile(&delays, 99.0));
    Ok(())
}
