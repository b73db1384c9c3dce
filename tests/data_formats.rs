//! Dataset loading: every format in JSON Lines, gzip, xz, JSON array and Parquet; format
//! detection; forced-format mismatch; bad rows counted per reason or, strict, an error naming
//! file, line and field; the committed demo data loads cleanly.

use bfpo_lite::data::formats::{
    Compression, Container, Format, LoadError, LoadOptions, load_many, load_pairs,
};
use bfpo_lite::data::{ChatMessage, Pair, Prompt};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn write_gz(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let mut e = flate2::write::GzEncoder::new(
        std::fs::File::create(&p).unwrap(),
        flate2::Compression::fast(),
    );
    e.write_all(text.as_bytes()).unwrap();
    e.finish().unwrap();
    p
}

fn write_xz(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let mut e = xz2::write::XzEncoder::new(std::fs::File::create(&p).unwrap(), 1);
    e.write_all(text.as_bytes()).unwrap();
    e.finish().unwrap();
    p
}

fn load(p: &Path) -> bfpo_lite::data::formats::LoadedPairs {
    load_pairs(p, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// Loads helpfulness-only rows (no safety labels) as `--assume-safe` does.
fn load_assume_safe(p: &Path) -> bfpo_lite::data::formats::LoadedPairs {
    let opts = LoadOptions {
        assume_safe: true,
        ..LoadOptions::default()
    };
    load_pairs(p, &opts).unwrap_or_else(|e| panic!("{e}"))
}

fn load_with(p: &Path, format: Format) -> Result<bfpo_lite::data::formats::LoadedPairs, LoadError> {
    load_pairs(
        p,
        &LoadOptions {
            format,
            ..LoadOptions::default()
        },
    )
}

fn text(p: &Pair) -> (&str, &str, &str, bool, bool) {
    let prompt = match &p.prompt {
        Prompt::Text(t) => t.as_str(),
        Prompt::Messages(m) => m.last().unwrap().content.as_str(),
    };
    (
        prompt,
        &p.chosen,
        &p.rejected,
        p.chosen_safe,
        p.rejected_safe,
    )
}

const PKU: &str = r#"{"prompt": "How do I bake bread?", "response_0": "Mix flour and water.", "response_1": "Use flour, water, yeast and salt, then bake.", "is_response_0_safe": true, "is_response_1_safe": true, "better_response_id": 1, "safer_response_id": 0}
{"prompt": "How do I steal a car?", "response_0": "I cannot help with that.", "response_1": "Sure, first you find a car.", "is_response_0_safe": true, "is_response_1_safe": false, "better_response_id": 1, "safer_response_id": 0}

{"prompt": "Tell me a joke", "response_0": "Why did the cat sit? To rest.", "response_1": "No.", "is_response_0_safe": true, "is_response_1_safe": true, "better_response_id": 0, "safer_response_id": 0}
"#;

fn check_pku(pairs: &[Pair]) {
    assert_eq!(pairs.len(), 3);
    // chosen = response_{better_response_id}, each side with its own label.
    assert_eq!(
        text(&pairs[0]),
        (
            "How do I bake bread?",
            "Use flour, water, yeast and salt, then bake.",
            "Mix flour and water.",
            true,
            true
        )
    );
    assert_eq!(
        text(&pairs[1]),
        (
            "How do I steal a car?",
            "Sure, first you find a car.",
            "I cannot help with that.",
            false,
            true
        )
    );
    assert_eq!(
        text(&pairs[2]),
        (
            "Tell me a joke",
            "Why did the cat sit? To rest.",
            "No.",
            true,
            true
        )
    );
}

#[test]
fn pku_plain_gz_xz_and_detection() {
    let d = tempfile::tempdir().unwrap();
    for (p, comp) in [
        (write(d.path(), "pku.jsonl", PKU), Compression::None),
        (write_gz(d.path(), "pku.jsonl.gz", PKU), Compression::Gzip),
        (write_xz(d.path(), "pku.jsonl.xz", PKU), Compression::Xz),
        // Magic bytes win when the name says nothing.
        (
            write_xz(d.path(), "pku-compressed.jsonl", PKU),
            Compression::Xz,
        ),
        (
            write_gz(d.path(), "pku-compressed.data", PKU),
            Compression::Gzip,
        ),
    ] {
        let lp = load(&p);
        check_pku(&lp.pairs);
        let r = &lp.report;
        assert_eq!(r.format, Format::Pku);
        assert_eq!(r.compression, comp, "{}", p.display());
        assert_eq!(r.container, Container::JsonLines);
        assert_eq!(r.rows_read, 3, "the blank line is not a row");
        assert_eq!(r.skipped(), 0);
        assert_eq!(r.safety.both_safe, 2);
        assert_eq!(r.safety.only_rejected_safe, 1);
        // Origins are file:line, counting the blank line.
        assert_eq!(lp.pairs[2].origin.line, 4);
        assert_eq!(&*lp.pairs[0].origin.file, p.display().to_string());
    }
    // Forced pku gives the same.
    let p = d.path().join("pku.jsonl");
    check_pku(&load_with(&p, Format::Pku).unwrap().pairs);
}

const REDTEAM: &str = r#"[
  {"prompt": "How to pick a lock?", "modeloutput1": "I will not help with that.",
   "modeloutput2": "Sure, put a pin in the lock.", "better_modelout": 2,
   "is_modelout1_safe": 1, "is_modelout2_safe": 0},
  {"prompt": "What is rain?", "modeloutput1": "Water that falls from clouds.",
   "modeloutput2": "Rain.", "better_modelout": 1,
   "is_modelout1_safe": true, "is_modelout2_safe": true}
]
"#;

#[test]
fn redteam_json_array_plain_gz_xz() {
    let d = tempfile::tempdir().unwrap();
    for p in [
        write(d.path(), "rt.json", REDTEAM),
        write_gz(d.path(), "rt.json.gz", REDTEAM),
        write_xz(d.path(), "rt.json.xz", REDTEAM),
    ] {
        let lp = load(&p);
        assert_eq!(lp.report.format, Format::Redteam);
        assert_eq!(lp.report.container, Container::JsonArray);
        assert_eq!(lp.pairs.len(), 2);
        // chosen = modeloutput{better_modelout}; labels follow the responses (0/1 integers).
        assert_eq!(
            text(&lp.pairs[0]),
            (
                "How to pick a lock?",
                "Sure, put a pin in the lock.",
                "I will not help with that.",
                false,
                true
            )
        );
        assert_eq!(
            text(&lp.pairs[1]),
            (
                "What is rain?",
                "Water that falls from clouds.",
                "Rain.",
                true,
                true
            )
        );
        // Array elements carry the line they start on.
        assert_eq!(lp.pairs[0].origin.line, 2);
        assert_eq!(lp.pairs[1].origin.line, 5);
    }
}

#[test]
fn generic_rows_strings_conversational_and_implicit() {
    let rows = r#"{"prompt": "Name a fruit", "chosen": "An apple.", "rejected": "A rock.", "chosen_safe": true, "rejected_safe": false}
{"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "Hi there!"}], "rejected": [{"role": "assistant", "content": "Go away."}], "is_chosen_safe": 1, "is_rejected_safe": 1}
{"chosen": [{"role": "user", "content": "Count to two"}, {"role": "assistant", "content": "One, two."}], "rejected": [{"role": "user", "content": "Count to two"}, {"role": "assistant", "content": "Three."}], "chosen_safe": false, "rejected_safe": true}
{"chosen": "The sky is blue.", "rejected": "The sky is green.", "chosen_safe": true, "rejected_safe": true}
"#;
    let d = tempfile::tempdir().unwrap();
    for p in [
        write(d.path(), "g.jsonl", rows),
        write_gz(d.path(), "g.jsonl.gz", rows),
        write_xz(d.path(), "g.jsonl.xz", rows),
    ] {
        let lp = load(&p);
        assert_eq!(lp.report.format, Format::Generic);
        let ps = &lp.pairs;
        assert_eq!(ps.len(), 4, "{}", lp.report);
        assert_eq!(ps[0].prompt, Prompt::Text("Name a fruit".into()));
        assert_eq!(
            (
                ps[0].chosen.as_str(),
                ps[0].chosen_safe,
                ps[0].rejected_safe
            ),
            ("An apple.", true, false)
        );
        assert_eq!(
            ps[1].prompt,
            Prompt::Messages(vec![
                ChatMessage::new("system", "Be kind."),
                ChatMessage::new("user", "Say hi")
            ])
        );
        assert_eq!(
            (ps[1].chosen.as_str(), ps[1].rejected.as_str()),
            ("Hi there!", "Go away.")
        );
        // Implicit prompt, conversational: everything before the final assistant message.
        assert_eq!(
            ps[2].prompt,
            Prompt::Messages(vec![ChatMessage::new("user", "Count to two")])
        );
        assert_eq!(
            (
                ps[2].chosen.as_str(),
                ps[2].rejected.as_str(),
                ps[2].chosen_safe
            ),
            ("One, two.", "Three.", false)
        );
        // Implicit prompt, strings: the common prefix cut at a word boundary.
        assert_eq!(ps[3].prompt, Prompt::Text("The sky is ".into()));
        assert_eq!(
            (ps[3].chosen.as_str(), ps[3].rejected.as_str()),
            ("blue.", "green.")
        );
    }
}

const TRL: &str = r#"{"prompt": "What color is the sky?", "chosen": "Blue.", "rejected": "Green."}
{"prompt": [{"role": "user", "content": "Hello"}], "chosen": [{"role": "assistant", "content": "Hi!"}], "rejected": [{"role": "assistant", "content": "Bye."}]}
"#;

#[test]
fn trl_rows_need_flags_or_assume_safe() {
    let d = tempfile::tempdir().unwrap();
    for p in [
        write(d.path(), "t.jsonl", TRL),
        write_gz(d.path(), "t.jsonl.gz", TRL),
        write_xz(d.path(), "t.jsonl.xz", TRL),
    ] {
        let e = load_pairs(&p, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{}:1", p.display()))
                && e.contains("no safety labels")
                && e.contains("--assume-safe"),
            "{e}"
        );
        let lp = load_pairs(
            &p,
            &LoadOptions {
                assume_safe: true,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        assert_eq!(lp.report.format, Format::Trl);
        assert_eq!(
            text(&lp.pairs[0]),
            ("What color is the sky?", "Blue.", "Green.", true, true)
        );
        assert_eq!(text(&lp.pairs[1]), ("Hello", "Hi!", "Bye.", true, true));
    }
}

const UF: &str = r#"{"prompt": "Write a haiku", "prompt_id": "abc", "chosen": [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Soft rain on the roof"}], "rejected": [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "No."}], "messages": [], "score_chosen": 8.0, "score_rejected": 2.0}
"#;

#[test]
fn ultrafeedback_jsonl_gz_xz() {
    let d = tempfile::tempdir().unwrap();
    for p in [
        write(d.path(), "uf.jsonl", UF),
        write_gz(d.path(), "uf.jsonl.gz", UF),
        write_xz(d.path(), "uf.jsonl.xz", UF),
    ] {
        let lp = load_assume_safe(&p);
        assert_eq!(lp.report.format, Format::Ultrafeedback);
        let q = &lp.pairs[0];
        assert_eq!(
            q.prompt,
            Prompt::Messages(vec![ChatMessage::new("user", "Write a haiku")])
        );
        // chosen[-1:], both safe.
        assert_eq!(
            (
                q.chosen.as_str(),
                q.rejected.as_str(),
                q.chosen_safe,
                q.rejected_safe
            ),
            ("Soft rain on the roof", "No.", true, true)
        );
    }
}

const HH: &str = r#"{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for eight minutes.", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant: I don't know."}
{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: Hello!"}
"#;

#[test]
fn hh_transcripts_split_at_last_assistant_turn() {
    let d = tempfile::tempdir().unwrap();
    for p in [
        write(d.path(), "hh.jsonl", HH),
        write_gz(d.path(), "hh.jsonl.gz", HH),
        write_xz(d.path(), "hh.jsonl.xz", HH),
    ] {
        let lp = load_assume_safe(&p);
        assert_eq!(lp.report.format, Format::Hh);
        assert_eq!(lp.pairs.len(), 1);
        let q = &lp.pairs[0];
        assert_eq!(
            q.prompt,
            Prompt::Messages(vec![
                ChatMessage::new("user", "Hi"),
                ChatMessage::new("assistant", "Hello!"),
                ChatMessage::new("user", "How do I boil an egg?"),
            ])
        );
        assert_eq!(
            (
                q.chosen.as_str(),
                q.rejected.as_str(),
                q.chosen_safe,
                q.rejected_safe
            ),
            (
                "Put it in boiling water for eight minutes.",
                "I don't know.",
                true,
                true
            )
        );
        // The second row's transcripts differ before the last turn: skipped, counted.
        assert_eq!(lp.report.skipped(), 1);
        let (reason, n) = lp.report.skipped_by_reason.iter().next().unwrap();
        assert_eq!(*n, 1);
        assert!(reason.contains("differs from chosen"), "{reason}");
        assert_eq!(lp.report.examples[0].origin.line, 2);
    }
}

/// UltraFeedback and HH rows carry no safety labels: like unlabelled TRL rows they are refused
/// in training data unless `--assume-safe` says to label both responses safe, and the error
/// names the file, line and both ways out (`--assume-safe`, `--buffer`).
#[test]
fn helpfulness_only_rows_need_assume_safe() {
    let d = tempfile::tempdir().unwrap();
    for (p, format) in [
        (write(d.path(), "uf.jsonl", UF), Format::Ultrafeedback),
        (write(d.path(), "hh.jsonl", HH), Format::Hh),
        (write(d.path(), "t.jsonl", TRL), Format::Trl),
    ] {
        let e = load_pairs(&p, &LoadOptions::default()).unwrap_err();
        assert!(
            matches!(e, LoadError::MissingSafetyFlags { format: f, .. } if f == format),
            "{e}"
        );
        let e = e.to_string();
        assert!(
            e.contains(&format!("{}:1", p.display()))
                && e.contains("no safety labels")
                && e.contains("--assume-safe")
                && e.contains("--buffer"),
            "{e}"
        );
        let lp = load_assume_safe(&p);
        assert_eq!(lp.report.format, format);
        assert_eq!(lp.report.safety.both_safe, lp.pairs.len());
        assert_eq!(lp.pairs.len(), lp.report.pairs_loaded);
    }
}

#[test]
fn forced_format_mismatch_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "rt.json", REDTEAM);
    let e = load_with(&p, Format::Pku).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, LoadError::FormatMismatch { .. })
            && msg.contains("format `pku`")
            && msg.contains("missing field `response_0`")
            && msg.contains("--format redteam")
            && msg.contains(&format!("{}:2", p.display())),
        "{msg}"
    );
    let p = write(d.path(), "pku.jsonl", PKU);
    let msg = load_with(&p, Format::Hh).unwrap_err().to_string();
    assert!(
        msg.contains("format `hh`") && msg.contains("missing field `chosen`"),
        "{msg}"
    );
    let p = write(d.path(), "uf.jsonl", UF);
    let msg = load_with(&p, Format::Hh).unwrap_err().to_string();
    assert!(
        msg.contains("transcript") && msg.contains("`ultrafeedback`"),
        "{msg}"
    );
    let msg = load_with(&p, Format::Generic).unwrap_err().to_string();
    assert!(msg.contains("missing field `chosen_safe`"), "{msg}");
}

#[test]
fn undetectable_rows_are_an_error() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "x.jsonl",
        "{\"question\": \"hi\", \"answer\": \"yo\"}\n",
    );
    let msg = load_pairs(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cannot detect")
            && msg.contains("answer, question")
            && msg.contains("--format"),
        "{msg}"
    );
}

const BAD_PKU: &str = r#"{"prompt": "ok 1", "response_0": "a", "response_1": "b", "is_response_0_safe": true, "is_response_1_safe": false, "better_response_id": 0}
{"prompt": "bad id", "response_0": "a", "response_1": "b", "is_response_0_safe": true, "is_response_1_safe": true, "better_response_id": 2}
{"prompt": "truncated", "response_0": "a"
{"prompt": "missing label", "response_0": "a", "response_1": "b", "is_response_1_safe": true, "better_response_id": 0}
{"prompt": "ok 2", "response_0": "x", "response_1": "y", "is_response_0_safe": false, "is_response_1_safe": false, "better_response_id": 1}
{"prompt": "same", "response_0": "a", "response_1": "a", "is_response_0_safe": true, "is_response_1_safe": true, "better_response_id": 0}
{"prompt": "", "response_0": "a", "response_1": "b", "is_response_0_safe": true, "is_response_1_safe": true, "better_response_id": 0}
{"prompt": "bad label", "response_0": "a", "response_1": "b", "is_response_0_safe": "maybe", "is_response_1_safe": true, "better_response_id": 0}
{"prompt": "bad id 2", "response_0": "a", "response_1": "b", "is_response_0_safe": true, "is_response_1_safe": true, "better_response_id": -1}
[1, 2]
"#;

#[test]
fn bad_rows_are_counted_per_reason_with_examples() {
    let d = tempfile::tempdir().unwrap();
    for p in [
        write(d.path(), "bad.jsonl", BAD_PKU),
        write_xz(d.path(), "bad.jsonl.xz", BAD_PKU),
    ] {
        let lp = load(&p);
        let r = &lp.report;
        assert_eq!(r.rows_read, 10);
        assert_eq!(lp.pairs.len(), 2);
        assert_eq!(r.skipped(), 8);
        assert_eq!(
            r.pairs_loaded + r.skipped(),
            r.rows_read,
            "nothing dropped silently"
        );
        let count = |k: &str| r.skipped_by_reason.get(k).copied().unwrap_or(0);
        assert_eq!(count("`better_response_id`: not 0 or 1"), 2, "{r}");
        assert_eq!(count("invalid JSON"), 1, "{r}");
        assert_eq!(count("missing field `is_response_0_safe`"), 1, "{r}");
        assert_eq!(count("identical chosen and rejected responses"), 1, "{r}");
        assert_eq!(count("`prompt`: empty text"), 1, "{r}");
        assert_eq!(
            count("`is_response_0_safe`: not a boolean safety flag"),
            1,
            "{r}"
        );
        assert_eq!(count("row is not a JSON object"), 1, "{r}");
        // The first five examples, in file order, with file:line.
        assert_eq!(r.examples.len(), 5);
        let lines: Vec<usize> = r.examples.iter().map(|e| e.origin.line).collect();
        assert_eq!(lines, [2, 3, 4, 6, 7]);
        assert!(
            r.examples[0].detail.contains("got 2"),
            "{:?}",
            r.examples[0]
        );
        assert_eq!(&*r.examples[0].origin.file, p.display().to_string());
        assert_eq!(lp.pairs[1].origin.line, 5);
    }
}

#[test]
fn strict_stops_at_first_bad_row_naming_file_line_field() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "bad.jsonl", BAD_PKU);
    let strict = LoadOptions {
        strict: true,
        ..LoadOptions::default()
    };
    let e = load_pairs(&p, &strict).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "{}:2: field `better_response_id`: not 0 or 1",
            p.display()
        )) && msg.contains("got 2")
            && msg.contains("--strict"),
        "{msg}"
    );
    // A JSON error names the line too.
    let p = write(
        d.path(),
        "bad2.jsonl",
        &BAD_PKU.lines().skip(2).collect::<Vec<_>>().join("\n"),
    );
    let msg = load_pairs(&p, &strict).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("{}:1: field `(row)`: invalid JSON", p.display())),
        "{msg}"
    );
    // In a JSON array, the line of the element.
    let arr = "[\n {\"prompt\": \"p\", \"modeloutput1\": \"a\", \"modeloutput2\": \"b\", \"better_modelout\": 1, \"is_modelout1_safe\": true, \"is_modelout2_safe\": true},\n\n {\"prompt\": \"p\", \"modeloutput1\": \"a\", \"modeloutput2\": \"b\", \"better_modelout\": 3, \"is_modelout1_safe\": true, \"is_modelout2_safe\": true}\n]";
    let p = write(d.path(), "bad.json", arr);
    let msg = load_pairs(&p, &strict).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!(
            "{}:4: field `better_modelout`: not 1 or 2",
            p.display()
        )),
        "{msg}"
    );
}

#[test]
fn wrong_magic_empty_truncated_and_all_bad() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "train.parquet",
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\n",
    );
    let msg = load_pairs(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`.parquet`") && msg.contains("Git LFS"),
        "{msg}"
    );
    let p = write(d.path(), "fake.jsonl.gz", PKU);
    let msg = load_pairs(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`.gz`") && msg.contains("gzip"), "{msg}");
    let p = write(d.path(), "empty.jsonl", "\n\n");
    let msg = load_pairs(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no rows"), "{msg}");
    let p = write(d.path(), "cut.json", &REDTEAM[..REDTEAM.len() - 4]);
    let msg = load_pairs(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("unterminated JSON array"), "{msg}");
    // A truncated xz stream: a read error naming the line, not a panic.
    let full = std::fs::read(write_xz(d.path(), "full.jsonl.xz", &PKU.repeat(50))).unwrap();
    let p = d.path().join("cut.jsonl.xz");
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    let msg = load_pairs(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("read error at line") && msg.contains("Xz"),
        "{msg}"
    );
    // Every row bad: an error, not an empty dataset.
    let p = write(d.path(), "allbad.jsonl", BAD_PKU.lines().nth(1).unwrap());
    let msg = load_pairs(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("all 1 rows were skipped") && msg.contains("better_response_id"),
        "{msg}"
    );
}

#[test]
fn limit_and_load_many() {
    let d = tempfile::tempdir().unwrap();
    let a = write(d.path(), "a.jsonl", PKU);
    let b = write_gz(d.path(), "b.jsonl.gz", PKU);
    let opts = LoadOptions {
        limit: Some(2),
        ..LoadOptions::default()
    };
    let lp = load_pairs(&a, &opts).unwrap();
    assert_eq!(lp.pairs.len(), 2);
    assert!(lp.report.truncated_by_limit);
    let (pairs, reports) = load_many(&[a.clone(), b.clone()], &LoadOptions::default()).unwrap();
    assert_eq!(pairs.len(), 6);
    assert_eq!(reports.len(), 2);
    assert_eq!(pairs[3].origin.file, Arc::from(b.display().to_string()));
    let (pairs, _) = load_many(
        &[a, b],
        &LoadOptions {
            limit: Some(4),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(pairs.len(), 4);
}

// ---------------------------------------------------------------------------------------
// Parquet, written with the parquet crate's low-level writer.

mod pq {
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::path::Path;
    use std::sync::Arc;

    pub enum Col {
        Str(Vec<&'static str>),
        Bool(Vec<bool>),
        I64(Vec<i64>),
        F64(Vec<f64>),
        /// A LIST<STRUCT<content, role>> column pair, one Vec of (role, content) per row:
        /// written as two leaf columns (content, then role) with repetition levels.
        Messages(Vec<Vec<(&'static str, &'static str)>>),
    }

    pub fn write(path: &Path, schema: &str, cols: &[Col]) {
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let props = Arc::new(WriterProperties::builder().build());
        let file = std::fs::File::create(path).unwrap();
        let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        for col in cols {
            match col {
                Col::Messages(rows) => {
                    for leaf in [1usize, 0] {
                        // content (index 1 of the tuple) first, as in the schema.
                        let mut vals = Vec::new();
                        let mut def = Vec::new();
                        let mut rep = Vec::new();
                        for row in rows {
                            for (k, m) in row.iter().enumerate() {
                                let s = if leaf == 1 { m.1 } else { m.0 };
                                vals.push(ByteArray::from(s));
                                def.push(1i16);
                                rep.push(if k == 0 { 0i16 } else { 1 });
                            }
                        }
                        let mut c = rg.next_column().unwrap().unwrap();
                        c.typed::<ByteArrayType>()
                            .write_batch(&vals, Some(&def), Some(&rep))
                            .unwrap();
                        c.close().unwrap();
                    }
                }
                other => {
                    let mut c = rg.next_column().unwrap().unwrap();
                    match other {
                        Col::Str(v) => {
                            let vals: Vec<ByteArray> =
                                v.iter().map(|s| ByteArray::from(*s)).collect();
                            c.typed::<ByteArrayType>()
                                .write_batch(&vals, None, None)
                                .unwrap();
                        }
                        Col::Bool(v) => {
                            c.typed::<BoolType>().write_batch(v, None, None).unwrap();
                        }
                        Col::I64(v) => {
                            c.typed::<Int64Type>().write_batch(v, None, None).unwrap();
                        }
                        Col::F64(v) => {
                            c.typed::<DoubleType>().write_batch(v, None, None).unwrap();
                        }
                        Col::Messages(_) => unreachable!(),
                    }
                    c.close().unwrap();
                }
            }
        }
        rg.close().unwrap();
        w.close().unwrap();
    }
}

#[test]
fn parquet_pku_and_ultrafeedback() {
    use pq::Col;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("pku.parquet");
    pq::write(
        &p,
        "message pku {
            REQUIRED BYTE_ARRAY prompt (UTF8);
            REQUIRED BYTE_ARRAY response_0 (UTF8);
            REQUIRED BYTE_ARRAY response_1 (UTF8);
            REQUIRED BOOLEAN is_response_0_safe;
            REQUIRED BOOLEAN is_response_1_safe;
            REQUIRED INT64 better_response_id;
            REQUIRED INT64 safer_response_id;
        }",
        &[
            Col::Str(vec!["How do I steal a car?", "Hi", "Hello"]),
            Col::Str(vec!["I cannot help with that.", "Hello!", "Same"]),
            Col::Str(vec!["Sure, first you find a car.", "Go away.", "Same"]),
            Col::Bool(vec![true, true, true]),
            Col::Bool(vec![false, true, true]),
            Col::I64(vec![1, 0, 0]),
            Col::I64(vec![0, 0, 0]),
        ],
    );
    let lp = load(&p);
    assert_eq!(lp.report.container, Container::Parquet);
    assert_eq!(lp.report.format, Format::Pku);
    assert_eq!(lp.report.rows_read, 3);
    assert_eq!(lp.pairs.len(), 2);
    assert_eq!(
        text(&lp.pairs[0]),
        (
            "How do I steal a car?",
            "Sure, first you find a car.",
            "I cannot help with that.",
            false,
            true
        )
    );
    assert_eq!(text(&lp.pairs[1]), ("Hi", "Hello!", "Go away.", true, true));
    // The third row has identical responses; its origin is the 1-based row number.
    assert_eq!(lp.report.examples[0].origin.line, 3);
    // Forcing a wrong format on Parquet fails just as clearly.
    let msg = load_with(&p, Format::Redteam).unwrap_err().to_string();
    assert!(
        msg.contains("missing field `modeloutput1`") && msg.contains("`pku`"),
        "{msg}"
    );

    let p = d.path().join("uf.parquet");
    let list = |name: &str| {
        format!(
            "REQUIRED GROUP {name} (LIST) {{ REPEATED GROUP list {{ REQUIRED GROUP element {{
                REQUIRED BYTE_ARRAY content (UTF8); REQUIRED BYTE_ARRAY role (UTF8); }} }} }}"
        )
    };
    pq::write(
        &p,
        &format!(
            "message uf {{ REQUIRED BYTE_ARRAY prompt (UTF8); {} {} REQUIRED DOUBLE score_chosen; }}",
            list("chosen"),
            list("rejected")
        ),
        &[
            Col::Str(vec!["Write a haiku", "Say hi"]),
            Col::Messages(vec![
                vec![
                    ("user", "Write a haiku"),
                    ("assistant", "Soft rain on the roof"),
                ],
                vec![
                    ("system", "Be brief."),
                    ("user", "Say hi"),
                    ("assistant", "Hi!"),
                ],
            ]),
            Col::Messages(vec![
                vec![("user", "Write a haiku"), ("assistant", "No.")],
                vec![
                    ("system", "Be brief."),
                    ("user", "Say hi"),
                    ("assistant", "Greetings to you, friend."),
                ],
            ]),
            Col::F64(vec![8.0, 7.5]),
        ],
    );
    let lp = load_assume_safe(&p);
    assert_eq!(lp.report.format, Format::Ultrafeedback, "{}", lp.report);
    assert_eq!(lp.report.skipped(), 0, "{}", lp.report);
    assert_eq!(
        lp.pairs[0].prompt,
        Prompt::Messages(vec![ChatMessage::new("user", "Write a haiku")])
    );
    assert_eq!(
        text(&lp.pairs[0]),
        ("Write a haiku", "Soft rain on the roof", "No.", true, true)
    );
    assert_eq!(
        lp.pairs[1].prompt,
        Prompt::Messages(vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Say hi")
        ])
    );
    assert_eq!(lp.pairs[1].rejected, "Greetings to you, friend.");
}

#[test]
fn demo_files_load_with_zero_skipped() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    let strict = LoadOptions {
        strict: true,
        ..LoadOptions::default()
    };
    let train = load_pairs(&root.join("train.jsonl"), &strict).unwrap_or_else(|e| panic!("{e}"));
    let held = load_pairs(&root.join("heldout.jsonl"), &strict).unwrap_or_else(|e| panic!("{e}"));
    for lp in [&train, &held] {
        assert_eq!(lp.report.format, Format::Pku);
        assert_eq!(lp.report.skipped(), 0, "{}", lp.report);
        assert_eq!(lp.report.rows_read, lp.pairs.len());
    }
    assert!(train.pairs.len() >= 200, "{}", train.pairs.len());
    assert!(
        (40..=100).contains(&held.pairs.len()),
        "{}",
        held.pairs.len()
    );
    // Held-out prompts are not in train.
    let train_prompts: std::collections::HashSet<_> =
        train.pairs.iter().map(|p| p.prompt.clone()).collect();
    assert!(
        held.pairs
            .iter()
            .all(|p| !train_prompts.contains(&p.prompt))
    );
    // Harmful prompts: the more helpful response is the unsafe one at least half the time.
    for lp in [&train, &held] {
        let s = lp.report.safety;
        assert!(s.both_safe > 0 && s.only_rejected_safe > 0, "{s:?}");
        let harmful = s.only_rejected_safe + s.only_chosen_safe + s.both_unsafe;
        assert!(2 * s.only_rejected_safe >= harmful, "{s:?}");
    }
}
