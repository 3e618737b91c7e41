//! Printing results: aligned tables for people, JSON for scripts (`--output json`). Columns
//! are typed accessors of the API's response types, so a renamed field fails the build.

use clap::ValueEnum;
use serde::Serialize;
use skygate_api_types::{
    AuditEventView, CreatedTokenView, EventView, HostView, ImageView, MachineView, ProfileView,
    QuotaView, SshKeyView, TokenView, UserView,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// A column: its header and how to read its cell.
pub type Column<T> = (&'static str, fn(&T) -> String);

/// An absent value.
fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

pub const USER: &[Column<UserView>] = &[
    ("id", |u| u.id.clone()),
    ("username", |u| u.username.clone()),
    ("email", |u| u.email.clone()),
    ("role", |u| u.role.clone()),
    ("disabled", |u| {
        u.disabled_at.map_or_else(
            || "-".into(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
    }),
];

/// A limit, marked when it is the tenant's own rather than the server default.
fn limit(value: i64, own: Option<i64>) -> String {
    match own {
        Some(_) => format!("{value} (own)"),
        None => value.to_string(),
    }
}

pub const QUOTA: &[Column<QuotaView>] = &[
    ("machines", |q| {
        format!(
            "{} of {}",
            q.usage.machines,
            limit(q.max_machines, q.overrides.max_machines)
        )
    }),
    ("vcpus", |q| {
        format!(
            "{} of {}",
            q.usage.vcpus,
            limit(q.max_vcpus, q.overrides.max_vcpus)
        )
    }),
    ("memory_mib", |q| {
        format!(
            "{} of {}",
            q.usage.memory_mib,
            limit(q.max_memory_mib, q.overrides.max_memory_mib)
        )
    }),
];

pub const SSH_KEY: &[Column<SshKeyView>] = &[
    ("id", |k| k.id.clone()),
    ("name", |k| k.name.clone()),
    ("fingerprint", |k| k.fingerprint.clone()),
];

pub const IMAGE_ROW: &[Column<ImageView>] = &[
    ("name", |i| i.name.clone()),
    ("format", |i| i.format.clone()),
    ("source", |i| opt(&i.source)),
];

pub const IMAGE: &[Column<ImageView>] = &[
    ("id", |i| i.id.clone()),
    ("name", |i| i.name.clone()),
    ("format", |i| i.format.clone()),
    ("source", |i| opt(&i.source)),
    ("deprecated", |i| {
        i.deprecated_at.map_or_else(
            || "-".into(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
    }),
];

pub const HOST: &[Column<HostView>] = &[
    ("name", |h| h.name.clone()),
    ("state", |h| h.state.clone()),
    ("hypervisor", |h| h.hypervisor.clone()),
    ("machines", |h| h.machines.to_string()),
    ("address", |h| h.address.clone()),
    ("evacuation", |h| {
        h.evacuation.as_ref().map_or_else(
            || "-".to_owned(),
            |e| format!("{} left, {} moving", e.machines_left, e.moving),
        )
    }),
];

pub const MACHINE_ROW: &[Column<MachineView>] = &[
    ("id", |m| m.id.clone()),
    ("hostname", |m| m.hostname.clone()),
    ("status", |m| m.status.to_string()),
    ("host", |m| opt(&m.host)),
    ("vcpus", |m| m.vcpus.to_string()),
    ("memory_mib", |m| m.memory_mib.to_string()),
];

const MACHINE: &[Column<MachineView>] = &[
    ("id", |m| m.id.clone()),
    ("hostname", |m| m.hostname.clone()),
    ("status", |m| m.status.to_string()),
    ("desired_state", |m| m.desired_state.as_str().to_owned()),
    ("image", |m| m.image.clone()),
    ("host", |m| opt(&m.host)),
    ("restart_policy", |m| m.restart_policy.as_str().to_owned()),
    ("labels", |m| {
        if m.labels.is_empty() {
            return "-".into();
        }
        m.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }),
    ("failure_reason", |m| opt(&m.failure_reason)),
];

pub const TOKEN: &[Column<TokenView>] = &[
    ("id", |t| t.id.clone()),
    ("name", |t| t.name.clone()),
    ("scope", |t| t.scope.as_str().to_owned()),
    ("expires_at", |t| {
        t.expires_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }),
    ("last_used_at", |t| {
        t.last_used_at.map_or_else(
            || "-".into(),
            |at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
    }),
];

/// A token just minted, with its secret (shown this once).
pub fn print_created_token(out: Output, created: &CreatedTokenView) {
    match out {
        Output::Json => println!("{}", json(created)),
        Output::Table => {
            print_one(out, &created.view, TOKEN);
            println!("token:        {}", created.token);
            eprintln!("this is the only time the token is shown: store it now");
        }
    }
}

pub const AUDIT_EVENT: &[Column<AuditEventView>] = &[
    ("at", |e| {
        e.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }),
    ("who", |e| {
        e.actor_id
            .clone()
            .or_else(|| e.actor_name.clone())
            .unwrap_or_else(|| "-".into())
    }),
    ("action", |e| e.action.clone()),
    ("outcome", |e| e.outcome.to_string()),
    ("target", |e| e.target.clone()),
    ("client", |e| e.client.clone()),
    ("request_id", |e| e.request_id.clone()),
];

pub const EVENT: &[Column<EventView>] = &[
    ("created_at", |e| {
        e.created_at
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    }),
    ("action", |e| e.action.clone()),
    ("status", |e| e.status.to_string()),
    ("message", |e| e.message.clone()),
];

/// Columns padded to their widest cell, a header first.
pub fn table<T>(rows: &[T], columns: &[Column<T>]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, cell)| cell(r)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([name.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<String>| {
        values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(columns.iter().map(|(c, _)| c.to_uppercase()).collect());
    for r in cells {
        out.push('\n');
        out.push_str(&line(r));
    }
    out
}

fn json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

pub fn print_rows<T: Serialize>(out: Output, rows: &[T], columns: &[Column<T>]) {
    match out {
        Output::Json => println!("{}", json(rows)),
        Output::Table => println!("{}", table(rows, columns)),
    }
}

pub fn print_one<T: Serialize>(out: Output, item: &T, columns: &[Column<T>]) {
    match out {
        Output::Json => println!("{}", json(item)),
        Output::Table => {
            let width = columns.iter().map(|(c, _)| c.len() + 1).max().unwrap_or(0);
            for (name, cell) in columns {
                println!("{:<width$} {}", format!("{name}:"), cell(item));
            }
        }
    }
}

/// The caller's account, then its limits and usage.
pub fn print_profile(out: Output, me: &ProfileView) {
    match out {
        Output::Json => println!("{}", json(me)),
        Output::Table => {
            print_one(out, &me.user, USER);
            print_one(out, &me.quota, QUOTA);
        }
    }
}

/// A machine, with how to reach it.
pub fn print_machine(out: Output, m: &MachineView) {
    print_one(out, m, MACHINE);
    if out == Output::Table {
        for p in &m.network.ports {
            println!(
                "{:<15} {}:{} -> {}",
                "port:", p.host_ip, p.host_port, p.guest
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Row {
        name: &'static str,
        state: Option<String>,
    }

    #[test]
    fn tables_align_columns_and_show_missing_values() {
        let rows = [
            Row {
                name: "web-1",
                state: Some("running".into()),
            },
            Row {
                name: "db",
                state: None,
            },
        ];
        let columns: &[Column<Row>] = &[
            ("name", |r| r.name.to_owned()),
            ("state", |r| opt(&r.state)),
        ];
        assert_eq!(
            table(&rows, columns),
            "NAME   STATE\nweb-1  running\ndb     -"
        );
    }
}
