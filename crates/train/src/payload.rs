//! Training rows from payload logs: the inputs `ferry serve --payload-log` recorded (JSON lines with `model`, `id`
//! and `inputs` as `{name: {datatype, shape, data}}`), joined by request id with labels that arrived later (a CSV
//! file with an `id` column and a label column).
//!
//! A record's inputs become feature columns in one of two layouts, chosen from the first record of the model and
//! required of every other: a single `[rows, features]` input (the layout `ferry train` exports), or one input per
//! feature, each holding one value per row. With the live version's feature names, the columns take those names (and
//! one-input-per-feature logs are read by them); without, a matrix input `x` gives `x_0`, `x_1`, ... and separate
//! inputs keep their own names. A record of one row is labelled by its request id; a record of several rows by
//! `ID:ROW` (`req-7:0`, `req-7:1`, ...), so batched requests can be labelled row by row.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::TrainError;

/// The joined rows, as CSV text (features, then the target) that [`crate::data::CsvSource::Memory`] reads.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The CSV text.
    pub csv: Vec<u8>,
    /// Feature column names.
    pub features: Vec<String>,
    /// The target column's name (the labels file's label column).
    pub target: String,
    /// Records of the model read from the logs.
    pub records: usize,
    /// Rows that found a label.
    pub rows: usize,
    /// Rows without a label (or records without a request id), left out.
    pub unlabeled: usize,
}

/// How a model's inputs map onto feature columns.
#[derive(Debug, Clone, PartialEq)]
enum Layout {
    /// One `[rows, features]` input.
    Matrix { input: String, width: usize },
    /// One input per feature, one value per row each.
    Columns(Vec<String>),
}

/// Why a record's values cannot be read (the text completes "input `NAME`: ").
#[derive(Debug, thiserror::Error)]
enum ValueError {
    /// A number JSON holds but an `f64` cannot.
    #[error("a number out of range")]
    OutOfRange,
    /// Values the log replaced with `[redacted]`.
    #[error("its values are redacted in the log (--payload-log-redact)")]
    Redacted,
    /// A value that is neither a number nor a boolean.
    #[error("`{0}` is not a number")]
    NotANumber(Value),
}

/// Why a record's inputs do not give rows (the text follows "line N: " in a [`TrainError::Data`]).
#[derive(Debug, thiserror::Error)]
enum RecordError {
    /// The layout names an input the record does not have.
    #[error("no input `{0}`")]
    NoInput(String),
    /// An input without a `shape` array.
    #[error("input `{0}` has no shape")]
    NoShape(String),
    /// A `shape` that is not a list of sizes.
    #[error("input `{0}` has a bad shape")]
    BadShape(String),
    /// An input whose `data` holds something other than numbers.
    #[error("input `{input}`: {why}")]
    Values {
        /// The input.
        input: String,
        /// What it holds instead.
        why: ValueError,
    },
    /// An input whose number of values is not its shape's.
    #[error("input `{input}` has {values} values for shape {shape:?}")]
    Count {
        /// The input.
        input: String,
        /// How many values it holds.
        values: usize,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A first record that fits neither layout the live version's features allow.
    #[error(
        "its inputs ({}) give neither a [rows, {}] matrix nor the live version's features ({})",
        .inputs.join(", "),
        .features.len(),
        .features.join(", ")
    )]
    NoLayout {
        /// The record's inputs.
        inputs: Vec<String>,
        /// The live version's features.
        features: Vec<String>,
    },
    /// The matrix input of a later record with another shape.
    #[error("input `{input}` has shape {shape:?}, expected [rows, {width}]")]
    NotAMatrix {
        /// The input.
        input: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The width of the first record's matrix.
        width: usize,
    },
    /// A feature input that is not one value per row.
    #[error("input `{input}` has shape {shape:?}, expected one value per row")]
    NotAColumn {
        /// The input.
        input: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// Feature inputs with different numbers of rows.
    #[error("input `{input}` has {rows} rows, the others {others}")]
    RowCount {
        /// The input.
        input: String,
        /// Its rows.
        rows: usize,
        /// The rows of the inputs before it.
        others: usize,
    },
}

fn data_error(path: &Path, message: String) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        message,
    }
}

/// Reads a labels file: an `id` column and a label column (`label`, or the only other column).
fn read_labels(path: &Path) -> Result<(String, HashMap<String, String>), TrainError> {
    let err = |m: String| data_error(path, m);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| err(e.to_string()))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| err(format!("cannot read the header row: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let id_col = header.iter().position(|h| h == "id").ok_or_else(|| {
        err(format!(
            "no `id` column (the header is {})",
            header.join(",")
        ))
    })?;
    let others: Vec<usize> = (0..header.len()).filter(|&c| c != id_col).collect();
    let label_col = match header.iter().position(|h| h == "label") {
        Some(c) => c,
        None if others.len() == 1 => others[0],
        None => {
            return Err(err(format!(
                "expected the columns `id` and `label` (the header is {})",
                header.join(",")
            )))
        }
    };
    let mut labels = HashMap::new();
    let mut lines: HashMap<String, u64> = HashMap::new();
    for record in reader.records() {
        let record = record.map_err(|e| err(e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        let id = record.get(id_col).unwrap_or_default().to_string();
        let label = record.get(label_col).unwrap_or_default().to_string();
        if id.is_empty() || label.is_empty() {
            continue;
        }
        if let Some(first) = lines.insert(id.clone(), line) {
            return Err(err(format!(
                "line {line}: id `{id}` is labelled twice (first on line {first})"
            )));
        }
        labels.insert(id, label);
    }
    Ok((header[label_col].clone(), labels))
}

/// The numbers of a tensor's `data` (flat or nested).
fn numbers(value: &Value, out: &mut Vec<f64>) -> Result<(), ValueError> {
    match value {
        Value::Array(items) => items.iter().try_for_each(|v| numbers(v, out)),
        Value::Number(n) => {
            out.push(n.as_f64().ok_or(ValueError::OutOfRange)?);
            Ok(())
        }
        Value::Bool(b) => {
            out.push(f64::from(u8::from(*b)));
            Ok(())
        }
        Value::String(s) if s == "[redacted]" => Err(ValueError::Redacted),
        other => Err(ValueError::NotANumber(other.clone())),
    }
}

/// One input of a record: its shape and its values.
fn tensor(
    inputs: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<(Vec<usize>, Vec<f64>), RecordError> {
    let t = inputs
        .get(name)
        .ok_or_else(|| RecordError::NoInput(name.to_string()))?;
    let shape: Vec<usize> = t
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| RecordError::NoShape(name.to_string()))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| RecordError::BadShape(name.to_string()))?;
    let mut values = Vec::new();
    numbers(t.get("data").unwrap_or(&Value::Null), &mut values).map_err(|why| {
        RecordError::Values {
            input: name.to_string(),
            why,
        }
    })?;
    if values.len() != shape.iter().product::<usize>() {
        return Err(RecordError::Count {
            input: name.to_string(),
            values: values.len(),
            shape,
        });
    }
    Ok((shape, values))
}

fn is_column(shape: &[usize]) -> bool {
    matches!(shape, [_] | [_, 1])
}

/// Chooses the layout from a model's first record.
fn layout(
    inputs: &serde_json::Map<String, Value>,
    features: Option<&[String]>,
) -> Result<(Layout, Vec<String>), RecordError> {
    let names: Vec<&String> = inputs.keys().collect();
    let matrix = match names.as_slice() {
        [only] => tensor(inputs, only)
            .ok()
            .and_then(|(shape, _)| match shape.as_slice() {
                [_, width] => Some(((*only).clone(), *width)),
                _ => None,
            }),
        _ => None,
    };
    match features {
        Some(features) => {
            if let Some((input, width)) = matrix.filter(|(_, w)| *w == features.len()) {
                return Ok((Layout::Matrix { input, width }, features.to_vec()));
            }
            if features.iter().all(|f| inputs.contains_key(f)) {
                return Ok((Layout::Columns(features.to_vec()), features.to_vec()));
            }
            Err(RecordError::NoLayout {
                inputs: names.iter().map(|n| n.to_string()).collect(),
                features: features.to_vec(),
            })
        }
        None => match matrix {
            Some((input, width)) if width > 1 => {
                let columns = (0..width).map(|j| format!("{input}_{j}")).collect();
                Ok((Layout::Matrix { input, width }, columns))
            }
            _ => {
                let columns: Vec<String> = names.iter().map(|n| n.to_string()).collect();
                Ok((Layout::Columns(columns.clone()), columns))
            }
        },
    }
}

/// A record's rows under `layout`.
fn rows(
    inputs: &serde_json::Map<String, Value>,
    layout: &Layout,
) -> Result<Vec<Vec<f64>>, RecordError> {
    match layout {
        Layout::Matrix { input, width } => {
            let (shape, values) = tensor(inputs, input)?;
            if shape.len() != 2 || shape[1] != *width {
                return Err(RecordError::NotAMatrix {
                    input: input.clone(),
                    shape,
                    width: *width,
                });
            }
            Ok(values.chunks(*width).map(<[f64]>::to_vec).collect())
        }
        Layout::Columns(names) => {
            let mut n_rows = None;
            let mut columns = Vec::with_capacity(names.len());
            for name in names {
                let (shape, values) = tensor(inputs, name)?;
                if !is_column(&shape) {
                    return Err(RecordError::NotAColumn {
                        input: name.clone(),
                        shape,
                    });
                }
                if *n_rows.get_or_insert(shape[0]) != shape[0] {
                    return Err(RecordError::RowCount {
                        input: name.clone(),
                        rows: shape[0],
                        others: n_rows.unwrap_or(0),
                    });
                }
                columns.push(values);
            }
            let n = n_rows.unwrap_or(0);
            Ok((0..n)
                .map(|r| columns.iter().map(|c| c[r]).collect())
                .collect())
        }
    }
}

/// The models the payload logs hold records of, sorted.
pub fn models(logs: &[PathBuf]) -> Result<Vec<String>, TrainError> {
    let mut names = std::collections::BTreeSet::new();
    for log in logs {
        let file = std::fs::File::open(log).map_err(|e| TrainError::Io {
            path: log.clone(),
            source: e,
        })?;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| TrainError::Io {
                path: log.clone(),
                source: e,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let record: Value = serde_json::from_str(&line)
                .map_err(|e| data_error(log, format!("line {}: not a JSON record: {e}", i + 1)))?;
            if let Some(model) = record.get("model").and_then(Value::as_str) {
                names.insert(model.to_string());
            }
        }
    }
    Ok(names.into_iter().collect())
}

/// Joins the records of `model` in the payload logs with the labels file, by request id. `features` names the
/// columns (the live version's features) when known.
pub fn join(
    logs: &[PathBuf],
    labels: &Path,
    model: &str,
    features: Option<&[String]>,
) -> Result<Joined, TrainError> {
    let (target, labels_by_id) = read_labels(labels)?;
    let mut writer = csv::Writer::from_writer(Vec::new());
    let mut chosen: Option<(Layout, Vec<String>)> = None;
    let (mut records, mut joined, mut unlabeled) = (0, 0, 0);
    for log in logs {
        let file = std::fs::File::open(log).map_err(|e| TrainError::Io {
            path: log.clone(),
            source: e,
        })?;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line_no = i + 1;
            let line = line.map_err(|e| TrainError::Io {
                path: log.clone(),
                source: e,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let at = |m: String| data_error(log, format!("line {line_no}: {m}"));
            let record: Value =
                serde_json::from_str(&line).map_err(|e| at(format!("not a JSON record: {e}")))?;
            if record.get("model").and_then(Value::as_str) != Some(model) {
                continue;
            }
            records += 1;
            let inputs = record
                .get("inputs")
                .and_then(Value::as_object)
                .ok_or_else(|| at("no `inputs` object".into()))?;
            if chosen.is_none() {
                let (layout, columns) = layout(inputs, features).map_err(|e| at(e.to_string()))?;
                let mut header = columns.clone();
                header.push(target.clone());
                writer
                    .write_record(&header)
                    .map_err(|e| at(e.to_string()))?;
                chosen = Some((layout, columns));
            }
            let (layout, _) = chosen.as_ref().expect("chosen above");
            let record_rows = rows(inputs, layout).map_err(|e| at(e.to_string()))?;
            let Some(id) = record.get("id").and_then(Value::as_str) else {
                unlabeled += record_rows.len();
                continue;
            };
            let single = record_rows.len() == 1;
            for (r, values) in record_rows.iter().enumerate() {
                let keyed = format!("{id}:{r}");
                let label = if single {
                    labels_by_id.get(id).or_else(|| labels_by_id.get(&keyed))
                } else {
                    labels_by_id.get(&keyed)
                };
                let Some(label) = label else {
                    unlabeled += 1;
                    continue;
                };
                let mut cells: Vec<String> = values.iter().map(f64::to_string).collect();
                cells.push(label.clone());
                writer.write_record(&cells).map_err(|e| at(e.to_string()))?;
                joined += 1;
            }
        }
    }
    let Some((_, columns)) = chosen else {
        return Err(data_error(
            &logs[0],
            format!("no records of model `{model}` in the payload log"),
        ));
    };
    if joined == 0 {
        return Err(data_error(
            labels,
            format!("none of the {records} logged requests of `{model}` has a label here (ids must match the log's `id`)"),
        ));
    }
    let csv = writer
        .into_inner()
        .map_err(|e| data_error(labels, e.to_string()))?;
    Ok(Joined {
        csv,
        features: columns,
        target,
        records,
        rows: joined,
        unlabeled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferry-payload-join-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    const LOG: &str = concat!(
        r#"{"time":1,"model":"iris","version":1,"id":"a","latency_ms":1,"inputs":{"features":{"datatype":"FP32","shape":[1,2],"data":[1.5,2]}},"outputs":{}}"#,
        "\n",
        r#"{"time":2,"model":"other","version":1,"id":"a","latency_ms":1,"inputs":{"x":{"datatype":"FP32","shape":[1],"data":[9]}},"outputs":{}}"#,
        "\n\n",
        r#"{"time":3,"model":"iris","version":2,"id":"b","latency_ms":1,"inputs":{"features":{"datatype":"FP32","shape":[2,2],"data":[[3,4],[5,6]]}},"outputs":{}}"#,
        "\n",
        r#"{"time":4,"model":"iris","version":2,"id":null,"latency_ms":1,"inputs":{"features":{"datatype":"FP32","shape":[1,2],"data":[7,8]}},"outputs":{}}"#,
        "\n",
    );

    #[test]
    fn records_join_labels_by_id_and_row() {
        let dir = scratch(
            "join",
            &[
                ("log.jsonl", LOG),
                (
                    "labels.csv",
                    "id,species\na,setosa\nb:1,\"vir, ginica\"\nzzz,x\n",
                ),
            ],
        );
        let names = vec!["p".to_string(), "q".to_string()];
        let joined = join(
            &[dir.join("log.jsonl")],
            &dir.join("labels.csv"),
            "iris",
            Some(&names),
        )
        .unwrap();
        assert_eq!(joined.target, "species");
        assert_eq!((joined.records, joined.rows, joined.unlabeled), (3, 2, 2));
        assert_eq!(
            String::from_utf8(joined.csv).unwrap(),
            "p,q,species\n1.5,2,setosa\n5,6,\"vir, ginica\"\n"
        );
        // Without feature names, the matrix input names the columns.
        let joined = join(
            &[dir.join("log.jsonl")],
            &dir.join("labels.csv"),
            "iris",
            None,
        )
        .unwrap();
        assert_eq!(joined.features, ["features_0", "features_1"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_input_per_feature_and_the_errors_that_name_the_line() {
        let log = concat!(
            r#"{"model":"m","id":"r1","inputs":{"b":{"datatype":"FP32","shape":[1,1],"data":[2]},"a":{"datatype":"FP32","shape":[1],"data":[1]}}}"#,
            "\n",
            r#"{"model":"m","id":"r2","inputs":{"b":{"datatype":"FP32","shape":[1,1],"data":"[redacted]"},"a":{"datatype":"FP32","shape":[1],"data":[1]}}}"#,
            "\n",
        );
        let dir = scratch(
            "columns",
            &[("log.jsonl", log), ("labels.csv", "label,id\n0,r1\n1,r2\n")],
        );
        let names = vec!["a".to_string(), "b".to_string()];
        let e = join(
            &[dir.join("log.jsonl")],
            &dir.join("labels.csv"),
            "m",
            Some(&names),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 2") && e.contains("redacted"), "{e}");
        std::fs::write(dir.join("log.jsonl"), log.lines().next().unwrap()).unwrap();
        let joined = join(
            &[dir.join("log.jsonl")],
            &dir.join("labels.csv"),
            "m",
            Some(&names),
        )
        .unwrap();
        assert_eq!(String::from_utf8(joined.csv).unwrap(), "a,b,label\n1,2,0\n");
        let e = join(
            &[dir.join("log.jsonl")],
            &dir.join("labels.csv"),
            "nope",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no records of model `nope`"), "{e}");
        std::fs::write(dir.join("labels.csv"), "id,label\nr1,0\nr1,1\n").unwrap();
        let e = join(&[dir.join("log.jsonl")], &dir.join("labels.csv"), "m", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("labelled twice"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
