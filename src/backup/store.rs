//! The object store: aws-sdk-s3 against AWS or any S3-compatible endpoint.
//!
//! Credentials come from the standard AWS chain (environment, profile, web
//! identity, instance metadata) unless the embedded store's pair is given.
//! Every call is retried by the SDK's standard policy (3 attempts with
//! back-off); errors are reported with the SDK's full context, which never
//! includes credentials.

use anyhow::Context;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, StorageClass};
use bytes::Bytes;

use crate::config::{S3Checksums, StorageArgs};

/// How to reach the bucket.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub force_path_style: bool,
    pub checksums: S3Checksums,
    /// A fixed key pair (the embedded store); `None` uses the AWS chain.
    pub static_credentials: Option<(String, crate::config::Secret)>,
}

impl StoreConfig {
    /// From configuration; `None` when no bucket is set (backups off).
    pub fn from_args(args: &StorageArgs) -> Option<Self> {
        Some(Self {
            bucket: args.s3_bucket.clone()?,
            endpoint: args.s3_endpoint.clone(),
            region: args.s3_region.clone(),
            force_path_style: args.s3_force_path_style,
            checksums: args.s3_checksums,
            static_credentials: None,
        })
    }
}

/// A bucket in an S3-compatible store.
#[derive(Clone, Debug)]
pub struct Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    crc32c: bool,
}

/// An S3 call failed; the message carries the store's error code.
fn s3_error<E, R>(what: &str, e: aws_sdk_s3::error::SdkError<E, R>) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    anyhow::anyhow!("{what}: {}", DisplayErrorContext(&e))
}

impl Store {
    pub async fn connect(config: &StoreConfig) -> anyhow::Result<Self> {
        // One HTTPS client (rustls on ring, the machine's trusted roots) for
        // S3 and for the credential providers (STS, instance metadata).
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(config.region.clone()));
        if let Some((access, secret)) = &config.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                access,
                secret.expose(),
                None,
                None,
                "silo-embedded",
            ));
        }
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.force_path_style)
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(10))
                    .operation_attempt_timeout(std::time::Duration::from_secs(300))
                    .build(),
            );
        if let Some(endpoint) = &config.endpoint {
            b = b.endpoint_url(endpoint);
        }
        if config.checksums == S3Checksums::WhenRequired {
            b = b
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: config.bucket.clone(),
            crc32c: config.checksums == S3Checksums::WhenSupported,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Create the bucket unless it exists (for `silo dev` and tests).
    pub async fn ensure_bucket(&self) -> anyhow::Result<()> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(s3_error("create the backup bucket", e)),
        }
    }

    /// Begin a multipart upload; returns its id.
    pub async fn create_upload(
        &self,
        key: &str,
        storage_class: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/octet-stream");
        if self.crc32c {
            req = req.checksum_algorithm(ChecksumAlgorithm::Crc32C);
        }
        if let Some(class) = storage_class {
            req = req.storage_class(StorageClass::from(class));
        }
        let out = req
            .send()
            .await
            .map_err(|e| s3_error("begin the multipart upload", e))?;
        out.upload_id
            .context("the store returned no upload id for the multipart upload")
    }

    /// Upload one part (numbered from 1), with its CRC32C when checksums are on.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> anyhow::Result<CompletedPart> {
        let mut req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(body.len() as i64);
        let crc = self.crc32c.then(|| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(crc32c::crc32c(&body).to_be_bytes())
        });
        if let Some(crc) = &crc {
            req = req
                .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                .checksum_crc32_c(crc);
        }
        let out = req
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_error(&format!("upload part {number}"), e))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag)
            .set_checksum_crc32_c(crc)
            .build())
    }

    pub async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> anyhow::Result<()> {
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s3_error("complete the multipart upload", e))?;
        Ok(())
    }

    /// Abort an upload; an upload already gone counts as aborted.
    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> anyhow::Result<()> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.code(), Some("NoSuchUpload" | "AccessDenied")) => Ok(()),
            Err(e) => Err(s3_error("abort the multipart upload", e)),
        }
    }

    /// Open multipart uploads under `prefix`, or `None` if the store cannot list them.
    pub async fn open_uploads(
        &self,
        prefix: &str,
    ) -> anyhow::Result<Option<Vec<(String, String)>>> {
        let mut found = Vec::new();
        let (mut key_marker, mut id_marker) = (None, None);
        loop {
            let out = match self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) if matches!(e.code(), Some("NotImplemented")) => return Ok(None),
                Err(e) => return Err(s3_error("list open multipart uploads", e)),
            };
            for u in out.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                    found.push((k.to_owned(), id.to_owned()));
                }
            }
            if out.is_truncated() != Some(true) {
                return Ok(Some(found));
            }
            key_marker = out.next_key_marker().map(str::to_owned);
            id_marker = out.next_upload_id_marker().map(str::to_owned);
        }
    }

    pub async fn put(&self, key: &str, body: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_error(&format!("write {key}"), e))?;
        Ok(())
    }

    /// An object's bytes as a stream of chunks; `None` when it does not exist.
    pub async fn get(&self, key: &str) -> anyhow::Result<Option<ByteStream>> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.body)),
            Err(e) if matches!(e.code(), Some("NoSuchKey" | "NotFound")) => Ok(None),
            Err(e) => Err(s3_error(&format!("read {key}"), e)),
        }
    }

    /// A small object read whole (manifests); `None` when it does not exist.
    pub async fn get_bytes(&self, key: &str) -> anyhow::Result<Option<Bytes>> {
        let Some(body) = self.get(key).await? else {
            return Ok(None);
        };
        let data = body
            .collect()
            .await
            .with_context(|| format!("read {key}"))?;
        Ok(Some(data.into_bytes()))
    }

    /// Size of an object; `None` when it does not exist.
    pub async fn size(&self, key: &str) -> anyhow::Result<Option<i64>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(out.content_length),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) if matches!(e.code(), Some("NoSuchKey" | "NotFound")) => Ok(None),
            Err(e) => Err(s3_error(&format!("look up {key}"), e)),
        }
    }

    /// Delete an object; a missing one counts as deleted.
    pub async fn delete(&self, key: &str) -> anyhow::Result<()> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.code(), Some("NoSuchKey" | "NotFound")) => Ok(()),
            Err(e) => Err(s3_error(&format!("delete {key}"), e)),
        }
    }
}
