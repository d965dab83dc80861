//! The `nself` command's reusable part: how `nself claw serve` reads its settings. The binary
//! (`main.rs`) is the clap tree, the admin client and the output formatting.

pub mod serve_args;

pub use serve_args::ServeArgs;
