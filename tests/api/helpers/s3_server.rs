//! Real S3 servers on loopback for the tests that keep checkpoints and datasets in a bucket:
//! s3s-fs (checks SigV4 and conditional writes) and Garage (a production server that ignores
//! conditional writes), each in a temp directory that survives `stop` / `start`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::TryStreamExt;
use tempfile::TempDir;
use trainvisor::storage::{BlobStore, S3Config};
use trainvisor::trainer::rng::SplitMix64;

use super::wait_for;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    S3sFs,
    Garage,
}

/// A real S3 server on 127.0.0.1: its port and directory survive `stop` / `start`, so a test
/// can take it down and bring the same store back.
pub struct S3Server {
    kind: Kind,
    port: u16,
    rpc_port: u16,
    dir: TempDir,
    child: Option<Child>,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

/// A server binary: on PATH, or where `cargo install` puts it (`tests/run` installs both).
pub fn binary(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    }) {
        return path;
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = home.join(".cargo/bin").join(name);
    assert!(
        path.is_file(),
        "{name} is not installed: tests/run installs it (cargo install ...)"
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn random_hex(rng: &mut SplitMix64, chars: usize) -> String {
    (0..chars)
        .map(|_| char::from_digit(rng.below(16) as u32, 16).unwrap())
        .collect()
}

impl S3Server {
    pub async fn start(kind: Kind) -> S3Server {
        let mut rng = SplitMix64::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        );
        let (access_key, secret_key) = match kind {
            // Garage's key format: GK + 24 hex digits, and 64 hex digits.
            Kind::Garage => (
                format!("GK{}", random_hex(&mut rng, 24)),
                random_hex(&mut rng, 64),
            ),
            Kind::S3sFs => (
                format!("AK{}", random_hex(&mut rng, 16)),
                format!("secret-{}", random_hex(&mut rng, 32)),
            ),
        };
        let mut server = S3Server {
            kind,
            port: free_port(),
            rpc_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            bucket: "trainvisor-test".into(),
            access_key,
            secret_key,
        };
        if kind == Kind::S3sFs {
            // s3s-fs: a bucket is a directory under its root.
            std::fs::create_dir_all(server.dir.path().join("root").join(&server.bucket)).unwrap();
        } else {
            let rpc_secret = random_hex(&mut rng, 64);
            let d = server.dir.path();
            let config = format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{rpc_secret}\"\n\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{port}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                meta = d.join("meta").display(),
                data = d.join("data").display(),
                rpc = server.rpc_port,
                port = server.port,
            );
            std::fs::write(d.join("garage.toml"), config).unwrap();
        }
        server.start_again().await;
        server
    }

    /// Starts the server process (again) on the same port and directory, and waits until it
    /// answers an authenticated listing of the bucket.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut cmd = match self.kind {
            Kind::S3sFs => {
                let mut c = Command::new(binary("s3s-fs"));
                c.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                    .args(["--access-key", &self.access_key])
                    .args(["--secret-key", &self.secret_key])
                    .arg(self.dir.path().join("root"));
                c
            }
            Kind::Garage => {
                let mut c = Command::new(binary("garage"));
                c.arg("-c")
                    .arg(self.dir.path().join("garage.toml"))
                    .args(["server", "--single-node", "--default-bucket"])
                    .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key)
                    .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_key)
                    .env("GARAGE_DEFAULT_BUCKET", &self.bucket)
                    .env("RUST_LOG", "garage=warn");
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the S3 server starts");
        self.child = Some(child);
        let store = self.store("");
        let ready = wait_for(Duration::from_secs(60), || async {
            store.list("").await.ok().map(|_| ())
        })
        .await;
        if ready.is_none() {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            panic!(
                "{:?} did not come up on port {}:\n{log}",
                self.kind, self.port
            );
        }
    }

    /// kill -9: the server goes away at once, in the middle of whatever it was doing.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What the trainvisor server is configured with (the seed's S3_* env), with a short
    /// retry budget so a lasting outage fails a checkpoint within the test's patience.
    pub fn config(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint()),
            region: match self.kind {
                Kind::Garage => "garage".into(),
                Kind::S3sFs => "us-east-1".into(),
            },
            access_key: Some(self.access_key.clone()),
            secret_key: Some(self.secret_key.clone()),
            max_retries: 3,
            retry_timeout: Duration::from_secs(2),
        }
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    pub fn store(&self, prefix: &str) -> BlobStore {
        BlobStore::open_with(&self.url(prefix), &self.config()).unwrap()
    }

    /// Every key in the bucket under `prefix`, listed with object_store directly.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let BlobStore::S3(s3) = self.store("") else {
            unreachable!()
        };
        let prefix = object_store::path::Path::from(prefix);
        s3.inner()
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
