//! The Helm chart, rendered and linted by the real `helm` binary
//! (`scripts/install-deps` fetches it into `.tools/helm`), then checked
//! against what silo needs: probes on its health endpoints, secrets only from
//! an existing Secret, a shutdown grace longer than silo's own deadline, the
//! replica count silo divides connection budgets by, and a schema that
//! refuses bad values.

use std::path::PathBuf;
use std::process::Command;

use serde_yaml::Value;

fn helm() -> PathBuf {
    if let Ok(path) = std::env::var("SILO_HELM") {
        return path.into();
    }
    let fetched = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/helm/helm");
    if fetched.exists() {
        return fetched;
    }
    let on_path = Command::new("helm").arg("version").output();
    assert!(
        on_path.is_ok_and(|o| o.status.success()),
        "no helm binary: run scripts/install-deps (it fetches one into .tools/helm) or set SILO_HELM"
    );
    "helm".into()
}

fn chart() -> String {
    format!("{}/helm/silo", env!("CARGO_MANIFEST_DIR"))
}

/// `helm template` with `--set` values: the rendered documents, or helm's error.
fn render(sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "silo", &chart(), "--namespace", "clinics"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("run helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect())
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"].as_str() == Some(kind))
}

/// Every environment variable `silo serve` reads.
fn serve_env_vars() -> Vec<String> {
    use clap::CommandFactory;
    let cli = silo::config::Cli::command();
    let serve = cli.find_subcommand("serve").unwrap();
    // Its own flags, and the global ones (`SILO_LOG_FORMAT`).
    serve
        .get_arguments()
        .chain(cli.get_arguments())
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn the_chart_lints_clean_under_strict_mode() {
    let out = Command::new(helm())
        .args(["lint", "--strict", &chart(), "--set", "existingSecret=silo"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_default_render_runs_silo_safely_with_secrets_only_from_the_existing_secret() {
    let docs = render(&["existingSecret=silo-secrets"]).unwrap();
    assert!(
        kind(&docs, "Secret").is_none(),
        "the chart never holds secret values"
    );
    assert!(kind(&docs, "HorizontalPodAutoscaler").is_none());
    assert!(kind(&docs, "ServiceMonitor").is_none());
    assert!(kind(&docs, "Service").is_some());
    let pdb = kind(&docs, "PodDisruptionBudget").expect("a disruption budget");
    assert_eq!(pdb["spec"]["maxUnavailable"], Value::from(1));

    let deploy = kind(&docs, "Deployment").expect("a deployment");
    assert_eq!(deploy["spec"]["replicas"], Value::from(2));
    let pod = &deploy["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > silo::startup::SHUTDOWN_DEADLINE.as_secs(),
        "Kubernetes must wait longer ({grace}s) than silo's own shutdown deadline"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::from(true));
    let c = &pod["containers"][0];
    assert_eq!(c["args"][0], Value::from("serve"));
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"],
        Value::from("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"],
        Value::from("/readyz")
    );
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"],
        Value::from(true)
    );
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"],
        Value::from(false)
    );
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert!(c["resources"]["requests"]["cpu"].is_string());
    let from: Vec<&Value> = c["envFrom"].as_sequence().unwrap().iter().collect();
    assert!(from
        .iter()
        .any(|e| e["secretRef"]["name"] == "silo-secrets"));

    let config = kind(&docs, "ConfigMap").unwrap()["data"]
        .as_mapping()
        .unwrap()
        .clone();
    let known = serve_env_vars();
    for (k, _) in &config {
        let k = k.as_str().unwrap();
        assert!(
            known.iter().any(|v| v == k),
            "the ConfigMap sets {k}, which silo does not read"
        );
        assert!(
            !["SILO_ADMIN_TOKEN", "SILO_MASTER_KEY", "SILO_DATABASE_URL"].contains(&k),
            "secret {k} in a ConfigMap"
        );
    }
    assert_eq!(config[&Value::from("SILO_REPLICAS")], Value::from("2"));
    assert_eq!(
        config[&Value::from("SILO_LISTEN")],
        Value::from("0.0.0.0:8080")
    );
    assert!(
        !config.contains_key(Value::from("SILO_S3_BUCKET")),
        "backups stay off until a bucket is set"
    );
}

#[test]
fn the_postgres_front_door_is_exposed_and_its_tls_mounted_from_a_secret() {
    let port_named = |docs: &[Value], kind_: &str, name: &str| -> Option<Value> {
        let doc = kind(docs, kind_).unwrap();
        let ports = match kind_ {
            "Service" => &doc["spec"]["ports"],
            _ => &doc["spec"]["template"]["spec"]["containers"][0]["ports"],
        };
        ports
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
    };
    let config = |docs: &[Value], k: &str| -> Option<Value> {
        kind(docs, "ConfigMap").unwrap()["data"].get(k).cloned()
    };
    let docs = render(&["existingSecret=s"]).unwrap();
    assert_eq!(
        config(&docs, "SILO_PG_LISTEN"),
        Some(Value::from("0.0.0.0:6432"))
    );
    assert_eq!(
        port_named(&docs, "Service", "postgres").unwrap()["port"],
        Value::from(6432)
    );
    assert_eq!(
        port_named(&docs, "Deployment", "postgres").unwrap()["containerPort"],
        Value::from(6432)
    );
    assert_eq!(config(&docs, "SILO_PG_TLS_CERT"), None);

    let docs = render(&[
        "existingSecret=s",
        "postgres.tlsSecret=pg-tls",
        "postgres.requireTls=true",
        "postgres.publicAddress=db.clinics.example.com:6432",
    ])
    .unwrap();
    assert_eq!(
        config(&docs, "SILO_PG_TLS_CERT"),
        Some(Value::from("/etc/silo/pg-tls/tls.crt"))
    );
    assert_eq!(
        config(&docs, "SILO_PG_REQUIRE_TLS"),
        Some(Value::from("true"))
    );
    assert_eq!(
        config(&docs, "SILO_PG_PUBLIC_ADDRESS"),
        Some(Value::from("db.clinics.example.com:6432"))
    );
    let pod = &kind(&docs, "Deployment").unwrap()["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "pg-tls")
        .expect("the TLS secret mounted");
    assert_eq!(volume["secret"]["secretName"], Value::from("pg-tls"));

    let docs = render(&["existingSecret=s", "postgres.enabled=false"]).unwrap();
    assert_eq!(config(&docs, "SILO_PG_LISTEN"), Some(Value::from("")));
    assert!(port_named(&docs, "Service", "postgres").is_none());
    assert!(render(&["existingSecret=s", "postgres.containerPort=0"]).is_err());
}

#[test]
fn autoscaling_monitoring_and_backups_render_when_enabled() {
    let docs = render(&[
        "existingSecret=silo",
        "autoscaling.enabled=true",
        "autoscaling.maxReplicas=5",
        "serviceMonitor.enabled=true",
        "config.backup.bucket=clinic-backups",
        "config.backup.endpoint=https://r2.example.com",
        "config.backup.forcePathStyle=true",
        "config.backup.checksums=when-required",
    ])
    .unwrap();
    let hpa = kind(&docs, "HorizontalPodAutoscaler").expect("an autoscaler");
    assert_eq!(hpa["spec"]["maxReplicas"], Value::from(5));
    let deploy = kind(&docs, "Deployment").unwrap();
    assert!(
        deploy["spec"]["replicas"].is_null(),
        "the autoscaler owns the count"
    );
    let monitor = kind(&docs, "ServiceMonitor").expect("a service monitor");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["path"],
        Value::from("/metrics")
    );
    // Scraped on its own port, where /metrics needs no token.
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        Value::from("metrics")
    );
    let config = &kind(&docs, "ConfigMap").unwrap()["data"];
    // Budgets are divided by the most replicas there can be.
    assert_eq!(config["SILO_REPLICAS"], Value::from("5"));
    assert_eq!(config["SILO_S3_BUCKET"], Value::from("clinic-backups"));
    assert_eq!(
        config["SILO_S3_ENDPOINT"],
        Value::from("https://r2.example.com")
    );
    assert_eq!(config["SILO_S3_FORCE_PATH_STYLE"], Value::from("true"));
    assert_eq!(config["SILO_S3_CHECKSUMS"], Value::from("when-required"));
}

#[test]
fn the_values_schema_refuses_bad_values() {
    #[rustfmt::skip]
    let rows: [(&[&str], &str); 7] = [
        (&[], "existingSecret is required"),
        (&["existingSecret=s", "replicaCount=0"], "at least one replica"),
        (&["existingSecret=s", "config.bogus=1"], "unknown config key"),
        (&["existingSecret=s", "config.backup.checksums=always"], "unknown checksum mode"),
        (&["existingSecret=s", "config.logFormat=xml"], "unknown log format"),
        (&["existingSecret=s", "extraEnv[0].name=SILO_MASTER_KEY", "extraEnv[0].value=k"], "a secret in plain values"),
        (&["existingSecret=s", "extraEnv[0].name=SILO_MASTER_KEY_PREVIOUS", "extraEnv[0].value=k"], "the previous key in plain values"),
    ];
    let accepted: Vec<String> = rows
        .iter()
        .filter(|(sets, _)| render(sets).is_ok())
        .map(|(sets, why)| format!("  {why}: {sets:?} should be refused"))
        .collect();
    crate::common::table::assert_no_failures(rows.len(), &accepted);
}
