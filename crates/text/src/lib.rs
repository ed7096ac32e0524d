//! Text models: raw text in, token ids out, and token vectors back to one vector per text.
//!
//! # Brief overview
//! - [`TextModel`]: a Hugging Face `tokenizer.json` loaded with Hugging Face's own `tokenizers` crate (so ids match
//!   what the model was trained with) and the [`Settings`] read from the files beside it.
//! - [`Settings`]: task (embedding, classifier, reranker), maximum length, truncation side, [`Pooling`],
//!   normalization and labels, from `config.json`, `tokenizer_config.json` and sentence-transformers' files, with
//!   `config.toml`'s [`Overrides`] on top.
//! - [`Tokens`]: one text's ids, compact (4 bytes a token, plus 1 for pairs).
//! - [`pool`] and [`normalize`]: what sentence-transformers' `Pooling` and `Normalize` modules do.
//!
//! This crate knows nothing of engines, async runtimes or protocols.

mod pooling;
mod settings;

use std::path::{Component, Path, PathBuf};

pub use pooling::{normalize, pool};
pub use settings::{Overrides, Pooling, Settings, Side, Task};
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

/// Why a text model could not be loaded or a text not encoded.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A settings file is missing, malformed or asks for something unsupported.
    #[error("text model settings: {0}")]
    Settings(String),
    /// `tokenizer.json` could not be loaded, or the tokenizer failed on a text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An empty text.
    #[error("an input is empty")]
    Empty,
    /// A text longer than the model takes, and the request did not ask to truncate.
    #[error("an input has {given}{more} tokens, more than the model's maximum of {max}; send `truncate: true` to cut it")]
    TooLong {
        /// Tokens counted (of a prefix, when `more` says so).
        given: usize,
        /// `" or more"` when only a prefix of the text was tokenized.
        more: &'static str,
        /// The model's maximum.
        max: usize,
    },
    /// A text longer in bytes than the model reads (`max_length × BYTES_PER_TOKEN`), and the request did not ask
    /// to truncate: only a prefix could be tokenized, so its tokens would not be the text's.
    #[error("an input of {bytes} bytes is longer than this model reads ({max_bytes} bytes, {BYTES_PER_TOKEN} for each of its {max} tokens); send `truncate: true` to cut it")]
    TooManyBytes {
        /// The text's length.
        bytes: usize,
        /// The most bytes tokenized.
        max_bytes: usize,
        /// The model's maximum in tokens.
        max: usize,
    },
    /// A request named a prompt the model does not have.
    #[error("{0}")]
    Prompt(String),
    /// A token id outside the vocabulary (decoding).
    #[error("token id {0} is not in the vocabulary of {1} tokens")]
    UnknownId(u32, usize),
}

/// The name of the tokenizer file in a version folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The most input bytes tokenized per allowed token: a text is cut to `max_length × BYTES_PER_TOKEN` bytes before
/// tokenizing, so one huge text costs the tokenizer a bounded amount of work and memory. Real tokens are a few bytes;
/// even WordPiece's longest unknown word (100 characters) is one token.
pub const BYTES_PER_TOKEN: usize = 128;

/// The largest `tokenizer.json` read (the largest on the hub, Gemma's, is about 33 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 128 << 20;

/// The largest settings file read (`config.json`, `tokenizer_config.json`, sentence-transformers' files).
pub const MAX_SETTINGS_BYTES: u64 = 16 << 20;

/// Reads a file of at most `limit` bytes, refusing a larger one before reading it: a huge (or sparse) file dropped in
/// a version folder must not be copied into memory whole.
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let too_big = |len: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the file has {len} bytes or more, more than the {limit} bytes allowed"),
        )
    };
    if len > limit {
        return Err(too_big(len));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // A file that grows while it is read stops at the limit.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// One text's token ids, special tokens included (all of them attended to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// The ids.
    pub ids: Vec<u32>,
    /// Token type ids, or empty when they are all 0 (single texts).
    pub type_ids: Vec<u8>,
}

impl Tokens {
    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The type id of token `i`.
    pub fn type_id(&self, i: usize) -> u8 {
        self.type_ids.get(i).copied().unwrap_or(0)
    }
}

/// One token as TEI's `/tokenize` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// Its id.
    pub id: u32,
    /// Its text in the input, or the token's own string for special tokens.
    pub text: String,
    /// Whether it is a special token (`[CLS]`, `</s>`, ...).
    pub special: bool,
    /// Byte offsets of its text in the input (none for special tokens).
    pub span: Option<(usize, usize)>,
}

/// A loaded tokenizer with its settings.
#[derive(Debug)]
pub struct TextModel {
    plain: tokenizers::Tokenizer,
    right: tokenizers::Tokenizer,
    left: tokenizers::Tokenizer,
    settings: Settings,
}

/// Resolves `rel` inside `dir`, refusing paths that leave it.
pub(crate) fn inside(dir: &Path, rel: &str) -> Result<PathBuf, TextError> {
    let p = Path::new(rel);
    if p.components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(TextError::Settings(format!(
            "`{rel}` leaves the model's folder"
        )));
    }
    Ok(dir.join(p))
}

impl TextModel {
    /// Whether `dir` holds a text model (a `tokenizer.json`).
    pub fn present(dir: &Path) -> bool {
        dir.join(TOKENIZER_FILE).is_file()
    }

    /// Loads `dir/tokenizer.json` and the settings beside it. The file's own padding and truncation are replaced:
    /// Ferry pads per batch and truncates per request.
    pub fn load(dir: &Path, overrides: &Overrides) -> Result<TextModel, TextError> {
        let settings = Settings::read(dir, overrides)?;
        let path = dir.join(TOKENIZER_FILE);
        let bytes = read_limited(&path, MAX_TOKENIZER_BYTES)
            .map_err(|e| TextError::Tokenizer(format!("{}: {e}", path.display())))?;
        TextModel::from_bytes(&bytes, settings)
    }

    /// A model from `tokenizer.json`'s bytes and settings already read.
    pub fn from_bytes(bytes: &[u8], settings: Settings) -> Result<TextModel, TextError> {
        let mut plain = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TextError::Tokenizer(format!("tokenizer.json: {e}")))?;
        plain.with_padding(None);
        let tok_err = |e: tokenizers::Error| TextError::Tokenizer(e.to_string());
        plain.with_truncation(None).map_err(tok_err)?;
        let truncating = |direction| {
            let mut t = plain.clone();
            t.with_truncation(Some(TruncationParams {
                direction,
                max_length: settings.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tok_err)?;
            Ok::<_, TextError>(t)
        };
        Ok(TextModel {
            right: truncating(TruncationDirection::Right)?,
            left: truncating(TruncationDirection::Left)?,
            plain,
            settings,
        })
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The vocabulary's size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.plain.get_vocab_size(true)
    }

    /// Encodes one text (or a pair, for cross-encoders) with special tokens. With `truncate`, a text longer than the
    /// maximum is cut on that side; without, it is refused with [`TextError::TooLong`].
    pub fn encode(
        &self,
        text: &str,
        pair: Option<&str>,
        truncate: Option<Side>,
    ) -> Result<Tokens, TextError> {
        if text.is_empty() || pair.is_some_and(str::is_empty) {
            return Err(TextError::Empty);
        }
        let cap = self.settings.max_length.saturating_mul(BYTES_PER_TOKEN);
        let longest = text.len().max(pair.map_or(0, str::len));
        let side = truncate.unwrap_or(self.settings.truncation_side);
        let (text, cut_a) = cut(text, cap, side);
        let (pair, cut_b) = match pair {
            Some(p) => {
                let (p, c) = cut(p, cap, side);
                (Some(p), c)
            }
            None => (None, false),
        };
        let tokenizer = match truncate {
            None => &self.plain,
            Some(Side::Right) => &self.right,
            Some(Side::Left) => &self.left,
        };
        let encoding = match pair {
            None => tokenizer.encode_fast(text, true),
            Some(p) => tokenizer.encode_fast((text, p), true),
        }
        .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let n = encoding.get_ids().len();
        if n > self.settings.max_length {
            return Err(TextError::TooLong {
                given: n,
                more: if cut_a || cut_b { " or more" } else { "" },
                max: self.settings.max_length,
            });
        }
        // A text cut to its byte cap that still fits in tokens (a very long word is one unknown token): its tokens
        // are the prefix's, not the text's.
        if (cut_a || cut_b) && truncate.is_none() {
            return Err(TextError::TooManyBytes {
                bytes: longest,
                max_bytes: cap,
                max: self.settings.max_length,
            });
        }
        let types = encoding.get_type_ids();
        Ok(Tokens {
            ids: encoding.get_ids().to_vec(),
            type_ids: if types.iter().all(|t| *t == 0) {
                Vec::new()
            } else {
                types
                    .iter()
                    .map(|t| u8::try_from(*t).unwrap_or(u8::MAX))
                    .collect()
            },
        })
    }

    /// The tokens of a text as TEI's `/tokenize` lists them (no truncation unless asked).
    pub fn tokenize(
        &self,
        text: &str,
        add_special_tokens: bool,
        truncate: Option<Side>,
    ) -> Result<Vec<TokenInfo>, TextError> {
        let tokenizer = match truncate {
            None => &self.plain,
            Some(Side::Right) => &self.right,
            Some(Side::Left) => &self.left,
        };
        let cap = self.settings.max_length.saturating_mul(BYTES_PER_TOKEN);
        let (cut_text, was_cut) = cut(text, cap, truncate.unwrap_or(Side::Right));
        if was_cut && truncate.is_none() {
            return Err(TextError::TooManyBytes {
                bytes: text.len(),
                max_bytes: cap,
                max: self.settings.max_length,
            });
        }
        let encoding = tokenizer
            .encode(cut_text, add_special_tokens)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let offset = if was_cut && truncate == Some(Side::Left) {
            text.len() - cut_text.len()
        } else {
            0
        };
        let special = encoding.get_special_tokens_mask();
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_offsets())
            .zip(special)
            .map(|(((id, token), (start, stop)), special)| {
                let special = *special == 1;
                let span = (!special).then_some((start + offset, stop + offset));
                TokenInfo {
                    id: *id,
                    text: match span {
                        Some((a, b)) => text.get(a..b).unwrap_or(token).to_string(),
                        None => token.clone(),
                    },
                    special,
                    span,
                }
            })
            .collect())
    }

    /// The id that stands for a hidden token: the vocabulary's mask token (`[MASK]`, `<mask>`), else its unknown
    /// token (`[UNK]`, `<unk>`); what token attributions put in place of the tokens they leave out.
    pub fn mask_id(&self) -> Option<u32> {
        ["[MASK]", "<mask>", "[UNK]", "<unk>"]
            .iter()
            .find_map(|t| self.plain.token_to_id(t))
    }

    /// Turns ids back into text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        let n = self.vocab_size();
        if let Some(bad) = ids.iter().find(|i| **i as usize >= n) {
            return Err(TextError::UnknownId(*bad, n));
        }
        self.plain
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Tokenizer(e.to_string()))
    }
}

/// At most `cap` bytes of `text`, cut at a character boundary on the side truncation would drop; and whether it was
/// cut.
fn cut(text: &str, cap: usize, side: Side) -> (&str, bool) {
    if text.len() <= cap {
        return (text, false);
    }
    match side {
        Side::Right => {
            let mut end = cap;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            (&text[..end], true)
        }
        Side::Left => {
            let mut start = text.len() - cap;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            (&text[start..], true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny WordPiece tokenizer in `tokenizer.json` form, with BERT's template.
    const TOKENIZER: &str = r###"{
      "version": "1.0", "truncation": {"max_length": 3, "strategy": "LongestFirst", "stride": 0},
      "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
      "added_tokens": [
        {"id": 0, "special": true, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
        {"id": 1, "special": true, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
        {"id": 2, "special": true, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
        {"id": 3, "special": true, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false}],
      "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
      "pre_tokenizer": {"type": "BertPreTokenizer"},
      "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
      "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
      "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
        "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5, "ferry": 6, "##s": 7, "!": 8}}
    }"###;

    fn model(max_length: usize) -> TextModel {
        let settings = Settings {
            task: Task::Embedding,
            max_length,
            truncation_side: Side::Right,
            pooling: Pooling::Mean,
            normalize: true,
            labels: Vec::new(),
            pad_id: 0,
            model_type: "bert".into(),
            prompts: Default::default(),
            default_prompt_name: None,
        };
        TextModel::from_bytes(TOKENIZER.as_bytes(), settings).unwrap()
    }

    #[test]
    fn encodes_without_the_files_padding_or_truncation() {
        let m = model(16);
        let t = m.encode("Hello ferrys world!", None, None).unwrap();
        assert_eq!(t.ids, [2, 4, 6, 7, 5, 8, 3]);
        assert!(t.type_ids.is_empty());
        let p = m.encode("hello", Some("world"), None).unwrap();
        assert_eq!(p.ids, [2, 4, 3, 5, 3]);
        assert_eq!(p.type_ids, [0, 0, 0, 1, 1]);
        assert_eq!(m.decode(&t.ids, true).unwrap(), "hello ferrys world!");
        assert!(matches!(
            m.decode(&[99], true),
            Err(TextError::UnknownId(99, 9))
        ));
    }

    #[test]
    fn a_text_past_the_byte_cap_is_refused_unless_truncation_is_asked() {
        // One "word" longer than max_length x 128 bytes is a single unknown token: without the byte check its
        // tokens would silently be those of a prefix.
        let m = model(4);
        let long = "x".repeat(4 * BYTES_PER_TOKEN + 1);
        for e in [
            m.encode(&long, None, None).unwrap_err(),
            m.tokenize(&long, true, None).unwrap_err(),
        ] {
            assert!(
                matches!(
                    e,
                    TextError::TooManyBytes {
                        bytes: 513,
                        max_bytes: 512,
                        max: 4
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("truncate"), "{e}");
        }
        assert!(m.encode(&long, None, Some(Side::Right)).is_ok());
        assert!(m.tokenize(&long, true, Some(Side::Right)).is_ok());
        // Within the cap, as before.
        assert!(m
            .encode(&"x".repeat(4 * BYTES_PER_TOKEN), None, None)
            .is_ok());
    }

    #[test]
    fn truncates_only_when_asked() {
        let m = model(4);
        let e = m.encode("hello world ferry", None, None).unwrap_err();
        assert!(
            matches!(
                e,
                TextError::TooLong {
                    given: 5,
                    max: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            m.encode("hello world ferry", None, Some(Side::Right))
                .unwrap()
                .ids,
            [2, 4, 5, 3]
        );
        assert_eq!(
            m.encode("hello world ferry", None, Some(Side::Left))
                .unwrap()
                .ids,
            [2, 5, 6, 3]
        );
        assert!(matches!(m.encode("", None, None), Err(TextError::Empty)));
    }

    #[test]
    fn huge_texts_are_cut_before_tokenizing() {
        let m = model(4);
        let text = "hello ".repeat(10_000);
        let e = m.encode(&text, None, None).unwrap_err();
        assert!(e.to_string().contains("or more"), "{e}");
        assert_eq!(
            m.encode(&text, None, Some(Side::Right)).unwrap().ids,
            [2, 4, 4, 3]
        );
        // A cut never splits a character.
        assert_eq!(cut("ééé", 3, Side::Right), ("é", true));
        assert_eq!(cut("ééé", 3, Side::Left), ("é", true));
    }

    #[test]
    fn lists_tokens_with_their_spans() {
        let m = model(16);
        let t = m.tokenize("Hello ferrys", true, None).unwrap();
        let shown: Vec<_> = t
            .iter()
            .map(|t| (t.id, t.text.as_str(), t.special, t.span))
            .collect();
        assert_eq!(
            shown,
            [
                (2, "[CLS]", true, None),
                (4, "Hello", false, Some((0, 5))),
                (6, "ferry", false, Some((6, 11))),
                (7, "s", false, Some((11, 12))),
                (3, "[SEP]", true, None)
            ]
        );
    }
}
