//! Rebuilds when a migration is added: `sqlx::migrate!` embeds the files of
//! `migrations/` at compile time but does not watch the directory itself
//! (the approach the sqlx documentation gives).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
