//! Children for process-level tests: where the `nself` binary is (built first when run under
//! cargo, so it is never stale), the environment a child must not inherit, free ports, and how
//! to show a finished command. Shared by the process tests and the fault tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Variables that would point a child somewhere else than its test says.
pub const SCRUBBED_ENV: &[&str] = &[
    "CLAW_LISTEN",
    "CLAW_DATA_DIR",
    "PLUGIN_INTERNAL_SECRET",
    "NSELF_CLAW_URL",
    "CLAW_KAFKA_BROKERS",
    "CLAW_KAFKA_TOPIC",
    "CLAW_KAFKA_GROUP",
    "CLAW_KAFKA_PARTITIONS",
    "CLAW_DATABASE_URL",
    "CLAW_QUEUE_TIMEOUT_MS",
    "CLAW_MAX_QUEUE",
    "OLLAMA_BASE_URL",
    "OLLAMA_MODEL",
    "OLLAMA_EMBED_MODEL",
    "OLLAMA_MAX_INFLIGHT",
    "GEMINI_API_KEYS",
    "GEMINI_BASE_URL",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "CLAW_MAX_BODY_BYTES",
    "CLAW_LOG_FORMAT",
    "RUST_LOG",
    "NO_COLOR",
    "CLICOLOR_FORCE",
];

/// The workspace root.
pub fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
}

/// The `nself` binary next to this test executable; under cargo, `cargo build -p nself` runs
/// once first so it is never stale.
pub fn nself_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("CLAW_NSELF_BIN") {
            return PathBuf::from(path);
        }
        let exe = std::env::current_exe().expect("current test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable lives in target/<profile>/deps");
        let bin = profile_dir.join(format!("nself{}", std::env::consts::EXE_SUFFIX));
        if let Some(cargo) = std::env::var_os("CARGO") {
            let mut build = Command::new(cargo);
            build
                .current_dir(workspace())
                .args(["build", "--quiet", "-p", "nself", "--bin", "nself"]);
            match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => {}
                Some("release") => {
                    build.arg("--release");
                }
                Some(other) => {
                    build.args(["--profile", other]);
                }
            }
            let status = build.status().expect("run cargo build -p nself");
            assert!(status.success(), "cargo build -p nself failed: {status}");
        }
        assert!(
            bin.is_file(),
            "{} not found: cargo build -p nself",
            bin.display()
        );
        bin
    })
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free local port")
        .port()
}

/// Exit status, stdout and stderr of a finished command.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// CPU time of a process (utime + stime), in clock ticks (`getconf CLK_TCK`, 100 a second on
/// Linux).
#[must_use]
pub fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}
