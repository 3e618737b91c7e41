//! Prometheus metrics: HTTP requests by route and status with latency histograms, live
//! machines by status (counted from the database at scrape time, so every replica agrees),
//! agent calls by call and outcome, and the reconciler's checks and last pass.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Instant;

const REQUESTS: &str = "skygate_http_requests_total";
const LATENCY: &str = "skygate_http_request_duration_seconds";
const MACHINES: &str = "skygate_machines";
const AGENT_CALLS: &str = "skygate_agent_calls_total";
const AGENT_LATENCY: &str = "skygate_agent_call_duration_seconds";
const RECONCILER_CHECKS: &str = "skygate_reconciler_checks_total";
const RECONCILER_PASSES: &str = "skygate_reconciler_passes_total";
const RECONCILER_LAST_PASS: &str = "skygate_reconciler_last_pass_finished_seconds";
const RECONCILER_LAST_PASS_DURATION: &str = "skygate_reconciler_last_pass_duration_seconds";
const RECONCILER_LAST_PASS_OUTCOMES: &str = "skygate_reconciler_last_pass_outcomes";

/// The process-wide recorder. `metrics` has one global recorder per process, so several
/// servers in one process (the test suite) share it; labels keep their series apart.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(LATENCY.to_owned()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            )
            .and_then(|b| {
                // Agent calls run from milliseconds (a listing) to minutes (an image fetch).
                b.set_buckets_for_metric(
                    Matcher::Full(AGENT_LATENCY.to_owned()),
                    &[
                        0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0,
                    ],
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed; then our handle renders nothing, which
        // the metrics test would catch.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Counts and times every request by its route template (never the raw path, whose ids
/// would make unbounded label sets).
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    // Only standard methods as labels: clients may send any token as a method.
    let method = match req.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let start = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!(REQUESTS, &labels).increment(1);
    metrics::histogram!(LATENCY, &labels).record(start.elapsed().as_secs_f64());
    response
}

/// Sets the machines-by-status gauge from fresh counts (every status, zeros included).
pub fn set_machine_counts(counts: &std::collections::HashMap<crate::model::MachineStatus, i64>) {
    for status in crate::model::MachineStatus::ALL {
        let n = counts.get(&status).copied().unwrap_or(0);
        metrics::gauge!(MACHINES, "status" => status.as_str()).set(n as f64);
    }
}

/// One agent call: `outcome` is `ok` or the `AgentCallError` kind (`unreachable`, `gone`, ...).
pub fn agent_call(call: &'static str, outcome: &'static str, elapsed: std::time::Duration) {
    metrics::counter!(AGENT_CALLS, "call" => call, "outcome" => outcome).increment(1);
    metrics::histogram!(AGENT_LATENCY, "call" => call).record(elapsed.as_secs_f64());
}

/// One check of the reconciler (a host listed, a repair, ...), by its outcome's name.
pub fn reconciler_check(outcome: &'static str) {
    metrics::counter!(RECONCILER_CHECKS, "outcome" => outcome).increment(1);
}

/// The reconciler finished a pass: when, how long it took, and its outcomes (every known
/// outcome, zeros included, so a series that stops happening drops to 0).
pub fn reconciler_pass(
    finished_unix_secs: f64,
    duration: std::time::Duration,
    outcomes: &[(&'static str, u64)],
) {
    metrics::counter!(RECONCILER_PASSES).increment(1);
    metrics::gauge!(RECONCILER_LAST_PASS).set(finished_unix_secs);
    metrics::gauge!(RECONCILER_LAST_PASS_DURATION).set(duration.as_secs_f64());
    for (outcome, n) in outcomes {
        metrics::gauge!(RECONCILER_LAST_PASS_OUTCOMES, "outcome" => *outcome).set(*n as f64);
    }
}
