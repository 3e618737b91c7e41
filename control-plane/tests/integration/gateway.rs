//! Gateway concerns: request ids, problem documents for framework errors, CORS, health,
//! metrics, and the OpenAPI document (fresh in the repo, and every route in it guarded).

use crate::both_stores;
use crate::common::{problem, Backend, TestApp};
use control_plane::api::HttpSettings;
use control_plane::app::Settings;
use reqwest::{Method, StatusCode};
use serde_json::Value;

both_stores!(
    every_response_carries_a_request_id,
    unknown_routes_and_methods_are_problems,
    readiness_and_metrics_report_the_store,
);

async fn every_response_carries_a_request_id(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let res = t.req(Method::GET, "/healthz").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let generated = res.headers()["x-request-id"].to_str().unwrap();
    assert!(generated.parse::<uuid::Uuid>().is_ok(), "{generated}");
    let res = t
        .req(Method::GET, "/machines")
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "client-chosen-42");
    let body = problem(res, StatusCode::UNAUTHORIZED).await;
    assert_eq!(body["request_id"], "client-chosen-42");
    t.stop().await;
}

async fn unknown_routes_and_methods_are_problems(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    problem(
        t.req(Method::GET, "/api/v1/nothing-here")
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        t.req(Method::GET, "/nope").send().await.unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    let res = t.req(Method::PUT, "/machines").send().await.unwrap();
    assert!(res.headers().contains_key("allow"));
    problem(res, StatusCode::METHOD_NOT_ALLOWED).await;
    t.stop().await;
}

async fn readiness_and_metrics_report_the_store(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    t.create_machine(&ann, "web").await;
    assert_eq!(
        t.req(Method::GET, "/readyz").send().await.unwrap().status(),
        StatusCode::OK
    );
    let text = t
        .req(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("skygate_http_requests_total{")
                && l.contains("route=\"/api/v1/machines\"")
                && l.contains("status=\"202\"")),
        "{text}"
    );
    assert!(
        text.contains("skygate_http_request_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "skygate_machines{status=\"pending\"} 1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "skygate_machines{status=\"running\"} 0"),
        "{text}"
    );
    // With the database gone, the process is alive but not ready.
    t.store.close().await;
    assert_eq!(
        t.req(Method::GET, "/healthz")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    problem(
        t.req(Method::GET, "/readyz").send().await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    t.stop().await;
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let http = HttpSettings {
        cors_origins: vec!["https://console.example".parse().unwrap()],
        ..HttpSettings::default()
    };
    let t = TestApp::spawn_with(Backend::Sqlite, Settings::default(), http).await;
    let preflight = |origin: &'static str| {
        t.req(Method::OPTIONS, "/machines")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let ok = preflight("https://console.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://console.example"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    t.stop().await;
}

const OPENAPI_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

/// The checked-in document must match the code. Regenerate with
/// `SKYGATE_UPDATE_OPENAPI=1 cargo test -p control-plane --test integration openapi`.
#[tokio::test]
async fn openapi_document_is_fresh_and_served() {
    let generated = control_plane::api::openapi_json();
    if std::env::var_os("SKYGATE_UPDATE_OPENAPI").is_some() {
        std::fs::write(OPENAPI_PATH, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(OPENAPI_PATH).unwrap_or_default();
    assert!(
        checked_in == generated,
        "control-plane/openapi.json is stale: rerun with SKYGATE_UPDATE_OPENAPI=1"
    );
    let t = TestApp::spawn(Backend::Sqlite).await;
    let served = t
        .req(Method::GET, "/openapi.json")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(served, generated);
    t.stop().await;
}

/// The served document promises what the server answers: every 4xx/5xx of every operation is
/// an `application/problem+json` `Problem`; every operation documents 408 and 503 (with
/// `Retry-After`), every operation with a body 400/413/415/422, every guarded one 401; and the
/// rules the server enforces are in the schemas, with the server's own numbers.
#[tokio::test]
async fn the_document_promises_problem_documents_and_the_servers_rules() {
    let t = TestApp::spawn(Backend::Sqlite).await;
    let doc: Value = t
        .req(Method::GET, "/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    t.stop().await;
    let mut operations = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            operations += 1;
            let at = format!("{method} {path}");
            let responses = op["responses"].as_object().unwrap();
            for (status, response) in responses {
                if !(status.starts_with('4') || status.starts_with('5')) {
                    continue;
                }
                let types: Vec<&String> = response["content"].as_object().unwrap().keys().collect();
                assert_eq!(types, ["application/problem+json"], "{at} {status}");
                assert_eq!(
                    response["content"]["application/problem+json"]["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{at} {status}"
                );
            }
            let mut expected = vec!["408", "503"];
            if op.get("requestBody").is_some() {
                expected.extend(["400", "413", "415", "422"]);
            }
            if op.get("security").is_some() {
                expected.push("401");
            }
            if path.contains("{id}") {
                expected.push("404");
            }
            for status in expected {
                assert!(
                    responses.contains_key(status),
                    "{at} does not document {status}"
                );
            }
            assert!(
                responses["503"]["headers"].get("Retry-After").is_some(),
                "{at}: 503 without Retry-After"
            );
        }
    }
    assert!(operations >= 24, "only {operations} operations");
    let ids: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|ops| ops.as_object().unwrap().values())
        .map(|op| op["operationId"].as_str().unwrap())
        .collect();
    let unique: std::collections::BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "operation ids repeat: {ids:?}");

    let schemas = &doc["components"]["schemas"];
    let register = &schemas["RegisterParams"]["properties"];
    assert_eq!(register["username"]["pattern"], "^[a-z0-9_.-]{3,32}$");
    assert_eq!(register["email"]["format"], "email");
    let (min_password, max_password) = (
        auth::password::MIN_PASSWORD_CHARS,
        auth::password::MAX_PASSWORD_CHARS,
    );
    assert_eq!(register["password"]["minLength"], min_password);
    assert_eq!(register["password"]["maxLength"], max_password);
    assert_eq!(
        schemas["ProfilePatch"]["properties"]["password"]["minLength"],
        min_password
    );
    let create = &schemas["CreateMachineParams"]["properties"];
    assert_eq!(
        create["hostname"]["pattern"],
        "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    );
    let limits = control_plane::app::MachineLimits::default();
    assert_eq!(create["vcpus"]["maximum"], limits.max_vcpus);
    assert_eq!(create["memory_mib"]["minimum"], limits.min_memory_mib);
    assert_eq!(create["memory_mib"]["maximum"], limits.max_memory_mib);
    assert_eq!(create["disk_gib"]["maximum"], limits.max_disk_gib);
    assert_eq!(
        create["ssh_keys"]["maxItems"],
        control_plane::app::machines::MAX_SSH_KEYS
    );
    assert_eq!(
        create["user_data"]["maxLength"],
        control_plane::app::machines::MAX_USER_DATA_BYTES
    );
    assert_eq!(
        schemas["AddSshKeyParams"]["properties"]["name"]["pattern"],
        "^[A-Za-z0-9._@-]{1,64}$"
    );
    let params = |path: &str, method: &str| doc["paths"][path][method]["parameters"].clone();
    for (path, method) in [
        ("/machines", "get"),
        ("/ssh-keys", "get"),
        ("/machines/{id}/events", "get"),
    ] {
        let params = params(path, method);
        let param = |name: &str| {
            params
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap()["schema"]
                .clone()
        };
        assert_eq!(param("limit")["minimum"], 1, "{path}");
        assert_eq!(param("limit")["maximum"], 200, "{path}");
        assert_eq!(param("cursor")["minLength"], 1, "{path}");
    }
    let key = params("/machines", "post")[0]["schema"].clone();
    assert_eq!(
        key["maxLength"],
        control_plane::app::idempotency::MAX_KEY_LEN
    );
    assert_eq!(key["type"], "string");
}

/// The API browser: served without a token, rendering the served document, and unable to
/// load anything from another origin (no external URL in it, and a CSP that forbids it).
#[tokio::test]
async fn the_api_browser_is_served_self_contained() {
    let t = TestApp::spawn(Backend::Sqlite).await;
    let res = t.req(Method::GET, "/docs").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let page = res.text().await.unwrap();
    assert!(page.contains("fetch(\"openapi.json\")"));
    for external in ["http://", "https://", "//cdn", "<script src", "<link"] {
        assert!(!page.contains(external), "the page refers to {external}");
    }
    t.stop().await;
}

/// Driven by the document: every operation but register, login and refresh refuses a caller
/// without a token, with 401 and a problem document.
#[tokio::test]
async fn every_route_but_register_login_refresh_rejects_anonymous_callers() {
    let doc: Value = serde_json::from_str(&control_plane::api::openapi_json()).unwrap();
    let public = ["/auth/register", "/auth/login", "/auth/refresh"];
    let t = TestApp::spawn(Backend::Sqlite).await;
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", &uuid::Uuid::new_v4().to_string());
        for method in ops.as_object().unwrap().keys() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let res = t
                .req(method.clone(), &concrete)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            if public.contains(&path.as_str()) {
                assert_ne!(res.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
            } else {
                problem(res, StatusCode::UNAUTHORIZED).await;
                checked += 1;
            }
        }
    }
    assert!(checked >= 18, "only {checked} operations checked");
    t.stop().await;
}

/// A request that outlives the timeout is answered 408 and abandoned whole: registration
/// hashes the password (argon2, tens of milliseconds) before it writes, so nothing is stored.
#[tokio::test]
async fn slow_requests_time_out_with_a_problem_and_leave_nothing_behind() {
    let http = HttpSettings {
        request_timeout: std::time::Duration::from_millis(1),
        ..HttpSettings::default()
    };
    let t = TestApp::spawn_with(Backend::Sqlite, Settings::default(), http).await;
    problem(t.register("ann").await, StatusCode::REQUEST_TIMEOUT).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(t.store.user_by_username("ann").await.unwrap().is_none());
    t.stop().await;
}
