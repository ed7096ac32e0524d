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

/// The text model a loaded version serves, or a 400 saying it takes tensors.
pub fn text_of(version: &LoadedVersion) -> Result<&Arc<TextModel>, InferError> {
    version.text.as_ref().ok_or_else(|| {
        InferError::invalid(format!(
            "model `{}` is not a text model (its version folder has no tokenizer.json)",
            version.model
        ))
    })
}

/// Tokenizes `inputs` with `model` (with special tokens; cut on `truncate`'s side when asked, else refused past the
/// maximum length). Short requests are tokenized on the calling task, longer ones on the blocking pool, at most one
/// per core at once. The tokens kept may take at most `allowance` bytes.
pub async fn tokenize(
    model: &Arc<TextModel>,
    inputs: Vec<TextInput>,
    truncate: Option<Side>,
    allowance: usize,
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
    off_runtime(bytes, move || run(&model, inputs)).await
}

/// Runs `work` (tokenizing `bytes` of text) on the calling task when it is small, else on the blocking pool, at most
/// one per core at once.
async fn off_runtime<T: Send + 'static>(
    bytes: usize,
    work: impl FnOnce() -> Result<T, InferError> + Send + 'static,
) -> Result<T, InferError> {
    if bytes <= INLINE_BYTES {
        return work();
    }
    let _permit = tokenizer_permits()
        .acquire()
        .await
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
) -> Result<Vec<u8>, InferError> {
    let bytes = texts.iter().map(String::len).sum();
    let model = model.clone();
    off_runtime(bytes, move || {
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
        let receiver = version.scheduler.submit_texts(texts, Some(deadline))?;
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
