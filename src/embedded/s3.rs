//! An S3-compatible object store in-process on loopback: s3s-fs (the S3
//! protocol over a local folder) behind a hyper server. `silo dev` keeps its
//! backups here, and the tests use it as a real S3 endpoint: requests go over
//! HTTP with SigV4 signatures, exactly as to AWS, R2 or MinIO.
//!
//! s3s-fs lacks one call silo's sweep relies on where a store has it,
//! `ListMultipartUploads` (an upload opened by a process that died before
//! recording it is found that way and aborted); [`Store`] adds it.
//!
//! [`Faults`] lets a test break the store on purpose: fail a given part
//! number of every multipart upload, fail every request (an outage), or slow
//! each part down (to catch a backup in the middle).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

/// Failures a test injects into the embedded store.
#[derive(Debug, Default)]
pub struct Faults {
    /// Answer `500` to every upload of this part number (0: off).
    fail_part: AtomicI32,
    /// Answer `503` to every request.
    outage: AtomicBool,
    /// Milliseconds to wait before storing each uploaded part.
    part_delay_ms: AtomicU64,
}

impl Faults {
    pub fn fail_part(&self, part: i32) {
        self.fail_part.store(part, Ordering::SeqCst);
    }
    pub fn set_outage(&self, on: bool) {
        self.outage.store(on, Ordering::SeqCst);
    }
    pub fn delay_parts(&self, delay: Duration) {
        self.part_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
    pub fn clear(&self) {
        self.fail_part(0);
        self.set_outage(false);
        self.delay_parts(Duration::ZERO);
    }
}

/// A running embedded S3 server. Stops when dropped.
pub struct EmbeddedS3 {
    addr: SocketAddr,
    root: PathBuf,
    access_key: String,
    secret_key: String,
    faults: Arc<Faults>,
    stop: CancellationToken,
}

impl EmbeddedS3 {
    /// Serve the folder `root` (created if missing) on a free loopback port,
    /// accepting only the given access key pair.
    pub async fn start(root: &Path, access_key: &str, secret_key: &str) -> anyhow::Result<Self> {
        Self::start_on(root, access_key, secret_key, "127.0.0.1:0".parse()?).await
    }

    /// As [`EmbeddedS3::start`], on a chosen address.
    pub async fn start_on(
        root: &Path,
        access_key: &str,
        secret_key: &str,
        addr: SocketAddr,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
        let fs = s3s_fs::FileSystem::new(root)
            .map_err(|e| anyhow::anyhow!("open the object store folder: {e:?}"))?;
        let mut builder = s3s::service::S3ServiceBuilder::new(Store {
            fs,
            root: root.to_owned(),
        });
        builder.set_auth(s3s::auth::SimpleAuth::from_single(
            access_key.to_owned(),
            secret_key.to_owned(),
        ));
        let service = builder.build().into_shared();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr}"))?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(Faults::default());
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, service, faults.clone(), stop.clone()));
        Ok(Self {
            addr,
            root: root.to_owned(),
            access_key: access_key.to_owned(),
            secret_key: secret_key.to_owned(),
            faults,
            stop,
        })
    }

    /// `http://127.0.0.1:PORT`, for `SILO_S3_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The folder holding the buckets (`<root>/<bucket>/<key>`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Multipart uploads begun and neither completed nor aborted (s3s-fs
    /// keeps one `.upload-<id>.json` file per open upload).
    pub fn open_uploads(&self) -> usize {
        std::fs::read_dir(&self.root)
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        name.starts_with(".upload-") && name.ends_with(".json")
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Path of an object on disk (for tests that corrupt one).
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }
}

impl Drop for EmbeddedS3 {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// s3s-fs, plus `ListMultipartUploads`: each open upload's bucket and key
/// are recorded in `.silo-upload-<id>` beside s3s-fs's own `.upload-<id>.json`,
/// written when the upload opens and removed when it completes or aborts.
#[derive(Debug)]
struct Store {
    fs: s3s_fs::FileSystem,
    root: PathBuf,
}

impl Store {
    fn record(&self, upload_id: &str) -> PathBuf {
        self.root.join(format!(".silo-upload-{upload_id}"))
    }

    /// Open uploads as (bucket, key, upload id), sorted by key then id.
    fn open_uploads(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return out;
        };
        for entry in dir.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_prefix(".silo-upload-") else {
                continue;
            };
            // Completed or aborted behind our back (the record is a hint).
            if !self.root.join(format!(".upload-{id}.json")).exists() {
                continue;
            }
            if let Ok(text) = std::fs::read_to_string(entry.path()) {
                if let Some((bucket, key)) = text.split_once('\n') {
                    out.push((bucket.to_owned(), key.to_owned(), id.to_owned()));
                }
            }
        }
        out.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
        out
    }
}

type S3Res<T> = s3s::S3Result<s3s::S3Response<T>>;

#[async_trait::async_trait]
impl s3s::S3 for Store {
    async fn create_bucket(
        &self,
        req: s3s::S3Request<s3s::dto::CreateBucketInput>,
    ) -> S3Res<s3s::dto::CreateBucketOutput> {
        self.fs.create_bucket(req).await
    }

    async fn head_bucket(
        &self,
        req: s3s::S3Request<s3s::dto::HeadBucketInput>,
    ) -> S3Res<s3s::dto::HeadBucketOutput> {
        self.fs.head_bucket(req).await
    }

    async fn put_object(
        &self,
        req: s3s::S3Request<s3s::dto::PutObjectInput>,
    ) -> S3Res<s3s::dto::PutObjectOutput> {
        self.fs.put_object(req).await
    }

    async fn get_object(
        &self,
        req: s3s::S3Request<s3s::dto::GetObjectInput>,
    ) -> S3Res<s3s::dto::GetObjectOutput> {
        self.fs.get_object(req).await
    }

    async fn head_object(
        &self,
        req: s3s::S3Request<s3s::dto::HeadObjectInput>,
    ) -> S3Res<s3s::dto::HeadObjectOutput> {
        self.fs.head_object(req).await
    }

    async fn delete_object(
        &self,
        req: s3s::S3Request<s3s::dto::DeleteObjectInput>,
    ) -> S3Res<s3s::dto::DeleteObjectOutput> {
        self.fs.delete_object(req).await
    }

    async fn list_objects_v2(
        &self,
        req: s3s::S3Request<s3s::dto::ListObjectsV2Input>,
    ) -> S3Res<s3s::dto::ListObjectsV2Output> {
        self.fs.list_objects_v2(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: s3s::S3Request<s3s::dto::CreateMultipartUploadInput>,
    ) -> S3Res<s3s::dto::CreateMultipartUploadOutput> {
        let where_to = format!("{}\n{}", req.input.bucket, req.input.key);
        let out = self.fs.create_multipart_upload(req).await?;
        if let Some(id) = &out.output.upload_id {
            if let Err(e) = std::fs::write(self.record(id), where_to) {
                tracing::warn!("embedded S3 could not record an open upload: {e}");
            }
        }
        Ok(out)
    }

    async fn upload_part(
        &self,
        req: s3s::S3Request<s3s::dto::UploadPartInput>,
    ) -> S3Res<s3s::dto::UploadPartOutput> {
        self.fs.upload_part(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: s3s::S3Request<s3s::dto::CompleteMultipartUploadInput>,
    ) -> S3Res<s3s::dto::CompleteMultipartUploadOutput> {
        let record = self.record(&req.input.upload_id);
        let out = self.fs.complete_multipart_upload(req).await?;
        let _ = std::fs::remove_file(record);
        Ok(out)
    }

    async fn abort_multipart_upload(
        &self,
        req: s3s::S3Request<s3s::dto::AbortMultipartUploadInput>,
    ) -> S3Res<s3s::dto::AbortMultipartUploadOutput> {
        let record = self.record(&req.input.upload_id);
        let out = self.fs.abort_multipart_upload(req).await?;
        let _ = std::fs::remove_file(record);
        Ok(out)
    }

    async fn list_multipart_uploads(
        &self,
        req: s3s::S3Request<s3s::dto::ListMultipartUploadsInput>,
    ) -> S3Res<s3s::dto::ListMultipartUploadsOutput> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let uploads: Vec<s3s::dto::MultipartUpload> = self
            .open_uploads()
            .into_iter()
            .filter(|(bucket, key, _)| *bucket == input.bucket && key.starts_with(&prefix))
            .map(|(_, key, id)| s3s::dto::MultipartUpload {
                key: Some(key),
                upload_id: Some(id),
                ..Default::default()
            })
            .collect();
        Ok(s3s::S3Response::new(s3s::dto::ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            is_truncated: Some(false),
            uploads: Some(uploads),
            ..Default::default()
        }))
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    service: s3s::service::SharedS3Service,
    faults: Arc<Faults>,
    stop: CancellationToken,
) {
    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let socket = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    tracing::warn!("embedded S3 failed to accept a connection: {e}");
                    continue;
                }
            },
        };
        let (service, faults, stop) = (service.clone(), faults.clone(), stop.clone());
        let http = http.clone();
        tokio::spawn(async move {
            let handler = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (service, faults) = (service.clone(), faults.clone());
                async move {
                    if let Some(res) = injected_fault(&req, &faults).await {
                        return Ok(res);
                    }
                    hyper::service::Service::call(&service, req).await
                }
            });
            let conn = http.serve_connection(TokioIo::new(socket), handler);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// The answer a configured fault gives instead of the store, if any.
async fn injected_fault(
    req: &hyper::Request<hyper::body::Incoming>,
    faults: &Faults,
) -> Option<hyper::Response<s3s::Body>> {
    if faults.outage.load(Ordering::SeqCst) {
        return Some(error_response(503, "ServiceUnavailable"));
    }
    let part = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("partNumber="))
            .and_then(|n| n.parse::<i32>().ok())
    });
    if let (Some(part), &hyper::Method::PUT) = (part, req.method()) {
        let fail = faults.fail_part.load(Ordering::SeqCst);
        if fail != 0 && fail == part {
            return Some(error_response(500, "InternalError"));
        }
        let delay = faults.part_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
    None
}

fn error_response(status: u16, code: &str) -> hyper::Response<s3s::Body> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test</Message></Error>"
    );
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(s3s::Body::from(body))
        .expect("valid response")
}
