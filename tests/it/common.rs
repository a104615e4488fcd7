//! Test harness: a real private PostgreSQL per test, silo started on it by
//! its production start-up. Nothing here fakes PostgreSQL or S3.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use silo::config::Secret;
use silo::control::ControlPlane;
use silo::crypto::Keyring;
use silo::embedded::{EmbeddedPostgres, EmbeddedS3};
use silo::registry::{Registry, TenantRecord};
use silo::router::{RouterConfig, TenantRouter};
use silo::startup::{Connection, RunSettings, Silo as Running};
use sqlx::postgres::PgPoolOptions;
use sqlx::{ConnectOptions, Connection as _, PgConnection, PgPool};
use tower::ServiceExt;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
pub const APP_DOMAIN: &str = "clinics.test";

/// A response: status, content type, and the body as JSON (or a JSON string).
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub body: Value,
}

/// A private PostgreSQL cluster with silo started on it by the same
/// start-up as `silo serve` ([`silo::startup`]); background jobs are off
/// unless the test runs them (they would race what a test checks).
pub struct TestEnv {
    pub pg: EmbeddedPostgres,
    pub master_key: String,
    pub keyring: Keyring,
    pub control: ControlPlane,
    pub router: TenantRouter,
    /// The running silo (router upkeep); stopped when the environment drops.
    running: Running,
    /// Superuser pool on the `postgres` database, for inspecting the server.
    pub admin: PgPool,
    /// The embedded S3 store, when the test uses backups.
    pub s3: Option<Arc<EmbeddedS3>>,
    s3_dir: Option<Arc<tempfile::TempDir>>,
    /// The PostgreSQL front door's address, when the setup asked for it.
    pub pg_addr: Option<std::net::SocketAddr>,
}

/// Bucket the tests back up into.
pub const BUCKET: &str = "silo-test";
const S3_ACCESS: &str = "silo-test-access";
const S3_SECRET: &str = "silo-test-secret-0123456789";

/// How a test environment is set up: `TestEnv::setup()…start()`.
#[derive(Default)]
pub struct Setup {
    warm_pool: u32,
    router: RouterConfig,
    storage: Option<silo::config::StorageArgs>,
    keep_for: Option<silo::domain::KeepFor>,
    admin_timeout: Option<std::time::Duration>,
    limits: Option<silo::api::limits::HttpLimits>,
    wire: Option<fn(&mut silo::wire::WireSettings)>,
    pg_public_address: Option<String>,
    temp_file_limit_mb: Option<u64>,
}

impl Setup {
    /// Serve the PostgreSQL front door on a loopback port (`TestEnv::pg_addr`),
    /// with its settings changed by `tweak`.
    pub fn wire(mut self, tweak: fn(&mut silo::wire::WireSettings)) -> Self {
        self.wire = Some(tweak);
        self
    }

    /// The front door on (as [`Setup::wire`]) with this public `host:port`,
    /// the one in the URIs the admin API hands out.
    pub fn pg_public_address(mut self, address: &str) -> Self {
        self.pg_public_address = Some(address.to_owned());
        if self.wire.is_none() {
            self.wire = Some(|_| {});
        }
        self
    }

    /// Limits of the HTTP routes (the defaults of `silo serve` otherwise).
    pub fn limits(mut self, limits: silo::api::limits::HttpLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Longest an admin request may take (30 s by default).
    pub fn admin_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.admin_timeout = Some(timeout);
        self
    }

    /// How long quarantined and replaced databases are kept (7 days by default).
    /// Tenant roles' `temp_file_limit` in MiB (default: silo's default).
    pub fn temp_file_limit_mb(mut self, mb: u64) -> Self {
        self.temp_file_limit_mb = Some(mb);
        self
    }

    pub fn keep_for(mut self, keep: silo::domain::KeepFor) -> Self {
        self.keep_for = Some(keep);
        self
    }

    /// Spares kept per server (the warm pool; 0 by default).
    pub fn warm_pool(mut self, n: u32) -> Self {
        self.warm_pool = n;
        self
    }

    /// Router settings of the test's choosing.
    pub fn router(mut self, config: RouterConfig) -> Self {
        self.router = config;
        self
    }

    /// Backups into an embedded S3 store, with the default settings.
    pub fn storage(self) -> Self {
        self.storage_args(storage_args())
    }

    /// Backups into an embedded S3 store, with settings of the test's choosing.
    pub fn storage_args(mut self, args: silo::config::StorageArgs) -> Self {
        self.storage = Some(args);
        self
    }

    /// A fresh cluster with silo's control DB migrated and the default server registered.
    pub async fn start(self) -> TestEnv {
        let pg = tokio::task::spawn_blocking(EmbeddedPostgres::start_throwaway)
            .await
            .unwrap()
            .expect("start a private PostgreSQL");
        silo::cli::ensure_database(&pg.url("postgres"), "silo_control")
            .await
            .unwrap();
        let master_key = Keyring::generate_base64();
        let keyring = Keyring::from_base64(&master_key).unwrap();
        let (mut s3, mut s3_dir, mut storage) = (None, None, None);
        if let Some(args) = &self.storage {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedS3::start(dir.path(), S3_ACCESS, S3_SECRET)
                .await
                .unwrap();
            let built = storage_for(&store, args).await;
            built.store.ensure_bucket().await.unwrap();
            storage = Some(built);
            s3 = Some(Arc::new(store));
            s3_dir = Some(Arc::new(dir));
        }
        let control = silo::startup::connect(Connection {
            database_url: Secret::new(pg.url("silo_control")),
            keyring: keyring.clone(),
            tenant_server_url: Some(Secret::new(pg.url("postgres"))),
            schema: silo::servers::TenantSchema::embedded(),
            storage,
            warm_pool_size: self.warm_pool,
            keep_for: self.keep_for.unwrap_or_default(),
            work_slots: self
                .storage
                .as_ref()
                .map_or(silo::config::DEFAULT_BACKUP_CONCURRENCY, |a| {
                    a.backup_concurrency
                }) as usize,
            role_settings: silo::servers::RoleSettings::from_mib(
                self.temp_file_limit_mb
                    .unwrap_or(silo::config::DEFAULT_TENANT_TEMP_FILE_LIMIT_MB),
            ),
        })
        .await
        .unwrap();
        // Bound as `silo serve` binds it (its backlog).
        let wire_listener = self
            .wire
            .as_ref()
            .map(|_| silo::startup::listen("127.0.0.1:0".parse().unwrap()).unwrap());
        let pg_addr = wire_listener.as_ref().map(|l| l.local_addr().unwrap());
        let public = self.pg_public_address.clone();
        let wire = self.wire.zip(pg_addr).map(|(tweak, addr)| {
            let mut w = silo::wire::WireSettings::on(addr);
            tweak(&mut w);
            if let Some(p) = public {
                w.public_address = p;
            }
            w
        });
        let running = silo::startup::start(
            control.clone(),
            RunSettings {
                admin_token: Secret::new(ADMIN_TOKEN),
                metrics_token: None,
                metrics_listen: None,
                app_domain: Some(APP_DOMAIN.into()),
                router: self.router,
                jobs: None,
                admin_timeout: self
                    .admin_timeout
                    .unwrap_or(std::time::Duration::from_secs(30)),
                limits: self.limits.unwrap_or_default(),
                wire,
            },
        )
        .unwrap();
        if let Some(listener) = wire_listener {
            running.serve_wire(listener).unwrap();
        }
        let admin = PgPoolOptions::new()
            .max_connections(4)
            .connect(&pg.url("postgres"))
            .await
            .unwrap();
        TestEnv {
            pg,
            master_key,
            keyring,
            router: running.router.clone(),
            control,
            running,
            admin,
            s3,
            s3_dir,
            pg_addr,
        }
    }
}

impl TestEnv {
    /// How to set one up, when the defaults do not do.
    pub fn setup() -> Setup {
        Setup::default()
    }

    /// Another control plane on the same control DB, with pools of its own,
    /// as another replica would have.
    pub fn replica(&self, config: silo::control::ControlConfig) -> ControlPlane {
        ControlPlane::new(
            Registry::connect_lazy(&self.control_url()).unwrap(),
            self.keyring.clone(),
            config,
        )
    }

    /// A tenant's create request, its values checked as any entry point would.
    pub fn request(slug: &str, name: &str) -> silo::provision::CreateTenant {
        silo::provision::CreateTenant {
            slug: slug.parse().unwrap(),
            name: name.parse().unwrap(),
            plan: silo::domain::Plan::default_plan(),
            server: None,
        }
    }

    /// Backups (the environment was set up with storage).
    pub fn backups(&self) -> &silo::backup::Backups {
        self.control
            .backups()
            .expect("this test started with storage")
    }

    /// A fresh cluster with silo on it: no warm pool, no backups.
    pub async fn start() -> Self {
        Self::setup().start().await
    }

    /// Environment for a `silo` child process: control DB, keys, storage.
    pub fn silo_env(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            ("SILO_DATABASE_URL".into(), self.control_url()),
            ("SILO_TENANT_SERVER_URL".into(), self.pg.url("postgres")),
            ("SILO_MASTER_KEY".into(), self.master_key.clone()),
        ];
        if let Some(s3) = &self.s3 {
            for (k, v) in [
                ("SILO_S3_BUCKET", BUCKET.to_owned()),
                ("SILO_S3_ENDPOINT", s3.endpoint()),
                ("SILO_S3_FORCE_PATH_STYLE", "true".into()),
                ("SILO_S3_REGION", "us-east-1".into()),
                ("AWS_ACCESS_KEY_ID", S3_ACCESS.into()),
                ("AWS_SECRET_ACCESS_KEY", S3_SECRET.into()),
                ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ] {
                vars.push((k.into(), v));
            }
        }
        vars
    }

    pub fn s3(&self) -> &EmbeddedS3 {
        self.s3.as_deref().expect("this test started with storage")
    }

    /// Objects stored under a tenant's backup prefix (names relative to it).
    pub fn stored_objects(&self, tenant: uuid::Uuid) -> Vec<String> {
        let dir = self
            .s3()
            .object_path(BUCKET, &format!("silo/tenants/{}", tenant.simple()));
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    pub fn control_url(&self) -> String {
        self.pg.url("silo_control")
    }

    pub fn registry(&self) -> &Registry {
        self.control.registry()
    }

    pub fn app(&self) -> axum::Router {
        self.running.http()
    }

    /// A fresh app token of `slug`, minted through the admin API.
    pub async fn app_token(&self, slug: &str) -> String {
        let (s, body) = self
            .call(
                Method::POST,
                &format!("/admin/v1/tenants/{slug}/tokens"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// One request through the whole router, authenticated as admin.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_with(
            method,
            path,
            body,
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
        .await
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let body = body.map(|b| b.to_string());
        let answer = self.send(method, path, body.as_deref(), headers).await;
        (answer.status, answer.body)
    }

    /// One request through the whole app with a raw body (sent as JSON),
    /// answering with the content type too, so malformed JSON and
    /// problem+json can be checked.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_owned())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let res = self.app().oneshot(req).await.unwrap();
        let status = res.status();
        let content_type = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let retry_after = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Answer {
            status,
            content_type,
            retry_after,
            body,
        }
    }

    /// The embedded cluster's superuser password (to check it never leaks).
    pub fn superuser_password(&self) -> String {
        let url = self.pg.url("x");
        let after_user = url.split_once("://").unwrap().1.split_once(':').unwrap().1;
        after_user.split_once('@').unwrap().0.to_owned()
    }

    pub async fn create(&self, slug: &str) -> Value {
        let (status, body) = self
            .call(
                Method::POST,
                "/admin/v1/tenants",
                Some(serde_json::json!({"slug": slug, "name": format!("Clinic {slug}")})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    pub async fn record(&self, slug: &str) -> TenantRecord {
        self.registry()
            .find_tenant(slug)
            .await
            .unwrap()
            .expect("tenant exists")
    }

    /// The tenant role's password, decrypted from the registry.
    pub fn password(&self, t: &TenantRecord) -> String {
        self.keyring
            .open_string(&t.key_id, &t.password_enc, t.id.as_bytes())
            .unwrap()
    }

    /// Connect to `database` as `role` with `password`.
    pub async fn connect_as(
        &self,
        database: &str,
        role: &str,
        password: &str,
    ) -> Result<PgConnection, sqlx::Error> {
        sqlx::postgres::PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.pg.port())
            .database(database)
            .username(role)
            .password(password)
            .connect()
            .await
    }

    /// Connect as a tenant's own role to its own database.
    pub async fn connect_tenant(&self, slug: &str) -> Result<PgConnection, sqlx::Error> {
        let t = self.record(slug).await;
        self.connect_as(&t.database_name, &t.role_name, &self.password(&t))
            .await
    }

    /// `silo_` databases and roles on the server that no live registry row accounts for.
    pub async fn orphans(&self) -> Vec<String> {
        let dbs: Vec<String> = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'silo\\_t\\_%' OR datname LIKE 'silo\\_spare\\_%' OR datname LIKE 'silo\\_x\\_%'",
        )
        .fetch_all(&self.admin)
        .await
        .unwrap();
        let roles: Vec<String> = sqlx::query_scalar(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'silo\\_r\\_%'",
        )
        .fetch_all(&self.admin)
        .await
        .unwrap();
        let live: Vec<(String, String)> = sqlx::query_as(
            "SELECT database_name, role_name FROM tenants WHERE status <> 'deleted'",
        )
        .fetch_all(self.registry().pool())
        .await
        .unwrap();
        let spares: Vec<String> = sqlx::query_scalar("SELECT database_name FROM spares")
            .fetch_all(self.registry().pool())
            .await
            .unwrap();
        let spare_roles: Vec<String> =
            sqlx::query_scalar("SELECT role_name FROM spares WHERE role_name IS NOT NULL")
                .fetch_all(self.registry().pool())
                .await
                .unwrap();
        let roles_on_server: Vec<String> = sqlx::query_scalar(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'silo\\_rs\\_%'",
        )
        .fetch_all(&self.admin)
        .await
        .unwrap();
        let mut out = Vec::new();
        for d in dbs {
            if !live.iter().any(|(db, _)| *db == d) && !spares.contains(&d) {
                out.push(format!("database {d}"));
            }
        }
        for r in roles {
            if !live.iter().any(|(_, role)| *role == r) {
                out.push(format!("role {r}"));
            }
        }
        for r in roles_on_server {
            if !spare_roles.contains(&r) {
                out.push(format!("spare role {r}"));
            }
        }
        out
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.registry().pool())
            .await
            .unwrap()
    }

    pub async fn database_exists(&self, name: &str) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&self.admin)
            .await
            .unwrap()
    }

    pub async fn role_exists(&self, name: &str) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(name)
            .fetch_one(&self.admin)
            .await
            .unwrap()
    }
}

/// Close a connection, ignoring errors.
pub async fn close(conn: PgConnection) {
    conn.close().await.ok();
}

/// A `silo serve` child process on a free loopback port.
pub struct Silo {
    pub child: Child,
    pub base: String,
}

impl Silo {
    pub async fn start(env: &TestEnv, failpoint: Option<&str>, warm_pool: u32, log: &Path) -> Self {
        Self::start_with(env, failpoint, warm_pool, log, &[]).await
    }

    /// As [`Silo::start`], with extra environment variables.
    pub async fn start_with(
        env: &TestEnv,
        failpoint: Option<&str>,
        warm_pool: u32,
        log: &Path,
        extra: &[(&str, &str)],
    ) -> Self {
        let port = silo::embedded::postgres::free_port().unwrap();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_silo"));
        cmd.arg("serve")
            .env("SILO_DATABASE_URL", env.control_url())
            .env("SILO_TENANT_SERVER_URL", env.pg.url("postgres"))
            .env("SILO_MASTER_KEY", &env.master_key)
            .env("SILO_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SILO_LISTEN", format!("127.0.0.1:{port}"))
            .env("SILO_PG_LISTEN", "127.0.0.1:0")
            .env("SILO_WARM_POOL_SIZE", warm_pool.to_string())
            .env("SILO_RECONCILE_INTERVAL", "3600")
            .env("RUST_LOG", "debug")
            .env_remove("SILO_FAILPOINT")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null());
        if let Some(fp) = failpoint {
            cmd.env("SILO_FAILPOINT", fp);
        }
        if let Some(s3) = &env.s3 {
            cmd.env("SILO_S3_BUCKET", BUCKET)
                .env("SILO_S3_ENDPOINT", s3.endpoint())
                .env("SILO_S3_FORCE_PATH_STYLE", "true")
                .env("SILO_S3_REGION", "us-east-1")
                .env("AWS_ACCESS_KEY_ID", S3_ACCESS)
                .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env("SILO_BACKUP_PARTS_IN_FLIGHT", "2");
        }
        cmd.envs(extra.iter().copied());
        let silo = Self {
            child: cmd.spawn().expect("start silo serve"),
            base: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", silo.base)).send().await {
                if r.status().is_success() {
                    return silo;
                }
            }
            assert!(
                Instant::now() < deadline,
                "silo did not become ready; see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> reqwest::Result<(u16, Value)> {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(60));
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// Wait for the process to die from its failpoint (SIGABRT).
    pub fn expect_abort(mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert_eq!(
                    status.signal(),
                    Some(6),
                    "silo should have aborted at its failpoint: {status}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "silo did not reach its failpoint"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .ok();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "silo should shut down cleanly on SIGTERM: {status}"
        );
    }
}

impl Drop for Silo {
    /// A test that fails midway must not leave its `silo serve` running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Backup settings for tests: the defaults, with a bucket.
pub fn storage_args() -> silo::config::StorageArgs {
    let mut args = silo::config::StorageArgs::from_env().unwrap();
    args.s3_bucket = Some(BUCKET.into());
    args.s3_force_path_style = true;
    args.backup_verify_sample = 0.0;
    args
}

/// Backup storage on `s3` with `args`.
pub async fn storage_for(
    s3: &EmbeddedS3,
    args: &silo::config::StorageArgs,
) -> silo::backup::Storage {
    let config = silo::backup::StoreConfig {
        bucket: BUCKET.into(),
        endpoint: Some(s3.endpoint()),
        region: "us-east-1".into(),
        force_path_style: true,
        checksums: args.s3_checksums,
        static_credentials: Some((S3_ACCESS.into(), Secret::new(S3_SECRET))),
    };
    silo::backup::Storage::connect(&config, args).await.unwrap()
}

/// Fill the tenant's database with `megabytes` of incompressible data (a
/// `ballast` table), so its dump spans several upload parts.
pub async fn add_ballast(env: &TestEnv, t: &TenantRecord, megabytes: usize) {
    let mut conn = PgConnection::connect(&env.pg.url(&t.database_name))
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS ballast (id serial PRIMARY KEY, data bytea NOT NULL);
         INSERT INTO ballast (data)
           SELECT decode(string_agg(md5(random()::text || g::text || r::text), ''), 'hex')
             FROM generate_series(1, {rows}) r, generate_series(1, 4096) g GROUP BY r;",
        rows = megabytes * 16
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.ok();
}

/// The most a count query (`SELECT count(*) …`) answered, sampled every
/// 5 ms from `start` until `finish`: sessions as PostgreSQL counts them.
pub struct MaxSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<i64>,
}

impl MaxSampler {
    pub fn start(admin: &PgPool, count_sql: &'static str) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (admin, until) = (admin.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut max = 0i64;
            while !until.load(std::sync::atomic::Ordering::Relaxed) {
                let n: i64 = sqlx::query_scalar(count_sql)
                    .fetch_one(&admin)
                    .await
                    .unwrap();
                max = max.max(n);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            max
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> i64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// A second PostgreSQL cluster registered as tenant server "second", its warm pool filled.
pub async fn second_server(env: &TestEnv) -> EmbeddedPostgres {
    let pg = server_named(env, "second").await;
    env.control.provisioner().refill_all().await.unwrap();
    pg
}

/// Another real cluster, registered as `name` (50 connections, 100 tenants).
pub async fn server_named(env: &TestEnv, name: &str) -> EmbeddedPostgres {
    let pg = tokio::task::spawn_blocking(EmbeddedPostgres::start_throwaway)
        .await
        .unwrap()
        .unwrap();
    env.control
        .register_server(name, &pg.url("postgres"), 50, 100)
        .await
        .unwrap();
    pg
}

pub async fn create_on(env: &TestEnv, slug: &str, server: &str) {
    let (s, body) = env
        .call(
            Method::POST,
            "/admin/v1/tenants",
            Some(serde_json::json!({"slug": slug, "name": slug, "server": server})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
}

/// Table tests: one line per request and the answer it must get. Every row
/// runs; one assertion at the end lists every row that was answered wrong.
///
/// ```ignore
/// let rows = vec![
///     get("/admin/v1/tenants/nope").is(404),
///     post("/admin/v1/tenants").json(json!({"slug": "ab"})).is(422).says("name"),
/// ];
/// table::run(&Client::admin(&env), rows, async || env.count("…").await).await;
/// ```
pub mod table {
    use std::fmt;

    use axum::http::{Method, StatusCode};
    use serde_json::Value;

    use super::{Answer, TestEnv, ADMIN_TOKEN};

    /// Members of an RFC 9457 problem as silo writes them.
    const PROBLEM_MEMBERS: [&str; 5] = ["type", "title", "status", "detail", "operation_id"];
    /// What a problem's detail must never show.
    const SQL: [&str; 4] = ["select ", "insert ", "update ", "delete from"];

    /// A request of a row: `get(path)`, `post(path).json(body)`, …
    pub struct Request {
        method: Method,
        path: String,
        body: Option<String>,
        /// The row's own headers; `None` leaves the client's one out.
        headers: Vec<(String, Option<String>)>,
    }

    pub fn get(path: impl Into<String>) -> Request {
        request(Method::GET, path)
    }

    pub fn post(path: impl Into<String>) -> Request {
        request(Method::POST, path)
    }

    pub fn patch(path: impl Into<String>) -> Request {
        request(Method::PATCH, path)
    }

    pub fn delete(path: impl Into<String>) -> Request {
        request(Method::DELETE, path)
    }

    fn request(method: Method, path: impl Into<String>) -> Request {
        Request {
            method,
            path: path.into(),
            body: None,
            headers: Vec::new(),
        }
    }

    impl Request {
        /// A JSON body.
        pub fn json(self, body: Value) -> Self {
            self.raw(&body.to_string())
        }

        /// A body sent as `application/json` as it is, malformed or not.
        pub fn raw(mut self, body: &str) -> Self {
            self.body = Some(body.to_owned());
            self
        }

        /// A header, in place of the client's one of that name.
        pub fn header(mut self, name: &str, value: &str) -> Self {
            self.headers.push((name.to_owned(), Some(value.to_owned())));
            self
        }

        /// Without the client's header of that name.
        pub fn without(mut self, name: &str) -> Self {
            self.headers.push((name.to_owned(), None));
            self
        }

        /// The answer it must get: `status`, as problem+json.
        pub fn is(self, status: u16) -> Row {
            Row {
                request: self,
                want: StatusCode::from_u16(status).expect("an HTTP status"),
                says: Vec::new(),
                exactly: None,
                what: None,
            }
        }
    }

    /// A request and the problem+json answer it must get.
    pub struct Row {
        request: Request,
        want: StatusCode,
        says: Vec<String>,
        exactly: Option<String>,
        what: Option<String>,
    }

    impl Row {
        /// Its detail must contain `text`.
        pub fn says(mut self, text: &str) -> Self {
            self.says.push(text.to_owned());
            self
        }

        /// Its detail must contain each of `texts`.
        pub fn says_all(self, texts: &[&str]) -> Self {
            texts.iter().fold(self, |row, text| row.says(text))
        }

        /// Its detail must be `text` and nothing else.
        pub fn says_exactly(mut self, text: &str) -> Self {
            self.exactly = Some(text.to_owned());
            self
        }

        /// What the row is about, for the list of failures.
        pub fn what(mut self, what: &str) -> Self {
            self.what = Some(what.to_owned());
            self
        }

        /// Everything wrong with `answer`; empty when it is right.
        fn wrong(&self, answer: &Answer) -> Vec<String> {
            if answer.status != self.want {
                return vec![format!("answered {}, want {}", answer.status, self.want)];
            }
            let mut wrong = Vec::new();
            if answer.content_type != "application/problem+json" {
                wrong.push(format!("content type {:?}", answer.content_type));
            }
            let body = &answer.body;
            if body["status"] != self.want.as_u16() {
                wrong.push(format!("problem status {}", body["status"]));
            }
            let kind = problem_type(self.want);
            if body["type"] != kind.as_str() {
                wrong.push(format!("problem type {}, want {kind}", body["type"]));
            }
            match body["detail"].as_str() {
                None => wrong.push("no detail".into()),
                Some(detail) => {
                    let lower = detail.to_lowercase();
                    if SQL.iter().any(|sql| lower.contains(sql)) {
                        wrong.push("SQL in the detail".into());
                    }
                    for text in self.says.iter().filter(|t| !detail.contains(t.as_str())) {
                        wrong.push(format!("the detail does not say {text:?}"));
                    }
                    if let Some(exactly) = self.exactly.as_ref().filter(|e| *e != detail) {
                        wrong.push(format!("the detail is not {exactly:?}"));
                    }
                }
            }
            let members = body.as_object().map(|o| o.keys().collect::<Vec<_>>());
            for member in members.unwrap_or_default() {
                if !PROBLEM_MEMBERS.contains(&member.as_str()) {
                    wrong.push(format!("{member:?} in a problem"));
                }
            }
            wrong
        }
    }

    /// `urn:silo:problem:…` for an answer of `status`.
    fn problem_type(status: StatusCode) -> String {
        let kind = match status.as_u16() {
            400 => "bad-request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not-found",
            409 => "conflict",
            415 => "unsupported-media-type",
            422 => "validation",
            423 => "locked",
            503 => "unavailable",
            other => panic!("no problem type for {other}"),
        };
        format!("urn:silo:problem:{kind}")
    }

    impl fmt::Display for Row {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let r = &self.request;
            if let Some(what) = &self.what {
                write!(f, "{what}: ")?;
            }
            write!(f, "{} {}", r.method, r.path)?;
            if let Some(body) = &r.body {
                write!(f, " {body}")?;
            }
            for (name, value) in &r.headers {
                match value {
                    Some(v) => write!(f, " [{name}: {v}]")?,
                    None => write!(f, " [no {name}]")?,
                }
            }
            Ok(())
        }
    }

    /// Who sends the rows: a path prefix and headers every row carries
    /// (unless it names its own).
    pub struct Client<'a> {
        env: &'a TestEnv,
        prefix: String,
        headers: Vec<(String, String)>,
    }

    impl<'a> Client<'a> {
        pub fn new(env: &'a TestEnv, prefix: &str, headers: &[(&str, &str)]) -> Self {
            Self {
                env,
                prefix: prefix.to_owned(),
                headers: headers
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            }
        }

        /// The admin API, with the admin token.
        pub fn admin(env: &'a TestEnv) -> Self {
            Self::new(
                env,
                "",
                &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            )
        }

        async fn send(&self, row: &Row) -> Answer {
            let r = &row.request;
            let own = |name: &str| r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
            let headers: Vec<(&str, &str)> = self
                .headers
                .iter()
                .filter(|(k, _)| !own(k))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .chain(
                    r.headers
                        .iter()
                        .filter_map(|(k, v)| Some((k.as_str(), v.as_deref()?))),
                )
                .collect();
            let path = format!("{}{}", self.prefix, r.path);
            self.env
                .send(r.method.clone(), &path, r.body.as_deref(), &headers)
                .await
        }
    }

    /// Send every row in turn, check its answer and that `unchanged` reads
    /// as it did before; then fail once, listing every row answered wrong
    /// or that changed something. The answers, in row order.
    pub async fn run<S: PartialEq + fmt::Debug>(
        client: &Client<'_>,
        rows: Vec<Row>,
        unchanged: impl AsyncFn() -> S,
    ) -> Vec<Answer> {
        let mut state = unchanged().await;
        let mut failures = Vec::new();
        let mut answers = Vec::new();
        for row in &rows {
            let answer = client.send(row).await;
            let mut wrong = row.wrong(&answer);
            if !wrong.is_empty() {
                wrong.push(format!("the answer: {}", answer.body));
            }
            let now = unchanged().await;
            if now != state {
                wrong.push(format!("it changed {state:?}\n      to {now:?}"));
                state = now;
            }
            if !wrong.is_empty() {
                failures.push(format!("  {row}\n    {}", wrong.join("\n    ")));
            }
            answers.push(answer);
        }
        assert_no_failures(rows.len(), &failures);
        answers
    }

    /// Fail once, listing every row that went wrong (one entry each) of a
    /// table of `rows` rows.
    pub fn assert_no_failures(rows: usize, failures: &[String]) {
        assert!(
            failures.is_empty(),
            "{} of {rows} rows went wrong:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// Poll an operation (as answered by a `202`) until it ends; its last state.
pub async fn wait_op(env: &TestEnv, op: &Value) -> Value {
    let id = op["id"].as_str().expect("an operation id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, now) = env
            .call(Method::GET, &format!("/admin/v1/operations/{id}"), None)
            .await;
        if now["status"] != "running" && now["status"] != "pending" && now["status"] != "queued" {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "operation {id} did not end: {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
