//! The library's layers (src/lib.rs's module map): a module never imports one above it.
//! `cli → run → train/cpu/export (eval, redteam) → gpu → model/runtime → data → gguf/util/optim/loss`
//! (the CPU engine is a peer of `train`, whose `Engine` trait it implements).
//! Reads the sources: every `crate::<module>` outside comments must name a module at the same
//! level or below. Modules not in the table (new ones) are not checked until they are added.

use std::path::{Path, PathBuf};

/// Level of each top-level module of `src/`; higher levels may import lower ones.
const LEVELS: &[(&str, u32)] = &[
    ("util", 0),
    ("gguf", 0),
    ("optim", 0),
    ("loss", 0),
    ("data", 1),
    ("template", 1),
    ("model", 2),
    ("runtime", 2),
    ("gpu", 3),
    ("export", 4),
    ("train", 4),
    ("cpu", 4),
    ("eval", 4),
    ("redteam", 4),
    ("run", 5),
];

fn level(module: &str) -> Option<u32> {
    LEVELS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if p.is_file() && p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

#[test]
fn no_module_imports_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    let mut checked = 0;
    for (module, lvl) in LEVELS {
        let mut files = Vec::new();
        rust_files(&src.join(module), &mut files);
        rust_files(&src.join(format!("{module}.rs")), &mut files);
        for f in files {
            checked += 1;
            let text = std::fs::read_to_string(&f).unwrap();
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for (pos, _) in code.match_indices("crate::") {
                    let name: String = code[pos + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if let Some(l) = level(&name)
                        && l > *lvl
                    {
                        violations.push(format!(
                            "{}:{}: {module} imports {name}",
                            f.display(),
                            i + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} files found under {}",
        src.display()
    );
    assert!(
        violations.is_empty(),
        "imports against the layering:\n{}",
        violations.join("\n")
    );
}
