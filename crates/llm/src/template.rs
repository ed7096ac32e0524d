//! The model's chat template, applied as Hugging Face's `transformers` applies it: the Jinja text from the GGUF
//! metadata (`tokenizer.chat_template`) rendered with `messages`, `add_generation_prompt`, `bos_token` and
//! `eos_token`, `raise_exception`, and Python's string methods (`strip`, `startswith`, ...).

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::LlmError;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant` (or another role the template knows).
    pub role: String,
    /// Its text.
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are the texts of the model's special tokens.
    pub fn new(source: &str, bos: String, eos: String) -> Result<ChatTemplate, LlmError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        // Templates written for transformers trim blocks the way its Jinja environment does.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| {
                LlmError::Template(format!("the model's chat template does not compile: {e}"))
            })?;
        Ok(ChatTemplate { env, bos, eos })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, LlmError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| LlmError::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => LlmError::BadMessages(
                    e.detail()
                        .unwrap_or("refused by the chat template")
                        .to_owned(),
                ),
                _ => LlmError::Template(format!("the chat template failed: {e}")),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // SmolLM2-Instruct's template, as its GGUF carries it.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chatml_with_its_default_system_message() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>".into(), "<|im_end|>".into()).unwrap();
        let p = t.render(&[msg("user", "Hi")], true).unwrap();
        assert_eq!(
            p,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let p = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], false)
            .unwrap();
        assert_eq!(
            p,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}{{ bos_token }}{{ messages[0].content.strip().upper() }}";
        let t = ChatTemplate::new(src, "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(t.render(&[msg("user", "  hi ")], true).unwrap(), "<s>HI");
        match t.render(&[msg("assistant", "x")], true) {
            Err(LlmError::BadMessages(m)) => assert!(m.contains("must start with user"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
