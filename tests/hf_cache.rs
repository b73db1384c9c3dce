//! `--model` / `--data` as Hugging Face cache references (`org/name`, `org/name:FILE`),
//! resolved in a hub cache laid out as the `huggingface_hub` client lays it out
//! (`models--org--name/{refs/main, snapshots/<commit>/FILE -> ../../blobs/<hash>, blobs/}`),
//! built in a temporary folder with real files and symlinks, through the real binary.

mod common;

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::model::Arch;
use common::models::tiny_model;
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const COMMIT: &str = "9f3c1b2a7d5e4f60819a2b3c4d5e6f708192a3b4";

/// Adds `files` (path in the repo, bytes) to `repo` (`models--org--name`) as the hub does:
/// content in `blobs/<sha256>`, a relative symlink per file in the snapshot, `refs/main`.
fn add_repo(hub: &Path, repo: &str, files: &[(&str, &[u8])]) {
    let root = hub.join(repo);
    let snap = root.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), COMMIT).unwrap();
    for (rel, bytes) in files {
        let hash: String = sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(root.join("blobs").join(&hash), bytes).unwrap();
        let link = snap.join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = rel.matches('/').count() + 2;
        let target = format!("{}blobs/{hash}", "../".repeat(depth));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(link.is_file(), "{} -> {target}", link.display());
    }
}

struct Cache {
    home: tempfile::TempDir,
    llama: Vec<u8>,
}

impl Cache {
    fn hub(&self) -> PathBuf {
        self.home.path().join("hub")
    }
}

fn cache() -> Cache {
    let home = tempfile::tempdir().unwrap();
    let hub = home.path().join("hub");
    let llama = std::fs::read(tiny_model(Arch::Llama, GgmlType::F32, false)).unwrap();
    let qwen = std::fs::read(tiny_model(Arch::Qwen3, GgmlType::F32, false)).unwrap();
    let pairs = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/demo/train.jsonl"
    ))
    .unwrap();
    add_repo(
        &hub,
        "models--acme--tiny-GGUF",
        &[
            ("tiny-f32.gguf", &llama),
            ("README.md", b"# tiny"),
            (".gitattributes", b"*.gguf filter=lfs"),
        ],
    );
    add_repo(
        &hub,
        "models--acme--two-GGUF",
        &[("llama.gguf", &llama), ("q/qwen3.gguf", &qwen)],
    );
    add_repo(
        &hub,
        "datasets--acme--pairs",
        &[
            ("data/train.jsonl", &pairs),
            ("README.md", b"# pairs"),
            ("dataset_info.json", b"{}"),
        ],
    );
    add_repo(
        &hub,
        "datasets--acme--score-pairs",
        &[(
            "pairs.jsonl",
            b"{\"prompt\": \"hi\", \"chosen\": \"Hello!\", \"rejected\": \"Go away.\"}\n{\"prompt\": \"bye\", \"chosen\": \"Bye!\", \"rejected\": \"No.\"}\n",
        )],
    );
    // An interrupted download: the snapshot's symlink leads nowhere.
    let broken = hub.join("models--acme--broken/snapshots").join(COMMIT);
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(hub.join("models--acme--broken/refs"), "").ok();
    std::os::unix::fs::symlink("../../blobs/0000", broken.join("model.gguf")).unwrap();
    Cache { home, llama }
}

fn run(c: &Cache, cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
        .args(args)
        .current_dir(cwd)
        .env("HF_HOME", c.home.path())
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(o: &Output) -> String {
    assert!(!o.status.success(), "expected failure");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn model_and_data_references_resolve_to_the_snapshot_files() {
    let c = cache();
    let cwd = tempfile::tempdir().unwrap();
    let out = ok(&run(&c, cwd.path(), &["info", "acme/tiny-GGUF"]));
    assert!(out.contains("llama"), "{out}");
    // A subfolder file by name; the other repo's single .gguf is ambiguous without it.
    let out = ok(&run(
        &c,
        cwd.path(),
        &["info", "acme/two-GGUF:q/qwen3.gguf"],
    ));
    assert!(out.contains("qwen3"), "{out}");
    // --model and --data together, through a command that reads both.
    let out = ok(&run(
        &c,
        cwd.path(),
        &[
            "score",
            "--threads",
            "1",
            "--model",
            "acme/tiny-GGUF:tiny-f32.gguf",
            "--data",
            "acme/score-pairs",
        ],
    ));
    assert_eq!(out.lines().count(), 2, "one line per pair: {out}");
    // tune reads both too.
    let out_dir = cwd.path().join("run");
    ok(&run(
        &c,
        cwd.path(),
        &[
            "tune",
            "--dry-run",
            "--engine",
            "cpu",
            "--model",
            "acme/tiny-GGUF",
            "--data",
            "acme/pairs:data/train.jsonl",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    ));
}

#[test]
fn a_tune_config_may_name_references_too() {
    let c = cache();
    let cwd = tempfile::tempdir().unwrap();
    let cfg = cwd.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"acme/tiny-GGUF\"\ndata = [\"acme/pairs\"]\nout = \"{}\"\nengine = \"cpu\"\n",
            cwd.path().join("run").display()
        ),
    )
    .unwrap();
    let tune = || {
        run(
            &c,
            cwd.path(),
            &["tune", "--dry-run", "--config", cfg.to_str().unwrap()],
        )
    };
    let o = tune();
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("data: 310 training pairs"), "{err}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("acme/tiny-GGUF", "acme/nope")).unwrap();
    let err = fails(&tune());
    assert!(
        err.contains("model: ") && err.contains("no model acme/nope"),
        "{err}"
    );
}

#[test]
fn errors_list_what_the_cache_holds() {
    let c = cache();
    let cwd = tempfile::tempdir().unwrap();
    let err = fails(&run(&c, cwd.path(), &["info", "acme/nope"]));
    assert!(
        err.contains("no model acme/nope")
            && err.contains("acme/broken, acme/tiny-GGUF, acme/two-GGUF"),
        "{err}"
    );
    let err = fails(&run(&c, cwd.path(), &["info", "acme/two-GGUF"]));
    assert!(
        err.contains("llama.gguf, q/qwen3.gguf") && err.contains("acme/two-GGUF:FILE"),
        "{err}"
    );
    let err = fails(&run(&c, cwd.path(), &["info", "acme/tiny-GGUF:nope.gguf"]));
    assert!(
        err.contains("no file nope.gguf")
            && err.contains(".gitattributes, README.md, tiny-f32.gguf"),
        "{err}"
    );
    let err = fails(&run(&c, cwd.path(), &["info", "acme/broken"]));
    assert!(err.contains("interrupted download"), "{err}");
    // Datasets are looked up among datasets, and list them.
    let err = fails(&run(
        &c,
        cwd.path(),
        &[
            "score",
            "--model",
            "acme/tiny-GGUF",
            "--data",
            "acme/tiny-GGUF",
        ],
    ));
    assert!(
        err.contains("no dataset acme/tiny-GGUF")
            && err.contains("cached datasets: acme/pairs, acme/score-pairs"),
        "{err}"
    );
    // A judge model is looked up the same way (eval, eval-judge, redteam, tune --eval-judge).
    let err = fails(&run(
        &c,
        cwd.path(),
        &["eval-judge", "--judge", "acme/judge-GGUF"],
    ));
    assert!(
        err.contains("--judge: ") && err.contains("no model acme/judge-GGUF"),
        "{err}"
    );
    // An empty cache says so.
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
        .args(["info", "acme/tiny-GGUF"])
        .env("HF_HUB_CACHE", empty.path())
        .output()
        .unwrap();
    let err = fails(&o);
    assert!(err.contains("cached models: none"), "{err}");
}

#[test]
fn a_local_path_wins_and_hf_hub_cache_comes_first() {
    let c = cache();
    let cwd = tempfile::tempdir().unwrap();
    // ./acme/tiny-GGUF exists (a qwen3 model): it is the path, not the cached llama.
    std::fs::create_dir_all(cwd.path().join("acme")).unwrap();
    std::fs::copy(
        tiny_model(Arch::Qwen3, GgmlType::F32, false),
        cwd.path().join("acme/tiny-GGUF"),
    )
    .unwrap();
    let out = ok(&run(&c, cwd.path(), &["info", "acme/tiny-GGUF"]));
    assert!(out.contains("qwen3"), "{out}");
    // HF_HUB_CACHE over HF_HOME, as in huggingface_hub.
    let o = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
        .args(["info", "acme/tiny-GGUF"])
        .env("HF_HOME", "/nonexistent")
        .env("HF_HUB_CACHE", c.hub())
        .output()
        .unwrap();
    assert!(ok(&o).contains("llama"));
    assert_eq!(
        std::fs::read(
            c.hub()
                .join("models--acme--tiny-GGUF/snapshots")
                .join(COMMIT)
                .join("tiny-f32.gguf")
        )
        .unwrap(),
        c.llama
    );
}
