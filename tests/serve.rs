//! `bitnet serve` over HTTP on the bundled tiny model: every endpoint, streaming and not, the
//! error cases, greedy texts equal to `Engine::generate` alone while batched, a client that
//! disconnects mid-stream, and SIGTERM with open streams (the real binary).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bitnet_wgpu::engine::{DeviceChoice, Engine, EngineOptions};
use bitnet_wgpu::sampler::{Sampler, SamplerConfig};
use bitnet_wgpu::serve::{start, ModelSource, ServeOptions, Server};
use serde_json::{json, Value};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-bitnet")
}

/// A server on a free port, one CPU thread (tests run side by side), small slots.
fn server(parallel: usize, tweak: impl FnOnce(&mut ServeOptions)) -> (Server, String) {
    let mut o = ServeOptions::new(ModelSource::Dir(model_dir()));
    o.engine.device = DeviceChoice::Cpu;
    o.engine.threads = 1;
    o.port = 0;
    o.parallel = parallel;
    o.ctx = Some(256);
    o.step_tokens = 64;
    tweak(&mut o);
    let s = start(o).unwrap();
    s.wait_ready(Duration::from_secs(60)).unwrap();
    let url = format!("http://{}", s.addr());
    (s, url)
}

/// Greedy text of `prompt` from the library alone (the reference for batched requests).
fn greedy_alone(prompt: &str, max_tokens: usize) -> (String, Vec<u32>) {
    let opts = EngineOptions {
        device: DeviceChoice::Cpu,
        threads: 1,
        ..Default::default()
    };
    let mut e = Engine::load(&model_dir(), &opts).unwrap();
    let ids = e.tokenizer.encode(prompt, true).unwrap();
    let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
    let g = e.generate(&ids, max_tokens, &mut s, false, |_| {}).unwrap();
    (g.text, g.token_ids)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn post(url: &str, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The `data:` payloads of an SSE body, `[DONE]` included.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .flat_map(|ev| ev.lines())
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Text, finish reason and usage of a streamed response.
fn stream_result(events: &[String]) -> (String, String, Option<Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let (mut text, mut finish, mut usage) = (String::new(), String::new(), None);
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        if let Some(t) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
            text.push_str(t);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish, usage)
}

fn assert_error(status: u16, body: &Value, want_status: u16, needle: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(e["message"].as_str().unwrap().contains(needle), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_streaming_and_not() {
    let (_s, url) = server(2, |_| {});
    let c = client();
    let h = c.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    let h: Value = h.json().await.unwrap();
    assert_eq!(
        (h["status"].as_str(), h["slots"].as_u64()),
        (Some("ok"), Some(2))
    );
    let m: Value = c
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["data"][0]["id"], "tiny-bitnet");

    // completions, not streaming: the library's greedy text, finish length, usage
    let prompt = "Once upon a time";
    let (want, want_ids) = greedy_alone(prompt, 12);
    let (st, v) = post(
        &url,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want);
    let finish = if want_ids.len() < 12 {
        "stop"
    } else {
        "length"
    };
    assert_eq!(v["choices"][0]["finish_reason"], finish);
    assert_eq!(v["usage"]["completion_tokens"], want_ids.len());
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 1);

    // the same, streamed, with the usage chunk
    let body = c
        .post(format!("{url}/v1/completions"))
        .json(
            &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(body.status(), 200);
    assert!(body.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_data(&body.text().await.unwrap());
    let (text, f, usage) = stream_result(&events);
    assert_eq!((text.as_str(), f.as_str()), (want.as_str(), finish));
    assert_eq!(usage.unwrap()["prompt_tokens"], prompt_tokens);

    // chat, both ways: same text, chat objects
    let chat = json!({"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Tell me a story."}],
                      "max_completion_tokens": 10, "temperature": 0, "seed": 1});
    let (st, v) = post(&url, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let chat_text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let events = sse_data(&r.text().await.unwrap());
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (text, _, usage) = stream_result(&events);
    assert_eq!(text, chat_text);
    assert!(usage.is_none(), "usage only when asked for");

    // sampled with a seed: reproducible
    let sampled = json!({"prompt": prompt, "max_tokens": 16, "temperature": 0.9, "seed": 7});
    let (_, a) = post(&url, "/v1/completions", sampled.clone()).await;
    let (_, b) = post(&url, "/v1/completions", sampled).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);

    // a stop string cuts the text before it
    let cut: String = want.chars().skip(3).take(4).collect();
    let (_, v) = post(
        &url,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": [cut]}),
    )
    .await;
    let got = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(got, &want[..want.find(&cut).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let metrics = c
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "bitnet_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 5",
        "bitnet_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2",
        "# TYPE bitnet_step_rows histogram",
        "bitnet_running_sequences 0",
        "bitnet_waiting_sequences 0",
        "bitnet_tokens_per_second",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
    let generated: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("bitnet_generated_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(generated >= 12 * 2 + 10 * 2, "{generated}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_requests_batched_equal_each_alone() {
    // 6 requests on 3 slots: they join and leave mid-flight, prompts of different lengths
    let (_s, url) = server(3, |o| o.step_tokens = 8);
    let prompts = [
        "Once upon a time",
        "The little dog",
        "She looked at the big red ball and said",
        "Tom",
        "In the morning, the sun was shining and the birds",
        "Lily and Ben went to the park",
    ];
    let mut tasks = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let url = url.clone();
        let p = p.to_string();
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": p, "max_tokens": 10 + 3 * i, "temperature": 0,
                              "stream": i % 2 == 0});
            let r = client()
                .post(format!("{url}/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            if i % 2 == 0 {
                stream_result(&sse_data(&r.text().await.unwrap())).0
            } else {
                let v: Value = r.json().await.unwrap();
                v["choices"][0]["text"].as_str().unwrap().to_string()
            }
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        let (want, _) = greedy_alone(prompts[i], 10 + 3 * i);
        assert_eq!(got, want, "prompt {i} {:?}", prompts[i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let (_s, url) = server(1, |o| {
        o.ctx = Some(16);
        o.body_limit = 4096;
    });
    let c = client();
    let raw = |body: Vec<u8>| {
        c.post(format!("{url}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = raw(b"{\"messages\": [".to_vec()).await.unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 400, "not valid JSON");
    let r = raw(b"{\"messages\": \"\xff\"}".to_vec()).await.unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 400, "UTF-8");
    let (st, v) = post(
        &url,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}),
    )
    .await;
    assert_error(st, &v, 400, "max_tokens");
    assert_eq!(v["error"]["param"], "max_tokens");
    let (st, v) = post(
        &url,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}),
    )
    .await;
    assert_error(st, &v, 400, "n = 2");
    let (st, v) = post(&url, "/v1/chat/completions", json!({"messages": []})).await;
    assert_error(st, &v, 400, "at least one message");
    let (st, v) = post(
        &url,
        "/v1/completions",
        json!({"prompt": "one two three four five six seven eight nine ten ".repeat(3)}),
    )
    .await;
    assert_error(st, &v, 400, "context holds 16");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let r = raw(vec![b' '; 5000]).await.unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 413, "limit");
    let r = c.get(format!("{url}/v2/nothing")).send().await.unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 404, "no such endpoint");
    // still serving after all that
    let (st, v) = post(
        &url,
        "/v1/completions",
        json!({"prompt": "Once", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

/// The next turn of a conversation resends it whole: the slot's cache already holds its start,
/// so only the new tokens are computed (`usage.prompt_tokens_details.cached_tokens`), and the
/// answer equals a fresh run's token for token. One slot, so every request lands on the cache
/// the previous one left; an unrelated prompt shares only the bos token and is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_reuses_its_cached_prefix_and_answers_as_a_fresh_run() {
    let (_s, url) = server(1, |_| {});
    let first = "Once upon a time";
    let (st, v) = post(
        &url,
        "/v1/completions",
        json!({"prompt": first, "max_tokens": 10, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let first_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let answer = v["choices"][0]["text"].as_str().unwrap().to_string();
    let second = format!("{first}{answer} She said that");
    let (want, want_ids) = greedy_alone(&second, 10);
    let (st, v) = post(
        &url,
        "/v1/completions",
        json!({"prompt": second, "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want);
    assert_eq!(v["usage"]["completion_tokens"], want_ids.len());
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= first_tokens,
        "cached {cached} of the {first_tokens} tokens of the first prompt"
    );
    assert!(cached < v["usage"]["prompt_tokens"].as_u64().unwrap());
    // something else entirely: only the bos is shared
    let other = "The garden was";
    let (want, _) = greedy_alone(other, 10);
    let (st, v) = post(
        &url,
        "/v1/completions",
        json!({"prompt": other, "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
    let metrics = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&metrics, "bitnet_prompt_tokens_cached_total"),
        (cached + 1) as f64
    );
}

/// A model whose chat template doubles a string past 1 GiB: the request fails with a 400 naming
/// the cause and the server goes on (in-process, the failed allocation aborted it). Templates
/// render in a child process as in `bitnet serve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_chat_template_fails_its_request_not_the_server() {
    use bitnet_wgpu::tokenizer::{render_in_child_processes, TemplateRenderer};
    render_in_child_processes(TemplateRenderer::new(PathBuf::from(env!(
        "CARGO_BIN_EXE_bitnet"
    ))));
    let dir = common::copy_dir(&model_dir());
    let cfg = dir.path().join("tokenizer_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["chat_template"] = "{% set ns = namespace(s='abcdefgh') %}{% for i in range(40) %}\
                          {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"
        .into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let path = dir.path().to_path_buf();
    let (_s, url) = server(1, |o| o.model = ModelSource::Dir(path));
    let (st, v) = post(
        &url,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    )
    .await;
    assert_error(st, &v, 400, "MiB of memory");
    let (st, v) = post(
        &url,
        "/v1/completions",
        json!({"prompt": "Once", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_on_v1_only() {
    let (_s, url) = server(1, |o| o.api_key = Some("sekret".into()));
    let c = client();
    let body = json!({"prompt": "Once", "max_tokens": 2});
    for key in [None, Some("wrong")] {
        let mut r = c.post(format!("{url}/v1/completions")).json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().await.unwrap();
        let st = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_error(st, &v, 401, "API key");
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let r = c
        .post(format!("{url}/v1/completions"))
        .bearer_auth("sekret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        c.get(format!("{url}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Reads a streaming response until its first token chunk.
async fn first_chunk(r: &mut reqwest::Response) {
    let mut seen = Vec::new();
    while let Some(b) = r.chunk().await.unwrap() {
        seen.extend_from_slice(&b);
        if String::from_utf8_lossy(&seen).contains("\"choices\"") {
            return;
        }
    }
    panic!("the stream ended before its first chunk");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_429_and_a_disconnect_frees_the_slot() {
    let (_s, url) = server(1, |o| {
        o.queue = 1;
        o.ctx = Some(1000);
    });
    let c = client();
    let long = json!({"prompt": "Once", "max_tokens": 990, "ignore_eos": true, "stream": true});
    // A takes the only slot, B waits in the queue, C finds the queue full
    let mut a = c
        .post(format!("{url}/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    first_chunk(&mut a).await;
    let b = c
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "Once", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(b.status(), 200);
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "Once", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_error(429, &v, 429, "queue is full");
    // A's client goes away: its slot goes to B, which finishes long before A would have
    let t0 = Instant::now();
    drop(a);
    let (text, finish, _) = stream_result(&sse_data(&b.text().await.unwrap()));
    assert_eq!(finish, "length", "{text}");
    let m = c
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&m, "bitnet_cancelled_requests_total"), 1.0);
    assert!(
        metric(&m, "bitnet_generated_tokens_total") < 900.0,
        "A ran on after its client left ({:?})",
        t0.elapsed()
    );
    assert_eq!(metric(&m, "bitnet_running_sequences"), 0.0);
}

#[test]
#[cfg(target_os = "linux")] // libc is a dependency on Linux only
fn sigterm_ends_open_streams_with_a_final_chunk_and_exits_0() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["serve", "--device", "cpu", "--threads", "1", "--port", "0"])
        .args(["--parallel", "2", "--ctx", "1000", "--model"])
        .arg(model_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = client();
        let t0 = Instant::now();
        while !c
            .get(format!("{url}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(t0.elapsed() < Duration::from_secs(60), "never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let long = json!({"prompt": "Once", "max_tokens": 990, "ignore_eos": true,
                          "stream": true, "stream_options": {"include_usage": true}});
        let mut streams = Vec::new();
        for _ in 0..2 {
            let mut r = c
                .post(format!("{url}/v1/completions"))
                .json(&long)
                .send()
                .await
                .unwrap();
            first_chunk(&mut r).await;
            streams.push(r);
        }
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        for r in streams {
            let rest = r.text().await.unwrap();
            let events = sse_data(&rest);
            let (_, finish, usage) = stream_result(&events);
            assert_eq!(finish, "stop", "{rest}");
            assert!(usage.unwrap()["completion_tokens"].as_u64().unwrap() < 990);
        }
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
