//! S3 responses that object_store retries, counted: its client retries 5xx, 429 and transport
//! errors inside (with backoff, up to `S3_MAX_RETRIES`) and reports no count of its own, so
//! every S3 request of this process goes through [`Counting`], which counts those answers for
//! `/metrics` (`trainvisor_s3_retryable_responses_total`).

use std::sync::atomic::{AtomicU64, Ordering};

use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};

static RETRYABLE: AtomicU64 = AtomicU64::new(0);

/// Answers of this process's S3 requests that object_store retries (while its budget lasts).
pub fn retryable_responses() -> u64 {
    RETRYABLE.load(Ordering::Relaxed)
}

/// object_store's own reqwest client, wrapped in [`Counting`].
#[derive(Debug, Default)]
pub struct CountingConnector;

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Counting(inner)))
    }
}

#[derive(Debug)]
struct Counting(HttpClient);

#[async_trait::async_trait]
impl HttpService for Counting {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let res = self.0.execute(req).await;
        let retryable = match &res {
            Ok(r) => r.status().is_server_error() || r.status().as_u16() == 429,
            Err(_) => true,
        };
        if retryable {
            RETRYABLE.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::s3::{S3Config, S3Store};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback "S3" that answers 503 twice, then the object: object_store retries the two,
    /// and both are counted.
    #[tokio::test]
    async fn answers_that_object_store_retries_are_counted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 16 * 1024];
                let _ = sock.read(&mut buf).await;
                let reply = if n < 2 {
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_string()
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\
                     last-modified: Thu, 03 Dec 2026 12:00:00 GMT\r\netag: \"e\"\r\n\r\nhello"
                        .to_string()
                };
                let _ = sock.write_all(reply.as_bytes()).await;
            }
        });
        let config = S3Config {
            endpoint: Some(endpoint),
            region: "us-east-1".into(),
            access_key: Some("k".into()),
            secret_key: Some("s".into()),
            max_retries: 5,
            retry_timeout: std::time::Duration::from_secs(30),
        };
        let store = S3Store::open("s3://bucket/prefix", &config).unwrap();
        let before = retryable_responses();
        let got = store.get("object").await.unwrap();
        assert_eq!(got.as_deref(), Some(&b"hello"[..]));
        assert!(retryable_responses() - before >= 2);
    }
}
