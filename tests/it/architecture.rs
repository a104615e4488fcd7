//! The shape of `src/`, checked: modules import only those on lower layers
//! (so there is no import cycle), the router uses no feature, and no feature
//! borrows from another. Read from the source itself, so a change that
//! breaks the shape fails here, in CI, with the edge that broke it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every top-level module and its layer: a module may import only modules
/// on a strictly lower layer.
const LAYERS: &[(&str, u8)] = &[
    // Foundations.
    ("domain", 0),
    ("crypto", 0),
    ("failpoint", 0),
    ("embedded", 0),
    ("config", 1),
    ("tokens", 1),
    ("registry", 1),
    ("telemetry", 2),
    // Shared machinery: tenant-server access, then the operations runner.
    ("servers", 2),
    ("ops", 3),
    // The router uses the registry and server access, never a feature.
    ("router", 3),
    // Features: none imports another.
    ("provision", 4),
    ("backup", 4),
    ("relocate", 4),
    ("migrate", 4),
    ("rekey", 4),
    ("usage", 4),
    // The PostgreSQL-protocol front door: the router's budget, the registry.
    ("wire", 4),
    // The control plane over the features, then its callers.
    ("control", 5),
    ("jobs", 6),
    ("api", 6),
    ("startup", 7),
    ("cli", 8),
];

/// `crate::<module>` names used by each top-level module (files under it).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_owned();
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let used = out.entry(module.clone()).or_default();
            for name in crate_paths(&text) {
                if name != module {
                    used.insert(name);
                }
            }
        }
    }
    out
}

/// The first segment after every `crate::`, including `crate::{a, b::c}`.
fn crate_paths(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        // `silo::crate::x` cannot occur; `$crate::` (macros) is not ours.
        if text[..i].ends_with('$') {
            continue;
        }
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let head = item.trim().split("::").next().unwrap_or("").trim();
                if !head.is_empty() {
                    names.push(head.to_owned());
                }
            }
        } else {
            let head: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.push(head);
        }
    }
    names
}

#[test]
fn every_module_imports_only_lower_layers() {
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let found = imports();
    let mut wrong = Vec::new();
    for (module, used) in &found {
        let Some(&own) = layer.get(module.as_str()) else {
            wrong.push(format!("src/{module}: not placed on a layer in this test"));
            continue;
        };
        for name in used {
            match layer.get(name.as_str()) {
                Some(&theirs) if theirs < own => {}
                Some(&theirs) => wrong.push(format!(
                    "{module} (layer {own}) imports {name} (layer {theirs})"
                )),
                None => wrong.push(format!("{module} imports unknown crate::{name}")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_router_uses_no_feature() {
    let found = imports();
    let router = &found["router"];
    let features: Vec<&str> = ["provision", "relocate", "backup", "migrate", "control"]
        .into_iter()
        .filter(|f| router.contains(*f))
        .collect();
    assert!(features.is_empty(), "router imports {features:?}");
}

#[test]
fn crate_paths_reads_single_and_grouped_imports() {
    let text = "use crate::a::B;\nuse crate::{c, d::E};\nlet x = crate::f::g();\nmacro $crate::h";
    assert_eq!(crate_paths(text), ["a", "c", "d", "f"]);
}
