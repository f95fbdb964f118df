//! `trainvisor logs`: a job's tail, and with `-f` every new line until the job ends (SSE,
//! resuming from the last seq seen when the connection drops). Each line is stamped with the
//! time the server received it, as `docker logs -t` does, unless `--no-timestamps`.

use std::io::Write;
use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

use super::Client;
use super::output::{printable, printable_json};

/// What `logs` prints, besides the job.
pub struct LogsArgs {
    pub follow: bool,
    pub rank: Option<u32>,
    pub tail: u32,
    pub timestamps: bool,
}

/// `2026-12-05T00:12:01.123456Z [1] stderr Traceback …`: the time, the rank, the stream when it
/// is not stdout, and the line.
pub fn format_line(line: &Value, timestamps: bool) -> String {
    let rank = line["rank"]
        .as_u64()
        .map(|r| format!("[{r}]"))
        .unwrap_or_else(|| "[-]".into());
    let mut out = String::new();
    if timestamps && let Some(ts) = line["ts"].as_str() {
        out.push_str(ts);
        out.push(' ');
    }
    out.push_str(&rank);
    match line["stream"].as_str() {
        Some("stdout") | None => {}
        Some(stream) => {
            out.push(' ');
            out.push_str(stream);
        }
    }
    out.push(' ');
    out.push_str(line["line"].as_str().unwrap_or(""));
    printable(&out)
}

fn print_line(c: &Client, line: &Value, timestamps: bool) {
    if c.json {
        println!("{}", printable_json(&line.to_string()));
    } else {
        println!("{}", format_line(line, timestamps));
    }
}

pub async fn logs(c: &Client, job: &str, args: LogsArgs) -> anyhow::Result<()> {
    let LogsArgs {
        follow,
        rank,
        tail,
        timestamps,
    } = args;
    let job = &super::job_id::resolve(c, job).await?;
    let rank_q = rank.map(|r| format!("&rank={r}")).unwrap_or_default();
    if !follow {
        let res = c
            .get(&format!("/jobs/{job}/logs?tail={tail}{rank_q}"))
            .await?;
        for line in res["lines"].as_array().into_iter().flatten() {
            print_line(c, line, timestamps);
        }
        return Ok(());
    }
    let mut last: Option<i64> = None;
    loop {
        let mut req = c.http.get(format!(
            "{}/jobs/{job}/logs/stream?tail={tail}{rank_q}",
            c.base
        ));
        if let Some(seq) = last {
            req = req.header("Last-Event-ID", seq.to_string());
        }
        let mut res = match req.send().await {
            Ok(res) if res.status().is_success() => res,
            Ok(res) => {
                let body: Value = res.json().await.unwrap_or(Value::Null);
                bail!(
                    "{}",
                    body["message"].as_str().unwrap_or("cannot follow the logs")
                );
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut buf = String::new();
        loop {
            let chunk = match res.chunk().await {
                Ok(Some(chunk)) => chunk,
                // Dropped: reconnect from the last line printed.
                _ => break,
            };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(pos) = buf.find("\n\n") {
                let block: String = buf.drain(..pos + 2).collect();
                let (mut event, mut data) = ("message", String::new());
                for l in block.lines() {
                    if let Some(v) = l.strip_prefix("event:") {
                        event = if v.trim() == "log" {
                            "log"
                        } else if v.trim() == "end" {
                            "end"
                        } else {
                            "other"
                        };
                    } else if let Some(v) = l.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                match event {
                    "log" => {
                        let line: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                        last = line["seq"].as_i64().or(last);
                        print_line(c, &line, timestamps);
                    }
                    "end" => return Ok(()),
                    _ => {}
                }
            }
        }
        std::io::stdout().flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::format_line;
    use serde_json::json;

    #[test]
    fn a_line_reads_time_rank_stream_text() {
        let line = json!({"seq": 7, "rank": 1, "stream": "stderr",
                          "ts": "2026-12-05T00:12:01.123456Z", "line": "boom \u{1b}[2J"});
        assert_eq!(
            format_line(&line, true),
            "2026-12-05T00:12:01.123456Z [1] stderr boom \\x1b[2J"
        );
        let out = json!({"seq": 8, "rank": 0, "stream": "stdout", "ts": "t", "line": "ok"});
        assert_eq!(format_line(&out, false), "[0] ok");
    }
}
