//! The pairs file and its progress journal: appending whole prompts at a time, and resuming.
//!
//! The pairs file (`--out`) holds only rows that `tune` loads (generic rows with provenance).
//! Beside it, `<out>.progress.jsonl` records the run: a header line with the settings, then one
//! line per finished prompt (its key, its counts and the pairs file's length after its rows).
//!
//! A prompt's rows are written with one `write_all` and synced before its journal line is
//! appended. If a write fails (a full disk), the file is cut back to its length before the
//! write, so no half row is ever left. On resume the journal is read (an unfinished last line
//! is dropped), the pairs file is cut back to the length the last journal line recorded
//! (dropping rows of a prompt that was interrupted before its journal line), every remaining
//! line is checked to be a complete JSON row, and finished prompts are skipped.

use super::RedteamError;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The journal's first line: what must match for a run to continue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub tool: String,
    pub version: String,
    /// Settings that change the rows (compared on resume, field by field).
    pub settings: serde_json::Map<String, serde_json::Value>,
}

/// One finished prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Done {
    /// `harmful` or `benign`.
    pub set: String,
    /// Position in its set.
    pub index: usize,
    /// Hash of the prompt (hex), checked on resume.
    pub key: String,
    pub pairs: usize,
    pub duplicates: usize,
    pub empty: usize,
    pub templates: usize,
    /// Pairs per case: both_safe, only_chosen_safe, only_rejected_safe, both_unsafe.
    pub cases: [usize; 4],
    /// Answers judged safe / all judged answers.
    pub judged_safe: usize,
    pub judged: usize,
    /// Length of the pairs file after this prompt's rows.
    pub out_bytes: u64,
    pub seconds: f64,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Header { header: Header },
    Done { done: Done },
}

/// The open output: the pairs file and the journal, both positioned at their end.
pub struct Output {
    pub path: PathBuf,
    pub journal_path: PathBuf,
    out: File,
    journal: File,
    out_len: u64,
    journal_len: u64,
}

/// What was found when opening an existing run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resumed {
    pub done: Vec<Done>,
    /// Bytes cut from the end of the pairs file (rows of an interrupted prompt, a partial line).
    pub cut_out_bytes: u64,
    /// An unfinished journal line was dropped.
    pub cut_journal_line: bool,
}

/// The journal path for a pairs file: `<out>.progress.jsonl`.
pub fn journal_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".progress.jsonl");
    PathBuf::from(s)
}

fn io_err<'p>(path: &'p Path, what: &'static str) -> impl Fn(std::io::Error) -> RedteamError + 'p {
    move |error| RedteamError::Io {
        path: path.to_path_buf(),
        what,
        error,
    }
}

/// Appends `bytes` to `file` (currently `len` long) in one write and syncs; on failure cuts the
/// file back to `len` so nothing is half-written.
fn append_all(
    file: &mut File,
    path: &Path,
    len: &mut u64,
    bytes: &[u8],
) -> Result<(), RedteamError> {
    let r = file.write_all(bytes).and_then(|_| file.sync_data());
    if let Err(error) = r {
        let _ = file.set_len(*len);
        let _ = file.sync_data();
        let full =
            error.raw_os_error() == Some(28) || error.kind() == std::io::ErrorKind::StorageFull;
        return Err(if full {
            RedteamError::DiskFull {
                path: path.to_path_buf(),
                bytes: bytes.len(),
                at: *len,
            }
        } else {
            RedteamError::Io {
                path: path.to_path_buf(),
                what: "appending",
                error,
            }
        });
    }
    *len += bytes.len() as u64;
    Ok(())
}

impl Output {
    /// Opens `out` for a run with `header`. A new run needs `out` and its journal absent
    /// (or `overwrite`); an existing run must have been made with the same settings.
    pub fn open(
        out: &Path,
        header: &Header,
        overwrite: bool,
    ) -> Result<(Output, Resumed), RedteamError> {
        let jpath = journal_path(out);
        if overwrite {
            for p in [out, jpath.as_path()] {
                match std::fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(p, "removing")(e)),
                }
            }
        }
        let out_exists = out.exists();
        let j_exists = jpath.exists();
        if out_exists && !j_exists {
            return Err(RedteamError::NotOurs {
                path: out.to_path_buf(),
                journal: jpath,
            });
        }
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(dir, "creating the folder"))?;
        }
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(p)
                .map_err(io_err(p, "opening"))
        };
        let mut resumed = Resumed::default();
        if !j_exists {
            let mut journal = open(&jpath)?;
            let outf = open(out)?;
            let mut jlen = 0;
            let line = serde_json::to_string(&Line::Header {
                header: header.clone(),
            })
            .expect("header serializes")
                + "\n";
            append_all(&mut journal, &jpath, &mut jlen, line.as_bytes())?;
            return Ok((
                Output {
                    path: out.to_path_buf(),
                    journal_path: jpath,
                    out: outf,
                    journal,
                    out_len: 0,
                    journal_len: jlen,
                },
                resumed,
            ));
        }
        // Resume.
        let mut journal = open(&jpath)?;
        let mut text = String::new();
        journal
            .read_to_string(&mut text)
            .map_err(io_err(&jpath, "reading"))?;
        let mut good_len = 0usize;
        let mut lines = Vec::new();
        let mut pos = 0usize;
        let mut lineno = 0usize;
        while pos < text.len() {
            lineno += 1;
            let end = text[pos..].find('\n').map(|e| pos + e);
            let (line, next, complete) = match end {
                Some(e) => (&text[pos..e], e + 1, true),
                None => (&text[pos..], text.len(), false),
            };
            match serde_json::from_str::<Line>(line) {
                Ok(l) if complete => {
                    lines.push((lineno, l));
                    good_len = next;
                }
                _ if next == text.len() => {
                    // Unfinished last line (interrupted while writing): drop it.
                    resumed.cut_journal_line = true;
                }
                Err(e) => {
                    return Err(RedteamError::CorruptJournal {
                        path: jpath,
                        line: lineno,
                        detail: e.to_string(),
                    });
                }
                Ok(_) => unreachable!("an incomplete line is the last one"),
            }
            pos = next;
        }
        let mut it = lines.into_iter();
        match it.next() {
            Some((_, Line::Header { header: h })) => check_header(&jpath, &h, header)?,
            _ => {
                return Err(RedteamError::CorruptJournal {
                    path: jpath,
                    line: 1,
                    detail: "the first line is not the run's header".into(),
                });
            }
        }
        for (line, l) in it {
            match l {
                Line::Done { done } => resumed.done.push(done),
                Line::Header { .. } => {
                    return Err(RedteamError::CorruptJournal {
                        path: jpath,
                        line,
                        detail: "a second header".into(),
                    });
                }
            }
        }
        if resumed.cut_journal_line {
            journal
                .set_len(good_len as u64)
                .map_err(io_err(&jpath, "truncating"))?;
        }
        let want = resumed.done.last().map_or(0, |d| d.out_bytes);
        let mut outf = open(out)?;
        let have = outf.metadata().map_err(io_err(out, "reading"))?.len();
        if have < want {
            return Err(RedteamError::OutShorter {
                path: out.to_path_buf(),
                have,
                want,
            });
        }
        if have > want {
            outf.set_len(want).map_err(io_err(out, "truncating"))?;
            outf.sync_data().map_err(io_err(out, "syncing"))?;
            resumed.cut_out_bytes = have - want;
        }
        check_rows(out, &mut outf)?;
        Ok((
            Output {
                path: out.to_path_buf(),
                journal_path: jpath,
                out: outf,
                journal,
                out_len: want,
                journal_len: good_len as u64,
            },
            resumed,
        ))
    }

    /// Appends one prompt's rows (each a JSON object) and then its journal line.
    pub fn write_prompt(
        &mut self,
        rows: &[serde_json::Value],
        mut done: Done,
    ) -> Result<(), RedteamError> {
        let mut buf = String::new();
        for r in rows {
            buf.push_str(&serde_json::to_string(r).expect("rows serialize"));
            buf.push('\n');
        }
        append_all(&mut self.out, &self.path, &mut self.out_len, buf.as_bytes())?;
        done.out_bytes = self.out_len;
        let line = serde_json::to_string(&Line::Done { done }).expect("journal serializes") + "\n";
        append_all(
            &mut self.journal,
            &self.journal_path,
            &mut self.journal_len,
            line.as_bytes(),
        )
    }
}

fn check_header(path: &Path, had: &Header, now: &Header) -> Result<(), RedteamError> {
    for (k, v) in &now.settings {
        let old = had
            .settings
            .get(k)
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        if &old != v {
            return Err(RedteamError::SettingsChanged {
                path: path.to_path_buf(),
                field: k.clone(),
                was: old.to_string(),
                now: v.to_string(),
            });
        }
    }
    for k in had.settings.keys() {
        if !now.settings.contains_key(k) {
            return Err(RedteamError::SettingsChanged {
                path: path.to_path_buf(),
                field: k.clone(),
                was: had.settings[k].to_string(),
                now: "null".into(),
            });
        }
    }
    Ok(())
}

/// Every line of the (already cut) pairs file is a complete JSON object.
fn check_rows(path: &Path, f: &mut File) -> Result<(), RedteamError> {
    use std::io::{BufRead, BufReader, Seek, SeekFrom};
    f.seek(SeekFrom::Start(0))
        .map_err(io_err(path, "reading"))?;
    let mut r = BufReader::new(&mut *f);
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        let k = r.read_line(&mut line).map_err(io_err(path, "reading"))?;
        if k == 0 {
            break;
        }
        n += 1;
        let complete = line.ends_with('\n');
        let ok = complete
            && serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&line).is_ok();
        if !ok {
            return Err(RedteamError::CorruptOut {
                path: path.to_path_buf(),
                line: n,
                detail: if complete {
                    "not a JSON object".into()
                } else {
                    "no newline at the end of a row the journal counts as written".into()
                },
            });
        }
    }
    f.seek(SeekFrom::End(0)).map_err(io_err(path, "reading"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk is reported as such, with the file and the offset.
    #[cfg(target_os = "linux")]
    #[test]
    fn full_disk_is_a_clear_error() {
        let path = Path::new("/dev/full");
        let Ok(mut f) = OpenOptions::new().append(true).open(path) else {
            panic!("/dev/full is missing: this Linux test needs it");
        };
        let mut len = 0;
        let e = append_all(&mut f, path, &mut len, b"{\"row\": 1}\n").unwrap_err();
        assert!(
            matches!(
                e,
                RedteamError::DiskFull {
                    bytes: 11,
                    at: 0,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("disk is full"), "{e}");
        assert_eq!(len, 0, "nothing counted as written");
    }

    #[test]
    fn journal_path_is_beside_the_pairs_file() {
        assert_eq!(
            journal_path(Path::new("runs/p.jsonl")),
            PathBuf::from("runs/p.jsonl.progress.jsonl")
        );
    }
}
