//! Reading a file: container and compression detection (magic bytes), JSON Lines, JSON arrays
//! and Parquet, feeding rows to the formats and counting skipped rows.

use super::fields::type_name;
use super::parquet::read_parquet;
use super::*;
use crate::data::example::{Pair, RowOrigin};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Accumulates rows into pairs and the report.
pub(super) struct Sink<'a> {
    pub(super) opts: &'a LoadOptions,
    pub(super) path: &'a Path,
    pub(super) file: Arc<str>,
    pub(super) format: Option<Format>,
    pub(super) pairs: Vec<Pair>,
    pub(super) rows_read: usize,
    pub(super) skipped: BTreeMap<String, usize>,
    pub(super) examples: Vec<SkippedRow>,
    pub(super) first_reason: Option<String>,
    pub(super) done: bool,
}

impl Sink<'_> {
    pub(super) fn origin(&self, line: usize) -> RowOrigin {
        RowOrigin {
            file: self.file.clone(),
            line,
        }
    }

    fn bad(&mut self, origin: RowOrigin, b: BadRow) -> Result<(), LoadError> {
        if self.opts.strict {
            return Err(LoadError::BadRow {
                origin,
                field: if b.field.is_empty() {
                    "(row)".into()
                } else {
                    b.field
                },
                reason: b.reason,
                detail: b.detail,
            });
        }
        let key = b.key();
        *self.skipped.entry(key.clone()).or_default() += 1;
        if self.first_reason.is_none() {
            self.first_reason = Some(format!("{origin}: {key}"));
        }
        if self.examples.len() < self.opts.max_examples {
            self.examples.push(SkippedRow {
                origin,
                reason: key,
                detail: b.detail,
            });
        }
        Ok(())
    }

    /// One row as JSON text (JSONL line or array element).
    fn text_row(&mut self, line: usize, text: &str) -> Result<(), LoadError> {
        self.rows_read += 1;
        let origin = self.origin(line);
        match serde_json::from_str::<Value>(text) {
            Ok(v) => self.value_row(origin, v),
            Err(e) => self.bad(origin, BadRow::new("", "invalid JSON", e.to_string())),
        }
    }

    pub(super) fn value_row(&mut self, origin: RowOrigin, v: Value) -> Result<(), LoadError> {
        let format = match self.format {
            Some(f) => f,
            None => {
                // The first JSON object fixes the format.
                if !v.is_object() {
                    return self.bad(
                        origin,
                        BadRow::new("", "row is not a JSON object", type_name(&v)),
                    );
                }
                let f = if self.opts.format == Format::Auto {
                    detect_format(&v).ok_or_else(|| LoadError::CannotDetect {
                        origin: origin.clone(),
                        fields: v.as_object().map(field_list).unwrap_or_default(),
                    })?
                } else {
                    check_forced(&v, self.opts.format, &origin)?;
                    self.opts.format
                };
                self.format = Some(f);
                f
            }
        };
        match parse_row(&v, format, &origin, self.opts.assume_safe) {
            Ok(p) => {
                self.pairs.push(p);
                if self.opts.limit.is_some_and(|l| self.pairs.len() >= l) {
                    self.done = true;
                }
                Ok(())
            }
            Err(RowError::Bad(b)) => self.bad(origin, b),
            Err(RowError::Fatal(e)) => Err(e),
        }
    }
}

pub(super) fn head_string(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(24)]).into_owned()
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const PARQUET_MAGIC: &[u8] = b"PAR1";

/// Loads preference pairs from a file (see the module documentation).
pub fn load_pairs(path: &Path, opts: &LoadOptions) -> Result<LoadedPairs, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 8];
    let n = {
        let mut f = File::open(path).map_err(io)?;
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..]).map_err(io)? {
                0 => break,
                k => n += k,
            }
        }
        n
    };
    let head = &head[..n];
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let ext_claim = |ext: &str, magic: &[u8], what: &'static str| -> Result<(), LoadError> {
        if name.ends_with(ext) && !head.starts_with(magic) {
            Err(LoadError::WrongMagic {
                path: path.to_path_buf(),
                extension: ext.to_string(),
                expected: what,
                head: head_string(head),
            })
        } else {
            Ok(())
        }
    };
    ext_claim(".gz", GZIP_MAGIC, "gzip")?;
    ext_claim(".xz", XZ_MAGIC, "xz")?;
    ext_claim(".parquet", PARQUET_MAGIC, "Parquet (PAR1)")?;

    let mut sink = Sink {
        opts,
        path,
        file: Arc::from(path.display().to_string()),
        format: None,
        pairs: Vec::new(),
        rows_read: 0,
        skipped: BTreeMap::new(),
        examples: Vec::new(),
        first_reason: None,
        done: false,
    };
    let (container, compression) = if head.starts_with(PARQUET_MAGIC) {
        read_parquet(path, &mut sink)?;
        (Container::Parquet, Compression::None)
    } else {
        let file = File::open(path).map_err(io)?;
        let (reader, compression): (Box<dyn Read>, Compression) = if head.starts_with(GZIP_MAGIC) {
            (
                Box::new(flate2::read::MultiGzDecoder::new(file)),
                Compression::Gzip,
            )
        } else if head.starts_with(XZ_MAGIC) {
            (
                Box::new(xz2::read::XzDecoder::new_multi_decoder(file)),
                Compression::Xz,
            )
        } else {
            (Box::new(file), Compression::None)
        };
        let container = read_json(BufReader::new(reader), compression, &mut sink)?;
        (container, compression)
    };
    finish_load(sink, container, compression)
}

pub(super) fn finish_load(
    sink: Sink<'_>,
    container: Container,
    compression: Compression,
) -> Result<LoadedPairs, LoadError> {
    if sink.rows_read == 0 {
        return Err(LoadError::Empty {
            path: sink.path.to_path_buf(),
        });
    }
    if sink.pairs.is_empty() {
        return Err(LoadError::NoValidRows {
            path: sink.path.to_path_buf(),
            rows_read: sink.rows_read,
            first_reason: sink.first_reason.unwrap_or_default(),
        });
    }
    let report = LoadReport {
        path: sink.path.to_path_buf(),
        format: sink.format.unwrap_or(sink.opts.format),
        container,
        compression,
        rows_read: sink.rows_read,
        pairs_loaded: sink.pairs.len(),
        skipped_by_reason: sink.skipped,
        examples: sink.examples,
        truncated_by_limit: sink.done,
        safety: SafetyMix::of(&sink.pairs),
    };
    Ok(LoadedPairs {
        pairs: sink.pairs,
        report,
    })
}

pub(super) fn read_json(
    mut r: impl BufRead,
    compression: Compression,
    sink: &mut Sink<'_>,
) -> Result<Container, LoadError> {
    let path = sink.path.to_path_buf();
    let read_err = |line, source| LoadError::Read {
        path: path.clone(),
        line,
        compression,
        source,
    };
    // Peek at the first non-blank byte (after an optional UTF-8 BOM).
    let mut buf = Vec::new();
    let mut line = 0usize;
    let first = loop {
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .map_err(|e| read_err(line + 1, e))?;
        if n == 0 {
            return Ok(Container::JsonLines); // empty: reported by finish_load
        }
        line += 1;
        if line == 1 && buf.starts_with(&[0xef, 0xbb, 0xbf]) {
            buf.drain(..3);
        }
        if let Some(&b) = buf.iter().find(|b| !b.is_ascii_whitespace()) {
            break b;
        }
    };
    if first == b'[' {
        let mut all = std::mem::take(&mut buf);
        r.read_to_end(&mut all).map_err(|e| read_err(line, e))?;
        let text = String::from_utf8(all).map_err(|e| LoadError::Json {
            path: path.clone(),
            line: line + count_lines(&e.as_bytes()[..e.utf8_error().valid_up_to()]),
            message: "invalid UTF-8".into(),
        })?;
        read_json_array(&text, line, sink)?;
        return Ok(Container::JsonArray);
    }
    loop {
        let text = String::from_utf8_lossy(&buf);
        let t = text.trim();
        if !t.is_empty() {
            if std::str::from_utf8(&buf).is_err() {
                sink.rows_read += 1;
                let origin = sink.origin(line);
                sink.bad(origin, BadRow::new("", "invalid UTF-8", ""))?;
            } else {
                sink.text_row(line, t)?;
            }
            if sink.done {
                break;
            }
        }
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .map_err(|e| read_err(line + 1, e))?;
        if n == 0 {
            break;
        }
        line += 1;
    }
    Ok(Container::JsonLines)
}

pub(super) fn count_lines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count()
}

/// Splits a top-level JSON array into its elements' text (with the line each starts on) and
/// feeds them to the sink one by one, so one malformed element is one bad row.
pub(super) fn read_json_array(
    text: &str,
    first_line: usize,
    sink: &mut Sink<'_>,
) -> Result<(), LoadError> {
    let err = |line, message: &str| LoadError::Json {
        path: sink.path.to_path_buf(),
        line,
        message: message.to_string(),
    };
    let bytes = text.as_bytes();
    let mut line = first_line;
    let mut i = bytes
        .iter()
        .position(|&b| b == b'[')
        .expect("caller saw '['")
        + 1;
    let mut depth = 0usize;
    let mut in_str = false;
    let mut esc = false;
    let mut start: Option<(usize, usize)> = None; // (byte, line) of the current element
    let mut closed = false;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\n' {
            line += 1;
        }
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => {
                in_str = true;
                start.get_or_insert((i, line));
            }
            b'{' | b'[' => {
                depth += 1;
                start.get_or_insert((i, line));
            }
            b'}' | b']' if depth > 0 => depth -= 1,
            b',' | b']' if depth == 0 => {
                match start.take() {
                    Some((s, l)) => sink.text_row(l, text[s..i].trim())?,
                    None if b == b',' => {
                        sink.rows_read += 1;
                        let origin = sink.origin(line);
                        sink.bad(
                            origin,
                            BadRow::new("", "invalid JSON", "empty array element"),
                        )?;
                    }
                    None => {}
                }
                if sink.done {
                    return Ok(());
                }
                if b == b']' {
                    closed = true;
                    i += 1;
                    break;
                }
            }
            c if c.is_ascii_whitespace() => {}
            _ => {
                start.get_or_insert((i, line));
            }
        }
        i += 1;
    }
    if !closed {
        return Err(err(
            line,
            "unterminated JSON array (missing `]`); the file may be truncated",
        ));
    }
    if let Some(off) = bytes[i..].iter().position(|b| !b.is_ascii_whitespace()) {
        let l = line + count_lines(&bytes[i..i + off]);
        return Err(err(
            l,
            "unexpected content after the closing `]` of the JSON array",
        ));
    }
    Ok(())
}

/// Loads several files with the same options and concatenates their pairs (reports kept per
/// file).
pub fn load_many(
    paths: &[PathBuf],
    opts: &LoadOptions,
) -> Result<(Vec<Pair>, Vec<LoadReport>), LoadError> {
    let mut pairs = Vec::new();
    let mut reports = Vec::new();
    for p in paths {
        let mut o = opts.clone();
        if let Some(l) = opts.limit {
            o.limit = Some(l.saturating_sub(pairs.len()));
            if o.limit == Some(0) {
                break;
            }
        }
        let lp = load_pairs(p, &o)?;
        pairs.extend(lp.pairs);
        reports.push(lp.report);
    }
    Ok((pairs, reports))
}
