//! Continuous batching: one thread owns the model and runs steps. Each step holds the decode row
//! of every running sequence plus prefill chunks of sequences still reading their prompt, up to
//! a per-step token budget, so requests join and leave between steps and a long prompt never
//! stalls the streams already running. Sampling, detokenization and stop strings happen here on
//! the host, per sequence; the HTTP side only forwards [`Event`]s.
//!
//! A sequence owns one KV-cache slot from admission to its end (finished, failed, or its client
//! gone: a closed event channel frees the slot before the next step is built).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::api::{GenParams, Usage};
use super::metrics::Shared;
use crate::backend::StepRow;
use crate::engine::AnyModel;
use crate::sampler::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Why a sequence ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token, a stop string, or the server shutting down.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a request's HTTP side receives, in order: one `Text` per generated token (possibly
/// empty: a piece of a character, or text held back as a possible stop string), then `Done`
/// or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    Done { finish: Finish, usage: Usage },
    Error(String),
}

/// A checked request: the prompt already tokenized and within the context.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
}

pub enum Control {
    Submit(Request),
    /// End every sequence (a final `Done` each) and stop.
    Shutdown,
}

struct Seq {
    events: UnboundedSender<Event>,
    params: GenParams,
    /// The prompt, then the generated ids: `[prompt_len + generated]`.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Prompt tokens that were in the slot's cache at admission.
    cached: usize,
    /// Positions of `tokens` already in the slot's cache.
    fed: usize,
    slot: u32,
    sampler: Sampler,
    decoder: StreamDecoder,
    /// Decoded text not sent yet because it may be the start of a stop string.
    held: String,
    generated: usize,
    max_new: usize,
    /// Ended by a stop string (the text after it is dropped) or by an error (already sent).
    cut: bool,
    failed: bool,
}

impl Seq {
    fn prefilling(&self) -> bool {
        self.fed < self.prompt_len
    }

    fn usage(&self) -> Usage {
        Usage::with_cached(self.prompt_len, self.generated, self.cached)
    }
}

pub struct SchedulerConfig {
    pub slots: usize,
    pub ctx: usize,
    /// Rows per step at most (decode rows plus prefill chunk).
    pub step_tokens: usize,
}

pub struct Scheduler {
    model: AnyModel,
    tokenizer: Arc<Tokenizer>,
    stop_ids: Vec<u32>,
    cfg: SchedulerConfig,
    shared: Arc<Shared>,
    /// Free slots, the longest free first (a new conversation takes the slot whose cache was
    /// left the longest ago).
    free_slots: Vec<u32>,
    /// `[slots]`: the tokens whose keys and values each slot's cache holds at positions
    /// `0..len`, left by the sequence that used it last. A request that starts with them (the
    /// next turn of a chat resends the whole conversation) takes that slot and skips their
    /// prefill. Rows are independent and integer-exact, so the reused entries are the ones a
    /// fresh prefill would compute (`tests/serve.rs` checks it).
    slot_tokens: Vec<Vec<u32>>,
    /// Sequences with a slot, in admission order (prefill goes first come, first served).
    running: Vec<Seq>,
    waiting: VecDeque<Request>,
    shutting_down: bool,
}

impl Scheduler {
    pub fn new(
        model: AnyModel,
        tokenizer: Arc<Tokenizer>,
        stop_ids: Vec<u32>,
        cfg: SchedulerConfig,
        shared: Arc<Shared>,
    ) -> Self {
        let free_slots = (0..cfg.slots as u32).collect();
        let slot_tokens = vec![Vec::new(); cfg.slots];
        Scheduler {
            model,
            tokenizer,
            stop_ids,
            cfg,
            shared,
            free_slots,
            slot_tokens,
            running: Vec::new(),
            waiting: VecDeque::new(),
            shutting_down: false,
        }
    }

    /// Runs until `Shutdown` (or every sender is gone) and every sequence has ended.
    pub fn run(mut self, rx: Receiver<Control>) {
        loop {
            // idle: block for work (the timeout only refreshes the tokens/s gauge)
            if self.running.is_empty() && self.waiting.is_empty() {
                if self.shutting_down {
                    break;
                }
                self.shared.idle();
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(c) => self.control(c),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.control(c),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        self.control(Control::Shutdown);
                        break;
                    }
                }
            }
            if self.shutting_down {
                self.end_all();
                continue;
            }
            self.drop_cancelled();
            self.admit();
            self.publish();
            if !self.running.is_empty() {
                self.step();
            }
        }
        self.publish();
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Submit(r) => self.waiting.push_back(r),
            Control::Shutdown => self.shutting_down = true,
        }
    }

    /// Shutdown: every sequence gets a final `Done` (finish `stop`).
    fn end_all(&mut self) {
        for r in self.waiting.drain(..) {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            let usage = Usage::new(r.prompt.len(), 0);
            let _ = r.events.send(Event::Done {
                finish: Finish::Stop,
                usage,
            });
        }
        for mut s in std::mem::take(&mut self.running) {
            self.flush_text(&mut s);
            let _ = s.events.send(Event::Done {
                finish: Finish::Stop,
                usage: s.usage(),
            });
            self.release(&s);
        }
        self.publish();
    }

    /// Frees the slot of a sequence that ended, remembering what its cache holds.
    fn release(&mut self, s: &Seq) {
        let slot = s.slot as usize;
        self.slot_tokens[slot].clear();
        self.slot_tokens[slot].extend_from_slice(&s.tokens[..s.fed]);
        self.free_slots.push(s.slot);
    }

    /// Clients that went away: their slots are free for this very step.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.events.is_closed());
        let gone = before - self.waiting.len();
        self.shared.queued.fetch_sub(gone, Ordering::Relaxed);
        let (closed, open): (Vec<Seq>, Vec<Seq>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.events.is_closed());
        self.running = open;
        let cancelled = gone + closed.len();
        for s in &closed {
            self.release(s);
        }
        self.shared
            .cancelled
            .fetch_add(cancelled as u64, Ordering::Relaxed);
    }

    fn admit(&mut self) {
        while !self.free_slots.is_empty() {
            let Some(r) = self.waiting.pop_front() else {
                break;
            };
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            let sampler = match Sampler::new(r.params.sampler.clone()) {
                Ok(s) => s,
                Err(e) => {
                    let _ = r.events.send(Event::Error(e.to_string()));
                    continue;
                }
            };
            // The free slot whose cache starts like this prompt, longest first; with no match
            // anywhere the one freed the longest ago (the first).
            let (k, common) = self
                .free_slots
                .iter()
                .enumerate()
                .map(|(k, &slot)| {
                    (
                        k,
                        common_prefix(&self.slot_tokens[slot as usize], &r.prompt),
                    )
                })
                .fold((0, 0), |best, c| if c.1 > best.1 { c } else { best });
            let slot = self.free_slots.remove(k);
            // At least the prompt's last token is computed again: its logits start the answer.
            let cached = common.min(r.prompt.len().saturating_sub(1));
            self.slot_tokens[slot as usize].clear();
            let prompt_len = r.prompt.len();
            // the context bounds the output too: the last sampled token needs no position
            let room = self.cfg.ctx + 1 - prompt_len;
            let max_new = r.params.max_tokens.unwrap_or(room).min(room);
            self.shared
                .prompt_tokens
                .fetch_add(prompt_len as u64, Ordering::Relaxed);
            self.shared
                .cached_prompt_tokens
                .fetch_add(cached as u64, Ordering::Relaxed);
            self.running.push(Seq {
                events: r.events,
                params: r.params,
                tokens: r.prompt,
                prompt_len,
                cached,
                fed: cached,
                slot,
                sampler,
                decoder: StreamDecoder::default(),
                held: String::new(),
                generated: 0,
                max_new,
                cut: false,
                failed: false,
            });
        }
    }

    fn publish(&self) {
        self.shared
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.shared
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
    }

    /// One model step over every running sequence.
    fn step(&mut self) {
        // rows: decode rows first (one per sequence past its prompt), then prefill chunks
        let mut rows: Vec<StepRow> = Vec::new();
        let mut logit_rows: Vec<u32> = Vec::new();
        let mut sampled: Vec<usize> = Vec::new(); // sequence index of each logit row
        let mut took: Vec<(usize, usize)> = Vec::new(); // (sequence, rows) fed this step
        for (i, s) in self.running.iter().enumerate() {
            if !s.prefilling() {
                logit_rows.push(rows.len() as u32);
                sampled.push(i);
                rows.push(StepRow {
                    token: s.tokens[s.fed],
                    pos: s.fed as u32,
                    slot: s.slot,
                });
                took.push((i, 1));
            }
        }
        let mut budget = self.cfg.step_tokens.saturating_sub(rows.len());
        for (i, s) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if s.prefilling() {
                let n = (s.prompt_len - s.fed).min(budget);
                rows.extend(StepRow::sequence_in(
                    s.slot,
                    &s.tokens[s.fed..s.fed + n],
                    s.fed,
                ));
                if s.fed + n == s.prompt_len {
                    logit_rows.push(rows.len() as u32 - 1);
                    sampled.push(i);
                }
                took.push((i, n));
                budget -= n;
            }
        }
        let t0 = Instant::now();
        let logits = match self.model.step_logits(&rows, &logit_rows) {
            Ok(l) => l,
            Err(e) => {
                // the step's sequences cannot go on (their caches are in an unknown state)
                let msg = format!("the model step failed: {e}");
                eprintln!("bitnet serve: {msg}");
                for s in std::mem::take(&mut self.running) {
                    let _ = s.events.send(Event::Error(msg.clone()));
                    self.slot_tokens[s.slot as usize].clear(); // the cache is not trusted
                    self.free_slots.push(s.slot);
                }
                self.shared.failed_steps.fetch_add(1, Ordering::Relaxed);
                self.publish();
                return;
            }
        };
        self.shared.record_step(rows.len(), t0.elapsed());
        for &(i, n) in &took {
            self.running[i].fed += n;
        }
        let vocab = logits.len() / logit_rows.len().max(1);
        let mut finished = Vec::new();
        for (k, &i) in sampled.iter().enumerate() {
            let l = &logits[k * vocab..(k + 1) * vocab];
            if let Some(f) = self.accept(i, l) {
                finished.push((i, f));
            }
        }
        self.shared
            .generated_tokens
            .fetch_add(sampled.len() as u64, Ordering::Relaxed);
        // remove from the back so the indices stay valid; the gauges are updated before the
        // clients hear of the end
        finished.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        let ended: Vec<(Seq, Finish)> = finished
            .into_iter()
            .map(|(i, f)| (self.running.remove(i), f))
            .collect();
        self.publish();
        for (mut s, f) in ended {
            if !s.failed {
                if !s.cut {
                    self.flush_text(&mut s);
                }
                let _ = s.events.send(Event::Done {
                    finish: f,
                    usage: s.usage(),
                });
            }
            self.release(&s);
        }
    }

    /// Samples the next token of sequence `i` and streams its text; `Some` when it ends.
    fn accept(&mut self, i: usize, logits: &[f32]) -> Option<Finish> {
        let s = &mut self.running[i];
        let id = s.sampler.sample(logits, &s.tokens[s.prompt_len..]);
        s.generated += 1;
        s.tokens.push(id);
        if !s.params.ignore_eos && self.stop_ids.contains(&id) {
            return Some(Finish::Stop);
        }
        let piece = match s.decoder.push(&self.tokenizer, id) {
            Ok(p) => p,
            Err(e) => {
                let _ = s.events.send(Event::Error(e.to_string()));
                s.failed = true;
                return Some(Finish::Stop);
            }
        };
        s.held.push_str(&piece);
        if let Some(at) = first_stop(&s.held, &s.params.stop) {
            let text = s.held[..at].to_string();
            s.held.clear();
            let _ = s.events.send(Event::Text(text));
            s.cut = true;
            return Some(Finish::Stop);
        }
        let keep = held_back(&s.held, &s.params.stop);
        let text: String = s.held.drain(..s.held.len() - keep).collect();
        let _ = s.events.send(Event::Text(text));
        if s.generated >= s.max_new || s.fed >= self.cfg.ctx {
            return Some(Finish::Length);
        }
        None
    }

    /// Sends what the decoder and the stop-string check still hold.
    fn flush_text(&self, s: &mut Seq) {
        let rest = s.decoder.finish(&self.tokenizer).unwrap_or_default();
        s.held.push_str(&rest);
        let text = match first_stop(&s.held, &s.params.stop) {
            Some(at) => s.held[..at].to_string(),
            None => std::mem::take(&mut s.held),
        };
        s.held.clear();
        if !text.is_empty() {
            let _ = s.events.send(Event::Text(text));
        }
    }
}

/// Byte offset of the earliest stop string in `text`.
/// Length of the common prefix of two token lists.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Bytes at the end of `text` that may begin a stop string (held until the next token says).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for k in (1..s.len().min(text.len() + 1)).rev() {
            if k > keep
                && text.is_char_boundary(text.len() - k)
                && s.is_char_boundary(k)
                && text.ends_with(&s[..k])
            {
                keep = k;
                break;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_their_prefixes_held_back() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(first_stop("abc END x", &stops), Some(4));
        assert_eq!(first_stop("a\n\nEND", &stops), Some(1));
        assert_eq!(first_stop("abc", &stops), None);
        assert_eq!(held_back("abcEN", &stops), 2);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abcE", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("é", &["éa".to_string()]), 2);
        assert_eq!(held_back("", &stops), 0);
    }
}
