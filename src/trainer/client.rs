//! The worker's side of the worker API: heartbeats, all-reduce, checkpoint registration.
//! A 409 means this incarnation was replaced (or the job ended): the process exits at once.

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};

use crate::checkpoint::PartInfo;
use crate::domain::notice::SaveRequest;

/// The `save` field of an answer (a request this worker cannot read is no request).
fn save_request(answer: &Value) -> Option<SaveRequest> {
    serde_json::from_value(answer.get("save")?.clone()).ok()
}

/// Exit code of a worker told it is stale.
pub const EXIT_STALE: i32 = 75;

#[derive(Clone)]
pub struct WorkerClient {
    http: reqwest::Client,
    base: String,
    token: String,
    rank: u32,
}

impl WorkerClient {
    pub fn new(server: &str, job_id: &str, rank: u32, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .tcp_nodelay(true)
            .build()
            .expect("an HTTP client builds");
        WorkerClient {
            http,
            base: format!("{server}/jobs/{job_id}/workers/{rank}"),
            token: token.to_string(),
            rank,
        }
    }

    async fn post(
        &self,
        what: &str,
        body: &Value,
        timeout: Option<Duration>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .post(format!("{}/{what}", self.base))
            .bearer_auth(&self.token)
            .json(body);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let res = req.send().await?;
        let status = res.status();
        if status == reqwest::StatusCode::CONFLICT {
            eprintln!(
                "trainvisor worker: the server says this incarnation is stale ({what}); exiting"
            );
            std::process::exit(EXIT_STALE);
        }
        if !status.is_success() {
            bail!("{what}: {status} {}", res.text().await.unwrap_or_default());
        }
        Ok(res.json().await?)
    }

    /// Sends a heartbeat; answers with the server's save request, if it has one.
    pub async fn heartbeat(&self, body: &Value) -> anyhow::Result<Option<SaveRequest>> {
        let res = self
            .post("heartbeat", body, Some(Duration::from_secs(5)))
            .await?;
        Ok(save_request(&res))
    }

    /// The element-wise mean of every rank's `values` for `step`, summed in rank order, and
    /// the save request the round carries.
    pub async fn allreduce(
        &self,
        step: u64,
        values: &[f64],
    ) -> anyhow::Result<(Vec<f64>, Option<SaveRequest>)> {
        let res = self
            .post("allreduce", &json!({"step": step, "values": values}), None)
            .await?;
        Ok((
            serde_json::from_value(res["values"].clone())?,
            save_request(&res),
        ))
    }

    /// Tells the server this rank's part of `step` is durable.
    pub async fn register_part(&self, step: u64, part: &PartInfo) -> anyhow::Result<()> {
        let mut body = serde_json::to_value(part)?;
        body["step"] = json!(step);
        body["part"] = json!(part.name);
        let obj = body.as_object_mut().expect("an object");
        obj.remove("name");
        obj.remove("rank");
        if part.rank != self.rank {
            // A dead rank's part, written by a survivor.
            obj.insert("for_rank".into(), json!(part.rank));
        }
        self.post("checkpoint", &body, Some(Duration::from_secs(60)))
            .await
            .map(drop)
    }
}
