//! The background sample a version is explained against: `background.csv` in the version folder, a header of
//! feature names (the model's input order) then one row per line, raw values as the graph takes them, an empty
//! field a missing value (NaN).

use std::io::Read;
use std::path::Path;

/// The file's name in a version folder.
pub const BACKGROUND_FILE: &str = "background.csv";
/// The largest background file read; a larger one is refused before it is read.
pub const MAX_BACKGROUND_BYTES: u64 = 64 << 20;
/// The most rows a background may hold (every explanation averages over all of them).
pub const MAX_BACKGROUND_ROWS: usize = 1000;

/// A background sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Background {
    /// Feature names from the header.
    pub features: Vec<String>,
    /// Rows.
    pub rows: usize,
    /// Values, row-major.
    pub values: Vec<f64>,
}

/// Why a background file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Larger than [`MAX_BACKGROUND_BYTES`].
    #[error(
        "{path}: {size} bytes or more; a background sample may take at most {MAX_BACKGROUND_BYTES}"
    )]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Not a header and rows of numbers.
    #[error("{path}: {why}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong, with the line.
        why: String,
    },
}

/// Reads a background file.
pub fn read(path: &Path) -> Result<Background, BackgroundError> {
    let shown = path.display().to_string();
    let io = |source| BackgroundError::Io {
        path: shown.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_BACKGROUND_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_BACKGROUND_BYTES {
        return Err(BackgroundError::TooLarge {
            path: shown,
            size: bytes.len() as u64,
        });
    }
    parse(&bytes).map_err(|why| BackgroundError::Format { path: shown, why })
}

/// Parses a background file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Background, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or("empty: no header")?;
    let features: Vec<String> = header.split(',').map(|s| s.trim().to_string()).collect();
    let mut values = Vec::new();
    let mut rows = 0;
    for (i, line) in lines {
        if rows == MAX_BACKGROUND_ROWS {
            return Err(format!("more than {MAX_BACKGROUND_ROWS} rows"));
        }
        let before = values.len();
        for field in line.split(',') {
            let field = field.trim();
            values.push(if field.is_empty() {
                f64::NAN
            } else {
                field.parse::<f64>().map_err(|_| {
                    format!(
                        "line {}: `{}` is not a number",
                        i + 1,
                        field.chars().take(40).collect::<String>().escape_debug()
                    )
                })?
            });
            if values.len() - before > features.len() {
                break;
            }
        }
        if values.len() - before != features.len() {
            return Err(format!(
                "line {} has {} fields, the header {}",
                i + 1,
                values.len() - before,
                features.len()
            ));
        }
        rows += 1;
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

    #[test]
    fn reads_rows_and_refuses_what_is_not_a_table_of_numbers() {
        let b = parse(b"a,b\n1,2.5\n\n-3e2,\n").unwrap();
        assert_eq!(b.features, ["a", "b"]);
        assert_eq!(b.rows, 2);
        assert_eq!(&b.values[..3], &[1.0, 2.5, -300.0]);
        assert!(b.values[3].is_nan());
        assert_eq!(
            parse(b"a,b\n1,2,3\n").unwrap_err(),
            "line 2 has 3 fields, the header 2"
        );
        assert_eq!(
            parse(b"a,b\n1\n").unwrap_err(),
            "line 2 has 1 fields, the header 2"
        );
        assert_eq!(
            parse(b"a\n1\nx\n").unwrap_err(),
            "line 3: `x` is not a number"
        );
        assert_eq!(parse(b"").unwrap_err(), "empty: no header");
        let many = format!("a\n{}", "1\n".repeat(MAX_BACKGROUND_ROWS + 1));
        assert!(parse(many.as_bytes())
            .unwrap_err()
            .contains("more than 1000 rows"));
        // A row of a million fields stops at the first one too many.
        let wide = format!("a\n{}\n", "1,".repeat(1_000_000));
        assert!(parse(wide.as_bytes())
            .unwrap_err()
            .starts_with("line 2 has 2 fields"));
    }
}
