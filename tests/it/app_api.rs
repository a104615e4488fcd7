//! The clinic app API against a real PostgreSQL: the four clinic resources end
//! to end in each tenant's own database, bad input that changes nothing, tenant
//! isolation on every path, and a suspended tenant locked out.

use crate::common::table::{self, delete, get, patch, post, Client};
use crate::common::{Answer, TestEnv};
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

const TABLES: [&str; 4] = ["clinics", "staff", "patients", "appointments"];

/// A tenant and a token for its app traffic.
struct Tenant {
    slug: String,
    id: String,
    token: String,
}

/// Create a tenant through the admin API and mint it a token.
async fn tenant(env: &TestEnv, slug: &str) -> Tenant {
    let t = env.create(slug).await;
    Tenant {
        slug: slug.to_owned(),
        id: t["id"].as_str().unwrap().to_owned(),
        token: env.app_token(slug).await,
    }
}

async fn send(
    env: &TestEnv,
    method: Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    env.send(method, path, body, headers).await
}

impl Tenant {
    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// Table rows sent to `/api/v1` as this tenant, named by `X-Tenant-ID`.
    fn client<'a>(&self, env: &'a TestEnv) -> Client<'a> {
        let bearer = self.bearer();
        Client::new(
            env,
            "/api/v1",
            &[("x-tenant-id", &self.slug), ("authorization", &bearer)],
        )
    }

    /// `/api/v1{path}` as this tenant, named by `X-Tenant-ID`.
    async fn call(&self, env: &TestEnv, method: Method, path: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string());
        self.raw(env, method, path, body.as_deref()).await
    }

    async fn raw(&self, env: &TestEnv, method: Method, path: &str, body: Option<&str>) -> Answer {
        let bearer = self.bearer();
        send(
            env,
            method,
            &format!("/api/v1{path}"),
            body,
            &[("x-tenant-id", &self.slug), ("authorization", &bearer)],
        )
        .await
    }

    /// POST a resource that must be created; its body.
    async fn create(&self, env: &TestEnv, resource: &str, body: Value) -> Value {
        let a = self
            .call(
                env,
                Method::POST,
                &format!("/{resource}"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            a.status,
            StatusCode::CREATED,
            "POST {resource} {body}: {}",
            a.body
        );
        a.body
    }

    /// GET that must succeed; its body.
    async fn get(&self, env: &TestEnv, path: &str) -> Value {
        let a = self.call(env, Method::GET, path, None).await;
        assert_eq!(a.status, StatusCode::OK, "GET {path}: {}", a.body);
        a.body
    }

    /// Every id of a list, following `next_cursor` to the end; each page in id order.
    async fn list_all(&self, env: &TestEnv, path: &str) -> Vec<String> {
        self.try_list_all(env, path)
            .await
            .unwrap_or_else(|wrong| panic!("{wrong}"))
    }

    /// As [`Tenant::list_all`], saying what went wrong rather than failing.
    async fn try_list_all(&self, env: &TestEnv, path: &str) -> Result<Vec<String>, String> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut seen = Vec::new();
        let mut next = path.to_owned();
        loop {
            let page = self.call(env, Method::GET, &next, None).await;
            if page.status != StatusCode::OK {
                return Err(format!("GET {next}: {} {}", page.status, page.body));
            }
            let ids = ids(&page.body);
            if ids != sorted(ids.clone()) {
                return Err(format!("a page of {path} is not in id order: {ids:?}"));
            }
            seen.extend(ids);
            match page.body["next_cursor"].as_str() {
                Some(c) => next = format!("{path}{sep}cursor={c}"),
                None => return Ok(seen),
            }
        }
    }

    /// Row counts of the clinic tables, read as the tenant's own role.
    async fn counts(&self, env: &TestEnv) -> Vec<i64> {
        let mut conn = env.connect_tenant(&self.slug).await.unwrap();
        let mut out = Vec::new();
        for table in TABLES {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&mut conn)
                .await
                .unwrap();
            out.push(n);
        }
        crate::common::close(conn).await;
        out
    }
}

fn id(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_owned()
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a page: {page}"))
        .iter()
        .map(id)
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The answer is `want` as problem+json, with nothing of SQL in it.
fn assert_problem(a: &Answer, want: StatusCode, what: &str) {
    assert_eq!(a.status, want, "{what}: {}", a.body);
    assert_eq!(a.content_type, "application/problem+json", "{what}");
    assert_eq!(a.body["status"], want.as_u16(), "{what}: {}", a.body);
    assert!(
        a.body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:silo:problem:")),
        "{what}: {}",
        a.body
    );
    let detail = a.body["detail"].as_str().unwrap().to_lowercase();
    for sql in ["select ", "insert ", "update ", "delete from"] {
        assert!(!detail.contains(sql), "{what}: SQL in {detail}");
    }
}

/// `2030-01-{day}T{hh}:{mm}:00Z`
fn at(day: u32, hour: u32, minute: u32) -> String {
    format!("2030-01-{day:02}T{hour:02}:{minute:02}:00Z")
}

/// One of each clinic resource; `marker` goes into every row's text so a
/// leak shows up in any answer that carries it.
async fn seed(env: &TestEnv, t: &Tenant, marker: &str) -> Vec<(&'static str, String)> {
    let clinic = t
        .create(env, "clinics", json!({"name": format!("{marker} clinic")}))
        .await;
    let staff = t
        .create(
            env,
            "staff",
            json!({"clinic_id": id(&clinic), "full_name": format!("{marker} doctor"), "role": "doctor"}),
        )
        .await;
    let patient = t
        .create(
            env,
            "patients",
            json!({"full_name": format!("{marker} patient"), "notes": marker}),
        )
        .await;
    let appointment = t
        .create(
            env,
            "appointments",
            json!({"clinic_id": id(&clinic), "patient_id": id(&patient), "staff_id": id(&staff),
                   "starts_at": at(1, 9, 0), "ends_at": at(1, 9, 30), "reason": marker}),
        )
        .await;
    vec![
        ("clinics", id(&clinic)),
        ("staff", id(&staff)),
        ("patients", id(&patient)),
        ("appointments", id(&appointment)),
    ]
}

#[tokio::test]
async fn a_clinic_workflow_runs_end_to_end_in_each_tenant_on_its_own_database() {
    let env = TestEnv::start().await;
    let north = tenant(&env, "north").await;
    let south = tenant(&env, "south").await;
    // The same names in two tenants do not collide: each has its own database.
    workflow(&env, &north).await;
    workflow(&env, &south).await;
    assert_eq!(north.counts(&env).await, [1, 1, 5, 2]);
    assert_eq!(south.counts(&env).await, [1, 1, 5, 2]);

    let (_, spec) = env.call_with(Method::GET, "/openapi.json", None, &[]).await;
    for resource in TABLES {
        for path in [
            format!("/api/v1/{resource}"),
            format!("/api/v1/{resource}/{{id}}"),
        ] {
            assert!(
                spec["paths"].get(&path).is_some(),
                "{path} missing from the OpenAPI document"
            );
        }
    }
}

async fn workflow(env: &TestEnv, t: &Tenant) {
    // Clinics: a time zone of one's own or UTC; names unique regardless of case.
    let main = t
        .create(
            env,
            "clinics",
            json!({"name": "Main Street", "address": "1 Main Street", "phone": "+49 30 1234",
                   "timezone": "Europe/Berlin"}),
        )
        .await;
    assert_eq!(main["timezone"], "Europe/Berlin");
    let annex = t.create(env, "clinics", json!({"name": "Annex"})).await;
    assert_eq!(annex["timezone"], "UTC");
    let dup = t
        .call(
            env,
            Method::POST,
            "/clinics",
            Some(json!({"name": "MAIN STREET"})),
        )
        .await;
    assert_problem(&dup, StatusCode::CONFLICT, "a clinic name twice");

    // Staff: at a clinic or none; active unless told otherwise; emails unique.
    let doctor = t
        .create(
            env,
            "staff",
            json!({"clinic_id": id(&main), "full_name": "Dr. Ada Quinn", "role": "doctor",
                   "email": "ada@example.com"}),
        )
        .await;
    assert_eq!(
        (doctor["active"].as_bool(), doctor["clinic_id"].as_str()),
        (Some(true), main["id"].as_str())
    );
    let nurse = t
        .create(
            env,
            "staff",
            json!({"full_name": "Ben Ode", "role": "nurse", "active": false}),
        )
        .await;
    assert!(nurse["clinic_id"].is_null());
    assert_eq!(nurse["active"], false);
    let dup = t
        .call(
            env,
            Method::POST,
            "/staff",
            Some(json!({"full_name": "Impostor", "role": "other", "email": "ADA@example.com"})),
        )
        .await;
    assert_problem(&dup, StatusCode::CONFLICT, "a staff email twice");

    // Patients, paged two at a time: every one exactly once, in id order.
    let mut patients = Vec::new();
    for i in 0..6 {
        let p = t
            .create(
                env,
                "patients",
                json!({"full_name": format!("Patient {i}")}),
            )
            .await;
        patients.push(id(&p));
    }
    let listed = t.list_all(env, "/patients?limit=2").await;
    assert_eq!(listed, sorted(patients.clone()));
    let first = t.get(env, "/patients?limit=2").await;
    assert_eq!(ids(&first).len(), 2);
    assert_eq!(
        first["next_cursor"].as_str(),
        Some(ids(&first)[1].as_str()),
        "the cursor is the last id of a full page"
    );

    // Appointments; the fourth starts at 12:00Z, written with an offset.
    let book = |patient: &str, staff: Option<&Value>, starts: String, ends: String| {
        let mut body = json!({"clinic_id": id(&main), "patient_id": patient, "starts_at": starts,
                              "ends_at": ends});
        if let Some(s) = staff {
            body["staff_id"] = json!(id(s));
        }
        body
    };
    let a1 = t
        .create(
            env,
            "appointments",
            book(&patients[0], Some(&doctor), at(1, 9, 0), at(1, 9, 30)),
        )
        .await;
    assert_eq!(
        (a1["status"].as_str(), a1["reason"].as_str()),
        (Some("scheduled"), None)
    );
    assert_eq!(a1["starts_at"], at(1, 9, 0));
    let a2 = t
        .create(
            env,
            "appointments",
            book(&patients[0], Some(&nurse), at(2, 9, 0), at(2, 9, 30)),
        )
        .await;
    let a3 = t
        .create(
            env,
            "appointments",
            book(&patients[1], Some(&doctor), at(3, 9, 0), at(3, 9, 30)),
        )
        .await;
    let a4 = t
        .create(
            env,
            "appointments",
            book(
                &patients[1],
                None,
                "2030-01-01T14:00:00+02:00".into(),
                at(1, 12, 30),
            ),
        )
        .await;
    assert_eq!(a4["starts_at"], at(1, 12, 0));
    let all = [id(&a1), id(&a2), id(&a3), id(&a4)];
    let (p0, p1, p5) = (&patients[0], &patients[1], &patients[5]);
    let (doc, nur) = (id(&doctor), id(&nurse));
    #[rustfmt::skip]
    let filters: Vec<(String, Vec<&String>)> = vec![
        (String::new(), all.iter().collect()),
        (format!("from={}&to={}", at(1, 0, 0), at(2, 0, 0)), vec![&all[0], &all[3]]),
        // `to` is exclusive, `from` inclusive.
        (format!("to={}", at(1, 12, 0)), vec![&all[0]]),
        (format!("from={}&to={}", at(1, 12, 0), at(1, 12, 1)), vec![&all[3]]),
        (format!("from={}", at(2, 9, 0)), vec![&all[1], &all[2]]),
        (format!("patient_id={p0}"), vec![&all[0], &all[1]]),
        (format!("staff_id={doc}"), vec![&all[0], &all[2]]),
        (format!("staff_id={nur}"), vec![&all[1]]),
        (format!("patient_id={p1}&staff_id={doc}"), vec![&all[2]]),
        (format!("patient_id={p0}&from={}", at(2, 0, 0)), vec![&all[1]]),
        (format!("patient_id={p5}"), vec![]),
        (format!("from={}&to={}", at(5, 0, 0), at(5, 0, 0)), vec![]),
    ];
    let mut wrong = Vec::new();
    for (query, want) in &filters {
        let want = sorted(want.iter().map(|id| id.to_string()).collect());
        // Whole, and one at a time through the cursor with the same filters.
        let page = t
            .call(env, Method::GET, &format!("/appointments?{query}"), None)
            .await;
        let whole = page.status == StatusCode::OK
            && sorted(ids(&page.body)) == want
            && page.body["next_cursor"].is_null();
        let paged = t
            .try_list_all(env, &format!("/appointments?limit=1&{query}"))
            .await;
        if !whole || paged.as_ref() != Ok(&want) {
            let got = format!(
                "whole: {} {}\n    one at a time: {paged:?}",
                page.status, page.body
            );
            wrong.push(format!("  ?{query}: want {want:?}\n    {got}"));
        }
    }
    table::assert_no_failures(filters.len(), &wrong);

    // PATCH changes what it names and nothing else.
    let path = format!("/appointments/{}", id(&a1));
    let changed = t
        .call(
            env,
            Method::PATCH,
            &path,
            Some(json!({"status": "checked_in", "reason": "follow-up"})),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    for field in [
        "clinic_id",
        "patient_id",
        "staff_id",
        "starts_at",
        "ends_at",
        "created_at",
    ] {
        assert_eq!(changed.body[field], a1[field], "{field}");
    }
    assert_eq!(
        (
            changed.body["status"].as_str(),
            changed.body["reason"].as_str()
        ),
        (Some("checked_in"), Some("follow-up"))
    );
    // Moving only the end before the start: the database's check refuses it.
    let refused = t
        .call(
            env,
            Method::PATCH,
            &path,
            Some(json!({"ends_at": at(1, 8, 0)})),
        )
        .await;
    assert_problem(
        &refused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "ends_at alone moved before starts_at",
    );
    assert_eq!(
        t.get(env, &path).await,
        changed.body,
        "a refused PATCH changes nothing"
    );
    let moved = t
        .call(
            env,
            Method::PATCH,
            &path,
            Some(json!({"starts_at": at(1, 9, 15)})),
        )
        .await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.body);
    assert_eq!(
        (
            moved.body["starts_at"].as_str(),
            moved.body["ends_at"].as_str()
        ),
        (Some(at(1, 9, 15).as_str()), Some(at(1, 9, 30).as_str()))
    );

    let renamed = t
        .call(
            env,
            Method::PATCH,
            &format!("/clinics/{}", id(&main)),
            Some(json!({"name": "Main St."})),
        )
        .await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.body);
    assert_eq!(
        (
            renamed.body["name"].as_str(),
            renamed.body["address"].as_str(),
            renamed.body["timezone"].as_str()
        ),
        (
            Some("Main St."),
            Some("1 Main Street"),
            Some("Europe/Berlin")
        )
    );
    let moved_nurse = t
        .call(
            env,
            Method::PATCH,
            &format!("/staff/{nur}"),
            Some(json!({"active": true, "clinic_id": id(&annex)})),
        )
        .await;
    assert_eq!(moved_nurse.status, StatusCode::OK, "{}", moved_nurse.body);
    assert_eq!(
        (
            moved_nurse.body["active"].as_bool(),
            moved_nurse.body["clinic_id"].as_str(),
            moved_nurse.body["role"].as_str()
        ),
        (Some(true), annex["id"].as_str(), Some("nurse"))
    );
    let patched = t
        .call(
            env,
            Method::PATCH,
            &format!("/patients/{}", patients[2]),
            Some(json!({"phone": "555 0100"})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    assert_eq!(
        (
            patched.body["phone"].as_str(),
            patched.body["full_name"].as_str()
        ),
        (Some("555 0100"), Some("Patient 2"))
    );

    // `null` clears a field that may be empty, and only what it names.
    let cleared = t
        .call(
            env,
            Method::PATCH,
            &format!("/patients/{}", patients[2]),
            Some(json!({"phone": null})),
        )
        .await;
    assert_eq!(cleared.status, StatusCode::OK, "{}", cleared.body);
    assert_eq!(cleared.body["phone"], Value::Null);
    assert_eq!(cleared.body["full_name"], patched.body["full_name"]);
    assert_eq!(cleared.body["email"], patched.body["email"]);
    let before = t.get(env, &path).await;
    assert!(before["reason"].is_string() && before["staff_id"].is_string());
    let unassigned = t
        .call(
            env,
            Method::PATCH,
            &path,
            Some(json!({"staff_id": null, "reason": null})),
        )
        .await;
    assert_eq!(unassigned.status, StatusCode::OK, "{}", unassigned.body);
    assert_eq!(
        (&unassigned.body["staff_id"], &unassigned.body["reason"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(unassigned.body["status"], before["status"]);
    let no_address = t
        .call(
            env,
            Method::PATCH,
            &format!("/clinics/{}", id(&main)),
            Some(json!({"address": null})),
        )
        .await;
    assert_eq!(no_address.status, StatusCode::OK, "{}", no_address.body);
    assert_eq!(no_address.body["address"], Value::Null);
    assert_eq!(no_address.body["name"].as_str(), Some("Main St."));
    let unplaced = t
        .call(
            env,
            Method::PATCH,
            &format!("/staff/{nur}"),
            Some(json!({"clinic_id": null})),
        )
        .await;
    assert_eq!(unplaced.status, StatusCode::OK, "{}", unplaced.body);
    assert_eq!(unplaced.body["clinic_id"], Value::Null);
    assert_eq!(unplaced.body["active"].as_bool(), Some(true));
    // An empty patch changes nothing but the time of the change.
    let same = t.call(env, Method::PATCH, &path, Some(json!({}))).await;
    assert_eq!(same.status, StatusCode::OK, "{}", same.body);
    assert_eq!(
        (
            &same.body["staff_id"],
            &same.body["reason"],
            &same.body["status"]
        ),
        (&Value::Null, &Value::Null, &before["status"])
    );

    // DELETE: refused while appointments refer to the row, then allowed.
    let refused = t
        .call(env, Method::DELETE, &format!("/patients/{p0}"), None)
        .await;
    assert_problem(
        &refused,
        StatusCode::CONFLICT,
        "deleting a patient with appointments",
    );
    let refused = t
        .call(
            env,
            Method::DELETE,
            &format!("/clinics/{}", id(&main)),
            None,
        )
        .await;
    assert_problem(
        &refused,
        StatusCode::CONFLICT,
        "deleting a clinic with appointments",
    );
    for a in [&a1, &a2] {
        let path = format!("/appointments/{}", id(a));
        assert_eq!(
            t.call(env, Method::DELETE, &path, None).await.status,
            StatusCode::NO_CONTENT
        );
        assert_problem(
            &t.call(env, Method::GET, &path, None).await,
            StatusCode::NOT_FOUND,
            "a deleted appointment",
        );
        assert_problem(
            &t.call(env, Method::DELETE, &path, None).await,
            StatusCode::NOT_FOUND,
            "deleting twice",
        );
    }
    assert_eq!(
        t.call(env, Method::DELETE, &format!("/patients/{p0}"), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &t.call(env, Method::GET, &format!("/patients/{p0}"), None)
            .await,
        StatusCode::NOT_FOUND,
        "a deleted patient",
    );
    // Staff and a clinic without appointments go; what referred to them keeps nothing.
    assert_eq!(
        t.call(env, Method::DELETE, &format!("/staff/{doc}"), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert!(t.get(env, &format!("/appointments/{}", id(&a3))).await["staff_id"].is_null());
    assert_eq!(
        t.call(
            env,
            Method::DELETE,
            &format!("/clinics/{}", id(&annex)),
            None
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    assert!(t.get(env, &format!("/staff/{nur}")).await["clinic_id"].is_null());
}

#[tokio::test]
async fn invalid_requests_get_problem_json_and_change_nothing() {
    let env = TestEnv::start().await;
    let a = tenant(&env, "alpha").await;
    let b = tenant(&env, "bravo").await;
    let seeded = seed(&env, &a, "alpha").await;
    let [(_, clinic), (_, staff), (_, patient), (_, appointment)] =
        <[_; 4]>::try_from(seeded).unwrap();
    let b_patient = id(&b
        .create(&env, "patients", json!({"full_name": "Elsewhere"}))
        .await);
    let nobody = uuid::Uuid::now_v7().to_string();
    let appointment_path = format!("/appointments/{appointment}");
    let (staff_path, clinic_path) = (format!("/staff/{staff}"), format!("/clinics/{clinic}"));
    let book = |patient: &str, clinic: &str, staff: &str, starts: &str, ends: &str| {
        post("/appointments").json(json!({"clinic_id": clinic, "patient_id": patient,
            "staff_id": staff, "starts_at": starts, "ends_at": ends}))
    };
    let (s, e) = (at(3, 10, 0), at(3, 11, 0));
    let roles = ["doctor", "nurse", "receptionist", "admin", "other"];
    #[rustfmt::skip]
    let rows = vec![
        // Appointments: the range, the references, the status, the timestamps.
        book(&patient, &clinic, &staff, &e, &s).is(422),
        book(&patient, &clinic, &staff, &s, &s).is(422),
        book(&b_patient, &clinic, &staff, &s, &e).is(422),
        book(&nobody, &clinic, &staff, &s, &e).is(422),
        book(&patient, &nobody, &staff, &s, &e).is(422),
        book(&patient, &clinic, &nobody, &s, &e).is(422),
        book(&patient, &clinic, &staff, "tomorrow", &e).is(422),
        book("not-a-uuid", &clinic, &staff, &s, &e).is(422),
        post("/appointments").json(json!({"clinic_id": clinic, "patient_id": patient, "starts_at": s, "ends_at": e, "status": "late"})).is(422),
        post("/appointments").json(json!({"clinic_id": clinic, "patient_id": patient, "starts_at": s})).is(422),
        patch(&appointment_path).json(json!({"ends_at": at(1, 8, 0)})).is(422),
        patch(&appointment_path).json(json!({"starts_at": e, "ends_at": s})).is(422),
        patch(&appointment_path).json(json!({"patient_id": b_patient})).is(422),
        patch(&appointment_path).json(json!({"staff_id": nobody})).is(422),
        patch(&appointment_path).json(json!({"status": "SCHEDULED"})).is(422),
        patch(format!("/appointments/{nobody}")).raw("{}").is(404),
        // `null` for a field that may not be empty, on every resource.
        patch(&appointment_path).json(json!({"status": null})).is(422),
        patch(&appointment_path).json(json!({"starts_at": null})).is(422),
        patch(&appointment_path).json(json!({"clinic_id": null})).is(422),
        patch(&appointment_path).json(json!({"reason": ""})).is(422).what("empty is not null"),
        patch(format!("/patients/{patient}")).json(json!({"full_name": null})).is(422),
        patch(format!("/patients/{patient}")).json(json!({"email": "nope"})).is(422),
        patch(&staff_path).json(json!({"full_name": null})).is(422),
        patch(&staff_path).json(json!({"active": null})).is(422),
        patch(&staff_path).json(json!({"role": null})).is(422),
        patch(&clinic_path).json(json!({"name": null})).is(422),
        patch(&clinic_path).json(json!({"timezone": null})).is(422),
        // Unknown fields, on every resource.
        post("/patients").json(json!({"full_name": "X", "tenant_id": 1})).is(422),
        post("/clinics").json(json!({"name": "X", "colour": "red"})).is(422),
        post("/staff").json(json!({"full_name": "X", "role": "nurse", "salary": 1})).is(422),
        patch(&appointment_path).json(json!({"id": nobody})).is(422),
        // Staff: the role (the answer says which are allowed), the clinic, the email.
        post("/staff").json(json!({"full_name": "X", "role": "surgeon"})).is(422).says_all(&roles),
        post("/staff").json(json!({"full_name": "X", "role": "nurse", "clinic_id": nobody})).is(422),
        post("/staff").json(json!({"full_name": "X", "role": "nurse", "email": "nope"})).is(422),
        patch(&staff_path).json(json!({"role": "chief"})).is(422),
        patch(&staff_path).json(json!({"clinic_id": nobody})).is(422),
        // Clinics: the name, the time zone, a duplicate.
        post("/clinics").json(json!({"name": "  "})).is(422),
        post("/clinics").json(json!({"name": "x".repeat(201)})).is(422),
        post("/clinics").json(json!({"name": "X", "timezone": "Mars/Olympus Mons"})).is(422),
        // Shaped like a zone, known to no tz database.
        post("/clinics").json(json!({"name": "X", "timezone": "Not/AZone"})).is(422),
        patch(&clinic_path).json(json!({"timezone": "Mars/Base"})).is(422),
        post("/clinics").json(json!({"name": "X", "timezone": "x".repeat(65)})).is(422),
        post("/clinics").json(json!({"name": "ALPHA clinic"})).is(409),
        patch(&clinic_path).json(json!({"timezone": "../etc/passwd"})).is(422),
        // Malformed JSON, wrong JSON types, no content type.
        post("/patients").raw("{\"full_name\": ").is(400),
        patch(&appointment_path).raw("not json").is(400),
        post("/patients").raw("[1, 2]").is(422),
        post("/staff").json(json!({"full_name": "X", "role": "nurse", "active": "yes"})).is(422),
        post("/patients").is(415).what("no content type"),
        // Path ids that are not UUIDs cannot exist.
        get("/patients/not-a-uuid").is(404),
        get("/appointments/123").is(404),
        patch("/staff/xyz").raw("{}").is(404),
        delete("/clinics/xyz").is(404),
        delete(format!("/patients/{nobody}")).is(404),
        // List parameters.
        get("/patients?limit=0").is(422),
        get("/clinics?limit=201").is(422),
        get("/staff?limit=abc").is(422),
        get("/staff?cursor=xyz").is(422),
        get("/patients?colour=red").is(422),
        get("/appointments?limit=0").is(422),
        get("/appointments?colour=red").is(422),
        get(format!("/appointments?from={}&to={}", at(2, 0, 0), at(1, 0, 0))).is(422),
        get("/appointments?from=yesterday").is(422),
        get("/appointments?patient_id=nope").is(422),
        get("/appointments?cursor=nope").is(422),
        get("/nothing-here").is(404),
    ];
    // Rejected requests change nothing, in either tenant.
    table::run(&a.client(&env), rows, async || {
        let appointment = a.get(&env, &appointment_path).await;
        (a.counts(&env).await, b.counts(&env).await, appointment)
    })
    .await;
}

#[tokio::test]
async fn a_tenant_never_sees_or_touches_another_tenants_data_on_any_path() {
    let env = TestEnv::start().await;
    let a = tenant(&env, "alpha").await;
    let b = tenant(&env, "bravo").await;
    let a_rows = seed(&env, &a, "alpha-marker").await;
    let b_rows = seed(&env, &b, "bravo-marker").await;
    let mut b_secrets: Vec<String> = b_rows.iter().map(|(_, id)| id.clone()).collect();
    b_secrets.push("bravo-marker".into());
    let mut b_before = Vec::new();
    for (resource, id) in &b_rows {
        b_before.push(b.get(&env, &format!("/{resource}/{id}")).await);
    }
    // Every answer given to A's token, checked for B's data at the end.
    let mut seen: Vec<Answer> = Vec::new();
    let a_bearer = a.bearer();

    // A's token naming B (by slug or id): 404 on every path and method.
    let mut rows = Vec::new();
    for name in [b.slug.as_str(), b.id.as_str()] {
        for (resource, b_id) in &b_rows {
            let (list, one) = (format!("/{resource}"), format!("/{resource}/{b_id}"));
            let requests = [
                get(&list),
                post(&list).raw("{}"),
                get(&one),
                patch(&one).raw("{}"),
                delete(&one),
            ];
            rows.extend(requests.map(|r| r.header("x-tenant-id", name).is(404).what("A's token")));
        }
    }
    let a_token = Client::new(&env, "/api/v1", &[("authorization", &a_bearer)]);
    seen.extend(table::run(&a_token, rows, async || ()).await);

    // B's ids asked for under A: they do not exist there.
    let mut rows = Vec::new();
    for (resource, b_id) in &b_rows {
        let one = format!("/{resource}/{b_id}");
        let requests = [get(&one), patch(&one).raw("{}"), delete(&one)];
        rows.extend(requests.map(|r| r.is(404).what("B's row under A")));
    }
    seen.extend(table::run(&a.client(&env), rows, async || ()).await);
    // ...nor can A refer to them.
    let (b_clinic, b_patient) = (&b_rows[0].1, &b_rows[2].1);
    let answer = a
        .call(
            &env,
            Method::POST,
            "/appointments",
            Some(
                json!({"clinic_id": b_clinic, "patient_id": b_patient, "starts_at": at(1, 9, 0),
                        "ends_at": at(1, 10, 0)}),
            ),
        )
        .await;
    assert_problem(
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "an appointment for B's patient under A",
    );
    seen.push(answer);
    let answer = a
        .call(
            &env,
            Method::GET,
            &format!("/appointments?patient_id={b_patient}"),
            None,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert!(ids(&answer.body).is_empty());
    seen.push(answer);

    // A's own lists hold exactly A's rows.
    for (resource, a_id) in &a_rows {
        let answer = a
            .call(&env, Method::GET, &format!("/{resource}"), None)
            .await;
        assert_eq!(ids(&answer.body), [a_id.as_str()], "{resource}");
        seen.push(answer);
    }

    // Tokens: checked before any tenant lookup.
    let (expired, _) = silo::tokens::mint(&env.keyring, a.id.parse().unwrap(), 0, -120);
    let mut parts: Vec<String> = a.token.split('.').map(str::to_owned).collect();
    let flipped = if parts[2].starts_with('A') { 'B' } else { 'A' };
    parts[2].replace_range(0..1, &flipped.to_string());
    let forged_signature = parts.join(".");
    let b_parts: Vec<&str> = b.token.split('.').collect();
    let a_parts: Vec<&str> = a.token.split('.').collect();
    let forged_claims = format!("{}.{}.{}", a_parts[0], b_parts[1], a_parts[2]);
    let other_key =
        silo::crypto::Keyring::from_base64(&silo::crypto::Keyring::generate_base64()).unwrap();
    let (foreign_key, _) = silo::tokens::mint(&other_key, a.id.parse().unwrap(), 0, 600);
    let auth = |token: &str| format!("Bearer {token}");
    let (expired, forged_signature, forged_claims, foreign_key) = (
        auth(&expired),
        auth(&forged_signature),
        auth(&forged_claims),
        auth(&foreign_key),
    );
    let b_bearer = b.bearer();
    let a_host = format!("alpha.{}", crate::common::APP_DOMAIN);
    let a_host_port = format!("alpha.{}:8443", crate::common::APP_DOMAIN);
    let b_host = format!("bravo.{}", crate::common::APP_DOMAIN);
    let (tenant, auth, host) = ("x-tenant-id", "authorization", "host");
    let patients = || get("/patients");
    #[rustfmt::skip]
    let rows = vec![
        patients().header(tenant, "alpha").header(auth, &expired).is(401).what("an expired token"),
        patients().header(tenant, "alpha").header(auth, &forged_signature).is(401).what("a forged signature"),
        patients().header(tenant, "bravo").header(auth, &forged_claims).is(401).what("B's claims under A's signature"),
        patients().header(tenant, "alpha").header(auth, &foreign_key).is(401).what("a token of another master key"),
        patients().header(tenant, "alpha").is(401).what("no Authorization"),
        patients().header(tenant, "alpha").header(auth, &a.token).is(401).what("no Bearer scheme"),
        patients().header(tenant, "alpha").header(auth, "Bearer ").is(401).what("an empty token"),
        patients().header(tenant, "nobody").is(401).what("no token for an unknown tenant"),
        patients().header(auth, &a_bearer).is(400).what("no tenant named"),
        patients().header(tenant, "").header(auth, &a_bearer).is(400).what("an empty X-Tenant-ID"),
        patients().header(tenant, "nobody").header(auth, &a_bearer).is(404).what("an unknown tenant"),
        patients().header(tenant, "alpha").header(auth, &b_bearer).is(404).what("B's token naming A"),
        patients().header(host, &b_host).header(auth, &a_bearer).is(404).what("A's token at B's host"),
        patients().header(tenant, "alpha").header(host, &b_host).header(auth, &a_bearer).is(400).what("X-Tenant-ID and host disagree"),
        patients().header(host, "clinics.test").header(auth, &a_bearer).is(400).what("the bare app domain"),
        patients().header(host, "alpha.example.com").header(auth, &a_bearer).is(400).what("another domain"),
    ];
    // A problem carries no `items`: nothing is listed to a caller refused.
    seen.extend(table::run(&Client::new(&env, "/api/v1", &[]), rows, async || ()).await);

    // Naming A by host (with or without a port) or by id works and gives A's data.
    let a_patient = a_rows[2].1.clone();
    let mut wrong = Vec::new();
    let named = [
        vec![
            ("host", a_host.as_str()),
            ("authorization", a_bearer.as_str()),
        ],
        vec![
            ("host", a_host_port.as_str()),
            ("authorization", a_bearer.as_str()),
        ],
        vec![
            ("x-tenant-id", "alpha"),
            ("host", a_host.as_str()),
            ("authorization", a_bearer.as_str()),
        ],
        vec![
            ("x-tenant-id", a.id.as_str()),
            ("authorization", a_bearer.as_str()),
        ],
    ];
    for headers in &named {
        let answer = send(&env, Method::GET, "/api/v1/patients", None, headers).await;
        if answer.status != StatusCode::OK || ids(&answer.body) != [a_patient.as_str()] {
            wrong.push(format!("  {headers:?}: {} {}", answer.status, answer.body));
        }
        seen.push(answer);
    }
    table::assert_no_failures(named.len(), &wrong);

    for answer in &seen {
        let text = answer.body.to_string();
        for secret in &b_secrets {
            assert!(
                !text.contains(secret.as_str()),
                "B's {secret} leaked to A: {text}"
            );
        }
    }
    // B's rows are untouched.
    for ((resource, id), before) in b_rows.iter().zip(&b_before) {
        assert_eq!(
            &b.get(&env, &format!("/{resource}/{id}")).await,
            before,
            "{resource}"
        );
    }
    assert_eq!(b.counts(&env).await, [1, 1, 1, 1]);
}

#[tokio::test]
async fn a_suspended_tenant_is_locked_until_resumed_and_others_carry_on() {
    let env = TestEnv::start().await;
    let a = tenant(&env, "sleepy").await;
    let b = tenant(&env, "awake").await;
    let rows = seed(&env, &a, "sleepy").await;
    seed(&env, &b, "awake").await;
    let patient = format!("/patients/{}", rows[2].1);
    let before = a.get(&env, &patient).await;

    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants/sleepy/suspend", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // The suspend revoked the tokens minted before it: they learn nothing.
    #[rustfmt::skip]
    let rows = vec![
        get("/patients").is(404),
        get(&patient).is(404),
    ];
    table::run(&a.client(&env), rows, async || ()).await;
    // A token minted while it is suspended: the tenant is locked.
    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants/sleepy/tokens", None)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let a = Tenant {
        token: body["token"].as_str().unwrap().to_owned(),
        ..a
    };
    #[rustfmt::skip]
    let rows = vec![
        get("/patients").is(423),
        get(&patient).is(423),
        post("/patients").json(json!({"full_name": "Late"})).is(423),
        delete(&patient).is(423),
    ];
    table::run(&a.client(&env), rows, async || ()).await;
    assert_eq!(
        b.get(&env, "/patients").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants/sleepy/resume", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        a.get(&env, &patient).await,
        before,
        "the data survived suspension"
    );
    a.create(&env, "patients", json!({"full_name": "Back again"}))
        .await;
    assert_eq!(a.counts(&env).await, [1, 1, 2, 1]);
}
