//! Fuzz target: any [`SeedSpec`] either renders to a `meta-data` and `user-data` that read back
//! (with serde_yaml, as cloud-init's YAML reader would) to exactly the spec's values, or is
//! refused with a validation error; and `yaml_quote` of any string is one line that parses back
//! to that string. Never a panic.
//!
//! Read back: meta-data has exactly `instance-id` and `local-hostname`, equal to the input;
//! user-data's SkyGate cloud-config has the hostname and exactly the tenant's keys, in order
//! (trimmed, as rendered); with tenant user data, the MIME message has exactly two parts, its
//! boundary occurs nowhere in the tenant's data, and the tenant's part gives back their data
//! byte for byte (base64-decoded, or verbatim when it is itself MIME).

#![no_main]

use arbitrary::Arbitrary;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use host_agent_fuzz::seed::{yaml_quote, SeedError, SeedSpec};
use libfuzzer_sys::fuzz_target;
use serde_yaml::Value;

/// A host name: built from labels over its alphabet (mostly valid), or any text.
#[derive(Debug, Arbitrary)]
enum Hostname {
    Labels(Vec<Vec<u8>>),
    Text(String),
}

impl Hostname {
    fn into_string(self) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";
        match self {
            Hostname::Labels(labels) => labels
                .iter()
                .map(|l| {
                    l.iter()
                        .map(|&b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
                .join("."),
            Hostname::Text(s) => s,
        }
    }
}

/// An SSH key line: key-shaped with any comment (mostly valid), or any text.
#[derive(Debug, Arbitrary)]
enum Key {
    Shaped { data: Vec<u8>, comment: String },
    Text(String),
}

impl Key {
    fn into_string(self) -> String {
        match self {
            Key::Shaped { data, comment } => {
                format!("ssh-ed25519 AAAA{} {comment}", BASE64.encode(data))
            }
            Key::Text(s) => s,
        }
    }
}

/// Tenant user data: any text, a cloud-config, or a MIME message (embedded verbatim).
#[derive(Debug, Arbitrary)]
enum UserData {
    Text(String),
    CloudConfig(String),
    Mime(String),
}

impl UserData {
    fn into_string(self) -> String {
        match self {
            UserData::Text(s) => s,
            UserData::CloudConfig(s) => format!("#cloud-config\n{s}"),
            UserData::Mime(s) => {
                format!("Content-Type: multipart/mixed; boundary=\"t\"\nMIME-Version: 1.0\n\n{s}")
            }
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    quote: String,
    instance_id: String,
    hostname: Hostname,
    ssh_keys: Vec<Key>,
    user_data: Option<UserData>,
}

fuzz_target!(|input: Input| {
    check_yaml_quote(&input.quote);
    let spec = SeedSpec {
        instance_id: input.instance_id,
        hostname: input.hostname.into_string(),
        ssh_keys: input.ssh_keys.into_iter().map(Key::into_string).collect(),
        user_data: input.user_data.map(UserData::into_string),
    };
    match spec.render() {
        Ok(rendered) => {
            check_meta_data(&spec, &rendered.meta_data);
            check_user_data(&spec, &rendered.user_data);
        }
        Err(SeedError::BadHostname(_) | SeedError::BadInstanceId(_) | SeedError::BadKey { .. }) => {
        }
        // render is pure: no file, process or time limit is involved.
        Err(e) => panic!("render failed outside validation: {e}"),
    }
});

fn parse(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("invalid YAML: {e}\n{yaml}"))
}

/// Any string, quoted, is one line (for YAML and for the tiny init's line parser) and parses
/// back to itself, also next to another key.
fn check_yaml_quote(s: &str) {
    let quoted = yaml_quote(s);
    assert!(
        !quoted.contains(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}']),
        "quoted value spans lines: {quoted:?}"
    );
    let doc = parse(&format!("k: {quoted}\nother: 1\n"));
    assert_eq!(doc["k"].as_str(), Some(s), "{quoted:?}");
    assert_eq!(doc.as_mapping().map(|m| m.len()), Some(2), "{quoted:?}");
    let list = parse(&format!("- {quoted}\n"));
    assert_eq!(list[0].as_str(), Some(s), "{quoted:?}");
}

/// Exactly `instance-id` and `local-hostname`, with the spec's values.
fn check_meta_data(spec: &SeedSpec, meta_data: &str) {
    let meta = parse(meta_data);
    assert_eq!(meta.as_mapping().map(|m| m.len()), Some(2), "{meta_data}");
    assert_eq!(
        meta["instance-id"].as_str(),
        Some(spec.instance_id.as_str())
    );
    assert_eq!(
        meta["local-hostname"].as_str(),
        Some(spec.hostname.as_str())
    );
}

/// SkyGate's cloud-config: the hostname and exactly the tenant's keys (plus `merge_how` in a
/// multipart message), nothing else.
fn check_cloud_config(spec: &SeedSpec, config: &str, multipart: bool) {
    assert!(config.starts_with("#cloud-config\n"), "{config}");
    let cfg = parse(config);
    let want_len = if multipart { 3 } else { 2 };
    assert_eq!(
        cfg.as_mapping().map(|m| m.len()),
        Some(want_len),
        "{config}"
    );
    assert_eq!(cfg["hostname"].as_str(), Some(spec.hostname.as_str()));
    let keys: Option<Vec<&str>> = cfg["ssh_authorized_keys"]
        .as_sequence()
        .and_then(|s| s.iter().map(Value::as_str).collect());
    let want: Vec<&str> = spec.ssh_keys.iter().map(|k| k.trim()).collect();
    assert_eq!(keys, Some(want), "{config}");
    if multipart {
        assert_eq!(cfg["merge_how"][0]["settings"][0].as_str(), Some("append"));
    }
}

fn check_user_data(spec: &SeedSpec, user_data: &str) {
    let Some(tenant) = &spec.user_data else {
        return check_cloud_config(spec, user_data, false);
    };
    let (header, body) = user_data
        .split_once("\n\n")
        .unwrap_or_else(|| panic!("no MIME header\n{user_data}"));
    let boundary = header
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("Content-Type: multipart/mixed; boundary=\""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no multipart boundary\n{user_data}"));
    assert!(!boundary.is_empty());
    assert!(
        !tenant.contains(boundary),
        "boundary {boundary:?} occurs in the tenant's data"
    );
    let delimiter = format!("--{boundary}\n");
    let parts = body
        .strip_prefix(&delimiter)
        .and_then(|b| b.strip_suffix(&format!("--{boundary}--\n")))
        .unwrap_or_else(|| panic!("body not enclosed by the boundary\n{user_data}"));
    let (theirs, ours) = parts
        .split_once(&delimiter)
        .unwrap_or_else(|| panic!("fewer than two parts\n{user_data}"));
    assert!(!ours.contains(boundary), "more than two parts\n{user_data}");

    let is_mime = tenant
        .as_bytes()
        .get(..13)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"content-type:"));
    if is_mime {
        // Embedded verbatim, a newline added if it had none before the next delimiter.
        let verbatim = theirs
            .strip_suffix('\n')
            .filter(|_| !tenant.ends_with('\n'));
        assert_eq!(verbatim.unwrap_or(theirs), tenant.as_str());
    } else {
        let (_, encoded) = theirs
            .split_once("\n\n")
            .unwrap_or_else(|| panic!("tenant part without headers\n{user_data}"));
        assert!(encoded.lines().all(|l| l.len() <= 76), "base64 lines > 76");
        let decoded = BASE64
            .decode(encoded.replace('\n', ""))
            .unwrap_or_else(|e| panic!("tenant part is not base64: {e}"));
        assert_eq!(decoded, tenant.as_bytes());
    }
    let (_, config) = ours
        .split_once("\n\n")
        .unwrap_or_else(|| panic!("our part without headers\n{user_data}"));
    check_cloud_config(spec, config, true);
}
