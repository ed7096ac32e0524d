//! The background sample a version is explained against: `background.csv` in the version folder, written by
//! `ferry train` and `ferry baseline`, read by the server when the version loads.
//!
//! The format: a header line of the feature names in the model's input order (those of `ferry.json`'s `features`),
//! then one line per row of raw feature values as the graph takes them (before any standardization; a missing value
//! is an empty field), at most [`MAX_BACKGROUND_ROWS`] rows. Numbers are written in Rust's shortest round-trip form,
//! so parsing them gives back the same `f64` (and so the same `f32`).

use std::io::Read;
use std::path::Path;

/// The file name inside a model version directory.
pub const BACKGROUND_FILE: &str = "background.csv";
/// The most rows a background file may hold.
pub const MAX_BACKGROUND_ROWS: usize = 1000;
/// The largest background file [`read`] reads (64 MiB); a larger one is refused before reading.
pub const MAX_BACKGROUND_BYTES: u64 = 64 << 20;

/// Background rows: feature names and raw values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Background {
    /// Feature names, in the model's input order.
    pub features: Vec<String>,
    /// Number of rows.
    pub rows: usize,
    /// `rows × features.len()` values, row-major; NaN is a missing value.
    pub values: Vec<f64>,
}

impl Background {
    /// Row `r`'s values.
    pub fn row(&self, r: usize) -> &[f64] {
        let f = self.features.len();
        &self.values[r * f..(r + 1) * f]
    }

    /// The text of `background.csv`: the header, then one line per row; NaN is an empty field, every other value
    /// its shortest round-trip decimal form.
    pub fn to_csv(&self) -> Vec<u8> {
        let mut w = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .from_writer(Vec::new());
        w.write_record(&self.features)
            .expect("writing to memory succeeds");
        let mut cells: Vec<String> = Vec::with_capacity(self.features.len());
        for r in 0..self.rows {
            cells.clear();
            cells.extend(self.row(r).iter().map(|v| {
                if v.is_nan() {
                    String::new()
                } else {
                    // Debug is the shortest round-trip form, with an exponent for very large and small values.
                    format!("{v:?}")
                }
            }));
            w.write_record(&cells).expect("writing to memory succeeds");
        }
        w.into_inner().expect("writing to memory succeeds")
    }
}

/// Why a background file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a background file (too large, malformed), with what is wrong.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong, with its line.
        message: String,
    },
}

/// Reads and checks a `background.csv`: refused when the file is over [`MAX_BACKGROUND_BYTES`] (before reading
/// it), has no header or an empty or repeated feature name, a row with a different number of fields than the
/// header, a field that is neither empty nor a finite number (the message names its line and column), no rows, or
/// more than [`MAX_BACKGROUND_ROWS`] rows.
pub fn read(path: &Path) -> Result<Background, BackgroundError> {
    let shown = path.display().to_string();
    let io = |source| BackgroundError::Io {
        path: shown.clone(),
        source,
    };
    let err = |message: String| BackgroundError::Format {
        path: shown.clone(),
        message,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_BACKGROUND_BYTES {
        return Err(err(format!(
            "{len} bytes: a background file may hold at most {MAX_BACKGROUND_BYTES} bytes ({} MiB)",
            MAX_BACKGROUND_BYTES >> 20
        )));
    }
    // The file may grow after the size check: read at most one byte past the limit.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(MAX_BACKGROUND_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_BACKGROUND_BYTES {
        return Err(err(format!(
            "more than {MAX_BACKGROUND_BYTES} bytes: a background file may hold at most {} MiB",
            MAX_BACKGROUND_BYTES >> 20
        )));
    }
    parse(&bytes).map_err(err)
}

/// Parses the text of a `background.csv` (see [`read`]); the error is the message without the path.
pub fn parse(bytes: &[u8]) -> Result<Background, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let features: Vec<String> = reader
        .headers()
        .map_err(|e| format!("cannot read the header line: {e}"))?
        .iter()
        .map(str::to_string)
        .collect();
    if features.is_empty() || features.iter().all(String::is_empty) {
        return Err("the file is empty: expected a header line of feature names".into());
    }
    for (i, name) in features.iter().enumerate() {
        if name.is_empty() {
            return Err(format!("line 1: column {} has no feature name", i + 1));
        }
        if let Some(first) = features[..i].iter().position(|n| n == name) {
            return Err(format!(
                "line 1: feature `{name}` appears twice (columns {} and {})",
                first + 1,
                i + 1
            ));
        }
    }
    let f = features.len();
    let mut values = Vec::new();
    let mut rows = 0usize;
    let mut record = csv::StringRecord::new();
    loop {
        let more = reader.read_record(&mut record).map_err(|e| {
            let line = e
                .position()
                .map_or(String::new(), |p| format!("line {}: ", p.line()));
            format!("{line}{e}")
        })?;
        if !more {
            break;
        }
        let line = record.position().map_or(rows as u64 + 2, |p| p.line());
        if rows == MAX_BACKGROUND_ROWS {
            return Err(format!(
                "line {line}: more than {MAX_BACKGROUND_ROWS} rows, the most a background file may hold"
            ));
        }
        if record.len() != f {
            return Err(format!(
                "line {line}: {} fields, but the header names {f} features",
                record.len()
            ));
        }
        for (cell, name) in record.iter().zip(&features) {
            if cell.is_empty() {
                values.push(f64::NAN);
                continue;
            }
            match cell.parse::<f64>() {
                Ok(v) if v.is_finite() => values.push(v),
                _ => {
                    return Err(format!(
                        "line {line}, feature `{name}`: `{cell}` is not a number (a missing value is an empty field)"
                    ))
                }
            }
        }
        rows += 1;
    }
    if rows == 0 {
        return Err("no rows after the header: a background needs at least one".into());
    }
    Ok(Background {
        features,
        rows,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferry-background-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn parse_err(text: &str) -> String {
        parse(text.as_bytes()).unwrap_err()
    }

    #[test]
    fn values_round_trip_exactly() {
        let mut values = vec![
            0.1,
            -0.0,
            1.0,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            -1e300,
            123_456_789.123_456_78,
            f64::from(0.1f32),
            f64::from(f32::MAX),
            f64::NAN,
            1e-7,
        ];
        // And pseudo-random bit patterns across the whole range.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        while values.len() < 12 * 40 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            values.push(if v.is_finite() { v } else { f64::NAN });
        }
        let background = Background {
            features: vec![
                "a".into(),
                "b, with a comma".into(),
                "c \"quoted\"".into(),
                "d".into(),
                "e".into(),
                "f".into(),
                "g".into(),
                "h".into(),
                "i".into(),
                "j".into(),
                "k".into(),
                "l".into(),
            ],
            rows: 40,
            values,
        };
        let dir = scratch("round-trip");
        let path = dir.join(BACKGROUND_FILE);
        std::fs::write(&path, background.to_csv()).unwrap();
        let read = read(&path).unwrap();
        assert_eq!(read.features, background.features);
        assert_eq!(read.rows, 40);
        assert_eq!(read.values.len(), background.values.len());
        for (a, b) in read.values.iter().zip(&background.values) {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{a:?} != {b:?}"
            );
            if !a.is_nan() {
                assert_eq!((*a as f32).to_bits(), (*b as f32).to_bits());
            }
        }
        // A single missing value in a one-feature file is still a row.
        let one = Background {
            features: vec!["x".into()],
            rows: 2,
            values: vec![f64::NAN, 2.5],
        };
        let read = parse(&one.to_csv()).unwrap();
        assert_eq!(read.rows, 2);
        assert!(read.values[0].is_nan());
        assert_eq!(read.values[1], 2.5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_format_is_a_header_then_plain_numbers() {
        let background = Background {
            features: vec!["x".into(), "y".into()],
            rows: 2,
            values: vec![1.0, f64::NAN, -2.5, 1e-9],
        };
        assert_eq!(
            String::from_utf8(background.to_csv()).unwrap(),
            "x,y\n1.0,\n-2.5,1e-9\n"
        );
    }

    #[test]
    fn malformed_files_are_refused_with_their_line() {
        assert!(parse_err("a,b\n1,2\n3\n").contains("line 3: 1 fields, but the header names 2"));
        assert!(parse_err("a,b\n1,2,3\n").contains("line 2: 3 fields"));
        let e = parse_err("a,b\n1,2\n3,x\n");
        assert!(
            e.contains("line 3, feature `b`: `x` is not a number"),
            "{e}"
        );
        assert!(parse_err("a,b\n1,NaN\n").contains("line 2, feature `b`: `NaN` is not a number"));
        assert!(parse_err("a,b\n1,inf\n").contains("`inf` is not a number"));
        assert!(parse_err("").contains("empty"));
        assert!(parse_err("a,b\n").contains("no rows"));
        assert!(parse_err("a,a\n1,2\n").contains("feature `a` appears twice"));
        assert!(parse_err("a,,c\n1,2,3\n").contains("column 2 has no feature name"));
        let mut text = String::from("x\n");
        for i in 0..MAX_BACKGROUND_ROWS {
            text.push_str(&format!("{i}\n"));
        }
        assert_eq!(parse(text.as_bytes()).unwrap().rows, MAX_BACKGROUND_ROWS);
        text.push_str("1\n");
        assert!(parse_err(&text).contains("line 1002: more than 1000 rows"));
    }

    #[test]
    fn files_over_the_size_limit_are_refused_before_reading() {
        let dir = scratch("size");
        let path = dir.join(BACKGROUND_FILE);
        let file = std::fs::File::create(&path).unwrap();
        // Sparse: no disk is used, and the limit is checked on the size alone.
        file.set_len(MAX_BACKGROUND_BYTES + 1).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("a background file may hold at most"), "{e}");
        assert!(read(&dir.join("absent.csv")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
