//! What a text model's folder says about how to use it: the files Hugging Face and sentence-transformers ship beside
//! the weights, read once at load time, with `config.toml`'s overrides on top.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::TextError;

/// How token vectors become one vector per text (sentence-transformers' pooling modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The mean of the tokens the attention mask keeps.
    Mean,
    /// The first token (`[CLS]`).
    Cls,
    /// The last token the attention mask keeps (decoder-style embedding models).
    LastToken,
    /// The element-wise maximum over the kept tokens.
    Max,
}

impl Pooling {
    /// The name used in `config.toml` and in TEI's `/info`.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::LastToken => "last_token",
            Pooling::Max => "max",
        }
    }
}

/// Which end of a text is cut when it is longer than the model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Side {
    /// Keep the beginning (Hugging Face's default).
    #[default]
    Right,
    /// Keep the end.
    Left,
}

impl Side {
    /// Parses `right`/`left` in any case, as TEI's `truncation_direction` and Hugging Face's `truncation_side`.
    pub fn parse(s: &str) -> Option<Side> {
        match s.to_ascii_lowercase().as_str() {
            "right" => Some(Side::Right),
            "left" => Some(Side::Left),
            _ => None,
        }
    }
}

/// What a text model is for, read from `config.json`'s `architectures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// One vector per text (a base model, pooled).
    Embedding,
    /// Scores per label for a text (`*ForSequenceClassification` with two or more labels).
    Classifier,
    /// One relevance score for a (query, text) pair (`*ForSequenceClassification` with one label: a cross-encoder).
    Reranker,
}

impl Task {
    /// A lower-case name for logs and metadata.
    pub fn name(self) -> &'static str {
        match self {
            Task::Embedding => "embedding",
            Task::Classifier => "classifier",
            Task::Reranker => "reranker",
        }
    }
}

/// `config.toml`'s `[text]` table: each key overrides what the folder's files say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// The most tokens of one text, special tokens included.
    pub max_length: Option<usize>,
    /// Which end to cut when a request asks for truncation without naming a side.
    pub truncation_side: Option<Side>,
    /// How token vectors are pooled (embedding models).
    pub pooling: Option<Pooling>,
    /// Whether embeddings are L2-normalized by default.
    pub normalize: Option<bool>,
    /// Named prompts prepended to texts (sentence-transformers' `prompts`), replacing the folder's.
    pub prompts: Option<BTreeMap<String, String>>,
    /// The prompt applied when a request names none (sentence-transformers' `default_prompt_name`).
    pub default_prompt_name: Option<String>,
}

/// Everything Ferry needs to know to serve a text model, settled at load time.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// What the model is for.
    pub task: Task,
    /// The most tokens of one text, special tokens included.
    pub max_length: usize,
    /// The side cut by default.
    pub truncation_side: Side,
    /// Pooling (embedding models).
    pub pooling: Pooling,
    /// Whether embeddings are normalized unless the request says otherwise.
    pub normalize: bool,
    /// Label names by class index (classifiers); `LABEL_i` when the folder names none.
    pub labels: Vec<String>,
    /// The token id used to pad a batch.
    pub pad_id: u32,
    /// `config.json`'s `model_type` (`bert`, `roberta`, ...), for `/info`.
    pub model_type: String,
    /// Named prompts, prepended to a text before it is tokenized (`config_sentence_transformers.json`'s `prompts`,
    /// as sentence-transformers applies them: `query: ` for a model trained with query and passage prefixes).
    pub prompts: BTreeMap<String, String>,
    /// The prompt applied when a request names none.
    pub default_prompt_name: Option<String>,
}

impl Settings {
    /// The text prepended for a request naming prompt `name`, or naming none (the default prompt, if any; else
    /// nothing). A name the model does not have is refused with the names it has.
    pub fn prompt(&self, name: Option<&str>) -> Result<&str, TextError> {
        let Some(name) = name.or(self.default_prompt_name.as_deref()) else {
            return Ok("");
        };
        self.prompts.get(name).map(String::as_str).ok_or_else(|| {
            TextError::Prompt(if self.prompts.is_empty() {
                format!("prompt `{name}` is not defined: the model has no prompts")
            } else {
                format!(
                    "prompt `{name}` is not defined; the model's prompts are {}",
                    self.prompts
                        .keys()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
    }
}

fn read_json(dir: &Path, name: &str) -> Result<Option<Value>, TextError> {
    let path = dir.join(name);
    match crate::read_limited(&path, crate::MAX_SETTINGS_BYTES) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| TextError::Settings(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TextError::Settings(format!("{}: {e}", path.display()))),
    }
}

fn usize_of(v: Option<&Value>) -> Option<usize> {
    v.and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
}

/// Hugging Face writes `model_max_length` as 1e30 when a tokenizer sets no limit.
const NO_LIMIT: usize = 1 << 20;

impl Settings {
    /// Reads the settings of the model in `dir`: `config.json` (task, labels, position table), `tokenizer_config.json`
    /// (`model_max_length`, `truncation_side`), sentence-transformers' `modules.json`, `sentence_bert_config.json`
    /// and pooling configuration, then applies `overrides`.
    pub fn read(dir: &Path, overrides: &Overrides) -> Result<Settings, TextError> {
        let config = read_json(dir, "config.json")?.unwrap_or(Value::Null);
        let tokenizer_config = read_json(dir, "tokenizer_config.json")?.unwrap_or(Value::Null);
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();

        let classifier = config
            .get("architectures")
            .and_then(Value::as_array)
            .is_some_and(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .any(|s| s.ends_with("ForSequenceClassification"))
            });
        let labels = if classifier {
            labels(&config)?
        } else {
            Vec::new()
        };
        let task = match (classifier, labels.len()) {
            (false, _) => Task::Embedding,
            (true, 1) => Task::Reranker,
            (true, _) => Task::Classifier,
        };

        // The longest input: the smallest of what the tokenizer, sentence-transformers and the position table allow.
        // RoBERTa-style models number positions from `pad_token_id + 1`, which costs that many rows of the table.
        let mut max_length = NO_LIMIT;
        // What the position table allows: an override may lower the maximum, never pass it.
        let mut positions_limit = NO_LIMIT;
        if let Some(n) = usize_of(tokenizer_config.get("model_max_length")) {
            max_length = max_length.min(n);
        }
        if let Some(positions) = usize_of(config.get("max_position_embeddings")) {
            let offset = if matches!(model_type.as_str(), "roberta" | "xlm-roberta" | "camembert") {
                usize_of(config.get("pad_token_id")).unwrap_or(1) + 1
            } else {
                0
            };
            positions_limit = positions.saturating_sub(offset);
            max_length = max_length.min(positions_limit);
        }
        let mut pooling = None;
        let mut normalize = false;
        if let Some(modules) = read_json(dir, "modules.json")? {
            let modules = modules.as_array().ok_or_else(|| {
                TextError::Settings("modules.json: expected a list of modules".into())
            })?;
            for m in modules {
                let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
                let path = m.get("path").and_then(Value::as_str).unwrap_or("");
                match kind.rsplit('.').next().unwrap_or("") {
                    "Transformer" => {}
                    "Pooling" => {
                        let sub = crate::inside(dir, path)?;
                        let cfg = read_json(&sub, "config.json")?.ok_or_else(|| {
                            TextError::Settings(format!("modules.json names {path}/config.json, which is missing"))
                        })?;
                        pooling = Some(pooling_of(&cfg)?);
                    }
                    "Normalize" => normalize = true,
                    other => {
                        return Err(TextError::Settings(format!(
                            "modules.json: the sentence-transformers module `{other}` is not supported (Transformer, Pooling and Normalize are)"
                        )))
                    }
                }
            }
        }
        if let Some(st) = read_json(dir, "sentence_bert_config.json")? {
            if let Some(n) = usize_of(st.get("max_seq_length")) {
                max_length = max_length.min(n);
            }
        }
        let mut prompts = BTreeMap::new();
        let mut default_prompt_name = None;
        if let Some(st) = read_json(dir, "config_sentence_transformers.json")? {
            if let Some(map) = st.get("prompts").and_then(Value::as_object) {
                for (k, v) in map {
                    let text = v.as_str().ok_or_else(|| {
                        TextError::Settings(format!(
                            "config_sentence_transformers.json: prompt `{k}` is not a string"
                        ))
                    })?;
                    prompts.insert(k.clone(), text.to_string());
                }
            }
            default_prompt_name = st
                .get("default_prompt_name")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        let truncation_side = tokenizer_config
            .get("truncation_side")
            .and_then(Value::as_str)
            .and_then(Side::parse)
            .unwrap_or_default();
        let pad_id = usize_of(config.get("pad_token_id"))
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);

        let mut settings = Settings {
            task,
            max_length,
            truncation_side,
            pooling: pooling.unwrap_or(Pooling::Cls),
            normalize,
            labels,
            pad_id,
            model_type,
            prompts,
            default_prompt_name,
        };
        if pooling.is_none() && task == Task::Embedding {
            // A bare encoder without sentence-transformers files: TEI's default is CLS pooling too.
            settings.pooling = Pooling::Cls;
        }
        if let Some(n) = overrides.max_length {
            if n > positions_limit {
                return Err(TextError::Settings(format!(
                    "config.toml: text.max_length = {n} is longer than the model's position table allows \
                     ({positions_limit} tokens, from config.json's max_position_embeddings)"
                )));
            }
            settings.max_length = n;
        }
        if let Some(s) = overrides.truncation_side {
            settings.truncation_side = s;
        }
        if let Some(p) = overrides.pooling {
            settings.pooling = p;
        }
        if let Some(n) = overrides.normalize {
            settings.normalize = n;
        }
        if let Some(p) = &overrides.prompts {
            settings.prompts = p.clone();
        }
        if let Some(name) = &overrides.default_prompt_name {
            settings.default_prompt_name = Some(name.clone());
        }
        if let Some(name) = &settings.default_prompt_name {
            if !settings.prompts.contains_key(name) {
                return Err(TextError::Settings(format!(
                    "the default prompt `{name}` is not among the model's prompts"
                )));
            }
        }
        if settings.max_length == 0 || settings.max_length >= NO_LIMIT {
            return Err(TextError::Settings(
                "no maximum input length: set `max_length` under [text] in config.toml".into(),
            ));
        }
        Ok(settings)
    }
}

fn pooling_of(cfg: &Value) -> Result<Pooling, TextError> {
    let on = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
    let modes = [
        ("pooling_mode_mean_tokens", Some(Pooling::Mean)),
        ("pooling_mode_cls_token", Some(Pooling::Cls)),
        ("pooling_mode_lasttoken", Some(Pooling::LastToken)),
        ("pooling_mode_max_tokens", Some(Pooling::Max)),
        ("pooling_mode_mean_sqrt_len_tokens", None),
        ("pooling_mode_weightedmean_tokens", None),
    ];
    let chosen: Vec<_> = modes.iter().filter(|(k, _)| on(k)).collect();
    match chosen.as_slice() {
        [(_, Some(p))] => Ok(*p),
        [(k, None)] => Err(TextError::Settings(format!(
            "1_Pooling: `{k}` is not supported (mean, cls, last token and max are)"
        ))),
        [] => Err(TextError::Settings(
            "1_Pooling: no pooling mode is set".into(),
        )),
        _ => Err(TextError::Settings(
            "1_Pooling: several pooling modes at once (concatenated vectors) are not supported"
                .into(),
        )),
    }
}

/// Label names by index from `config.json`'s `id2label` (or `num_labels`), `LABEL_i` where a name is missing.
fn labels(config: &Value) -> Result<Vec<String>, TextError> {
    let mut named = BTreeMap::new();
    if let Some(map) = config.get("id2label").and_then(Value::as_object) {
        for (k, v) in map {
            let i: usize = k.parse().map_err(|_| {
                TextError::Settings(format!("config.json: id2label key `{k}` is not an index"))
            })?;
            if i >= 1 << 16 {
                return Err(TextError::Settings(format!(
                    "config.json: id2label index {i} is too large"
                )));
            }
            named.insert(i, v.as_str().unwrap_or_default().to_string());
        }
    }
    let n = usize_of(config.get("num_labels"))
        .unwrap_or(0)
        .max(named.keys().next_back().map_or(0, |k| k + 1));
    let n = if n == 0 { 2 } else { n };
    if n > 1 << 16 {
        return Err(TextError::Settings(format!(
            "config.json: {n} labels is too many"
        )));
    }
    Ok((0..n)
        .map(|i| {
            named
                .get(&i)
                .filter(|s| !s.is_empty())
                .cloned()
                .unwrap_or_else(|| format!("LABEL_{i}"))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_files_are_refused_before_they_are_read() {
        // Sparse 64 GiB files: no disk taken, but reading one whole would take 64 GiB of memory.
        for name in ["config.json", "modules.json", "tokenizer.json"] {
            let d = folder(&[("config.json", r#"{"max_position_embeddings":512}"#)]);
            std::fs::File::create(d.path().join(name))
                .unwrap()
                .set_len(64 << 30)
                .unwrap();
            let e = crate::TextModel::load(d.path(), &Overrides::default()).unwrap_err();
            assert!(
                e.to_string().contains("68719476736 bytes or more"),
                "{name}: {e}"
            );
        }
    }

    fn folder(files: &[(&str, &str)]) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        for (name, text) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        d
    }

    mod tempdir {
        /// A temporary folder removed on drop (no dependency for one test helper).
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU64, Ordering};
                static N: AtomicU64 = AtomicU64::new(0);
                let p = std::env::temp_dir().join(format!(
                    "ferry-text-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn prompts_come_from_sentence_transformers_and_config_toml() {
        let d = folder(&[
            ("config.json", r#"{"max_position_embeddings":512}"#),
            (
                "config_sentence_transformers.json",
                r#"{"prompts":{"query":"query: ","passage":"passage: "},"default_prompt_name":null}"#,
            ),
        ]);
        let s = Settings::read(d.path(), &Overrides::default()).unwrap();
        assert_eq!(s.prompt(None).unwrap(), "");
        assert_eq!(s.prompt(Some("query")).unwrap(), "query: ");
        let e = s.prompt(Some("doc")).unwrap_err().to_string();
        assert_eq!(
            e,
            "prompt `doc` is not defined; the model's prompts are `passage`, `query`"
        );
        let o = Overrides {
            default_prompt_name: Some("passage".into()),
            ..Overrides::default()
        };
        assert_eq!(
            Settings::read(d.path(), &o).unwrap().prompt(None).unwrap(),
            "passage: "
        );
        let o = Overrides {
            prompts: Some([("q".to_string(), "Q: ".to_string())].into()),
            default_prompt_name: Some("query".into()),
            ..Overrides::default()
        };
        let e = Settings::read(d.path(), &o).unwrap_err().to_string();
        assert!(e.contains("default prompt `query` is not among"), "{e}");
        let bare = folder(&[("config.json", r#"{"max_position_embeddings":512}"#)]);
        let s = Settings::read(bare.path(), &Overrides::default()).unwrap();
        assert!(s
            .prompt(Some("query"))
            .unwrap_err()
            .to_string()
            .contains("no prompts"));
    }

    #[test]
    fn sentence_transformers_folder() {
        let d = folder(&[
            (
                "config.json",
                r#"{"model_type":"bert","architectures":["BertModel"],"max_position_embeddings":512}"#,
            ),
            ("tokenizer_config.json", r#"{"model_max_length":512}"#),
            ("sentence_bert_config.json", r#"{"max_seq_length":256}"#),
            (
                "modules.json",
                r#"[{"type":"sentence_transformers.models.Transformer","path":""},{"type":"sentence_transformers.models.Pooling","path":"1_Pooling"},{"type":"sentence_transformers.models.Normalize","path":"2_Normalize"}]"#,
            ),
            (
                "1_Pooling/config.json",
                r#"{"pooling_mode_mean_tokens":true,"pooling_mode_cls_token":false}"#,
            ),
        ]);
        let s = Settings::read(d.path(), &Overrides::default()).unwrap();
        assert_eq!(s.task, Task::Embedding);
        assert_eq!(s.max_length, 256);
        assert_eq!(s.pooling, Pooling::Mean);
        assert!(s.normalize);
        let o = Overrides {
            max_length: Some(64),
            pooling: Some(Pooling::Max),
            normalize: Some(false),
            truncation_side: Some(Side::Left),
            ..Overrides::default()
        };
        let s = Settings::read(d.path(), &o).unwrap();
        // Longer than the position table: refused at load, never a failure of the engine at run time.
        let long = Overrides {
            max_length: Some(513),
            ..Overrides::default()
        };
        let e = Settings::read(d.path(), &long).unwrap_err();
        assert!(
            e.to_string().contains("position table allows (512 tokens"),
            "{e}"
        );
        assert_eq!(
            Settings::read(
                d.path(),
                &Overrides {
                    max_length: Some(512),
                    ..Overrides::default()
                }
            )
            .unwrap()
            .max_length,
            512
        );
        assert_eq!(
            (s.max_length, s.pooling, s.normalize, s.truncation_side),
            (64, Pooling::Max, false, Side::Left)
        );
    }

    #[test]
    fn classifiers_and_rerankers() {
        let d = folder(&[(
            "config.json",
            r#"{"model_type":"roberta","pad_token_id":1,"max_position_embeddings":514,"architectures":["RobertaForSequenceClassification"],"id2label":{"0":"negative","2":"positive"}}"#,
        )]);
        let s = Settings::read(d.path(), &Overrides::default()).unwrap();
        assert_eq!(s.task, Task::Classifier);
        assert_eq!(s.labels, ["negative", "LABEL_1", "positive"]);
        assert_eq!(s.max_length, 512);
        let d = folder(&[(
            "config.json",
            r#"{"model_type":"bert","max_position_embeddings":512,"architectures":["BertForSequenceClassification"],"id2label":{"0":"LABEL_0"}}"#,
        )]);
        assert_eq!(
            Settings::read(d.path(), &Overrides::default())
                .unwrap()
                .task,
            Task::Reranker
        );
    }

    #[test]
    fn refusals_are_clear() {
        let d = folder(&[
            ("config.json", r#"{"max_position_embeddings":512}"#),
            (
                "modules.json",
                r#"[{"type":"sentence_transformers.models.Dense","path":"2_Dense"}]"#,
            ),
        ]);
        let e = Settings::read(d.path(), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("Dense"), "{e}");
        let d = folder(&[("config.json", r#"{}"#)]);
        let e = Settings::read(d.path(), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("max_length"), "{e}");
        let d = folder(&[
            ("config.json", r#"{"max_position_embeddings":512}"#),
            (
                "modules.json",
                r#"[{"type":"sentence_transformers.models.Pooling","path":"../x"}]"#,
            ),
        ]);
        let e = Settings::read(d.path(), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("leaves"), "{e}");
        let d = folder(&[("config.json", "{")]);
        assert!(Settings::read(d.path(), &Overrides::default()).is_err());
    }
}
