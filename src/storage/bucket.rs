//! The server's own bucket at start-up (`USE_S3`, or an `s3://` `DATASET_DIR` /
//! `CHECKPOINT_DIR`): proven reachable with the configured credentials and created when it is
//! missing — so `docker compose up` needs no bucket-making sidecar for MinIO, s3s or AWS — or
//! the start fails with one line that says what to fix.

use std::time::Duration;

use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::{HttpRequest, HttpRequestBody};

use super::s3::{S3Config, S3Store, S3Url};

/// What `prepare` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    Existed,
    Created,
}

/// Checks that `location`'s bucket answers an authenticated listing, creating the bucket if
/// the server says it does not exist. A server still starting is waited for within the
/// config's retry budget (`S3_RETRY_TIMEOUT_S`).
pub async fn prepare(location: &str, config: &S3Config) -> anyhow::Result<Prepared> {
    let url = S3Url::parse(location).map_err(anyhow::Error::msg)?;
    let endpoint = endpoint(config);
    let (Some(key), Some(secret)) = (&config.access_key, &config.secret_key) else {
        anyhow::bail!(
            "{location}: no S3 credentials: set S3_ACCESS_KEY and S3_SECRET_KEY (and \
             S3_ENDPOINT for MinIO, Garage and other S3-compatible servers)"
        );
    };
    let store = S3Store::open(location, config)?;
    let refused = || {
        anyhow::anyhow!(
            "the S3 server at {endpoint} refused the credentials for bucket {} \
             (S3_ACCESS_KEY={key}): check S3_ACCESS_KEY and S3_SECRET_KEY",
            url.bucket
        )
    };
    match store.check_access().await {
        Ok(()) => return Ok(Prepared::Existed),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(refused()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("the S3 server at {endpoint}: {}", one_line(&e.to_string())),
    }
    create_bucket(&endpoint, &url.bucket, config, key, secret).await?;
    match store.check_access().await {
        Ok(()) => Ok(Prepared::Created),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(refused()),
        Err(e) => anyhow::bail!(
            "bucket {} was created at {endpoint} but cannot be listed: {}",
            url.bucket,
            one_line(&e.to_string())
        ),
    }
}

/// The S3 endpoint requests go to (AWS's regional one when none is configured).
fn endpoint(config: &S3Config) -> String {
    config
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", config.region))
        .trim_end_matches('/')
        .to_string()
}

/// `PUT /{bucket}` (path style), signed with SigV4 by object_store's own signer.
async fn create_bucket(
    endpoint: &str,
    bucket: &str,
    config: &S3Config,
    key: &str,
    secret: &str,
) -> anyhow::Result<()> {
    // Outside us-east-1, AWS wants the region in the body; S3-compatible servers accept it.
    let body = if config.region == "us-east-1" {
        String::new()
    } else {
        format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
            config.region
        )
    };
    let url = format!("{endpoint}/{bucket}");
    let mut request = HttpRequest::new(HttpRequestBody::from(body.clone()));
    *request.method_mut() = reqwest::Method::PUT;
    *request.uri_mut() = url
        .parse()
        .map_err(|e| anyhow::anyhow!("S3_ENDPOINT {endpoint:?}: {e}"))?;
    let credential = AwsCredential {
        key_id: key.to_string(),
        secret_key: secret.to_string(),
        token: None,
    };
    AwsAuthorizer::new(&credential, "s3", &config.region)
        .try_authorize(&mut request, None)
        .map_err(|e| anyhow::anyhow!("signing the CreateBucket request: {e}"))?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()?;
    let res = client
        .put(&url)
        .headers(request.headers().clone())
        .body(body)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("creating bucket {bucket} at {endpoint}: {e}"))?;
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    // Created, or made by someone else in the meantime (a second server, an operator).
    if status.is_success() || text.contains("BucketAlreadyOwnedByYou") {
        tracing::info!(bucket, endpoint, "created the S3 bucket");
        return Ok(());
    }
    anyhow::bail!(
        "creating bucket {bucket} at {endpoint}: {status} {}",
        one_line(&text)
    )
}

/// A server's message on one line, and not a whole XML document.
fn one_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.len() > 300 {
        let cut = (0..=300)
            .rev()
            .find(|&i| flat.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}…", &flat[..cut])
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_short_line() {
        let xml = "<?xml version=\"1.0\"?>\n<Error>\n  <Code>AccessDenied</Code>\n</Error>\n";
        assert_eq!(
            one_line(xml),
            "<?xml version=\"1.0\"?> <Error> <Code>AccessDenied</Code> </Error>"
        );
        let long = "é".repeat(400);
        let short = one_line(&long);
        assert!(short.ends_with('…') && short.len() <= 304);
    }

    #[test]
    fn the_endpoint_defaults_to_the_regions_aws_one() {
        let mut config = S3Config {
            region: "eu-west-1".into(),
            ..S3Config::default()
        };
        assert_eq!(endpoint(&config), "https://s3.eu-west-1.amazonaws.com");
        config.endpoint = Some("http://minio:9000/".into());
        assert_eq!(endpoint(&config), "http://minio:9000");
    }
}
