//! The server's Prometheus metrics (`GET /metrics`, OpenMetrics text): counters and histograms
//! updated where things happen (restarts, incidents, checkpoints, HTTP requests, the
//! recorder's batches), and gauges read when scraped (live jobs and ranks, SSE subscribers,
//! the process's memory and descriptors). Labels that name a job or a rank exist only for
//! live jobs: they are built afresh at every scrape, so an ended job leaves no series behind.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestartLabels {
    pub reason: String,
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The matched route pattern (`/jobs/{job_id}/summary`), never the raw path.
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabels {
    pub job_id: String,
    pub rank: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NoticeLabels {
    pub cause: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

fn seconds_histogram() -> Histogram {
    // 1 ms … ~65 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

fn route_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 4.0, 9,
    ))
}

/// Everything counted while the server runs (shared by the actors, the recorder and the
/// HTTP middleware; cheap to update: atomics).
pub struct Metrics {
    pub restarts: Family<RestartLabels, Counter>,
    pub incidents: Counter,
    /// From a rank's end (its exit seen, its spawn failed, its hang declared) to the decision.
    pub detection_seconds: Histogram,
    /// From the decision to every replacement running (backoff included).
    pub replacement_seconds: Histogram,
    /// From the decision to every replaced rank stepping past its checkpoint.
    pub training_again_seconds: Histogram,
    pub steps_lost: Counter,
    pub stragglers: Counter,
    pub checkpoint_commit_seconds: Histogram,
    pub checkpoint_bytes: Counter,
    pub checkpoint_failures: Counter,
    /// Saves on notice by cause and outcome, the steps they lost, and the wait for them.
    pub notices: Family<NoticeLabels, Counter>,
    pub notice_steps_lost: Counter,
    pub notice_seconds: Histogram,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub recorder_batch_ops: Histogram,
    pub recorder_commit_seconds: Histogram,
}

/// What is read at scrape time.
#[derive(Default)]
pub struct Live {
    pub jobs_by_state: Vec<(String, i64)>,
    pub workers_running: i64,
    pub live_jobs: i64,
    pub log_subscribers: i64,
    pub sse_streams: i64,
    /// Per live job: (id, goodput, steps/s, step, ranks: (rank, heartbeat age s, straggler)).
    pub jobs: Vec<LiveJob>,
}

pub struct LiveJob {
    pub id: String,
    pub goodput: Option<f64>,
    pub steps_per_s: Option<f64>,
    pub step: Option<u64>,
    pub ranks: Vec<(u32, Option<f64>, bool)>,
}

type GaugeF = Gauge<f64, AtomicU64>;

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics {
            restarts: Family::default(),
            incidents: Counter::default(),
            detection_seconds: seconds_histogram(),
            replacement_seconds: seconds_histogram(),
            training_again_seconds: seconds_histogram(),
            steps_lost: Counter::default(),
            stragglers: Counter::default(),
            checkpoint_commit_seconds: seconds_histogram(),
            checkpoint_bytes: Counter::default(),
            checkpoint_failures: Counter::default(),
            notices: Family::default(),
            notice_steps_lost: Counter::default(),
            notice_seconds: seconds_histogram(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(route_histogram),
            recorder_batch_ops: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 4.0, 9),
            ),
            recorder_commit_seconds: seconds_histogram(),
        })
    }

    /// Counts a save on notice.
    pub fn notice(&self, report: &crate::domain::notice::NoticeReport) {
        self.notices
            .get_or_create(&NoticeLabels {
                cause: report.cause.as_str().to_string(),
                outcome: report.outcome.as_str().to_string(),
            })
            .inc();
        self.notice_steps_lost.inc_by(report.steps_lost);
        self.notice_seconds.observe(report.wait_ms / 1000.0);
    }

    /// The OpenMetrics text of everything, with `live` as the scrape-time gauges.
    pub fn encode(&self, live: &Live) -> String {
        let mut r = Registry::with_prefix("trainvisor");
        let jobs = Family::<StateLabels, Gauge>::default();
        for (state, n) in &live.jobs_by_state {
            jobs.get_or_create(&StateLabels {
                state: state.clone(),
            })
            .set(*n);
        }
        r.register("jobs", "Jobs by state", jobs);
        let gauge = |v: i64| {
            let g = Gauge::<i64>::default();
            g.set(v);
            g
        };
        r.register(
            "workers_running",
            "Worker processes running",
            gauge(live.workers_running),
        );
        r.register("live_jobs", "Jobs with a live actor", gauge(live.live_jobs));
        r.register(
            "log_subscribers",
            "SSE log subscribers",
            gauge(live.log_subscribers),
        );
        r.register(
            "sse_streams",
            "Open SSE streams (logs and events)",
            gauge(live.sse_streams),
        );
        r.register(
            "restarts",
            "Restart decisions by reason and scope",
            self.restarts.clone(),
        );
        r.register(
            "incidents",
            "Failures answered with a restart",
            self.incidents.clone(),
        );
        r.register_with_unit(
            "detection",
            "From a rank's end (exit seen, spawn failed, hang declared) to the restart decision",
            Unit::Seconds,
            self.detection_seconds.clone(),
        );
        r.register_with_unit(
            "replacement",
            "From the restart decision to every replacement running (backoff included)",
            Unit::Seconds,
            self.replacement_seconds.clone(),
        );
        r.register_with_unit(
            "training_again",
            "From the restart decision to every replaced rank stepping past its checkpoint",
            Unit::Seconds,
            self.training_again_seconds.clone(),
        );
        r.register(
            "steps_lost",
            "Steps done again after restarts",
            self.steps_lost.clone(),
        );
        r.register(
            "notices",
            "Saves on notice (stop, SIGTERM, signal, checkpoint) by cause and outcome",
            self.notices.clone(),
        );
        r.register(
            "notice_steps_lost",
            "Steps the next incarnation does again after interruptions with notice",
            self.notice_steps_lost.clone(),
        );
        r.register_with_unit(
            "notice_save",
            "From a notice to the commit of its save (or to giving up)",
            Unit::Seconds,
            self.notice_seconds.clone(),
        );
        r.register(
            "stragglers",
            "Ranks flagged as stragglers",
            self.stragglers.clone(),
        );
        r.register_with_unit(
            "checkpoint_commit",
            "Checkpoint commit duration (parts gathered to LATEST written)",
            Unit::Seconds,
            self.checkpoint_commit_seconds.clone(),
        );
        r.register_with_unit(
            "checkpoint",
            "Bytes of committed checkpoints",
            Unit::Bytes,
            self.checkpoint_bytes.clone(),
        );
        r.register(
            "checkpoint_failures",
            "Checkpoints that failed to commit",
            self.checkpoint_failures.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests by route pattern, method and status",
            self.http_requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "HTTP request latency by route pattern and method",
            Unit::Seconds,
            self.http_seconds.clone(),
        );
        r.register(
            "recorder_batch_operations",
            "Operations per SQLite transaction of the recorder",
            self.recorder_batch_ops.clone(),
        );
        r.register_with_unit(
            "recorder_commit",
            "Duration of the recorder's SQLite transactions",
            Unit::Seconds,
            self.recorder_commit_seconds.clone(),
        );
        let goodput = Family::<JobLabels, GaugeF>::default();
        let rate = Family::<JobLabels, GaugeF>::default();
        let step = Family::<JobLabels, Gauge>::default();
        let age = Family::<RankLabels, GaugeF>::default();
        let straggler = Family::<RankLabels, Gauge>::default();
        for j in &live.jobs {
            let l = JobLabels {
                job_id: j.id.clone(),
            };
            if let Some(g) = j.goodput {
                goodput.get_or_create(&l).set(g);
            }
            if let Some(s) = j.steps_per_s {
                rate.get_or_create(&l).set(s);
            }
            if let Some(s) = j.step {
                step.get_or_create(&l).set(s as i64);
            }
            for &(rank, hb, flag) in &j.ranks {
                let l = RankLabels {
                    job_id: j.id.clone(),
                    rank,
                };
                if let Some(a) = hb {
                    age.get_or_create(&l).set(a);
                }
                straggler.get_or_create(&l).set(i64::from(flag));
            }
        }
        r.register(
            "job_goodput",
            "Goodput of each live job (useful time / wall time)",
            goodput,
        );
        r.register("job_steps_per_second", "Steps/s of each live job", rate);
        r.register(
            "job_step",
            "Global step (the slowest rank's) of each live job",
            step,
        );
        r.register_with_unit(
            "rank_heartbeat_age",
            "Time since each live rank's last heartbeat",
            Unit::Seconds,
            age,
        );
        r.register(
            "rank_straggler",
            "1 when a live rank is flagged as a straggler",
            straggler,
        );
        let (rss, fds) = process_figures();
        let rss_g = GaugeF::default();
        rss_g.set(rss);
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory of the server",
            Unit::Bytes,
            rss_g,
        );
        r.register(
            "process_open_fds",
            "Open file descriptors of the server",
            gauge(fds),
        );
        let s3 = Counter::<u64>::default();
        s3.inc_by(crate::storage::s3::retryable_responses());
        r.register(
            "s3_retryable_responses",
            "S3 answers the client retries (5xx, 429, transport errors), in this process",
            s3,
        );
        let mut out = String::new();
        let _ = encode(&mut out, &r);
        out
    }
}

/// The server's resident memory (bytes) and open descriptors, from /proc/self.
fn process_figures() -> (f64, i64) {
    let rss_kb: f64 = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as i64)
        .unwrap_or(0);
    (rss_kb * 1024.0, fds)
}
