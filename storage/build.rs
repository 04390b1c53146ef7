//! `sqlx::migrate!` embeds each migration with `include_str!`, which tracks
//! the files it saw but not a file added later; this makes cargo rebuild the
//! crate when anything under migrations/ changes.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
