//! The OpenAI wire format: request bodies (parsed strictly enough to reject wrong types with the
//! field named, loosely enough that the extra fields real clients send are ignored), response
//! bodies and stream chunks, and the error object every failure is reported with.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sampler::SamplerConfig;

/// `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_status(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// `prompt` of `/v1/completions`: one string or a list holding exactly one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: MessageContent,
}

/// A message's `content`: a string, or the list-of-parts form with text parts only.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub n: Option<u64>,
    /// Not OpenAI's (llama.cpp's server has it): keep generating past end-of-sequence tokens,
    /// so a load generator gets exactly `max_tokens` per request.
    pub ignore_eos: Option<bool>,
}

/// The fields only `/v1/chat/completions` has (the shared ones are [`Common`]).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
}

/// The fields only `/v1/completions` has.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
}

/// Parses a request body into the endpoint's own fields and the shared ones (two passes over
/// one JSON value rather than `serde(flatten)`, which would lose the path of a bad field):
/// non-UTF-8, bad JSON and fields of the wrong type are 400s naming the problem and the field.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(T, Common), ApiError> {
    let v = parse_json(bytes)?;
    Ok((from_value(v.clone())?, from_value(v)?))
}

fn from_value<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = (path != "." && !path.is_empty()).then_some(path);
        let msg = match &param {
            Some(p) => format!("invalid request: field {p}: {inner}"),
            None => format!("invalid request: {inner}"),
        };
        ApiError::invalid(msg, param.as_deref())
    })
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::invalid(
            format!(
                "the request body is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
            None,
        )
    })?;
    serde_json::from_str(text)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))
}

/// Everything the server does with a request body before queueing it: parse, check the shared
/// fields, render (chat) or take (completion) the prompt, tokenize it and check it against the
/// context. Untrusted bytes in, a 4xx `ApiError` or a ready request out (the `serve_request` fuzz
/// target calls exactly this).
pub fn prepare(
    endpoint: Endpoint,
    body: &[u8],
    tok: &crate::tokenizer::Tokenizer,
    ctx: usize,
) -> Result<(GenParams, Vec<u32>), ApiError> {
    let (params, prompt) = match endpoint {
        Endpoint::Chat => {
            let (r, common) = parse_body::<ChatRequest>(body)?;
            let params = common.params()?;
            let msgs = r.chat_messages()?;
            let ids = tok
                .encode_chat(&msgs, true)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
            (params, ids)
        }
        Endpoint::Completion => {
            let (r, common) = parse_body::<CompletionRequest>(body)?;
            let params = common.params()?;
            let ids = tok
                .encode(r.prompt_text()?, true)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
            (params, ids)
        }
    };
    let field = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completion => "prompt",
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt has no tokens", Some(field)));
    }
    if prompt.len() > ctx {
        return Err(ApiError::invalid(
            format!(
                "the prompt has {} tokens but the context holds {ctx} (--ctx)",
                prompt.len(),
            ),
            Some(field),
        )
        .code("context_length_exceeded"));
    }
    Ok((params, prompt))
}

/// What the scheduler needs of a request, checked.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub stream: bool,
    pub include_usage: bool,
    /// None: until the context is full.
    pub max_tokens: Option<usize>,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl Common {
    /// Validates the shared fields; `seed` defaults to a fresh random one (OpenAI's sampling is
    /// not reproducible without a seed either).
    pub fn params(&self) -> Result<GenParams, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    format!("n = {n} is not supported: this server returns one choice (n = 1)"),
                    Some("n"),
                ));
            }
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        if let Some((name, 0)) = max_tokens {
            return Err(ApiError::invalid(
                format!("{name} must be at least 1"),
                Some(name),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::invalid(
                format!("temperature {temperature} must be in [0, 2]"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                format!("top_p {top_p} must be in (0, 1]"),
                Some("top_p"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop holds at most 4 non-empty strings",
                Some("stop"),
            ));
        }
        let seed = self.seed.unwrap_or_else(rand::random);
        Ok(GenParams {
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            max_tokens: max_tokens.map(|(_, m)| m.min(usize::MAX as u64) as usize),
            // OpenAI's knobs only: no top-k, min-p or repeat penalty, so temperature 0 is
            // exactly `bitnet generate --temperature 0`.
            sampler: SamplerConfig {
                temperature,
                top_k: 0,
                top_p,
                min_p: 0.0,
                repeat_penalty: 1.0,
                repeat_last_n: 0,
                seed,
            },
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

impl ChatRequest {
    /// The messages as the tokenizer's chat turns (system/user/assistant only; text parts
    /// joined).
    pub fn chat_messages(&self) -> Result<Vec<crate::tokenizer::ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages must hold at least one message",
                Some("messages"),
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(ApiError::invalid(
                            format!(
                                "messages[{i}].role {other:?} is not supported \
                                 (system, user or assistant)"
                            ),
                            Some(&format!("messages[{i}].role")),
                        ))
                    }
                };
                let content = match &m.content {
                    MessageContent::Text(t) => t.clone(),
                    MessageContent::Parts(parts) => {
                        let mut text = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid(
                                        format!(
                                            "messages[{i}].content[{j}]: only text parts are \
                                             supported"
                                        ),
                                        Some(&format!("messages[{i}].content")),
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                Ok(crate::tokenizer::ChatMessage::new(role, &content))
            })
            .collect()
    }
}

impl CompletionRequest {
    pub fn prompt_text(&self) -> Result<&str, ApiError> {
        match &self.prompt {
            PromptField::One(s) => Ok(s),
            PromptField::Many(v) if v.len() == 1 => Ok(&v[0]),
            PromptField::Many(v) => Err(ApiError::invalid(
                format!(
                    "prompt holds {} strings; this server takes one prompt per request",
                    v.len()
                ),
                Some("prompt"),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's `usage.prompt_tokens_details`: how many prompt tokens came from the cache.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage::with_cached(prompt_tokens, completion_tokens, 0)
    }

    /// `cached_tokens` of the prompt were found in the slot's cache (not computed again).
    pub fn with_cached(prompt_tokens: usize, completion_tokens: usize, cached: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }
}

/// Which endpoint a response is for: the object names and the choice shape differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// The identity of one response: every chunk of a stream repeats it.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseMeta {
    fn head(&self, object: &str) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("object".into(), object.into());
        m.insert("created".into(), self.created.into());
        m.insert("model".into(), self.model.clone().into());
        m
    }

    /// The whole (non-streaming) response.
    pub fn full(&self, text: &str, finish: &str, usage: Usage) -> Value {
        let (object, choice) = match self.endpoint {
            Endpoint::Chat => (
                "chat.completion",
                serde_json::json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish,
                }),
            ),
            Endpoint::Completion => (
                "text_completion",
                serde_json::json!({
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": finish,
                }),
            ),
        };
        let mut m = self.head(object);
        m.insert("choices".into(), Value::Array(vec![choice]));
        m.insert(
            "usage".into(),
            serde_json::to_value(usage).expect("plain struct"),
        );
        Value::Object(m)
    }

    /// One stream chunk: a text piece (`first` adds the chat role), or the finish reason.
    pub fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        let (object, choice) = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                (
                    "chat.completion.chunk",
                    serde_json::json!({
                        "index": 0,
                        "delta": delta,
                        "logprobs": null,
                        "finish_reason": finish,
                    }),
                )
            }
            Endpoint::Completion => (
                "text_completion",
                serde_json::json!({
                    "index": 0,
                    "text": text.unwrap_or(""),
                    "logprobs": null,
                    "finish_reason": finish,
                }),
            ),
        };
        let mut m = self.head(object);
        m.insert("choices".into(), Value::Array(vec![choice]));
        Value::Object(m)
    }

    /// The last chunk of `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut m = self.head(object);
        m.insert("choices".into(), Value::Array(Vec::new()));
        m.insert(
            "usage".into(),
            serde_json::to_value(usage).expect("plain struct"),
        );
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_name_the_field_and_extra_fields_are_ignored() {
        let e =
            parse_body::<ChatRequest>(br#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some("temperature"), "{}", e.message);
        let e = parse_body::<ChatRequest>(br#"{"messages": [{"role": 1}]}"#).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].role"),
            "{}",
            e.message
        );
        let e = parse_body::<ChatRequest>(b"{\"messages\": [").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_body::<ChatRequest>(b"\xff\xfe").unwrap_err();
        assert!(e.message.contains("UTF-8"), "{}", e.message);
        let (r, _) = parse_body::<ChatRequest>(
            br#"{"messages": [{"role": "user", "content": "hi"}], "user": "x", "logit_bias": {}}"#,
        )
        .unwrap();
        assert_eq!(r.chat_messages().unwrap()[0].content, "hi");
    }

    #[test]
    fn params_check_n_max_tokens_and_stop() {
        let c = |j: &str| parse_body::<CompletionRequest>(j.as_bytes()).unwrap().1;
        assert_eq!(
            c(r#"{"prompt": "a", "n": 2}"#)
                .params()
                .unwrap_err()
                .param
                .as_deref(),
            Some("n")
        );
        assert!(c(r#"{"prompt": "a", "max_tokens": 0}"#).params().is_err());
        let p = c(r#"{"prompt": "a", "max_tokens": 5, "max_completion_tokens": 7, "stop": "x"}"#)
            .params()
            .unwrap();
        assert_eq!((p.max_tokens, p.stop), (Some(7), vec!["x".to_string()]));
        let p = c(r#"{"prompt": "a", "temperature": 0, "seed": 3}"#)
            .params()
            .unwrap();
        assert!(p.sampler.is_greedy());
        assert_eq!(p.sampler.seed, 3);
        assert!(c(r#"{"prompt": "a", "temperature": 3}"#).params().is_err());
    }
}
