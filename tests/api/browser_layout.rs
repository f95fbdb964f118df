//! The page as a new user first sees it (issue 29, point 3), in real headless Chromium at
//! 1280×800: signed out, the list says to sign in (not "no jobs"); signed in, ten jobs with
//! realistic names show those names whole and their ages unclipped; an open job shows its
//! log on the first screen. Screenshots: `target/browser-artifacts/first-hour-*.png`.

use fantoccini::key::Key;
use serde_json::json;

use crate::browser::{open_page, submit_with_token, with_page};
use crate::helpers::spawn_app_with;

const TOKEN: &str = "first-hour-7f3a9c2e51d84b06";

/// Names as people give them: model, task, variant.
const NAMES: [&str; 10] = [
    "bert-base-finetune",
    "resnet50-imagenet",
    "llama-7b-lora-r16",
    "gpt2-small-pretrain",
    "ddp-mnist-smoke",
    "vit-b16-cifar100",
    "whisper-tiny-asr",
    "t5-small-summarize",
    "sdxl-lora-faces-v2",
    "mixtral-moe-eval",
];

/// Ranks that print a line and heartbeat a step every 0.3 s for a minute.
const TRAIN: &str = r#"i=0; while [ $i -lt 200 ]; do echo "rank $RANK step $i loss 0.$((900 - i))"; curl -s -o /dev/null -X POST -H "Authorization: Bearer $TRAINVISOR_TOKEN" -d "{\"step\": $i}" "$TRAINVISOR_HEARTBEAT_URL"; i=$((i+1)); sleep 0.3; done"#;

#[actix_web::test]
async fn the_page_at_1280_by_800_with_ten_jobs_shows_names_ages_and_the_log() {
    let app = spawn_app_with(|s| s.api_token = Some(TOKEN.into())).await;
    let mut training = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        // Half finished at once, half training (with steps, some with a total).
        let spec = if i % 2 == 0 {
            json!({"world_size": 1 + i % 3, "name": name, "command": ["true"],
                   "restart_scope": "worker"})
        } else {
            json!({"world_size": 4, "name": name, "command": ["sh", "-c", TRAIN],
                   "restart_scope": "worker", "total_steps": 200})
        };
        let id = submit_with_token(&app, TOKEN, spec).await;
        if i % 2 == 1 {
            training.push(id);
        }
    }
    let running = training[0].clone();
    with_page(&app, "first-hour", async |page, app| {
        page.c.set_window_size(1280, 800).await.unwrap();
        page.c.goto(&format!("{}/", app.address)).await.unwrap();
        let empty = page
            .wait(
                "signed out: the list asks to sign in",
                "const f = document.querySelector('[data-testid=signin]');
                 const e = document.getElementById('jobs-empty');
                 return f && !f.hidden && !e.hidden && e.textContent;",
            )
            .await;
        assert_eq!(empty, "Sign in to see the jobs.");
        page.screenshot("first-hour-signed-out.png").await;

        page.type_into("#signin-token", TOKEN).await;
        page.find("#signin-token")
            .await
            .send_keys(&Key::Enter.to_string())
            .await
            .unwrap();
        page.wait(
            "signed in: ten jobs listed, the running ones stepping",
            "const rows = [...document.querySelectorAll('#jobs-body tr')];
             return rows.length === 10 && document.getElementById('jobs-empty').hidden
               && rows.filter(r => /%/.test(r.children[2].textContent)).length >= 5;",
        )
        .await;
        // Every name whole (no ellipsis), and the Age column wide enough for the longest
        // value its format makes.
        let cut = page
            .js("return [...document.querySelectorAll('#jobs-body tr td:first-child a')]
                   .filter(a => a.scrollWidth > a.clientWidth).map(a => a.textContent);")
            .await;
        assert_eq!(cut, json!([]), "names cut at 1280 px");
        let ages = page
            .js("const cell = document.querySelector('#jobs-body tr td.age');
                 const clipped = ['59 s', '59 min', '47 h', '365 d'].filter(t => {
                   cell.textContent = t; return cell.scrollWidth > cell.clientWidth; });
                 return clipped;")
            .await;
        assert_eq!(ages, json!([]), "ages clipped at 1280 px");
        page.screenshot("first-hour-jobs.png").await;

        open_page(page, &format!("{}/#/jobs/{running}", app.address)).await;
        page.wait(
            "the job's log lines arrive",
            "return document.querySelectorAll('#log-lines .log-line').length >= 8;",
        )
        .await;
        // The first screen of the job (the window's inner height: 1280×800 less the
        // browser's own bars) shows at least ten lines of its log.
        let log = page
            .js("const r = document.getElementById('log-lines').getBoundingClientRect();
                 const line = parseFloat(getComputedStyle(document.getElementById('log-lines')).lineHeight);
                 return {top: r.top, bottom: r.bottom, line, fold: window.innerHeight};")
            .await;
        page.screenshot("first-hour-job.png").await;
        let n = |k: &str| log[k].as_f64().unwrap();
        let visible = n("bottom").min(n("fold")) - n("top");
        assert!(
            visible >= 10.0 * n("line"),
            "the log is below the fold at 1280×800: {log}"
        );
    })
    .await;
    for id in &training {
        app.client
            .post(app.url(&format!("/jobs/{id}/stop")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
    }
}
