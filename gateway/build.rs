//! Rebuilds the gateway when a document is added to or removed from `knowledge/`, which is
//! compiled in (`include_dir!` tracks the files it found, not the directory).

fn main() {
    println!("cargo:rerun-if-changed=../knowledge");
}
