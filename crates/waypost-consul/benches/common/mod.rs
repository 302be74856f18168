//! What the crate's benches share: the line that says when and where a table was measured.

/// "Measured {date} on a {n}-core VM (shared with other builds), one Consul 1.8.7 `-dev`
/// agent on loopback; `cargo bench -p waypost-consul --bench {bench}`."
pub(crate) fn measured_on(bench: &str) -> String {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "Measured {} on a {cores}-core VM (shared with other builds), one Consul 1.8.7 \
         `-dev` agent on loopback; `cargo bench -p waypost-consul --bench {bench}`.",
        date.trim()
    )
}
