//! Printing results: aligned tables for people, JSON for scripts (`--output json`).

use clap::ValueEnum;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Columns padded to their widest cell, a header first.
pub fn table(rows: &[Value], columns: &[&str]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.len()])
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
    let mut out = line(columns.iter().map(|c| c.to_uppercase()).collect());
    for r in cells {
        out.push('\n');
        out.push_str(&line(r));
    }
    out
}

pub fn print_rows(out: Output, items: &Value, columns: &[&str]) {
    let rows = items.as_array().cloned().unwrap_or_default();
    match out {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        ),
        Output::Table => println!("{}", table(&rows, columns)),
    }
}

pub fn print_one(out: Output, item: &Value, columns: &[&str]) {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(item).unwrap_or_default()),
        Output::Table => {
            let width = columns.iter().map(|c| c.len() + 1).max().unwrap_or(0);
            for c in columns {
                println!("{:<width$} {}", format!("{c}:"), cell(&item[*c]));
            }
        }
    }
}

/// A machine, with how to reach it.
pub fn print_machine(out: Output, m: &Value) {
    print_one(
        out,
        m,
        &[
            "id",
            "hostname",
            "status",
            "desired_state",
            "image",
            "host",
            "failure_reason",
        ],
    );
    if out == Output::Table {
        if let Some(ports) = m["network"]["ports"].as_array() {
            for p in ports {
                println!(
                    "{:<15} {}:{} -> {}",
                    "port:",
                    cell(&p["host_ip"]),
                    cell(&p["host_port"]),
                    cell(&p["guest"])
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_columns_and_show_missing_values() {
        let rows = [
            json!({"name": "web-1", "state": "running"}),
            json!({"name": "db", "state": null}),
        ];
        assert_eq!(
            table(&rows, &["name", "state"]),
            "NAME   STATE\nweb-1  running\ndb     -"
        );
    }
}
