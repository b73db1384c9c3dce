//! Parquet rows (the `parquet` crate's record API), converted to JSON objects for the formats.

use super::LoadError;
use super::reader::Sink;
use serde_json::Value;
use std::fs::File;
use std::path::Path;

/// Converts a Parquet record field to JSON (strings as strings, lists as arrays, groups as
/// objects; binary that is valid UTF-8 as a string).
pub(super) fn field_to_json(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(n) => Value::from(*n),
        F::Short(n) => Value::from(*n),
        F::Int(n) => Value::from(*n),
        F::Long(n) => Value::from(*n),
        F::UByte(n) => Value::from(*n),
        F::UShort(n) => Value::from(*n),
        F::UInt(n) => Value::from(*n),
        F::ULong(n) => Value::from(*n),
        F::Float16(x) => Value::from(f64::from(*x)),
        F::Float(x) => Value::from(f64::from(*x)),
        F::Double(x) => Value::from(*x),
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::String(format!("<{} bytes of binary>", b.len())),
        },
        F::Group(row) => row_to_json(row),
        F::ListInternal(list) => Value::Array(list.elements().iter().map(field_to_json).collect()),
        F::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match field_to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
        other => Value::String(other.to_string()),
    }
}

pub(super) fn row_to_json(row: &parquet::record::Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(k, v)| (k.clone(), field_to_json(v)))
            .collect(),
    )
}

pub(super) fn read_parquet(path: &Path, sink: &mut Sink<'_>) -> Result<(), LoadError> {
    use parquet::file::reader::SerializedFileReader;
    let perr = |row, message: String| LoadError::Parquet {
        path: path.to_path_buf(),
        row,
        message,
    };
    let file = File::open(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| perr(None, e.to_string()))?;
    // The record API panics (`unimplemented!`) on a few exotic column types; turn that into an
    // error instead of taking the process down.
    let mut iter = reader.into_iter();
    let mut row_no = 0usize;
    loop {
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| iter.next()));
        let item = match next {
            Ok(None) => break,
            Ok(Some(item)) => item,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unsupported column type".into());
                return Err(perr(Some(row_no + 1), msg));
            }
        };
        row_no += 1;
        let row = item.map_err(|e| perr(Some(row_no), e.to_string()))?;
        sink.rows_read += 1;
        let origin = sink.origin(row_no);
        sink.value_row(origin, row_to_json(&row))?;
        if sink.done {
            break;
        }
    }
    Ok(())
}
