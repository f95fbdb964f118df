//! Test helpers: the real application on port 0 with a temp data dir, an HTTP client, an SSE
//! reader, and small polling utilities. Worker commands are real `sh` processes.

mod model;
mod process;
pub mod s3_server;

pub use model::{assert_latest_valid, model_of, model_sha, run_to_end, served_model};
pub use process::*;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use trainvisor::config::Settings;
use trainvisor::startup::Application;

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub data_dir: TempDir,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings::new("127.0.0.1:0", data_dir.path());
    settings.trainer_exe = env!("CARGO_BIN_EXE_trainvisor").into();
    settings.kill_grace = Duration::from_millis(500);
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    actix_web::rt::spawn(app.run_until_stopped());
    TestApp {
        address,
        client: test_client(),
        data_dir,
    }
}

/// An HTTP client whose idle connections are dropped well before the server closes them.
pub fn test_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTP client builds")
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.get(path).await;
        assert!(res.status().is_success(), "GET {path}: {}", res.status());
        res.json().await.expect("JSON")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    /// `POST /jobs/{id}/stop`.
    pub async fn stop(&self, id: &str) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/jobs/{id}/stop")))
            .send()
            .await
            .expect("POST stop")
    }

    /// Creates a job and returns its id.
    pub async fn create_job(&self, spec: Value) -> String {
        let res = self.post_json("/jobs", &spec).await;
        assert_eq!(
            res.status(),
            201,
            "create job: {}",
            res.text().await.unwrap_or_default()
        );
        let job: Value = res.json().await.unwrap();
        job["job_id"].as_str().unwrap().to_string()
    }

    pub async fn job(&self, id: &str) -> Value {
        self.get_json(&format!("/jobs/{id}")).await
    }

    pub async fn summary(&self, id: &str) -> Value {
        self.get_json(&format!("/jobs/{id}/summary")).await
    }

    pub async fn restarts(&self, id: &str) -> Vec<Value> {
        let v = self.get_json(&format!("/jobs/{id}/restarts")).await;
        v.as_array().unwrap().clone()
    }

    pub async fn incarnations(&self, id: &str) -> Vec<Value> {
        let v = self.get_json(&format!("/jobs/{id}/workers")).await;
        v.as_array().unwrap().clone()
    }

    pub async fn log_lines(&self, id: &str) -> Vec<Value> {
        let v = self.get_json(&format!("/jobs/{id}/logs?tail=100000")).await;
        v["lines"].as_array().unwrap().clone()
    }

    /// The text of every stored line of the job, in order.
    pub async fn log_texts(&self, id: &str) -> Vec<String> {
        self.log_lines(id)
            .await
            .iter()
            .map(|l| l["line"].as_str().unwrap().to_string())
            .collect()
    }

    /// Waits until the job is in a terminal state and returns it.
    pub async fn wait_finished(&self, id: &str, timeout: Duration) -> Value {
        let job = wait_for(timeout, || async {
            let job = self.job(id).await;
            let state = job["state"].as_str().unwrap().to_string();
            matches!(state.as_str(), "succeeded" | "failed" | "stopped").then_some(job)
        })
        .await;
        job.unwrap_or_else(|| panic!("job {id} did not finish in {timeout:?}"))
    }

    /// Waits until every rank of the summary reports a pid, and returns the pids.
    pub async fn running_pids(&self, id: &str, world_size: usize) -> Vec<u32> {
        wait_for(Duration::from_secs(20), || async {
            let pids = running_pids_in(&self.summary(id).await);
            (pids.len() == world_size).then_some(pids)
        })
        .await
        .expect("all ranks running")
    }
}

/// Pids of the ranks a summary shows as running.
pub fn running_pids_in(summary: &Value) -> Vec<u32> {
    summary["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter(|w| w["state"] == "running")
                .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// A small dataset in the app's data dir: 4 shards × 400 rows, 8 features, 3 classes.
pub fn small_dataset(app: &TestApp) -> std::path::PathBuf {
    use trainvisor::trainer::data::{DatasetParams, make_dataset};
    let dir = app.data_dir.path().join("small");
    let params = DatasetParams::small();
    make_dataset(&dir, &params).unwrap();
    dir
}

/// Sends `req` and reads its JSON body; none on any failure (for polling a server that may
/// not answer yet).
pub async fn try_json(req: reqwest::RequestBuilder) -> Option<Value> {
    req.send().await.ok()?.json().await.ok()
}

/// Polls `check` every 20 ms until it returns Some or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A shell worker: `sh -c SCRIPT`.
pub fn sh(script: &str) -> Value {
    json!(["sh", "-c", script])
}

/// Shell snippet: one heartbeat with the given JSON body.
pub fn beat(body: &str) -> String {
    format!(
        "curl -s -o /dev/null -X POST -H \"Authorization: Bearer $TRAINVISOR_TOKEN\" -d '{body}' \"$TRAINVISOR_HEARTBEAT_URL\""
    )
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Reads SSE events from a streaming response.
pub struct SseReader {
    res: reqwest::Response,
    buf: String,
}

impl SseReader {
    pub fn new(res: reqwest::Response) -> Self {
        SseReader {
            res,
            buf: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped), or None at the end of the stream.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let mut ev = SseEvent {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        ev.id = Some(v.trim().to_string());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_string();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        any = true;
                    }
                }
                if any {
                    return Some(ev);
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.res.chunk())
                .await
                .expect("SSE stream stalled")
                .ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// All events up to and including `end` (or the end of the stream).
    pub async fn until_end(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(ev) = self.next().await {
            let end = ev.event == "end";
            out.push(ev);
            if end {
                break;
            }
        }
        out
    }
}

/// Asserts an error response is a 4xx with the JSON `{error, message}` body.
pub async fn assert_json_error(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status, "unexpected status");
    let body: Value = res.json().await.expect("error body is JSON");
    assert!(body["error"].is_string(), "no error code in {body}");
    assert!(body["message"].is_string(), "no message in {body}");
    body
}

/// A small tmpfs mounted for a test (mounting needs root; CI runs the tests as root),
/// unmounted (lazily) when dropped.
pub struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill it, which needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the file system to the last byte with a file that `rm` frees again.
    pub fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let ballast = self.path().join("ballast");
        let mut f = std::fs::File::create(&ballast).unwrap();
        let block = vec![1u8; 4096];
        while f.write_all(&block).is_ok() {}
        ballast
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Submits `spec` to the server at `url` (a server process's, with its token if it has one);
/// the new job's id.
pub async fn submit_to(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    spec: &Value,
) -> String {
    let mut req = client.post(format!("{url}/jobs")).json(spec);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 201);
    res.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}
