//! The browser page in a real headless Chromium, driven through chromedriver (WebDriver) with
//! fantoccini: submit jobs from the form, watch ranks, logs and restarts arrive live, stop and
//! delete jobs, and sign in when the server has an API token. Needs the Debian packages `chromium` and `chromium-driver` (`.ci/run` installs them);
//! without them the test fails and says so. A screenshot of the job view is written to
//! `target/browser-artifacts/job.png` (and `failure.png` plus the page's text when a step
//! times out).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use serde_json::{Value, json};

use crate::helpers::{TestApp, kill, small_dataset, spawn_app, spawn_app_with, wait_for};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// How long one expectation may take to show up in the page (CI machines are slow).
const WAIT: Duration = Duration::from_secs(20);

/// Two ranks printing a line every 0.2 s and heartbeating their step and a loss every fifth
/// line, so the page gets logs, `progress` events and chart points.
const SCRIPT: &str = r#"i=0; while [ $i -lt 1000 ]; do echo "line $i from $RANK"; if [ $((i % 5)) -eq 0 ]; then curl -s -o /dev/null -X POST -H "Authorization: Bearer $TRAINVISOR_TOKEN" -d "{\"step\": $i, \"metrics\": {\"loss\": $(awk "BEGIN{print 2/($i+2)}")}}" "$TRAINVISOR_HEARTBEAT_URL"; fi; i=$((i+1)); sleep 0.2; done"#;

fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/browser-artifacts");
    dir
}

/// A chromedriver child process on a free loopback port; killed on drop.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    async fn start(log_name: &str) -> Chromedriver {
        for (path, what) in [(CHROMEDRIVER, "chromedriver"), (CHROMIUM, "Chromium")] {
            assert!(
                Path::new(path).exists(),
                "{what} is missing ({path} does not exist): the browser test needs a real \
                 browser. Install the Debian packages: apt-get install -y chromium chromium-driver \
                 (.ci/run does this when /usr/bin/chromedriver is missing)"
            );
        }
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().unwrap().port()
        };
        let log = artifacts_dir().join(log_name);
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let driver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let status = format!("{}/status", driver.url);
        let http = reqwest::Client::new();
        let ready = wait_for(WAIT, || async {
            let res = http.get(&status).send().await.ok()?;
            let body: Value = res.json().await.ok()?;
            (body["value"]["ready"] == true).then_some(())
        })
        .await;
        assert!(
            ready.is_some(),
            "chromedriver did not become ready on port {port} (log: {})",
            log.display()
        );
        driver
    }

    async fn session(&self, user_data_dir: &Path) -> Client {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--window-size=1280,800",
                    format!("--user-data-dir={}", user_data_dir.display()),
                ],
            },
        });
        let mut builder =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(caps.as_object().unwrap().clone());
        builder
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot open a Chromium session through chromedriver: {e}"))
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The page under test: a WebDriver session plus helpers that poll the DOM.
pub struct Page {
    pub c: Client,
}

impl Page {
    /// Runs `body` (a function body with `return`) in the page.
    pub async fn js(&self, body: &str) -> Value {
        self.c
            .execute(body, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{body}"))
    }

    /// Polls `body` until it returns something other than null/false/"", and returns that.
    pub async fn wait(&self, what: &str, body: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.c.execute(body, vec![]).await;
            if let Ok(v) = &v
                && !matches!(v, Value::Null | Value::Bool(false))
                && v.as_str() != Some("")
            {
                return v.clone();
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "timed out after {WAIT:?} waiting for: {what} (last result: {v:?})"
                ))
                .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a screenshot and the page's text, then panics with them.
    async fn fail(&self, msg: &str) -> ! {
        let shot = artifacts_dir().join("failure.png");
        if let Ok(png) = self.c.screenshot().await {
            let _ = std::fs::write(&shot, png);
        }
        let text = self
            .c
            .execute(
                "return document.body.innerText.slice(0, 6000) + '\\nerrors: ' + \
                 JSON.stringify(window.__tvErrors || [])",
                vec![],
            )
            .await
            .unwrap_or_default();
        panic!(
            "{msg}\nscreenshot: {}\npage text:\n{}",
            shot.display(),
            text.as_str().unwrap_or_default()
        );
    }

    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.c
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    /// Replaces an input's value by typing, as a user would.
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        e.clear().await.expect("clear");
        if !text.is_empty() {
            e.send_keys(text).await.expect("type");
        }
    }

    async fn select(&self, css: &str, value: &str) {
        self.find(css)
            .await
            .select_by_value(value)
            .await
            .unwrap_or_else(|e| panic!("select {value:?} in {css}: {e}"));
    }

    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let path = artifacts_dir().join(name);
        let png = self.c.screenshot().await.expect("screenshot");
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }
}

/// Opens a browser, runs `scenario`, and closes the browser whether it passed or panicked.
pub async fn with_page<F>(app: &TestApp, name: &str, scenario: F)
where
    F: AsyncFnOnce(&Page, &TestApp),
{
    let driver = Chromedriver::start(&format!("chromedriver-{name}.log")).await;
    let profile = tempfile::tempdir().expect("profile dir");
    let page = Page {
        c: driver.session(profile.path()).await,
    };
    let outcome = std::panic::AssertUnwindSafe(scenario(&page, app))
        .catch_unwind()
        .await;
    let _ = page.c.close().await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

pub async fn open_page(page: &Page, url: &str) {
    page.c.goto(url).await.expect("open the page");
    page.wait(
        "the page connected to GET /events",
        "return document.getElementById('conn').dataset.state === 'open'",
    )
    .await;
}

#[actix_web::test]
async fn the_page_runs_watches_and_stops_a_job() {
    let app = spawn_app().await;
    with_page(&app, "job", async |page, app| {
        open_page(page, &format!("{}/", app.address)).await;
        assert_eq!(page.c.title().await.unwrap(), "trainvisor");

        // An invalid job: the server's own error is shown, next to the field it names.
        page.type_into("#f-world-size", "0").await;
        page.find("[data-testid=submit]").await.click().await.unwrap();
        let res = app.post_json("/jobs", &json!({"world_size": 0})).await;
        assert_eq!(res.status(), 422);
        let server: Value = res.json().await.unwrap();
        let shown = page
            .wait(
                "the server's validation error next to the field it names",
                "const e = document.querySelector('#f-world-size').closest('.field')
                   .querySelector('[data-testid=field-error]');
                 if (!e) return null;
                 return {code: e.querySelector('.code')?.textContent,
                         message: e.querySelector('.message')?.textContent,
                         invalid: document.getElementById('f-world-size').getAttribute('aria-invalid'),
                         described: document.getElementById('f-world-size').getAttribute('aria-describedby'),
                         focused: document.activeElement && document.activeElement.id};",
            )
            .await;
        assert!(
            shown["described"].as_str().unwrap().contains("f-world-size-error"),
            "{shown}"
        );
        assert_eq!(shown["code"], server["error"], "{shown}");
        assert_eq!(shown["message"], server["message"], "{shown}");
        assert!(
            server["message"].as_str().unwrap().contains("world_size"),
            "{server}"
        );
        assert_eq!(shown["invalid"], "true", "the field is marked invalid");
        assert_eq!(shown["focused"], "f-world-size", "focus moves to the field");
        assert_eq!(
            app.get_json("/jobs").await,
            json!([]),
            "a refused job creates nothing"
        );

        // A valid job: 2 shell ranks, worker scope, no backoff; Enter in a field submits.
        page.type_into("#f-world-size", "2").await;
        page.select("#f-worker", "shell").await;
        page.type_into("#f-command", SCRIPT).await;
        page.type_into("#f-total-steps", "1000").await;
        page.type_into("#f-checkpoint-every", "10").await;
        page.select("#f-restart-scope", "worker").await;
        page.type_into("#f-max-restarts", "5").await;
        page.type_into("#f-backoff", "0").await;
        page.type_into("#f-name", "browser-e2e").await;
        page.find("#f-name")
            .await
            .send_keys(&Key::Enter.to_string())
            .await
            .unwrap();

        let id = page
            .wait(
                "the new job's view (#/jobs/{id})",
                "return location.hash.startsWith('#/jobs/') ? location.hash.slice(7) : null",
            )
            .await;
        let id = id.as_str().unwrap().to_string();
        assert!(
            page.js("return document.getElementById('form-error').hidden
                       && !document.querySelector('[data-testid=field-error]')")
                .await
                .as_bool()
                .unwrap(),
            "the old error is cleared"
        );
        // The form built the spec the user asked for.
        let job = app.job(&id).await;
        let spec = &job["spec"];
        assert_eq!(job["name"], "browser-e2e");
        assert_eq!(spec["world_size"], 2);
        assert_eq!(spec["command"], json!(["sh", "-c", SCRIPT]));
        assert_eq!(spec["total_steps"], 1000);
        assert_eq!(spec["checkpoint_every"], 10);
        assert_eq!(spec["restart_scope"], "worker");
        assert_eq!(spec["max_restarts"], 5);
        assert_eq!(spec["backoff_initial_ms"], 0);

        // The list shows it, live.
        let row = format!("#jobs-table tr[data-job-id='{id}']");
        page.wait(
            "the job in the list, running, with 2 ranks",
            &format!(
                "const r = document.querySelector(\"{row}\");
                 return r && r.dataset.state === 'running'
                   && r.querySelector('.sub').textContent.endsWith('2 ranks')
                   && r.textContent.includes('browser-e2e');"
            ),
        )
        .await;

        // Its view: both ranks running, with the pids the API reports.
        let pids = app.running_pids(&id, 2).await;
        let shown = page
            .wait(
                "both ranks running with pids in the ranks table",
                "const rows = [...document.querySelectorAll('[data-testid=ranks-table] tbody tr')];
                 if (rows.length !== 2) return null;
                 const out = rows.map(r => ({rank: r.dataset.rank, state: r.dataset.state,
                                             pid: Number(r.querySelector('.pid').textContent)}));
                 return out.every(r => r.state === 'running' && r.pid > 0) ? out : null;",
            )
            .await;
        let mut shown_pids: Vec<u32> = shown
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["pid"].as_u64().unwrap() as u32)
            .collect();
        let mut api_pids = pids.clone();
        shown_pids.sort();
        api_pids.sort();
        assert_eq!(shown_pids, api_pids, "the page shows the API's pids");

        // Log lines of both ranks arrive in the log view, each once, in order.
        page.wait(
            "log lines from both ranks",
            "const t = document.querySelector('[data-testid=log-lines]').textContent;
             return t.includes('from 0') && t.includes('from 1');",
        )
        .await;
        let seqs = page
            .js("return [...document.querySelectorAll('#log-lines .log-line')].map(l => Number(l.dataset.seq))")
            .await;
        let seqs: Vec<i64> = seqs
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert!(seqs.len() >= 2, "{seqs:?}");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "log lines are unique and in order: {seqs:?}"
        );

        // kill -9 rank 0: the restart shows up with its cause, and rank 0 comes back.
        let summary = app.summary(&id).await;
        let victim = summary["workers"][0]["pid"].as_u64().unwrap() as u32;
        kill(victim, libc::SIGKILL);
        let restart = page
            .wait(
                "the restart of rank 0 in the restart history, with its cause",
                "const r = document.querySelector('[data-testid=restarts] tbody tr[data-rank=\"0\"]');
                 return r && r.textContent.includes('SIGKILL') ? {reason: r.dataset.reason,
                   text: r.textContent} : null;",
            )
            .await;
        assert_eq!(restart["reason"], "signal", "{restart}");
        let text = restart["text"].as_str().unwrap();
        assert!(
            text.contains("killed by signal 9 (SIGKILL)"),
            "the cause is shown: {text}"
        );
        assert!(text.contains("worker"), "the scope is shown: {text}");
        page.wait(
            "rank 0 running again under a new pid, 1 restart",
            &format!(
                "const r = document.querySelector('[data-testid=ranks-table] tbody tr[data-rank=\"0\"]');
                 const pid = r && Number(r.querySelector('.pid').textContent);
                 return r && r.dataset.state === 'running' && pid > 0 && pid !== {victim}
                   && r.children[4].textContent === '1';"
            ),
        )
        .await;
        page.wait(
            "the restart was filled in as done (restarted_at)",
            "const r = document.querySelector('[data-testid=restarts] tbody tr[data-rank=\"0\"]');
             return r && r.lastChild.textContent !== 'pending';",
        )
        .await;
        // The incident timeline: the failure, then its phases as labelled bar segments.
        let incident = page
            .wait(
                "incident #1 of rank 0 with its relaunch and start phases",
                "const i = document.querySelector('[data-testid=incidents] li[data-seq=\"1\"]');
                 const phases = i ? [...i.querySelectorAll('.phase')].map(p => p.dataset.phase) : [];
                 return i && phases.includes('start') ? {rank: i.dataset.rank, phases,
                   text: i.textContent} : null;",
            )
            .await;
        assert_eq!(incident["rank"], "0", "{incident}");
        assert_eq!(incident["phases"][0], "relaunch", "{incident}");
        let text = incident["text"].as_str().unwrap();
        assert!(text.contains("#1 rank 0 signal"), "{text}");
        assert!(text.contains("worker restart of rank 0"), "{text}");
        assert!(
            text.contains("relaunch ") && text.contains(" s"),
            "{text}"
        );
        page.wait(
            "the list counts the restart",
            &format!(
                "const r = document.querySelector(\"{row}\");
                 return r && r.children[3].textContent === '1';"
            ),
        )
        .await;
        page.wait(
            "the restart note and the new incarnation's lines in the log view",
            "const lines = [...document.querySelectorAll('#log-lines .log-line')];
             return lines.some(l => l.dataset.stream === 'system' && l.textContent.includes('SIGKILL'))
               && lines.some(l => l.querySelector('.who').textContent === 'r0.1');",
        )
        .await;
        // Heartbeats became progress events and chart points.
        page.wait(
            "loss and steps/s charts with points",
            "return Number(document.getElementById('chart-loss').dataset.points) >= 2
               && Number(document.getElementById('chart-rate').dataset.points) >= 1;",
        )
        .await;

        page.js("window.scrollTo(0, 0); return null").await;
        page.screenshot("job.png").await;

        // Pause holds new lines; resuming shows them, without duplicates.
        page.find("[data-testid=log-follow]").await.click().await.unwrap();
        page.wait(
            "new lines held while paused",
            "return /held/.test(document.getElementById('log-status').textContent);",
        )
        .await;
        page.find("[data-testid=log-follow]").await.click().await.unwrap();
        let seqs = page
            .js("return [...document.querySelectorAll('#log-lines .log-line')].map(l => Number(l.dataset.seq))")
            .await;
        let seqs: Vec<i64> = seqs
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "after resuming: unique and in order: {seqs:?}"
        );

        // The rank filter reopens the stream for one rank.
        page.select("#log-rank", "1").await;
        page.wait(
            "only rank 1's lines after filtering",
            "const lines = [...document.querySelectorAll('#log-lines .log-line')];
             return lines.length > 0 && lines.every(l => l.dataset.rank === '1');",
        )
        .await;

        // Stop (after a confirm): the job becomes stopped, the log stream ends with a marker.
        page.find("[data-testid=stop]").await.click().await.unwrap();
        page.c.accept_alert().await.expect("the stop confirm");
        page.wait(
            "the job shown as stopped",
            "return document.querySelector('[data-testid=job-state]').textContent === 'stopped'
               && document.querySelector('[data-testid=stop]').disabled;",
        )
        .await;
        assert_eq!(app.job(&id).await["state"], "stopped");
        page.wait(
            "the list shows it stopped",
            &format!("return document.querySelector(\"{row}\")?.dataset.state === 'stopped';"),
        )
        .await;
        page.wait(
            "the end-of-stream marker in the log view",
            "const e = document.querySelector('[data-testid=log-end]');
             return e && e.textContent.includes('stopped');",
        )
        .await;
        // The whole stopped view, for a reviewer.
        page.c.set_window_size(1280, 2400).await.unwrap();
        page.screenshot("job-stopped-full.png").await;

        // The job view has its own link; it also works in a narrow window.
        page.c.set_window_size(420, 800).await.unwrap();
        page.c.goto("about:blank").await.unwrap();
        open_page(page, &format!("{}/#/jobs/{id}", app.address)).await;
        page.wait(
            "the linked job view, with its ranks, restart and ended log",
            "return document.querySelector('[data-testid=job-state]').textContent === 'stopped'
               && document.querySelectorAll('[data-testid=ranks-table] tbody tr').length === 2
               && document.querySelector('[data-testid=restarts] tbody tr[data-reason=signal]')
               && document.querySelector('[data-testid=log-end]');",
        )
        .await;
        let overflow = page
            .js("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            .await;
        assert!(
            overflow.as_i64().unwrap() <= 0,
            "nothing overflows a narrow window horizontally ({overflow} px)"
        );
        page.screenshot("job-narrow.png").await;

        // Delete, after a confirm: a finished job plainly, a running one with ?force=true.
        let running = app
            .create_job(json!({"world_size": 1, "name": "to-force-delete",
                               "command": ["sh", "-c", "echo up; sleep 60"]}))
            .await;
        app.running_pids(&running, 1).await;
        for (job, state) in [(id.as_str(), "stopped"), (running.as_str(), "running")] {
            open_page(page, &format!("{}/#/jobs/{job}", app.address)).await;
            page.wait(
                &format!("the view of the {state} job"),
                &format!(
                    "return document.querySelector('[data-testid=job-state]').textContent === '{state}'"
                ),
            )
            .await;
            page.find("[data-testid=delete]").await.click().await.unwrap();
            let question = page.c.get_alert_text().await.expect("a confirm");
            if state == "running" {
                assert!(question.contains("Stop it"), "{question}");
            }
            page.c.accept_alert().await.unwrap();
            page.wait(
                "the job gone from the list and the view closed",
                &format!(
                    "return !document.querySelector(\"#jobs-table tr[data-job-id='{job}']\")
                       && location.hash === '#/' && !document.getElementById('job-none').hidden;"
                ),
            )
            .await;
            assert_eq!(app.get(&format!("/jobs/{job}")).await.status(), 404);
        }

        let errors = page.js("return window.__tvErrors || []").await;
        assert_eq!(errors, json!([]), "the page reported errors");
    })
    .await;
}

/// The restart history of a job whose rank recorded its exception shows that exception.
#[actix_web::test]
async fn the_page_shows_the_root_cause_of_a_failure() {
    let app = spawn_app().await;
    let id = app.create_job(crate::python::recording_job()).await;
    app.wait_finished(&id, Duration::from_secs(60)).await;
    with_page(&app, "root-cause", async |page, app| {
        open_page(page, &format!("{}/#/jobs/{id}", app.address)).await;
        page.wait(
            "the restart history names the exception the rank recorded",
            "const r = document.querySelector('[data-testid=restarts] tbody tr[data-rank=\"0\"]');
             return r && r.textContent.includes('ValueError: shard 7 is corrupt');",
        )
        .await;
    })
    .await;
}

/// Submits `spec` to a server that has an API token; the new job's id.
pub async fn submit_with_token(app: &TestApp, token: &str, spec: Value) -> String {
    crate::helpers::submit_to(&app.client, &app.address, Some(token), &spec).await
}

#[actix_web::test]
async fn the_page_signs_in_when_the_server_has_an_api_token() {
    let app = spawn_app_with(|s| s.api_token = Some("s3cret-token".into())).await;
    let id = submit_with_token(
        &app,
        "s3cret-token",
        json!({"world_size": 1, "name": "behind-a-token", "command": ["true"]}),
    )
    .await;
    with_page(&app, "signin", async |page, app| {
        page.c.goto(&format!("{}/", app.address)).await.unwrap();
        page.wait(
            "the sign-in form",
            "const f = document.querySelector('[data-testid=signin]'); return f && !f.hidden;",
        )
        .await;
        page.type_into("#signin-token", "wrong").await;
        page.find("#signin-token")
            .await
            .send_keys(&Key::Enter.to_string())
            .await
            .unwrap();
        page.wait(
            "the server's answer to a wrong token",
            "const e = document.getElementById('signin-error'); return !e.hidden && e.textContent;",
        )
        .await;
        page.type_into("#signin-token", "s3cret-token").await;
        page.find("#signin-token")
            .await
            .send_keys(&Key::Enter.to_string())
            .await
            .unwrap();
        page.wait(
            "signed in: live, and the job listed",
            &format!(
                "return document.getElementById('conn').dataset.state === 'open'
                   && document.querySelector('[data-testid=signin]').hidden
                   && !!document.querySelector(\"#jobs-table tr[data-job-id='{id}']\");"
            ),
        )
        .await;
    })
    .await;
}

/// Issue 15, item 5: a job opened after it ran shows its whole curve from the stored history,
/// with its restart marked, and the incident timeline under it.
#[actix_web::test]
async fn the_charts_show_history_from_before_the_page_was_opened() {
    let app = spawn_app().await;
    let data = small_dataset(&app);
    let id = app
        .create_job(json!({"world_size": 2, "dataset": data, "total_steps": 400,
                           "batch_size": 16, "checkpoint_every": 20, "sleep_sec": 0.02,
                           "backoff_initial_ms": 200, "restart_scope": "job"}))
        .await;
    let pid = wait_for(Duration::from_secs(60), || async {
        let s = app.summary(&id).await;
        (s["step"].as_u64().unwrap_or(0) >= 120)
            .then(|| s["workers"][0]["pid"].as_u64())
            .flatten()
    })
    .await
    .expect("the job steps");
    kill(pid as u32, libc::SIGKILL);
    app.wait_finished(&id, Duration::from_secs(120)).await;
    let samples = app.get_json(&format!("/jobs/{id}/progress")).await;
    let samples = samples.as_array().unwrap();
    assert!(samples.len() >= 3, "{samples:?}");
    let ats: Vec<&str> = samples.iter().map(|s| s["at"].as_str().unwrap()).collect();
    assert!(ats.windows(2).all(|w| w[0] < w[1]), "{ats:?}");
    let with_loss = samples.iter().filter(|s| s["loss"].is_f64()).count();
    assert!(with_loss >= 3, "{samples:?}");

    with_page(&app, "history", async |page, app| {
        open_page(page, &format!("{}/#/jobs/{id}", app.address)).await;
        let n = with_loss;
        page.wait(
            "the loss chart holds every stored sample and marks the restart",
            &format!(
                "const c = document.getElementById('chart-loss');
                 return Number(c.dataset.points) >= {n} && c.dataset.restarts === '1'
                   && c.querySelectorAll('.restart-mark').length === 1;"
            ),
        )
        .await;
        page.wait(
            "the incident timeline under the job",
            "const i = document.querySelector('[data-testid=incidents] li[data-seq=\"1\"]');
             return i && i.dataset.end === 'recovered' && i.querySelectorAll('.phase').length === 3;",
        )
        .await;
    })
    .await;
}

/// Issue 14, item 8: at 1280×800 and at 420 px the jobs column never scrolls sideways (long
/// names are cut, not wrapped), the Scope dropdown shows its whole text, and every field's
/// error is shown next to its field at once.
#[actix_web::test]
async fn the_page_fits_1280_and_420_and_shows_every_field_error() {
    let app = spawn_app().await;
    // What a busy list holds: finished and running jobs, long names, big steps, restarts.
    for (i, name) in [
        "a",
        "a-rather-long-job-name-that-would-not-fit-anywhere-sensible",
    ]
    .iter()
    .enumerate()
    {
        app.create_job(
            json!({"world_size": 1 + i, "name": name, "command": ["true"],
                              "restart_scope": "worker"}),
        )
        .await;
    }
    let steps = r#"for i in $(seq 100000 100060); do curl -s -o /dev/null -X POST -H "Authorization: Bearer $TRAINVISOR_TOKEN" -d "{\"step\": $i}" "$TRAINVISOR_HEARTBEAT_URL"; sleep 1; done"#;
    for total in [None, Some(1_000_000)] {
        let mut spec = json!({"world_size": 16, "command": ["sh", "-c", steps],
                              "restart_scope": "worker", "backoff_initial_ms": 0});
        if let Some(t) = total {
            spec["total_steps"] = json!(t);
        }
        let id = app.create_job(spec).await;
        let pid = wait_for(Duration::from_secs(60), || async {
            app.summary(&id).await["workers"][5]["pid"].as_u64()
        })
        .await
        .unwrap();
        kill(pid as u32, libc::SIGKILL);
    }
    with_page(&app, "layout", async |page, app| {
        for (width, height) in [(1280, 800), (420, 800)] {
            page.c.set_window_size(width, height).await.unwrap();
            open_page(page, &format!("{}/", app.address)).await;
            page.wait(
                "every job listed, the running ones with their steps",
                "const rows = document.querySelectorAll('#jobs-body tr');
                 return rows.length === 4 && [...rows].filter(r => /step 1000|10%|0%/.test(r.textContent)).length >= 1;",
            )
            .await;
            let fit = page
                .js("const wrap = document.getElementById('jobs-table').closest('.table-wrap');
                     const select = document.getElementById('f-restart-scope');
                     const ctx = document.createElement('canvas').getContext('2d');
                     ctx.font = getComputedStyle(select).font;
                     const text = ctx.measureText(select.options[select.selectedIndex].text).width;
                     return {scroll: wrap.scrollWidth, client: wrap.clientWidth,
                             page: document.documentElement.scrollWidth, viewport: window.innerWidth,
                             select: select.clientWidth, text};")
                .await;
            // Names and ids stay on one line (cut with an ellipsis, not wrapped), and no other
            // cell is clipped.
            let rows = page
                .js("return [...document.querySelectorAll('#jobs-body tr')].map(r => ({
                       lines: [...r.children[0].querySelectorAll('a, .sub')]
                         .filter(e => getComputedStyle(e).display !== 'none').map(e => e.getClientRects().length),
                       clipped: [...r.children].slice(1)
                         .filter(td => td.scrollWidth > td.clientWidth + 1).map(td => td.textContent)}))")
                .await;
            for row in rows.as_array().unwrap() {
                assert!(
                    row["lines"].as_array().unwrap().iter().all(|n| n == 1),
                    "{width} px: a name or id wraps: {rows}"
                );
                assert_eq!(row["clipped"], json!([]), "{width} px: {rows}");
            }
            let n = |k: &str| fit[k].as_f64().unwrap();
            assert!(n("scroll") <= n("client"), "{width} px: the jobs column scrolls: {fit}");
            assert!(n("page") <= n("viewport"), "{width} px: the page scrolls sideways: {fit}");
            // The option's text plus the padding and the arrow.
            assert!(n("select") >= n("text") + 24.0, "{width} px: Scope is clipped: {fit}");
        }

        page.c.set_window_size(1280, 800).await.unwrap();
        page.type_into("#f-world-size", "1.5").await;
        page.type_into("#f-max-restarts", "2.5").await;
        page.find("[data-testid=submit]").await.click().await.unwrap();
        let errors = page
            .wait(
                "an error next to each invalid field",
                "const es = [...document.querySelectorAll('[data-testid=field-error]')];
                 return es.length === 2 ? es.map(e => ({field: e.dataset.field,
                   inField: !!e.closest('.field').querySelector('input, select'),
                   text: e.textContent})) : null;",
            )
            .await;
        assert_eq!(errors[0]["field"], "world_size", "{errors}");
        assert_eq!(errors[1]["field"], "max_restarts", "{errors}");
        assert!(errors.as_array().unwrap().iter().all(|e| e["inField"] == true), "{errors}");
        assert!(
            errors[1]["text"].as_str().unwrap().contains("whole number"),
            "{errors}"
        );
        assert_eq!(
            page.js("return document.activeElement.id").await,
            "f-world-size",
            "the first invalid field has the focus"
        );
    })
    .await;
}

/// Warm standby (issue 16): each rank's standby is shown in the ranks table with its state
/// and pid, and a rank that became its standby wears the `warm` badge.
#[actix_web::test]
async fn the_page_shows_each_ranks_standby_and_warm_starts() {
    use crate::standby::*;
    let app = spawn_app().await;
    let files = Files::new();
    let id = app.create_job(files.spec(2, 100_000, json!({}))).await;
    let s = standbys_ready(&app, &id).await;
    let standby = s["workers"][1]["standby"]["pid"].as_u64().unwrap();
    with_page(&app, "standby", async |page, app| {
        open_page(page, &format!("{}/#/jobs/{id}", app.address)).await;
        page.wait(
            "both ranks show a ready standby with its pid",
            &format!(
                "const r = [...document.querySelectorAll('#ranks-body tr td.standby')];
                 return r.length === 2 && r.every(c => c.dataset.state === 'ready')
                   && r[1].textContent === 'ready · pid {standby}';"
            ),
        )
        .await;
        kill(
            s["workers"][1]["pid"].as_u64().unwrap() as u32,
            libc::SIGKILL,
        );
        page.wait(
            "rank 1 is its former standby, marked warm",
            &format!(
                "const r = document.querySelector('#ranks-body tr[data-rank=\"1\"]');
                 return r && r.children[2].textContent === '{standby}'
                   && r.querySelector('.badge.warm') !== null;"
            ),
        )
        .await;
        page.screenshot("standby.png").await;
    })
    .await;
    app.stop(&id).await;
}
