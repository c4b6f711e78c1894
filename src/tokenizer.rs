//! Text ↔ token ids (Hugging Face `tokenizer.json` through the `tokenizers` crate) and the chat
//! format (the Jinja `chat_template` of `tokenizer_config.json`, rendered with minijinja).

mod sandbox;

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{BitnetError, Result};

/// One chat turn.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// tokenizer_config's `add_bos_token`: transformers' LLaMA tokenizers add the bos themselves
    /// when this is set, even if tokenizer.json's post-processor does not.
    add_bos_token: bool,
}

/// The 2B4T chat format, used when the folder has no chat_template: `Role: content<|eot_id|>`
/// per message, one bos at the start, then `Assistant: `.
const FALLBACK_TEMPLATE: &str = "{% for message in messages %}{% set content = message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

impl Tokenizer {
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let json = std::fs::read(tokenizer_json).map_err(|e| BitnetError::io(tokenizer_json, e))?;
        let config = match tokenizer_config {
            Some(path) => Some((
                path,
                std::fs::read(path).map_err(|e| BitnetError::io(path, e))?,
            )),
            None => None,
        };
        Self::from_bytes(
            tokenizer_json,
            &json,
            config.as_ref().map(|(p, b)| (*p, &b[..])),
        )
    }

    /// The tokenizer from the bytes of `tokenizer.json` and, optionally, `tokenizer_config.json`
    /// (the paths only label errors).
    pub fn from_bytes(
        json_path: &Path,
        json: &[u8],
        config: Option<(&Path, &[u8])>,
    ) -> Result<Self> {
        let bad = |msg: String| {
            BitnetError::Tokenizer(format!("cannot load {}: {msg}", json_path.display()))
        };
        // tokenizers 0.22 panics (`expect("Helper")` in its decoder deserializer) on any JSON error
        // inside "decoder", a syntax error or an invalid \u escape (both found by the tokenizer
        // fuzz target): reject invalid JSON first.
        serde_json::from_slice::<JsonCheck>(json)
            .map_err(|e| bad(format!("not valid JSON: {e}")))?;
        check_post_processor(json).map_err(bad)?;
        // Any other panic of the crate on a hostile file becomes an error too (the default hook
        // still prints it: it is a bug, of tokenizers, worth reporting).
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(json))
            .map_err(|_| bad("the tokenizers crate panicked on this file".into()))?
            .map_err(|e| bad(e.to_string()))?;
        let mut tok = Tokenizer {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            add_bos_token: false,
        };
        if let Some((path, bytes)) = config {
            let v: Value = serde_json::from_slice(bytes).map_err(|e| BitnetError::Config {
                path: path.to_path_buf(),
                msg: format!("not valid JSON: {e}"),
            })?;
            // Tokens may be plain strings or {"content": "..."} objects (AddedToken).
            let token = |key: &str| -> Option<String> {
                match v.get(key)? {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                    _ => None,
                }
            };
            tok.bos_token = token("bos_token");
            tok.eos_token = token("eos_token");
            tok.add_bos_token = v
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            tok.chat_template = match v.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
        }
        Ok(tok)
    }

    /// A tokenizer built elsewhere (a GGUF file's `tokenizer.ggml.*` metadata) plus the chat
    /// template and special tokens that a folder keeps in tokenizer_config.json.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos_token: bool,
    ) -> Self {
        Tokenizer {
            inner,
            chat_template,
            bos_token,
            eos_token,
            add_bos_token,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes plain text; `add_special_tokens` lets the post-processor add `<|begin_of_text|>`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| BitnetError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos_token {
            let bos = self
                .bos_token
                .as_deref()
                .and_then(|t| self.inner.token_to_id(t));
            if let Some(bos) = bos.filter(|&b| ids.first() != Some(&b)) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, dropping special tokens (invalid UTF-8 pieces become U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| BitnetError::Tokenizer(e.to_string()))
    }

    /// The chat prompt as text, rendered with the model's template (or the 2B4T fallback).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().unwrap_or(FALLBACK_TEMPLATE);
        let bos = self.bos_token.as_deref().unwrap_or("<|begin_of_text|>");
        let eos = self.eos_token.as_deref().unwrap_or_default();
        render_chat_template(template, bos, eos, messages, add_generation_prompt)
    }

    /// Chat prompt ids. The template writes the bos itself, so the text is encoded without the
    /// post-processor's specials (as transformers' apply_chat_template does): no doubled bos.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

/// tokenizers 0.22 panics in `encode` ("no entry found for key", processors/template.rs) when a
/// TemplateProcessing post-processor names a special token missing from its `special_tokens`:
/// its deserializer does not check (found by the tokenizer fuzz target). Checked here, also
/// inside `Sequence` post-processors.
fn check_post_processor(json: &[u8]) -> std::result::Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Only {
        post_processor: Option<Value>,
    }
    let Ok(Only {
        post_processor: Some(pp),
    }) = serde_json::from_slice::<Only>(json)
    else {
        return Ok(()); // no post-processor, or an error tokenizers reports itself
    };
    fn check(pp: &Value) -> std::result::Result<(), String> {
        match pp.get("type").and_then(Value::as_str) {
            Some("Sequence") => pp
                .get("processors")
                .and_then(Value::as_array)
                .map_or(Ok(()), |list| list.iter().try_for_each(check)),
            Some("TemplateProcessing") => {
                let known = pp.get("special_tokens").and_then(Value::as_object);
                for key in ["single", "pair"] {
                    for piece in pp.get(key).and_then(Value::as_array).into_iter().flatten() {
                        let Some(id) = piece
                            .get("SpecialToken")
                            .and_then(|t| t.get("id"))
                            .and_then(Value::as_str)
                        else {
                            continue;
                        };
                        if !known.is_some_and(|k| k.contains_key(id)) {
                            return Err(format!(
                                "the post_processor's {key} template uses the special token {id:?}, which its special_tokens do not define"
                            ));
                        }
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    check(&pp)
}

/// Parses a JSON document completely, strings and their escapes included (serde's IgnoredAny
/// skips string contents unchecked), without building it: a validity check that allocates
/// nothing per value.
struct JsonCheck;

impl<'de> serde::Deserialize<'de> for JsonCheck {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(JsonCheckVisitor)
    }
}

struct JsonCheckVisitor;

impl<'de> serde::de::Visitor<'de> for JsonCheckVisitor {
    type Value = JsonCheck;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_unit<E>(self) -> std::result::Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut a: A,
    ) -> std::result::Result<JsonCheck, A::Error> {
        while a.next_element::<JsonCheck>()?.is_some() {}
        Ok(JsonCheck)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut a: A,
    ) -> std::result::Result<JsonCheck, A::Error> {
        while a.next_entry::<JsonCheck, JsonCheck>()?.is_some() {}
        Ok(JsonCheck)
    }
}

pub use sandbox::{
    child_main as template_renderer_main, render_in_child_processes, TemplateRenderer,
    CHILD_ARG as TEMPLATE_RENDERER_ARG,
};

/// Renders a Jinja chat template (transformers' `apply_chat_template` variables): in a child
/// process with a memory limit and a deadline once [`render_in_child_processes`] was called
/// (the `bitnet` binary does), in this process otherwise (see [`render_chat_template_in_process`]).
pub fn render_chat_template(
    template: &str,
    bos_token: &str,
    eos_token: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    match sandbox::renderer() {
        Some(renderer) => renderer.render(
            template,
            bos_token,
            eos_token,
            messages,
            add_generation_prompt,
        ),
        None => render_chat_template_in_process(
            template,
            bos_token,
            eos_token,
            messages,
            add_generation_prompt,
        ),
    }
}

/// Renders a chat template in this process. The template comes from an untrusted
/// `tokenizer_config.json` or GGUF: minijinja's fuel bounds its work (nested loops fail with an
/// error instead of running for hours), the writer bounds its output, `*` is restricted to
/// literals; the size of the strings it builds is bounded only by the child process's memory
/// limit (`sandbox.rs`).
pub fn render_chat_template_in_process(
    template: &str,
    bos_token: &str,
    eos_token: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    check_template_multiplications(template)?;
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| BitnetError::ChatTemplate(e.to_string()))?;
    let mut out = LimitedWriter(Vec::new());
    env.get_template("chat")
        .and_then(|t| {
            t.render_captured_to(
                minijinja::context! {
                    messages => messages,
                    bos_token => bos_token,
                    eos_token => eos_token,
                    add_generation_prompt => add_generation_prompt,
                },
                &mut out,
            )
            .map(|_| ())
        })
        .map_err(|e| {
            if out.0.len() >= MAX_RENDERED_BYTES {
                BitnetError::ChatTemplate(format!(
                    "the rendered prompt is longer than {} MiB: the template loops without end?",
                    MAX_RENDERED_BYTES >> 20
                ))
            } else {
                BitnetError::ChatTemplate(e.to_string())
            }
        })?;
    String::from_utf8(out.0).map_err(|e| BitnetError::ChatTemplate(e.to_string()))
}

/// Refuses a `*` in a chat template unless it multiplies two number literals or repeats a string
/// literal a literal number of times (`'  ' * 4`; minijinja caps a repeated string at 100 MB).
/// minijinja repeats a *sequence* by any count as
/// one instruction, lazily, and the next instruction that reads it whole (`~`, `join`, `list`)
/// then builds it in one step: `{{ messages * 87000000 ~ '' }}` (found by the `chat_template`
/// fuzz target) takes seconds per 10^7 copies and gigabytes, and fuel, which counts instructions,
/// never sees it. Chat templates do not multiply variables; refusing them is the simple bound.
fn check_template_multiplications(template: &str) -> Result<()> {
    use minijinja::machinery::{tokenize, Token, WhitespaceConfig};
    let tokens: Vec<(Token, minijinja::machinery::Span)> = match tokenize(
        template,
        false,
        Default::default(),
        WhitespaceConfig::default(),
    )
    .collect::<std::result::Result<_, _>>()
    {
        Ok(t) => t,
        // A syntax error: add_template reports it with its own message.
        Err(_) => return Ok(()),
    };
    let number = |t: &Token| matches!(t, Token::Int(_) | Token::Int128(_) | Token::Float(_));
    let string = |t: &Token| matches!(t, Token::Str(_) | Token::String(_));
    let int = |t: &Token| matches!(t, Token::Int(_));
    for (i, (t, span)) in tokens.iter().enumerate() {
        if !matches!(t, Token::Mul) {
            continue;
        }
        let before = i.checked_sub(1).map(|j| &tokens[j].0);
        let after = tokens.get(i + 1).map(|(t, _)| t);
        let ok = match (before, after) {
            (Some(a), Some(b)) => {
                (number(a) && number(b)) || (string(a) && int(b)) || (int(a) && string(b))
            }
            _ => false,
        };
        if !ok {
            return Err(BitnetError::ChatTemplate(format!(
                "line {}: `*` multiplies a value that is not a literal; chat templates may only \
                 multiply number literals or repeat a string literal (a repeated sequence can take \
                 all memory in one step)",
                span.start_line
            )));
        }
    }
    Ok(())
}

/// Longest rendered chat prompt: far beyond any context (~4 bytes per token), small enough that
/// a template printing in a loop fails in milliseconds instead of filling the memory (fuel
/// bounds instructions, not output: one instruction can print 100 MB).
const MAX_RENDERED_BYTES: usize = 16 << 20;

/// A `Vec<u8>` writer that refuses to grow beyond [`MAX_RENDERED_BYTES`].
struct LimitedWriter(Vec<u8>);

impl std::io::Write for LimitedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            self.0.resize(MAX_RENDERED_BYTES, 0); // marks the overflow for the error message
            return Err(std::io::Error::other("rendered prompt too long"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Template instructions allowed per rendering: real chat templates use a few thousand for a
/// long conversation (a loop over messages with a few conditions each).
const TEMPLATE_FUEL: u64 = 5_000_000;

/// Turns a growing list of generated ids into text pieces for streaming, holding back bytes of
/// a character that is not complete yet (byte-level BPE splits multi-byte UTF-8 across tokens).
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    printed: usize, // bytes of the decoded text already returned
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() < self.printed
            || !text.is_char_boundary(self.printed)
        {
            return Ok(String::new());
        }
        let piece = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(piece)
    }

    /// Whatever is left at the end (including a trailing replacement character).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let text = tok.decode(&self.ids)?;
        let piece = if text.is_char_boundary(self.printed) && text.len() >= self.printed {
            text[self.printed..].to_string()
        } else {
            String::new()
        };
        self.printed = text.len();
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str) -> Result<String> {
        render_chat_template(
            template,
            "<s>",
            "</s>",
            &[ChatMessage::new("user", "hi")],
            true,
        )
    }

    #[test]
    fn a_normal_template_renders() {
        assert_eq!(
            render(FALLBACK_TEMPLATE).unwrap(),
            "<s>User: hi<|eot_id|>Assistant: "
        );
    }

    /// A hostile tokenizer_config.json: 10^10 loop iterations stop on fuel in well under a second.
    #[test]
    fn endless_loops_run_out_of_fuel() {
        let t0 = std::time::Instant::now();
        let e = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("fuel"), "{e}");
        assert!(t0.elapsed().as_secs() < 10);
    }

    /// Found by the chat_template fuzzer: a sequence repeated 87 million times, then joined into
    /// one string by `~` (one instruction: fuel never sees it), took gigabytes and minutes.
    #[test]
    fn repeated_sequences_are_refused_before_rendering() {
        let t0 = std::time::Instant::now();
        for t in [
            "{{messages*870e5~w+4}} m",
            "{{ (messages * 10) | join }}",
            "{% set n = 870000 %}{{ [1, 2] * n ~ '' }}",
            "{{ 3 * messages }}",
        ] {
            let e = render(t).unwrap_err().to_string();
            assert!(
                e.contains("`*` multiplies a value that is not a literal"),
                "{t}: {e}"
            );
        }
        assert!(t0.elapsed().as_secs() < 2);
        // what real templates write still renders
        assert_eq!(
            render("{{ '-' * 3 }}{{ 2 * 3 }}{{ 1.5 * 2 }}").unwrap(),
            "---63.0"
        );
    }

    /// 100 000 × 1 MB of output in few instructions: stopped at 16 MiB, not at the memory's end.
    #[test]
    fn output_floods_are_cut_at_16_mib() {
        let e = render("{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}").unwrap_err();
        assert!(e.to_string().contains("longer than 16 MiB"), "{e}");
    }
}
