//! Loading a CSV file into a [`Dataset`]: numeric features stored once as a row-major `f64` matrix, a target
//! column, a sha256 of the bytes read, and seeded (stratified) train/validation splits.
//!
//! The file is streamed record by record through a hashing reader, so memory holds the parsed matrix (8 bytes a
//! value, about the size of the text) and never the text itself. Cells that are empty, `NA`, `N/A`, `null`, `?`
//! or a non-finite number are missing: an error naming the line and column unless [`Impute`] fills them.
//!
//! Class labels: a target whose values all parse as numbers keeps the numeric order of its distinct values
//! (digits 0..9 stay 0..9); any other target keeps its labels in order of first appearance in the file.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::TrainError;

/// How missing feature values are filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Impute {
    /// The column's mean over the rows that have a value.
    Mean,
    /// The column's median over the rows that have a value.
    Median,
}

/// What to read from a CSV file.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The target column; the last column when `None`.
    pub target: Option<String>,
    /// Columns to leave out.
    pub drop: Vec<String>,
    /// Keep exactly these feature columns, in this order (used to evaluate a trained model); all the others
    /// (but the target) are ignored. `None` keeps every column but the target and `drop`.
    pub features: Option<Vec<String>>,
    /// How to fill missing feature values; `None` makes them an error.
    pub impute: Option<Impute>,
}

/// The target column as read.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Every value parsed as a number. `labels` holds the distinct raw strings with their values while there are
    /// few enough of them to be classes ([`MAX_CLASSES`]).
    Numeric {
        /// The values, one per row.
        values: Vec<f64>,
        /// The distinct raw strings and their values, sorted by value; `None` past [`MAX_CLASSES`].
        labels: Option<Vec<(String, f64)>>,
    },
    /// At least one value is not a number: class labels in order of first appearance.
    Labels {
        /// The distinct labels.
        classes: Vec<String>,
        /// The class index of each row.
        index: Vec<usize>,
    },
}

/// The most distinct target values a classification target may have.
pub const MAX_CLASSES: usize = 1000;

/// A loaded CSV file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file it came from.
    pub path: PathBuf,
    /// Feature column names, in matrix column order.
    pub features: Vec<String>,
    /// The target column name.
    pub target_name: String,
    /// Features, one row per record.
    pub x: Array2<f64>,
    /// The target.
    pub target: Target,
    /// Hex sha256 of the file's bytes.
    pub sha256: String,
    /// The value each feature's missing cells were filled with, when imputation was asked for.
    pub imputed: Option<Vec<f64>>,
    /// Per feature, the rows (ascending) whose cell was missing and filled by imputation; all empty without it.
    pub missing: Vec<Vec<usize>>,
}

/// Classification labels resolved from a [`Target`].
#[derive(Debug, Clone, PartialEq)]
pub struct Classes {
    /// Class names.
    pub names: Vec<String>,
    /// The class index of each row.
    pub index: Vec<usize>,
}

impl Dataset {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.x.nrows()
    }

    /// The target as class labels, for classification.
    pub fn classes(&self) -> Result<Classes, TrainError> {
        match &self.target {
            Target::Labels { classes, index } => Ok(Classes {
                names: classes.clone(),
                index: index.clone(),
            }),
            Target::Numeric { values, labels } => {
                let labels = labels.as_ref().ok_or_else(|| {
                    self.data_error(format!(
                        "target column `{}` has more than {MAX_CLASSES} distinct values: it is not a class label (train a regressor?)",
                        self.target_name
                    ))
                })?;
                let index = values
                    .iter()
                    .map(|v| {
                        labels
                            .binary_search_by(|(_, l)| l.total_cmp(v))
                            .expect("every target value has a label while labels are kept")
                    })
                    .collect();
                Ok(Classes {
                    names: labels.iter().map(|(s, _)| s.clone()).collect(),
                    index,
                })
            }
        }
    }

    /// The value of feature `col` in row `row` as the file gave it: NaN where the cell was missing (and filled).
    pub fn raw_value(&self, row: usize, col: usize) -> f64 {
        if self.missing[col].binary_search(&row).is_ok() {
            f64::NAN
        } else {
            self.x[[row, col]]
        }
    }

    /// The rows `rows` of this dataset (same columns and class labels), for cross-validation.
    pub fn subset(&self, rows: &[usize]) -> Dataset {
        let target = match &self.target {
            Target::Numeric { values, labels } => Target::Numeric {
                values: rows.iter().map(|&i| values[i]).collect(),
                labels: labels.clone(),
            },
            Target::Labels { classes, index } => Target::Labels {
                classes: classes.clone(),
                index: rows.iter().map(|&i| index[i]).collect(),
            },
        };
        Dataset {
            path: self.path.clone(),
            features: self.features.clone(),
            target_name: self.target_name.clone(),
            x: self.x.select(ndarray::Axis(0), rows),
            target,
            sha256: self.sha256.clone(),
            imputed: self.imputed.clone(),
            missing: self
                .missing
                .iter()
                .map(|col| {
                    rows.iter()
                        .enumerate()
                        .filter(|(_, r)| col.binary_search(r).is_ok())
                        .map(|(i, _)| i)
                        .collect()
                })
                .collect(),
        }
    }

    /// The target as numbers, for regression.
    pub fn values(&self) -> Result<&[f64], TrainError> {
        match &self.target {
            Target::Numeric { values, .. } => Ok(values),
            Target::Labels { classes, .. } => Err(self.data_error(format!(
                "target column `{}` is not numeric (it holds labels such as `{}`): train a classifier",
                self.target_name, classes[0]
            ))),
        }
    }

    fn data_error(&self, message: String) -> TrainError {
        TrainError::Data {
            path: self.path.clone(),
            message,
        }
    }
}

/// A seeded split of row indices into training and validation rows.
///
/// With `strata` (the class of each row), every class gives the same fraction of its rows to validation
/// (rounded, at least one when the class has two rows or more), so both parts keep the class balance.
/// Both parts come out in ascending row order.
pub fn split(
    rows: usize,
    validation_fraction: f64,
    strata: Option<&[usize]>,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut groups: Vec<Vec<usize>> = match strata {
        Some(strata) => {
            let k = strata.iter().copied().max().map_or(0, |m| m + 1);
            let mut groups = vec![Vec::new(); k];
            for (i, &c) in strata.iter().enumerate() {
                groups[c].push(i);
            }
            groups
        }
        None => vec![(0..rows).collect()],
    };
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for group in &mut groups {
        group.shuffle(&mut rng);
        let mut cut = (group.len() as f64 * validation_fraction).round() as usize;
        if validation_fraction > 0.0 && cut == 0 && group.len() >= 2 {
            cut = 1;
        }
        let cut = cut.min(group.len().saturating_sub(1));
        valid.extend_from_slice(&group[..cut]);
        train.extend_from_slice(&group[cut..]);
    }
    train.sort_unstable();
    valid.sort_unstable();
    (train, valid)
}

/// Passes bytes through while hashing them.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn is_missing(cell: &str) -> bool {
    matches!(
        cell.trim(),
        "" | "NA" | "N/A" | "na" | "n/a" | "null" | "NULL" | "?" | "NaN" | "nan"
    )
}

/// Reads the next record into `record`: false at the end, or the error's message, led by its line when known.
pub(crate) fn read_record<R: Read>(
    reader: &mut csv::Reader<R>,
    record: &mut csv::StringRecord,
) -> Result<bool, String> {
    reader.read_record(record).map_err(|e| {
        let line = e
            .position()
            .map_or(String::new(), |p| format!("line {}: ", p.line()));
        format!("{line}{e}")
    })
}

/// Where CSV text comes from: a file, or text made in memory (payload logs joined with their labels).
#[derive(Debug, Clone)]
pub enum CsvSource {
    /// A file on disk.
    File(PathBuf),
    /// Text in memory, with the name error messages and `ferry.json` give it.
    Memory {
        /// What to call it.
        name: PathBuf,
        /// The CSV text.
        bytes: Vec<u8>,
    },
}

impl CsvSource {
    /// The name error messages and `ferry.json` use.
    pub fn name(&self) -> &Path {
        match self {
            CsvSource::File(path) => path,
            CsvSource::Memory { name, .. } => name,
        }
    }

    /// Reads it as [`load_csv`] reads a file.
    pub fn load(&self, options: &LoadOptions) -> Result<Dataset, TrainError> {
        match self {
            CsvSource::File(path) => load_csv(path, options),
            CsvSource::Memory { name, bytes } => {
                load_reader(name, bytes.as_slice(), bytes.len() as u64, options)
            }
        }
    }
}

/// Reads a CSV file with a header row. See the module docs for the rules.
pub fn load_csv(path: &Path, options: &LoadOptions) -> Result<Dataset, TrainError> {
    let file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    load_reader(
        path,
        std::io::BufReader::with_capacity(1 << 16, file),
        file_len,
        options,
    )
}

/// Reads CSV text of about `len` bytes from `input`; `path` names it in messages.
fn load_reader(
    path: &Path,
    input: impl Read,
    file_len: u64,
    options: &LoadOptions,
) -> Result<Dataset, TrainError> {
    let err = |message: String| TrainError::Data {
        path: path.to_path_buf(),
        message,
    };
    let mut hashing = HashingReader {
        inner: input,
        hasher: Sha256::new(),
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(&mut hashing);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| err(format!("cannot read the header row: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    if header.is_empty() || header.iter().all(String::is_empty) {
        return Err(err("the file is empty: expected a header row".into()));
    }
    let mut seen = HashMap::new();
    for (i, name) in header.iter().enumerate() {
        if let Some(first) = seen.insert(name.as_str(), i) {
            return Err(err(format!(
                "column `{name}` appears twice in the header (columns {} and {})",
                first + 1,
                i + 1
            )));
        }
    }
    let find = |name: &str, what: &str| {
        seen.get(name).copied().ok_or_else(|| {
            err(format!(
                "{what} column `{name}` is not in the header ({})",
                header.join(", ")
            ))
        })
    };
    let target_col = match &options.target {
        Some(t) => find(t, "target")?,
        None => header.len() - 1,
    };
    let feature_cols: Vec<usize> = match &options.features {
        Some(names) => names
            .iter()
            .map(|n| find(n, "feature"))
            .collect::<Result<_, _>>()?,
        None => {
            let dropped: Vec<usize> = options
                .drop
                .iter()
                .map(|d| find(d, "--drop"))
                .collect::<Result<_, _>>()?;
            (0..header.len())
                .filter(|c| *c != target_col && !dropped.contains(c))
                .collect()
        }
    };
    if feature_cols.is_empty() {
        return Err(err("no feature columns are left besides the target".into()));
    }
    if feature_cols.contains(&target_col) {
        return Err(err(format!(
            "column `{}` cannot be both the target and a feature",
            header[target_col]
        )));
    }
    let f = feature_cols.len();

    // After the first rows, reserve for the rows the rest of the file should hold (its size over the bytes per
    // row so far, plus 5 %), so that a big matrix is not reallocated and copied a dozen times while it grows.
    const SAMPLE_ROWS: usize = 256;
    let mut x: Vec<f64> = Vec::with_capacity(SAMPLE_ROWS * f);
    let mut missing: Vec<Vec<usize>> = vec![Vec::new(); f];
    let mut numeric: Option<Vec<f64>> = Some(Vec::with_capacity(SAMPLE_ROWS));
    let mut dict: Option<HashMap<String, usize>> = Some(HashMap::new());
    let mut dict_order: Vec<String> = Vec::new();
    let mut codes: Vec<usize> = Vec::with_capacity(SAMPLE_ROWS);
    let mut record = csv::StringRecord::new();
    let mut row = 0usize;
    loop {
        if row == SAMPLE_ROWS {
            let per_row = (reader.position().byte() as f64 / row as f64).max(1.0);
            let expected = (file_len as f64 / per_row * 1.05) as usize;
            let more = expected.saturating_sub(row);
            x.reserve(more * f);
            if let Some(values) = &mut numeric {
                values.reserve(more);
            }
            codes.reserve(more);
        }
        if !read_record(&mut reader, &mut record).map_err(err)? {
            break;
        }
        let line = record.position().map_or(row as u64 + 2, |p| p.line());
        for (j, &c) in feature_cols.iter().enumerate() {
            let cell = &record[c];
            if is_missing(cell) {
                if options.impute.is_none() {
                    return Err(err(format!(
                        "line {line}, column `{}`: missing value (use --impute mean|median to fill it, or --drop the column)",
                        header[c]
                    )));
                }
                missing[j].push(row);
                x.push(f64::NAN);
                continue;
            }
            match cell.parse::<f64>() {
                Ok(v) if v.is_finite() => x.push(v),
                _ => {
                    return Err(err(format!(
                        "line {line}, column `{}`: `{cell}` is not a number (features must be numeric; --drop the column to leave it out)",
                        header[c]
                    )))
                }
            }
        }
        let cell = &record[target_col];
        if is_missing(cell) {
            return Err(err(format!(
                "line {line}, column `{}`: missing target value",
                header[target_col]
            )));
        }
        if let Some(values) = &mut numeric {
            match cell.parse::<f64>() {
                Ok(v) if v.is_finite() => values.push(v),
                _ => numeric = None,
            }
        }
        if let Some(d) = &mut dict {
            let next = d.len();
            let code = *d.entry(cell.to_string()).or_insert_with(|| {
                dict_order.push(cell.to_string());
                next
            });
            codes.push(code);
            if d.len() > MAX_CLASSES {
                dict = None;
                codes = Vec::new();
            }
        }
        if numeric.is_none() && dict.is_none() {
            return Err(err(format!(
                "column `{}`: the target is neither numeric nor a class label with at most {MAX_CLASSES} distinct values",
                header[target_col]
            )));
        }
        row += 1;
    }
    drop(reader);
    if row < 2 {
        return Err(err(format!("{row} data rows: at least 2 are needed")));
    }
    let mut x = Array2::from_shape_vec((row, f), x).expect("one value per feature per row");
    let imputed = match options.impute {
        None => None,
        Some(how) => {
            let mut fills = Vec::with_capacity(f);
            for (j, rows_missing) in missing.iter().enumerate() {
                let mut col = x.column_mut(j);
                let present: Vec<f64> = col.iter().copied().filter(|v| !v.is_nan()).collect();
                if present.is_empty() {
                    return Err(err(format!(
                        "column `{}` has no values at all: --drop it",
                        header[feature_cols[j]]
                    )));
                }
                let fill = match how {
                    Impute::Mean => present.iter().sum::<f64>() / present.len() as f64,
                    Impute::Median => crate::stats::quantile_unsorted(present, 0.5),
                };
                for &r in rows_missing {
                    col[r] = fill;
                }
                fills.push(fill);
            }
            Some(fills)
        }
    };
    let target = match numeric {
        Some(values) => {
            let labels = dict.map(|_| {
                let mut labels: Vec<(String, f64)> = dict_order
                    .into_iter()
                    .map(|s| {
                        let v = s.parse::<f64>().expect("numeric target");
                        (s, v)
                    })
                    .collect();
                labels.sort_by(|a, b| a.1.total_cmp(&b.1));
                // "1" and "1.0" are one class: keep the first spelling.
                labels.dedup_by(|b, a| a.1 == b.1);
                labels
            });
            Target::Numeric { values, labels }
        }
        None => Target::Labels {
            classes: dict_order,
            index: codes,
        },
    };
    let sha256 = format!("{:x}", hashing.hasher.finalize());
    Ok(Dataset {
        path: path.to_path_buf(),
        features: feature_cols.iter().map(|&c| header[c].clone()).collect(),
        target_name: header[target_col].clone(),
        x,
        target,
        sha256,
        imputed,
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratified_split_keeps_class_shares_and_is_seeded() {
        let strata: Vec<usize> = (0..100).map(|i| usize::from(i % 4 == 0)).collect();
        let (train, valid) = split(100, 0.2, Some(&strata), 7);
        assert_eq!(train.len() + valid.len(), 100);
        assert_eq!(valid.iter().filter(|&&i| strata[i] == 1).count(), 5);
        assert_eq!(valid.iter().filter(|&&i| strata[i] == 0).count(), 15);
        assert_eq!(
            split(100, 0.2, Some(&strata), 7),
            (train.clone(), valid.clone())
        );
        assert_ne!(split(100, 0.2, Some(&strata), 8).1, valid);
    }

    #[test]
    fn zero_fraction_keeps_every_row_for_training() {
        let (train, valid) = split(10, 0.0, None, 1);
        assert_eq!(train, (0..10).collect::<Vec<_>>());
        assert!(valid.is_empty());
    }
}
