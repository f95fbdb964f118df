//! The warm standby's Python side (`launcher::standby::PROGRAM`, shipped in the binary) on its
//! own, without a server: a script run by a standby behaves as `python script.py` (or
//! `python -m module`) runs it. Each case runs the same script both ways with python3 and
//! compares what a script or its parent can see: exit code or signal, stdout, stderr
//! (tracebacks included), argv, `sys.path[0]`, `__file__`, `__name__`, cwd, stdin, the
//! environment — all but the one variable that says it was warm-started.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;
use trainvisor::launcher::standby::{PROGRAM, READY_LINE};

/// What a run leaves: (code, signal, stdout, stderr).
type Seen = (Option<i32>, Option<i32>, String, String);

/// The probe: prints what a script can see of how it was started, then does what `ACTION`
/// says.
const PROBE: &str = r#"import os, sys, json
print(json.dumps({"name": __name__, "argv": sys.argv, "path0": sys.path[0],
                  "file": __file__, "cwd": os.getcwd(), "stdin": sys.stdin.read(),
                  "main_keys": sorted(k for k in globals() if k.startswith("__")),
                  "env": {k: v for k, v in os.environ.items() if k.startswith("PROBE_")},
                  "preloaded": "probe_preload" in sys.modules}), flush=True)
action = os.environ.get("ACTION", "ok")
if action == "raise":
    def inner():
        raise ValueError("boom")
    inner()
elif action == "exit7":
    sys.exit(7)
elif action == "exit_message":
    sys.exit("bad things")
elif action == "sigterm":
    import signal
    os.kill(os.getpid(), signal.SIGTERM)
    import time
    time.sleep(5)
elif action == "interrupt":
    raise KeyboardInterrupt
"#;

fn cold(dir: &Path, argv: &[&str], env: &[(&str, &str)]) -> Seen {
    let out = Command::new("python3")
        .args(argv)
        .current_dir(dir)
        .envs(env.iter().copied())
        .env("PYTHONPATH", dir)
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs");
    (
        out.status.code(),
        out.status.signal(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The standby started in `/` with a stale environment, then activated to run `argv` in `dir`.
fn warm(dir: &Path, argv: &[&str], env: &[(&str, &str)]) -> Seen {
    let mut child = Command::new("python3")
        .args(["-c", PROGRAM, "probe_preload", "json"])
        .current_dir("/")
        .env("PYTHONPATH", dir)
        .env("PROBE_STALE", "from the standby's start")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let (script, module, args) = match argv {
        ["-m", m, rest @ ..] => (None, Some(*m), rest),
        [s, rest @ ..] => (Some(*s), None, rest),
        [] => unreachable!(),
    };
    let mut all_env: serde_json::Map<String, serde_json::Value> =
        std::env::vars().map(|(k, v)| (k, json!(v))).collect();
    all_env.insert("PYTHONPATH".into(), json!(dir));
    for (k, v) in env {
        all_env.insert(k.to_string(), json!(v));
    }
    all_env.insert("TRAINVISOR_WARM_START".into(), json!("1"));
    let line = json!({"env": all_env, "unset": ["PROBE_STALE"], "cwd": dir,
                      "script": script, "module": module, "argv": args});
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{line}").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stdout = stdout
        .strip_prefix(&format!("{READY_LINE}\n"))
        .unwrap_or_else(|| panic!("no ready line first: {stdout:?}"))
        .to_string();
    (
        out.status.code(),
        out.status.signal(),
        stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/probe.py"), PROBE).unwrap();
    std::fs::write(dir.path().join("probe_mod.py"), PROBE).unwrap();
    std::fs::write(dir.path().join("probe_preload.py"), "X = 1\n").unwrap();
    dir
}

/// `preloaded` is the one field that differs (and must): the standby imported it.
fn without_preloaded(stdout: &str) -> String {
    stdout.replace("\"preloaded\": true", "\"preloaded\": false")
}

#[test]
fn a_script_run_by_a_standby_sees_what_a_cold_start_sees() {
    let dir = setup();
    for action in ["ok", "raise", "exit7", "exit_message", "sigterm"] {
        for argv in [
            vec!["sub/probe.py", "--lr", "0.1", ""],
            vec!["-m", "probe_mod", "x", "-m"],
        ] {
            let env = [("ACTION", action), ("PROBE_RANK", "3")];
            let c = cold(dir.path(), &argv, &env);
            let w = warm(dir.path(), &argv, &env);
            assert!(
                w.2.contains("\"preloaded\": true"),
                "{action} {argv:?}: {w:?}"
            );
            assert!(c.2.contains("\"preloaded\": false"), "{c:?}");
            assert_eq!(
                (c.0, c.1, &c.2, &c.3),
                (w.0, w.1, &without_preloaded(&w.2), &w.3),
                "{action} {argv:?}"
            );
        }
    }
    // What each action means, on the cold side (so the comparison above compares something).
    let seen = |action| cold(dir.path(), &["sub/probe.py"], &[("ACTION", action)]);
    assert_eq!(seen("ok").0, Some(0));
    let raised = seen("raise");
    assert_eq!(raised.0, Some(1));
    assert!(raised.3.contains("ValueError: boom") && raised.3.contains("probe.py"));
    assert_eq!(seen("exit7").0, Some(7));
    assert_eq!(seen("exit_message").3, "bad things\n");
    assert_eq!(seen("sigterm").1, Some(libc::SIGTERM));
}

#[test]
fn an_interrupted_script_dies_of_sigint_as_a_cold_one_does() {
    let dir = setup();
    let env = [("ACTION", "interrupt")];
    let c = cold(dir.path(), &["sub/probe.py"], &env);
    let w = warm(dir.path(), &["sub/probe.py"], &env);
    assert_eq!(c.1, Some(libc::SIGINT), "{c:?}");
    assert_eq!((c.0, c.1), (w.0, w.1));
    assert!(w.3.ends_with("KeyboardInterrupt\n"), "{w:?}");
}

#[test]
fn a_missing_script_fails_as_python_says_it() {
    let dir = setup();
    let c = cold(dir.path(), &["nothere.py"], &[]);
    let w = warm(dir.path(), &["nothere.py"], &[]);
    assert_eq!(c.0, Some(2));
    assert_eq!((c.0, &c.3), (w.0, &w.3));
}

#[test]
fn a_standby_whose_stdin_closes_without_a_word_exits_quietly() {
    let out = Command::new("python3")
        .args(["-c", PROGRAM, "json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{READY_LINE}\n")
    );
    assert!(out.stderr.is_empty());
}

#[test]
fn a_preload_that_raises_ends_the_standby_before_it_is_ready() {
    let out = Command::new("python3")
        .args(["-c", PROGRAM, "no_such_module_here"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ModuleNotFoundError: No module named 'no_such_module_here'"),
        "{err}"
    );
}
