//! `config.json` of the BERT family, as `transformers` writes it.

use std::collections::BTreeMap;

use super::HfError;

/// The architectures the importer builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `model_type` `bert` (BERT, MiniLM, most sentence-transformers models).
    Bert,
    /// `model_type` `roberta`.
    Roberta,
    /// `model_type` `xlm-roberta` (the same graph as RoBERTa).
    XlmRoberta,
}

impl Family {
    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
            Family::XlmRoberta => "xlm-roberta",
        }
    }

    /// Whether positions count from `pad_token_id + 1` and the head is RoBERTa's.
    pub fn is_roberta(self) -> bool {
        !matches!(self, Family::Bert)
    }

    /// The prefix the encoder's weights have in checkpoints with a head (`bert.`, `roberta.`).
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Family::Bert => "bert.",
            Family::Roberta | Family::XlmRoberta => "roberta.",
        }
    }
}

/// The feed-forward activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact GELU, `x * (1 + erf(x / sqrt 2)) / 2`.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
}

/// What the graph ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The encoder alone: `last_hidden_state`.
    Base,
    /// A sequence classifier: `logits`.
    SequenceClassification,
}

/// The settings of `config.json` the graph needs, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The family.
    pub family: Family,
    /// The head the architecture names.
    pub head: Head,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `hidden_act`.
    pub activation: Activation,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `type_vocab_size`.
    pub type_vocab_size: usize,
    /// `layer_norm_eps`.
    pub layer_norm_eps: f32,
    /// `pad_token_id` (RoBERTa's positions start after it).
    pub pad_token_id: i64,
    /// Class labels in index order (`id2label`; `LABEL_i` where the config names none); empty for a base model.
    pub labels: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Raw {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    hidden_act: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    pad_token_id: Option<i64>,
    position_embedding_type: Option<String>,
    id2label: Option<BTreeMap<String, String>>,
    num_labels: Option<usize>,
    #[serde(default)]
    is_decoder: bool,
    #[serde(default)]
    add_cross_attention: bool,
}

/// A bound on every size, far above any real model, so that products of sizes cannot overflow.
const MAX_DIM: usize = 1 << 24;

impl Config {
    /// Parses and checks `config.json`'s text.
    pub fn parse(text: &str) -> Result<Config, HfError> {
        let bad = |m: String| HfError::Config(m);
        let raw: Raw =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let family = match raw.model_type.as_deref() {
            Some("bert") => Family::Bert,
            Some("roberta") => Family::Roberta,
            Some("xlm-roberta") => Family::XlmRoberta,
            Some(other) => {
                return Err(HfError::Unsupported(format!(
                    "model_type `{other}`: Ferry imports bert, roberta and xlm-roberta models"
                )))
            }
            None => return Err(bad("no `model_type`".into())),
        };
        let mut head = Head::Base;
        for arch in &raw.architectures {
            let rest = arch.strip_prefix(match family {
                Family::Bert => "Bert",
                Family::Roberta => "Roberta",
                Family::XlmRoberta => "XLMRoberta",
            });
            match rest {
                Some("Model" | "ForMaskedLM" | "ForPreTraining") => {}
                Some("ForSequenceClassification") => head = Head::SequenceClassification,
                _ => {
                    return Err(HfError::Unsupported(format!(
                        "architecture `{arch}`: Ferry imports the encoder of {0}Model, {0}ForMaskedLM and \
                         {0}ForPreTraining checkpoints (output last_hidden_state) and {0}ForSequenceClassification \
                         (output logits)",
                        match family {
                            Family::Bert => "Bert",
                            Family::Roberta => "Roberta",
                            Family::XlmRoberta => "XLMRoberta",
                        }
                    )))
                }
            }
        }
        if raw.is_decoder || raw.add_cross_attention {
            return Err(HfError::Unsupported(
                "decoder configurations (is_decoder, add_cross_attention): Ferry imports encoders"
                    .into(),
            ));
        }
        if let Some(kind) = raw.position_embedding_type.as_deref() {
            if kind != "absolute" {
                return Err(HfError::Unsupported(format!(
                    "position_embedding_type `{kind}`: Ferry imports absolute position embeddings only"
                )));
            }
        }
        let activation = match &raw.hidden_act {
            None => Activation::Gelu,
            Some(serde_json::Value::String(s)) => match s.as_str() {
                "gelu" => Activation::Gelu,
                "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
                "relu" => Activation::Relu,
                other => {
                    return Err(HfError::Unsupported(format!(
                        "hidden_act `{other}`: Ferry imports gelu, gelu_new (gelu_pytorch_tanh, gelu_fast) and relu"
                    )))
                }
            },
            Some(other) => {
                return Err(HfError::Unsupported(format!(
                    "hidden_act {other}: Ferry imports gelu, gelu_new (gelu_pytorch_tanh, gelu_fast) and relu"
                )))
            }
        };
        let need = |v: Option<usize>, key: &str| -> Result<usize, HfError> {
            match v {
                None => Err(bad(format!("no `{key}`"))),
                Some(0) => Err(bad(format!("`{key}` is 0"))),
                Some(n) if n > MAX_DIM => Err(bad(format!("`{key}` = {n} is implausibly large"))),
                Some(n) => Ok(n),
            }
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        if hidden_size % num_heads != 0 {
            return Err(bad(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
            )));
        }
        let num_layers = raw
            .num_hidden_layers
            .ok_or_else(|| bad("no `num_hidden_layers`".into()))?;
        if num_layers > 1000 {
            return Err(bad(format!(
                "num_hidden_layers = {num_layers} is implausibly large"
            )));
        }
        let pad_token_id = raw
            .pad_token_id
            .unwrap_or(if family.is_roberta() { 1 } else { 0 });
        let max_position_embeddings = need(
            Some(raw.max_position_embeddings.unwrap_or(512)),
            "max_position_embeddings",
        )?;
        if family.is_roberta()
            && (pad_token_id < 0 || pad_token_id as usize + 1 >= max_position_embeddings)
        {
            return Err(bad(format!(
                "pad_token_id {pad_token_id} leaves no positions in max_position_embeddings {max_position_embeddings} \
                 (RoBERTa's positions start at pad_token_id + 1)"
            )));
        }
        let eps = raw.layer_norm_eps.unwrap_or(1e-12);
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(bad(format!(
                "layer_norm_eps {eps} is not a small positive number"
            )));
        }
        let labels = match head {
            Head::Base => Vec::new(),
            Head::SequenceClassification => labels(raw.id2label.as_ref(), raw.num_labels)?,
        };
        Ok(Config {
            family,
            head,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            activation,
            max_position_embeddings,
            type_vocab_size: need(Some(raw.type_vocab_size.unwrap_or(2)), "type_vocab_size")?,
            layer_norm_eps: eps as f32,
            pad_token_id,
            labels,
        })
    }

    /// The longest sequence the position table allows (RoBERTa's start after `pad_token_id + 1` positions).
    pub fn max_sequence_length(&self) -> usize {
        if self.family.is_roberta() {
            self.max_position_embeddings - self.pad_token_id as usize - 1
        } else {
            self.max_position_embeddings
        }
    }

    /// The bytes the graph's FP32 weights take (from the sizes, before any weight is read).
    pub fn weight_bytes(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let embeddings =
            (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) as u64 * h
                + 2 * h;
        let layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h;
        let head = match self.head {
            Head::Base => 0,
            Head::SequenceClassification => h * h + h + (h + 1) * self.labels.len() as u64,
        };
        4 * (embeddings + self.num_layers as u64 * layer + head)
    }
}

/// `id2label` in index order, checked against `num_labels`; `LABEL_i` names where the config has none (as
/// `transformers` does).
fn labels(
    id2label: Option<&BTreeMap<String, String>>,
    num_labels: Option<usize>,
) -> Result<Vec<String>, HfError> {
    let bad = |m: String| HfError::Config(m);
    let Some(map) = id2label.filter(|m| !m.is_empty()) else {
        let n = num_labels.unwrap_or(2);
        if n == 0 || n > MAX_DIM {
            return Err(bad(format!("num_labels = {n} is not a number of classes")));
        }
        return Ok((0..n).map(|i| format!("LABEL_{i}")).collect());
    };
    let mut labels = vec![None; map.len()];
    for (key, label) in map {
        let index = key
            .parse::<usize>()
            .ok()
            .filter(|i| *i < map.len())
            .ok_or_else(|| {
                bad(format!(
                    "id2label key `{key}` is not an index from 0 to {}",
                    map.len() - 1
                ))
            })?;
        labels[index] = Some(label.clone());
    }
    let labels: Vec<String> = labels
        .into_iter()
        .map(|l| l.expect("every index below len, each once"))
        .collect();
    if let Some(n) = num_labels {
        if n != labels.len() {
            return Err(bad(format!(
                "num_labels is {n} but id2label names {} labels",
                labels.len()
            )));
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINILM: &str = r#"{"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 384,
        "intermediate_size": 1536, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
        "num_attention_heads": 12, "num_hidden_layers": 6, "pad_token_id": 0, "position_embedding_type": "absolute",
        "type_vocab_size": 2, "vocab_size": 30522}"#;

    fn with(key: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(MINILM).unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    #[test]
    fn reads_minilm() {
        let c = Config::parse(MINILM).unwrap();
        assert_eq!(c.family, Family::Bert);
        assert_eq!(c.head, Head::Base);
        assert_eq!((c.hidden_size, c.num_layers, c.num_heads), (384, 6, 12));
        assert_eq!(c.max_sequence_length(), 512);
        assert!(c.labels.is_empty());
        // 22.7 M parameters less the pooler's 147,840, which a base graph does not use.
        assert_eq!(c.weight_bytes() / 4, 22_565_376);
    }

    #[test]
    fn reads_classifier_labels() {
        let text = with("architectures", r#"["BertForSequenceClassification"]"#);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut v = v;
        v["id2label"] = serde_json::json!({"1": "POSITIVE", "0": "NEGATIVE"});
        let c = Config::parse(&v.to_string()).unwrap();
        assert_eq!(c.head, Head::SequenceClassification);
        assert_eq!(c.labels, ["NEGATIVE", "POSITIVE"]);
        v["num_labels"] = serde_json::json!(3);
        assert!(Config::parse(&v.to_string())
            .unwrap_err()
            .to_string()
            .contains("num_labels is 3"));
        v["id2label"] = serde_json::json!({"0": "a", "2": "b"});
        assert!(Config::parse(&v.to_string())
            .unwrap_err()
            .to_string()
            .contains("id2label key `2`"));
        v["id2label"] = serde_json::json!({});
        v["num_labels"] = serde_json::json!(1);
        assert_eq!(Config::parse(&v.to_string()).unwrap().labels, ["LABEL_0"]);
    }

    #[test]
    fn roberta_positions_start_after_the_pad_token() {
        let text = with("model_type", r#""xlm-roberta""#).replace("BertModel", "XLMRobertaModel");
        let text = text.replace("\"pad_token_id\":0", "\"pad_token_id\":1");
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.family, Family::XlmRoberta);
        assert_eq!(c.pad_token_id, 1);
        assert_eq!(c.max_sequence_length(), 510);
    }

    #[test]
    fn refuses_what_it_cannot_build() {
        let cases = [
            (with("model_type", r#""gpt2""#), "model_type `gpt2`"),
            (with("hidden_act", r#""swish""#), "hidden_act `swish`"),
            (
                with("architectures", r#"["BertForQuestionAnswering"]"#),
                "architecture `BertForQuestionAnswering`",
            ),
            (
                with("position_embedding_type", r#""relative_key""#),
                "position_embedding_type",
            ),
            (with("is_decoder", "true"), "decoder"),
            (with("num_attention_heads", "5"), "not a multiple"),
            (with("hidden_size", "null"), "no `hidden_size`"),
            ("[]".to_string(), "not valid JSON"),
        ];
        for (text, expected) in cases {
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
    }
}
