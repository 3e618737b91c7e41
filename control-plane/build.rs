//! Rebuilds the control plane when a migration is added: `sqlx::migrate!` embeds the
//! migration directories at compile time, and cargo would not otherwise notice a new file.

fn main() {
    println!("cargo:rerun-if-changed=src/store/migrations");
}
