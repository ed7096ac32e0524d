//! Raw text in: tokenizing off the async runtime, queueing tokenized texts on a text model's scheduler, and what the
//! protocols do with the rows that come back (normalization, shortened embeddings, softmax, sigmoid).
//!
//! Every text protocol (TEI's routes, OpenAI's embeddings, KServe and TF Serving with a BYTES input) ends here, so a
//! text is tokenized, truncated, refused and batched the same way whichever door it came through.

use std::sync::Arc;
use std::time::Instant;

use ferry_text::{Side, TextError, TextModel, Tokens};

use crate::error::{ErrorKind, InferError};
use crate::infer::{Infer, Prediction};
use crate::repository::LoadedVersion;

/// One input of a text request: a text, or a pair (a cross-encoder's query and passage, or a classifier's two
/// sentences).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextInput {
    /// One text.
    Single(String),
    /// Two texts encoded together.
    Pair(String, String),
}

impl TextInput {
    fn bytes(&self) -> usize {
        match self {
            TextInput::Single(a) => a.len(),
            TextInput::Pair(a, b) => a.len() + b.len(),
        }
    }
}

/// Texts up to this many bytes in all are tokenized on the calling task: handing them to a thread would cost more
/// than tokenizing them.
const INLINE_BYTES: usize = 2048;

/// Memory kept per token once tokenized (a u32 id, a type id) and per text, charged against the request's
/// allowance.
const TOKEN_COST: usize = 5;
const TEXT_COST: usize = 64;

/// Tokenizing threads at once, beyond which requests wait: the async runtime's threads never tokenize long inputs,
/// and a flood of text cannot take every core from the engine.
fn tokenizer_permits() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| tokio::sync::Semaphore::new(crate::model_config::machine_cores().max(1)))
}

/// A text error as the client hears it.
pub fn text_error(e: TextError) -> InferError {
    match e {
        TextError::Settings(m) => InferError::new(ErrorKind::Internal, m),
        other => InferError::invalid(other.to_string()),
    }
}

/// `texts` with the prompt `name` names (or, naming none, the model's default prompt, if it has one) before each,
/// as sentence-transformers applies prompts.
pub fn prompted(
    text: &TextModel,
    name: Option<&str>,
    texts: Vec<String>,
) -> Result<Vec<String>, InferError> {
    let prompt = text.settings().prompt(name).map_err(text_error)?;
    Ok(if prompt.is_empty() {
        texts
    } else {
        texts.into_iter().map(|t| format!("{prompt}{t}")).collect()
    })
}

/// The text model a loaded version serves, or a 400 saying it takes tensors.
pub fn text_of(version: &LoadedVersion) -> Result<&Arc<TextModel>, InferError> {
    version.text.as_ref().ok_or_else(|| {
        InferError::invalid(format!(
            "model `{}` is not a text model (its version folder has no tokenizer.json)",
            version.model
        ))
    })
}

/// Tokenizes `inputs` with `version`'s tokenizer (with special tokens; cut on `truncate`'s side when asked, else refused past the
/// maximum length). Short requests are tokenized on the calling task, longer ones on the blocking pool, at most one
/// per core at once, and refused with DEADLINE_EXCEEDED when `deadline` passes before a thread is free. The tokens
/// kept may take at most `allowance` bytes.
pub async fn tokenize(
    version: &LoadedVersion,
    inputs: Vec<TextInput>,
    truncate: Option<Side>,
    allowance: usize,
    deadline: Instant,
) -> Result<Vec<Tokens>, InferError> {
    let started = Instant::now();
    let tokens = tokenize_with(text_of(version)?, inputs, truncate, allowance, deadline).await?;
    version
        .scheduler
        .series()
        .text_request(tokens.iter().map(Tokens::len).sum(), started.elapsed());
    Ok(tokens)
}

async fn tokenize_with(
    model: &Arc<TextModel>,
    inputs: Vec<TextInput>,
    truncate: Option<Side>,
    allowance: usize,
    deadline: Instant,
) -> Result<Vec<Tokens>, InferError> {
    let run = move |model: &TextModel, inputs: Vec<TextInput>| {
        let mut left = allowance;
        let mut out = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let tokens = match input {
                TextInput::Single(a) => model.encode(a, None, truncate),
                TextInput::Pair(a, b) => model.encode(a, Some(b), truncate),
            }
            .map_err(|e| text_error(e).with_prefix(&format!("input {i}: ")))?;
            let cost = tokens.len() * TOKEN_COST + TEXT_COST;
            left = left.checked_sub(cost).ok_or_else(|| {
                InferError::invalid(format!(
                    "the request's texts hold more tokens than a request of its size may ({allowance} bytes of \
                     tokens); split the request"
                ))
            })?;
            out.push(tokens);
        }
        Ok(out)
    };
    let bytes = inputs.iter().map(TextInput::bytes).sum::<usize>();
    let model = model.clone();
    off_runtime(bytes, deadline, move || run(&model, inputs)).await
}

/// Runs `work` (tokenizing `bytes` of text) on the calling task when it is small, else on the blocking pool, at most
/// one per core at once; DEADLINE_EXCEEDED when `deadline` passes before a thread is free.
async fn off_runtime<T: Send + 'static>(
    bytes: usize,
    deadline: Instant,
    work: impl FnOnce() -> Result<T, InferError> + Send + 'static,
) -> Result<T, InferError> {
    if bytes <= INLINE_BYTES {
        return work();
    }
    let _permit = tokio::time::timeout_at(deadline.into(), tokenizer_permits().acquire())
        .await
        .map_err(|_| {
            InferError::new(
                ErrorKind::DeadlineExceeded,
                "the request's deadline passed while it waited to be tokenized",
            )
        })?
        .map_err(|_| InferError::unavailable("server shutting down"))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| InferError::new(ErrorKind::Internal, "tokenizing failed"))?
}

/// One token as TEI's `/tokenize` answers it.
#[derive(serde::Serialize)]
struct Listed<'a> {
    id: u32,
    text: &'a str,
    special: bool,
    start: Option<usize>,
    stop: Option<usize>,
}

/// TEI's `/tokenize` answer for `texts`, as JSON bytes (a list of token lists), built off the async runtime as
/// [`tokenize`] is. The answer may take at most `allowance` bytes: a token costs about 60 bytes of JSON, so a body of
/// punctuation (a token a byte) would otherwise cost 60 times its size, and far more as a JSON tree.
pub async fn listing(
    model: &Arc<TextModel>,
    texts: Vec<String>,
    add_special_tokens: bool,
    allowance: usize,
    deadline: Instant,
) -> Result<Vec<u8>, InferError> {
    let bytes = texts.iter().map(String::len).sum();
    let model = model.clone();
    off_runtime(bytes, deadline, move || {
        let too_big = || {
            InferError::invalid(format!(
                "the request's texts hold more tokens than a request of its size may list ({allowance} bytes of \
                 answer); split the request"
            ))
        };
        let mut out = Vec::with_capacity(allowance.min(bytes.saturating_mul(8) + 64));
        out.push(b'[');
        for (i, text) in texts.iter().enumerate() {
            let tokens = model
                .tokenize(text, add_special_tokens, None)
                .map_err(|e| text_error(e).with_prefix(&format!("input {i}: ")))?;
            if i > 0 {
                out.push(b',');
            }
            out.push(b'[');
            for (k, t) in tokens.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                let listed = Listed {
                    id: t.id,
                    text: &t.text,
                    special: t.special,
                    start: t.span.map(|s| s.0),
                    stop: t.span.map(|s| s.1),
                };
                serde_json::to_writer(&mut out, &listed)
                    .map_err(|e| InferError::new(ErrorKind::Internal, e.to_string()))?;
                if out.len() > allowance {
                    return Err(too_big());
                }
            }
            out.push(b']');
        }
        out.push(b']');
        Ok(out)
    })
    .await
}

impl Infer {
    /// Queues tokenized texts on a text model's version and awaits one row per text (its pooled embedding or its
    /// scores), at most until the earlier of `--request-timeout` and `deadline`.
    pub async fn predict_texts(
        &self,
        version: &Arc<LoadedVersion>,
        texts: Vec<Tokens>,
        output: crate::batching::TextOutput,
        deadline: Option<Instant>,
    ) -> Result<Prediction, InferError> {
        if texts.len() > self.limits.max_rows {
            return Err(InferError::invalid(format!(
                "{} texts in one request; at most {} are allowed (--max-rows-per-request)",
                texts.len(),
                self.limits.max_rows
            )));
        }
        let start = Instant::now();
        let deadline = self.deadline(start, deadline);
        let receiver = version
            .scheduler
            .submit_texts(texts, output, Some(deadline))?;
        let answered = self
            .await_answer(version, receiver, start, deadline)
            .await?;
        Ok(Prediction {
            outputs: answered.outputs,
            timing: crate::infer::Timing {
                queue: answered.queue,
                compute: answered.compute,
                total: start.elapsed(),
            },
        })
    }
}

/// The name of a text model's input in its KServe and TF Serving signature: BYTES, one text per row (for a
/// re-ranker, `[rows, 2]`: query and passage).
pub const TEXT_INPUT: &str = "text";

/// The signature a text model shows KServe and TF Serving clients: `text` (BYTES) in; out, `embedding` (FP32
/// `[rows, width]`, normalized as the model's settings say) for an embedding model, `probabilities` (FP32, softmax)
/// and `label` (BYTES, the most likely label) for a classifier, `score` (FP32, sigmoid) for a re-ranker.
pub fn signature(
    settings: &ferry_text::Settings,
    graph: &ferry_model::Signature,
) -> ferry_model::Signature {
    use ferry_model::{DataType, TensorSpec};
    use ferry_text::Task;
    // The width of the graph's output, when it declares one.
    let width = graph
        .outputs
        .first()
        .and_then(|o| o.shape.as_ref())
        .and_then(|s| s.last().copied())
        .filter(|w| *w > 0)
        .unwrap_or(-1);
    let input = match settings.task {
        Task::Reranker => TensorSpec::tensor(TEXT_INPUT, DataType::Bytes, vec![-1, 2]),
        _ => TensorSpec::tensor(TEXT_INPUT, DataType::Bytes, vec![-1]),
    };
    let outputs = match settings.task {
        Task::Embedding => vec![TensorSpec::tensor(
            "embedding",
            DataType::F32,
            vec![-1, width],
        )],
        Task::Classifier => vec![
            TensorSpec::tensor(
                "probabilities",
                DataType::F32,
                vec![-1, settings.labels.len() as i64],
            ),
            TensorSpec::tensor("label", DataType::Bytes, vec![-1]),
        ],
        Task::Reranker => vec![TensorSpec::tensor("score", DataType::F32, vec![-1])],
    };
    ferry_model::Signature {
        inputs: vec![input],
        outputs,
    }
}

/// Whether tensors sent to a text model are raw text (one BYTES input named [`TEXT_INPUT`]) rather than its
/// tokenized tensors.
pub fn is_text_request(inputs: &[ferry_model::NamedTensor]) -> bool {
    matches!(inputs, [one] if one.name == TEXT_INPUT)
}

/// A KServe or TF Serving request of raw text to a text model: the texts are checked against the text signature,
/// tokenized (never truncated: a text over the maximum is refused), run, and answered with the outputs asked for
/// (all, in signature order, when `wanted` is `None`).
pub async fn predict_text_tensors(
    infer: &Infer,
    version: &Arc<LoadedVersion>,
    mut inputs: Vec<ferry_model::NamedTensor>,
    wanted: Option<Vec<String>>,
    deadline: Option<Instant>,
) -> Result<(Vec<ferry_model::NamedTensor>, crate::infer::Timing), InferError> {
    use ferry_model::{NamedTensor, Tensor, TensorData};
    use ferry_text::Task;
    let model = text_of(version)?.clone();
    let settings = model.settings();
    let sig = &version.signature;
    let input = inputs.pop().expect("is_text_request checked one input");
    let spec = &sig.inputs[0];
    if input.tensor.dtype() != ferry_model::DataType::Bytes
        || !spec.accepts_shape(&input.tensor.shape)
    {
        return Err(InferError::invalid(format!(
            "input `{TEXT_INPUT}`: expected datatype BYTES and shape {:?}, got {} {:?}",
            spec.display_shape(),
            input.tensor.dtype(),
            input.tensor.shape
        )));
    }
    if let Some(names) = &wanted {
        if let Some(bad) = names.iter().find(|n| sig.output(n).is_none()) {
            return Err(InferError::invalid(format!(
                "unknown output `{bad}`; the model gives {}",
                sig.outputs
                    .iter()
                    .map(|o| format!("`{}`", o.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let TensorData::Bytes(strings) = input.tensor.data else {
        unreachable!("the datatype was checked");
    };
    let request_bytes = strings.content_len();
    let mut texts = Vec::with_capacity(strings.len());
    for (i, s) in strings.iter().enumerate() {
        texts.push(String::from_utf8(s.to_vec()).map_err(|_| {
            InferError::invalid(format!(
                "input `{TEXT_INPUT}`: element {i} is not valid UTF-8"
            ))
        })?);
    }
    let texts = if settings.task == Task::Embedding {
        prompted(text_of(version)?, None, texts)?
    } else {
        texts
    };
    let inputs: Vec<TextInput> = if settings.task == Task::Reranker {
        let mut pairs = Vec::with_capacity(texts.len() / 2);
        let mut it = texts.into_iter();
        while let (Some(a), Some(b)) = (it.next(), it.next()) {
            pairs.push(TextInput::Pair(a, b));
        }
        pairs
    } else {
        texts.into_iter().map(TextInput::Single).collect()
    };
    if inputs.is_empty() {
        return Err(InferError::invalid(format!(
            "input `{TEXT_INPUT}` holds no text"
        )));
    }
    let allowance = crate::infer::Budget::for_request(request_bytes).total();
    let tokens = tokenize(
        version,
        inputs,
        None,
        allowance,
        infer.deadline(Instant::now(), deadline),
    )
    .await?;
    let prediction = infer
        .predict_texts(
            version,
            tokens,
            crate::batching::TextOutput::Pooled,
            deadline,
        )
        .await?;
    let (rows, width) = rows(&prediction.outputs)?;
    let n = rows.len() / width.max(1);
    let tensor = |shape: Vec<usize>, data| {
        Tensor::new(shape, data).map_err(|e| InferError::new(ErrorKind::Internal, e.to_string()))
    };
    let mut outputs = Vec::new();
    match settings.task {
        Task::Embedding => {
            let mut data = Vec::with_capacity(rows.len());
            for row in rows.chunks_exact(width.max(1)) {
                data.extend(embedding(row, None, settings.normalize));
            }
            outputs.push(NamedTensor::new(
                "embedding",
                tensor(vec![n, width], TensorData::F32(data))?,
            ));
        }
        Task::Classifier => {
            let mut probabilities = Vec::with_capacity(rows.len());
            let mut labels = Vec::with_capacity(n);
            for row in rows.chunks_exact(width.max(1)) {
                let p = softmax(row);
                let best = p
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i);
                labels.push(
                    settings
                        .labels
                        .get(best)
                        .cloned()
                        .unwrap_or_else(|| format!("LABEL_{best}"))
                        .into_bytes(),
                );
                probabilities.extend(p);
            }
            outputs.push(NamedTensor::new(
                "probabilities",
                tensor(vec![n, width], TensorData::F32(probabilities))?,
            ));
            outputs.push(NamedTensor::new(
                "label",
                tensor(vec![n], TensorData::Bytes(labels.into()))?,
            ));
        }
        Task::Reranker => {
            let scores = rows
                .chunks_exact(width.max(1))
                .map(|r| sigmoid(r[0]))
                .collect();
            outputs.push(NamedTensor::new(
                "score",
                tensor(vec![n], TensorData::F32(scores))?,
            ));
        }
    }
    if let Some(names) = wanted {
        outputs = names
            .iter()
            .filter_map(|name| outputs.iter().find(|o| &o.name == name).cloned())
            .collect();
    }
    Ok((outputs, prediction.timing))
}

/// The rows of a text answer: `[texts, width]` FP32 as a flat vector and its width.
pub fn rows(outputs: &[ferry_model::NamedTensor]) -> Result<(&[f32], usize), InferError> {
    let out = outputs
        .first()
        .ok_or_else(|| InferError::new(ErrorKind::Internal, "a text answer without rows"))?;
    match (&out.tensor.data, out.tensor.shape.as_slice()) {
        (ferry_model::TensorData::F32(v), [_, width]) => Ok((v, *width)),
        _ => Err(InferError::new(
            ErrorKind::Internal,
            "a text answer of the wrong form",
        )),
    }
}

/// An embedding as a client asked for it: its first `dimensions` values (Matryoshka-style shortening), then
/// L2-normalized when `normalize`.
pub fn embedding(row: &[f32], dimensions: Option<usize>, normalize: bool) -> Vec<f32> {
    let n = dimensions.map_or(row.len(), |d| d.min(row.len()));
    let mut v = row[..n].to_vec();
    if normalize {
        ferry_text::normalize(&mut v);
    }
    v
}

/// Softmax over a classifier's scores.
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = row.iter().map(|x| f64::from(x - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (e / sum) as f32).collect()
}

/// The logistic function, as TEI applies it to a cross-encoder's single score.
pub fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-f64::from(x)).exp())) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokenizing_waits_for_a_thread_only_until_the_deadline() {
        // Every tokenizing thread busy: a large request waits, and is refused when its deadline passes.
        let permits = tokenizer_permits();
        let held = permits
            .acquire_many(u32::try_from(crate::model_config::machine_cores().max(1)).unwrap())
            .await
            .unwrap();
        let started = Instant::now();
        let deadline = started + std::time::Duration::from_millis(100);
        let e = off_runtime(INLINE_BYTES + 1, deadline, || Ok(()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::DeadlineExceeded, "{e:?}");
        assert!(started.elapsed() >= std::time::Duration::from_millis(100));
        // Small requests never wait; once a thread is free, large ones run.
        off_runtime(INLINE_BYTES, deadline, || Ok(()))
            .await
            .unwrap();
        drop(held);
        let later = Instant::now() + std::time::Duration::from_secs(10);
        assert_eq!(
            off_runtime(INLINE_BYTES + 1, later, || Ok(7))
                .await
                .unwrap(),
            7
        );
    }

    #[test]
    fn scores_as_clients_expect() {
        let p = softmax(&[1.0, 1.0]);
        assert_eq!(p, [0.5, 0.5]);
        let p = softmax(&[1000.0, 0.0]);
        assert_eq!(p, [1.0, 0.0]);
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(embedding(&[3.0, 4.0, 12.0], Some(2), true), [0.6, 0.8]);
        assert_eq!(embedding(&[3.0, 4.0], Some(9), false), [3.0, 4.0]);
    }
}
