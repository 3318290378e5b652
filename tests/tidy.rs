//! The sans-IO core stays sans-IO: no real clock, no OS randomness, no
//! hash-ordered collections (their iteration order differs between runs), no
//! runtime, no IO. A grep, so it cannot be fooled by types or macros only in
//! comments: lines starting with `//` are skipped.

use std::path::{Path, PathBuf};

const CORE: [&str; 7] = [
    "src/types.rs",
    "src/machine.rs",
    "src/rng.rs",
    "src/log",
    "src/broker",
    "src/saga",
    "src/cluster",
];

const FORBIDDEN: [(&str, &str); 12] = [
    ("Instant::now", "reads the real clock; take `now` as an input"),
    ("SystemTime", "reads the real clock; take `now` as an input"),
    ("thread_rng", "OS-seeded randomness; use crate::rng::Rng"),
    ("OsRng", "OS randomness; use crate::rng::Rng"),
    (
        "rand::",
        "an external RNG; use crate::rng::Rng so seeds reproduce forever",
    ),
    ("HashMap", "hash-ordered iteration; use BTreeMap"),
    ("HashSet", "hash-ordered iteration; use BTreeSet"),
    ("tokio", "a runtime in the core; drivers own IO"),
    ("madsim", "a runtime in the core; drivers own IO"),
    ("async fn", "async in the core; drivers own IO"),
    ("std::fs", "file IO in the core; return Persist outputs instead"),
    ("std::net", "network IO in the core; return outputs instead"),
];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .expect("read core dir")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for e in entries {
            rust_files(&e, out);
        }
    } else if path.extension().is_some_and(|x| x == "rs") {
        out.push(path.to_path_buf());
    }
}

#[test]
fn the_core_never_reaches_for_clocks_randomness_hash_maps_or_io() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for c in CORE {
        rust_files(&root.join(c), &mut files);
    }
    assert!(files.len() > 10, "found the core's files: {files:?}");
    let mut hits = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read source");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for (pattern, why) in FORBIDDEN {
                if code.contains(pattern) {
                    hits.push(format!(
                        "{}:{}: `{pattern}`: {why}",
                        f.strip_prefix(root).unwrap_or(f).display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        hits.is_empty(),
        "the sans-IO core broke its rules:\n{}",
        hits.join("\n")
    );
}
