//! Docker for tests, with no registry: the base image from Debian's packages
//! (`deploy/base-image.sh`), the trainvisor image around this test build's binary
//! (`deploy/Dockerfile --target prebuilt`), the S3 server image of `deploy/s3-image.sh` around
//! the s3s-fs binary the S3 tests install, a rank image with a `VOLUME` and a `HEALTHCHECK`,
//! guards that remove the containers, networks and volumes a test creates (also when it
//! fails), and [`JobLeftovers`], which fails a test whose job left any behind. Each image is
//! built at most once per test run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The repository's root (deploy/, Cargo.toml).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `docker ARGS` and returns its output (whatever the exit status).
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker (is Docker installed?): {e}"))
}

/// Runs `docker ARGS`, panics with its stderr unless it succeeds, returns its trimmed stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A name no other test, run or worktree on this engine uses.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The registry-free base (Debian minbase + python3, tini, ca-certificates), built by
/// `deploy/base-image.sh` on first use and cached in the engine across runs (the script
/// takes a lock, so parallel callers wait for one build).
pub fn base_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| image_script("deploy/base-image.sh", &[]))
        .clone()
}

/// Builds `deploy/Dockerfile`'s `prebuilt` target around `binary` (stripped) on the base
/// image; the tag names a digest of the binary, the Dockerfile and the base, so test runs of
/// other builds never clash and a changed Dockerfile is never served from a stale image.
fn image_around(binary: &Path, repo: &str) -> String {
    let base = base_image();
    let ctx = tempfile::tempdir().expect("a temp build context");
    let copy = ctx.path().join("trainvisor");
    std::fs::copy(binary, &copy).expect("copy the binary into the context");
    let status = Command::new("strip")
        .arg(&copy)
        .status()
        .expect("strip runs (binutils)");
    assert!(status.success(), "strip {}", copy.display());
    let dockerfile = repo_root().join("deploy/Dockerfile");
    let base_id = docker_ok(&["image", "inspect", "-f", "{{.Id}}", &base]);
    let tag = format!("{repo}:{}", digest(&[&copy, &dockerfile], &base_id));
    if docker(&["image", "inspect", &tag]).status.success() {
        return tag;
    }
    docker_ok(&[
        "build",
        "-q",
        "-f",
        dockerfile.to_str().unwrap(),
        "--target",
        "prebuilt",
        "--build-arg",
        &format!("RUNTIME_IMAGE={base}"),
        "--label",
        "org.trainvisor.test=1",
        "-t",
        &tag,
        ctx.path().to_str().unwrap(),
    ]);
    // Images of earlier test builds, unused for a day, go (the base stays: it is the cache).
    let _ = docker(&[
        "image",
        "prune",
        "-a",
        "-f",
        "--filter",
        "label=org.trainvisor.test=1",
        "--filter",
        "until=24h",
    ]);
    tag
}

/// A short digest of files and a salt (the base image's id): image tags that change whenever
/// what goes into the image does.
fn digest(files: &[&Path], salt: &str) -> String {
    use std::io::Write;
    let mut sum = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    {
        let mut stdin = sum.stdin.take().unwrap();
        for file in files {
            stdin
                .write_all(&std::fs::read(file).expect("read a file to digest"))
                .unwrap();
        }
        stdin.write_all(salt.as_bytes()).unwrap();
    }
    let out = sum.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..16].to_string()
}

/// The trainvisor image around this test build's binary (`CARGO_BIN_EXE_trainvisor`).
pub fn trainvisor_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            image_around(
                Path::new(env!("CARGO_BIN_EXE_trainvisor")),
                "trainvisor-test",
            )
        })
        .clone()
}

/// Runs one of deploy/'s image scripts with `env`; the image name is its last line on stdout.
fn image_script(script: &str, env: &[(&str, &std::ffi::OsStr)]) -> String {
    let out = Command::new(repo_root().join(script))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{script} runs: {e}"));
    assert!(
        out.status.success(),
        "{script} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_else(|| panic!("{script} prints the image name"))
        .trim()
        .to_string()
}

/// The registry-free S3 server image users build for Compose, by the same recipe:
/// `deploy/s3-image.sh` (s3s-fs on the base image, standing in for MinIO in the compose file
/// and the manifests unchanged), around the s3s-fs binary tests/run installs.
pub fn s3s_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let binary = crate::helpers::s3_server::binary("s3s-fs");
            image_script(
                "deploy/s3-image.sh",
                &[
                    ("S3S_FS", binary.as_os_str()),
                    ("S3_IMAGE_REPO", "trainvisor-test-s3s".as_ref()),
                ],
            )
        })
        .clone()
}

/// The image the launcher tests run ranks in: the base plus what a real training image often
/// declares and a rank must not inherit: a `VOLUME` (an anonymous volume with every
/// container) and a `HEALTHCHECK` (one that always fails, so a rank that inherited it shows
/// as unhealthy).
pub fn rank_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let ctx = tempfile::tempdir().unwrap();
            std::fs::write(
                ctx.path().join("Dockerfile"),
                format!(
                    "FROM {}\n\
                     VOLUME /scratch\n\
                     HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"false\"]\n",
                    base_image()
                ),
            )
            .unwrap();
            build_context(ctx.path(), "trainvisor-test-rank")
        })
        .clone()
}

/// Builds the context `dir` (a `Dockerfile` on the base image) as `repo:<digest of it and the
/// base>`, unless an image of that tag exists.
fn build_context(dir: &Path, repo: &str) -> String {
    let base_id = docker_ok(&["image", "inspect", "-f", "{{.Id}}", &base_image()]);
    let tag = format!("{repo}:{}", digest(&[&dir.join("Dockerfile")], &base_id));
    if docker(&["image", "inspect", &tag]).status.success() {
        return tag;
    }
    docker_ok(&[
        "build",
        "-q",
        "--label",
        "org.trainvisor.test=1",
        "-t",
        &tag,
        dir.to_str().unwrap(),
    ]);
    tag
}

/// A container this test started; removed (with its anonymous volumes) on drop.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `docker run -d --name <unique> ARGS`; panics (after removing it) if it cannot start.
    pub fn run(prefix: &str, args: &[&str]) -> Container {
        let name = unique_name(prefix);
        let container = Container { name: name.clone() };
        let mut full = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "org.trainvisor.test=1",
        ];
        full.extend_from_slice(args);
        docker_ok(&full);
        container
    }

    /// The host address a published container port is reachable at (`-p 127.0.0.1::PORT`).
    pub fn host_port(&self, port: u16) -> String {
        let out = docker_ok(&["port", &self.name, &format!("{port}/tcp")]);
        out.lines()
            .next()
            .unwrap_or_else(|| panic!("port {port} of {} is not published", self.name))
            .trim()
            .replace("0.0.0.0", "127.0.0.1")
    }

    /// `docker inspect -f FORMAT`.
    pub fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "-f", format, &self.name])
    }

    /// Everything the container printed so far (stdout and stderr).
    pub fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `docker exec` as the image's user; panics unless the command succeeds.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut full = vec!["exec", self.name.as_str()];
        full.extend_from_slice(cmd);
        docker_ok(&full)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

/// A named volume this test created; removed on drop (after the containers using it).
pub struct Volume {
    pub name: String,
}

impl Volume {
    pub fn create(prefix: &str) -> Volume {
        let name = unique_name(prefix);
        docker_ok(&[
            "volume",
            "create",
            "--label",
            "org.trainvisor.test=1",
            &name,
        ]);
        Volume { name }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = docker(&["volume", "rm", "-f", &self.name]);
    }
}

/// A bridge network this test created; removed on drop.
pub struct Network {
    pub name: String,
}

impl Network {
    pub fn create(prefix: &str) -> Network {
        let name = unique_name(prefix);
        docker_ok(&[
            "network",
            "create",
            "--label",
            "org.trainvisor.test=1",
            &name,
        ]);
        Network { name }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// A Compose project with a unique name (its containers, network and volumes carry it), run
/// with `docker compose` or, where only v1 exists, `docker-compose`; `down -v` on drop.
pub struct ComposeProject {
    pub name: String,
    file: PathBuf,
    env: Vec<(String, String)>,
}

impl ComposeProject {
    pub fn new(prefix: &str, file: &Path, env: &[(&str, &str)]) -> ComposeProject {
        ComposeProject {
            name: unique_name(prefix),
            file: file.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// `docker compose -p NAME -f FILE ARGS` with the project's variables.
    pub fn run(&self, args: &[&str]) -> Output {
        let v2 = Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        let mut cmd = if v2 {
            let mut c = Command::new("docker");
            c.arg("compose");
            c
        } else {
            Command::new("docker-compose")
        };
        cmd.args(["-p", &self.name, "-f"])
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run docker compose / docker-compose: {e}"))
    }

    /// Like `run`, panicking with the output unless it succeeds; returns trimmed stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "compose {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The container of a service, as a handle that does not remove it on drop (the project
    /// does).
    pub fn container(&self, service: &str) -> std::mem::ManuallyDrop<Container> {
        let id = self.ok(&["ps", "-q", service]);
        let id = id
            .lines()
            .next()
            .unwrap_or_else(|| panic!("no container for service {service}"));
        std::mem::ManuallyDrop::new(Container {
            name: docker_ok(&["inspect", "-f", "{{.Name}}", id])
                .trim_start_matches('/')
                .to_string(),
        })
    }
}

impl Drop for ComposeProject {
    /// `down -v`, then, unless the test failed already, fails if anything of the project is
    /// left: containers, networks or volumes (Compose labels them all with the project).
    fn drop(&mut self) {
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]);
        let label = format!("label=com.docker.compose.project={}", self.name);
        let left = |what: &[&str]| {
            let mut args = what.to_vec();
            args.extend(["-q", "--filter", label.as_str()]);
            docker_ok(&args)
        };
        let containers = left(&["ps", "-a"]);
        let networks = left(&["network", "ls"]);
        let volumes = left(&["volume", "ls"]);
        if !std::thread::panicking() {
            assert!(
                containers.is_empty() && networks.is_empty() && volumes.is_empty(),
                "compose down -v left containers {containers:?}, networks {networks:?}, \
                 volumes {volumes:?}"
            );
        }
    }
}

/// What a job of a trainvisor server puts on the engine, and the proof that none of it is
/// left: containers and networks carry the label `trainvisor.job=<id>`; the anonymous volumes
/// of its containers (an image's `VOLUME`s) carry nothing, so a watcher thread notes the
/// volumes of the job's containers while they exist. On drop, when the test has not failed
/// already, it waits (up to 60 s: removal is asynchronous) and fails unless every container,
/// network and volume of the job is gone; then it removes whatever is left.
pub struct JobLeftovers {
    label: String,
    volumes: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl JobLeftovers {
    pub fn new(job_id: &str) -> JobLeftovers {
        let label = format!("trainvisor.job={job_id}");
        let volumes: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>> =
            std::sync::Arc::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (label, volumes, stop) = (label.clone(), volumes.clone(), stop.clone());
            // One `docker ps` a poll, an inspect only for containers not seen yet: two tests
            // at a time must not cost the machine a core in docker CLI processes.
            std::thread::spawn(move || {
                let mut inspected = std::collections::BTreeSet::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let new: Vec<String> = containers_with(&label)
                        .into_iter()
                        .filter(|c| !inspected.contains(c))
                        .collect();
                    // A container's volumes exist from its creation: one look is enough.
                    volumes.lock().unwrap().extend(volumes_of(&new));
                    inspected.extend(new);
                    std::thread::sleep(std::time::Duration::from_millis(150));
                }
            })
        };
        JobLeftovers {
            label,
            volumes,
            stop,
            watcher: Some(watcher),
        }
    }

    /// The anonymous volumes seen on the job's containers so far.
    pub fn volumes_seen(&self) -> Vec<String> {
        self.volumes.lock().unwrap().iter().cloned().collect()
    }

    /// What of the job is still on the engine: containers, networks, volumes.
    pub fn left(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let volumes = self
            .volumes_seen()
            .into_iter()
            .filter(|v| docker(&["volume", "inspect", v]).status.success())
            .collect();
        (
            containers_with(&self.label),
            networks_with(&self.label),
            volumes,
        )
    }
}

impl Drop for JobLeftovers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let nothing = |l: &(Vec<String>, Vec<String>, Vec<String>)| {
            l.0.is_empty() && l.1.is_empty() && l.2.is_empty()
        };
        let mut left = self.left();
        if !std::thread::panicking() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !nothing(&left) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(200));
                left = self.left();
            }
        }
        for c in &left.0 {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        for n in &left.1 {
            let _ = docker(&["network", "rm", n]);
        }
        for v in &left.2 {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        if !std::thread::panicking() {
            assert!(
                nothing(&left),
                "left behind by {}: containers {:?}, networks {:?}, volumes {:?}",
                self.label,
                left.0,
                left.1,
                left.2
            );
        }
    }
}

/// Containers that carry `label` (`key=value`), running or not.
pub fn containers_with(label: &str) -> Vec<String> {
    docker_ok(&["ps", "-a", "-q", "--filter", &format!("label={label}")])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Networks that carry `label` (`key=value`).
pub fn networks_with(label: &str) -> Vec<String> {
    docker_ok(&["network", "ls", "-q", "--filter", &format!("label={label}")])
        .lines()
        .map(str::to_string)
        .collect()
}

/// The volumes (named or anonymous) mounted in `containers`; containers gone meanwhile are
/// skipped.
fn volumes_of(containers: &[String]) -> Vec<String> {
    if containers.is_empty() {
        return Vec::new();
    }
    let mut args = vec![
        "inspect",
        "-f",
        "{{range .Mounts}}{{if eq .Type \"volume\"}}{{.Name}} {{end}}{{end}}",
    ];
    args.extend(containers.iter().map(String::as_str));
    let out = docker(&args);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}
