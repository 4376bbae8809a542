//! Checks the architecture map in `lib.rs`: every `crate::x` a top-level module names (outside
//! comments and its unit tests) is listed below it in [`LAYERS`].

/// The crate's top-level modules, top to bottom, as the map lists them.
const LAYERS: &[&str] = &[
    "executor",
    "startup",
    "admin",
    "sd_notify",
    "listener",
    "connection",
    "shard",
    "fanout",
    "client",
    "pacing",
    "shared",
    "shutdown",
    "ready_set",
    "socket",
    "limiter",
    "quarantine",
    "metrics",
    "backpressure",
    "host_limit",
    "log",
    "notify",
    "config",
    "cluster",
    "tls",
    "batch",
    "mesh",
    "protocol",
    "proxy_protocol",
    "netlist",
    "machine",
    "supervisor",
    "glibc_compat",
];

fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments and its `#[cfg(test)] mod tests`.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `code` names, as `crate::x` or inside `use crate::{x, ...}`.
fn uses(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find("};").unwrap_or(group.len())];
            for part in group.split(',') {
                let part = part.trim();
                let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                names.push(name);
            }
        } else {
            names.push(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
        }
    }
    names
}

#[test]
fn every_module_uses_only_modules_below_it_in_the_map() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut upward = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let module = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" || module == "layering" {
            continue;
        }
        seen.insert(module.clone());
        let Some(level) = LAYERS.iter().position(|m| *m == module) else {
            panic!("module {module} ({rel}) is not in the map");
        };
        for used in uses(&code(&std::fs::read_to_string(&file).unwrap())) {
            let Some(used_level) = LAYERS.iter().position(|m| *m == used) else {
                continue;
            };
            if used_level <= level && used != module {
                upward.push(format!("{rel} uses {used}"));
            }
        }
    }
    assert!(upward.is_empty(), "modules using modules above them: {upward:?}");
    assert_eq!(seen.len(), LAYERS.len(), "the map lists modules that do not exist");
}
