//! The error half of the OpenAPI document, written once for every operation instead of on each
//! handler: what the gateway and the extractors answer (problem documents, RFC 9457) follows
//! from an operation's shape — a body, query or header parameters, bearer security, an id in
//! the path — so it is derived from that shape here. Handlers' annotations name only what is
//! particular to them (403, 409, 429, ...), and this pass gives those the problem media type.
//!
//! Alternative rejected: listing 400/408/413/415/422/503 on each `#[utoipa::path]`. Twenty-four
//! copies drift (that is how the document came to say `application/json` for every error).

use super::problem::PROBLEM_JSON;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::response::Response;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::SecurityRequirement;
use utoipa::openapi::{Content, Header, OpenApi, Ref, RefOr};
use utoipa::Modify;

/// Adds the error responses every operation can give and makes every 4xx/5xx response a
/// `application/problem+json` `Problem`.
#[derive(Debug)]
pub struct ErrorResponses;

/// What each error status means when the handler's annotation says nothing more particular.
fn default_description(status: &str) -> &'static str {
    match status {
        "400" => {
            "Malformed JSON, or a query parameter or header the server cannot use: a `limit` \
             out of range, a `cursor` it did not issue, a bad `Idempotency-Key`"
        }
        "401" => "The bearer token is missing, expired or invalid",
        "403" => "The caller may not do this",
        "404" => "No such resource (or not yours)",
        "408" => "The request took longer than the server allows",
        "409" => "The request conflicts with the resource's state",
        "413" => "The body is larger than 1 MiB",
        "415" => "The body is not `Content-Type: application/json`",
        "422" => {
            "The body is well-formed JSON but not a valid request: a field breaks its rule, an \
             unknown field is present, or it names something that does not exist"
        }
        "429" => "Too many attempts: retry after `Retry-After` seconds",
        "503" => {
            "Not now: the database is unreachable or the server is saturated; retry after \
             `Retry-After` seconds"
        }
        _ => "The request failed",
    }
}

fn integer_header(description: &str) -> Header {
    let mut header = Header::new(
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0)),
    );
    header.description = Some(description.to_owned());
    header
}

fn string_header(description: &str) -> Header {
    let mut header = Header::new(ObjectBuilder::new().schema_type(Type::String));
    header.description = Some(description.to_owned());
    header
}

/// The problem response for `status`, keeping an annotation's own description.
fn problem_response(status: &str, existing: Option<&Response>) -> Response {
    let description = existing
        .map(|r| r.description.trim())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| default_description(status));
    let mut response = Response::new(description);
    response.content.insert(
        PROBLEM_JSON.to_owned(),
        Content::new(Some(Ref::from_schema_name("Problem"))),
    );
    if let Some(existing) = existing {
        response.headers = existing.headers.clone();
    }
    match status {
        "401" => {
            response.headers.insert(
                "WWW-Authenticate".into(),
                string_header("`Bearer` for a missing or invalid token"),
            );
        }
        "429" | "503" => {
            response.headers.insert(
                "Retry-After".into(),
                integer_header("Seconds to wait before retrying"),
            );
        }
        _ => {}
    }
    response
}

fn is_secured(op: &Operation) -> bool {
    op.security
        .as_ref()
        .is_some_and(|all| all.iter().any(|r| *r != SecurityRequirement::default()))
}

/// Query and header values are text on the wire: `null` is no value they can take (an optional
/// parameter is one that may be absent).
fn drop_null_from_parameters(op: &mut Operation) {
    for param in op.parameters.iter_mut().flatten() {
        if let Some(RefOr::T(Schema::Object(object))) = param.schema.as_mut() {
            if let SchemaType::Array(types) = &object.schema_type {
                let kept: Vec<Type> = types
                    .iter()
                    .filter(|t| **t != Type::Null)
                    .cloned()
                    .collect();
                object.schema_type = match kept.as_slice() {
                    [one] => SchemaType::Type(one.clone()),
                    _ => SchemaType::Array(kept),
                };
            }
        }
    }
}

fn complete(path: &str, op: &mut Operation) {
    drop_null_from_parameters(op);
    let has_body = op.request_body.is_some();
    let has_text_params = op
        .parameters
        .iter()
        .flatten()
        .any(|p| matches!(p.parameter_in, ParameterIn::Query | ParameterIn::Header));
    let mut statuses = vec!["408", "503"];
    if has_body || has_text_params {
        // Malformed JSON; a query parameter or header that does not parse or is out of range.
        statuses.push("400");
    }
    if has_body {
        statuses.extend(["413", "415", "422"]);
    }
    if is_secured(op) {
        statuses.push("401");
    }
    if path.contains('{') {
        statuses.push("404");
    }
    for status in statuses {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(Response::new("")));
    }
    for (status, response) in op.responses.responses.iter_mut() {
        if !(status.starts_with('4') || status.starts_with('5')) {
            continue;
        }
        let existing = match response {
            RefOr::T(r) => Some(r.clone()),
            RefOr::Ref(_) => None,
        };
        *response = RefOr::T(problem_response(status, existing.as_ref()));
    }
}

impl Modify for ErrorResponses {
    fn modify(&self, openapi: &mut OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                complete(path, op);
            }
        }
    }
}
