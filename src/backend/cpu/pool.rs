//! A small spinning thread pool for the CPU backend's parallel loops. Hand-written instead of rayon
//! because of the cost of *starting* a parallel region: a decoded 2B4T token runs ~250 of them (7
//! projections and an attention per layer, the LM head), each short, and rayon wakes its sleeping
//! workers for each one (BENCHMARKS.md has what that cost). Here the workers spin on an epoch
//! counter for a while after each region (so the next region of the same token starts in well under
//! a microsecond), the calling thread takes part in the work, waiting threads yield their core
//! after a few hundred spins (so an oversubscribed machine degrades instead of stalling), and
//! workers fall asleep on a condition variable after ~1 ms without work so that an idle model does
//! not burn CPU.
//!
//! One region runs at a time: [`SpinPool::run`] takes `&self` but serialises callers.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before sleeping.
const SPIN_FOR: Duration = Duration::from_millis(1);

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped (SeqCst) to start a region; workers wait for it to change.
    epoch: AtomicUsize,
    /// The region's task and item count, written by the caller before bumping `epoch`.
    task: UnsafeCell<Option<Task<'static>>>,
    items: AtomicUsize,
    /// Next item to claim.
    next: AtomicUsize,
    /// Workers that finished the current region.
    done: AtomicUsize,
    /// Workers asleep (or about to be) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    panicked: AtomicBool,
    shutdown: AtomicBool,
}

// SAFETY: `task` is written only by the caller of `run` while no worker reads it (before the epoch
// bump that publishes it, and after every worker reported done), and read by workers only between
// those two points.
unsafe impl Sync for Shared {}

/// Worker threads plus the calling thread: `threads` in all.
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    caller: Mutex<()>,
}

impl SpinPool {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            task: UnsafeCell::new(None),
            items: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("bitnet-cpu-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(SpinPool {
            shared,
            workers,
            caller: Mutex::new(()),
        })
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(i)` for every `i < items`, spread over the pool; returns when all are done.
    /// Items are claimed one at a time from a shared counter, so uneven items balance out.
    pub fn run(&self, items: usize, f: &(dyn Fn(usize) + Sync)) {
        if items == 0 {
            return;
        }
        if self.workers.is_empty() || items == 1 {
            (0..items).for_each(f);
            return;
        }
        let _one_region = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the lifetime is extended only for the duration of this call: every worker
        // reports `done` after its last use of `task` and we wait for all of them below.
        let task: Task<'static> = unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(f) };
        // SAFETY: no worker reads `task` now (all reported done for the previous region).
        unsafe { *s.task.get() = Some(task) };
        s.items.store(items, Relaxed);
        s.next.store(0, Relaxed);
        s.done.store(0, Relaxed);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // The workers must be done with `f` before this frame may unwind, so a panic here is
        // caught and re-raised after the wait.
        let mine = catch_unwind(AssertUnwindSafe(|| claim(s, f)));
        let mut spins = 0u32;
        while s.done.load(Acquire) < self.workers.len() {
            backoff(&mut spins);
        }
        // SAFETY: every worker is done with the task.
        unsafe { *s.task.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Relaxed) {
            panic!("a CPU worker thread panicked");
        }
    }

    /// Splits `data` into chunks of `chunk` elements (the last may be shorter) and calls
    /// `f(chunk_index, chunk)` for each, in parallel.
    pub fn for_each_chunk_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let chunk = chunk.max(1);
        let len = data.len();
        let shared = DisjointSlice::new(data);
        self.run(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            // SAFETY: chunk i is handed to this item only; chunks are disjoint.
            f(i, unsafe {
                shared.slice_mut(start..(start + chunk).min(len))
            })
        });
    }
}

/// A `&mut [T]` that parallel jobs write through, each to elements no other job touches: the
/// chunks of [`SpinPool::for_each_chunk_mut`], and the strided output runs of the CPU ternary
/// matmul (a job owns a run of byte rows, whose outputs are 4 strided runs per token, which no
/// `chunks_mut` split can express). Bounds are checked; disjointness is the caller's contract.
pub struct DisjointSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>, // holds the slice's borrow
}

// SAFETY: access goes through `slice_mut` / `write`, whose contract is that no two threads touch
// one element, and the slice stays mutably borrowed for the struct's lifetime.
unsafe impl<T: Send> Send for DisjointSlice<'_, T> {}
unsafe impl<T: Send> Sync for DisjointSlice<'_, T> {}

impl<'a, T> DisjointSlice<'a, T> {
    pub fn new(data: &'a mut [T]) -> Self {
        DisjointSlice {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// # Safety
    /// No other thread reads or writes any element of `range` while the returned slice lives.
    #[allow(clippy::mut_from_ref)] // the point of the type: disjoint `&mut` from a shared handle
    pub unsafe fn slice_mut(&self, range: std::ops::Range<usize>) -> &mut [T] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "DisjointSlice: {range:?} out of {}",
            self.len
        );
        // SAFETY: in bounds (checked); exclusive per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// # Safety
    /// No other thread reads or writes `index` while the jobs run.
    #[inline]
    pub unsafe fn write(&self, index: usize, v: T) {
        assert!(
            index < self.len,
            "DisjointSlice: index {index} out of {}",
            self.len
        );
        // SAFETY: in bounds (checked); exclusive per the caller's contract.
        unsafe { *self.ptr.add(index) = v };
    }

    /// A pointer to element `start` for a kernel that writes `count` runs of `width` elements,
    /// `stride` apart, from there; checks that every run lies inside the slice.
    ///
    /// # Safety
    /// No other thread reads or writes those runs while the pointer is used.
    pub unsafe fn runs_ptr(
        &self,
        start: usize,
        stride: usize,
        count: usize,
        width: usize,
    ) -> *mut T {
        let end = count
            .checked_sub(1)
            .and_then(|c| c.checked_mul(stride))
            .and_then(|o| o.checked_add(start))
            .and_then(|o| o.checked_add(width));
        assert!(
            count == 0 || end.is_some_and(|end| end <= self.len),
            "DisjointSlice: {count} runs of {width} from {start} (stride {stride}) out of {}",
            self.len
        );
        // SAFETY: start ≤ len (checked above when count > 0; a pointer one past the end is valid).
        unsafe { self.ptr.add(start.min(self.len)) }
    }
}

/// One step of a wait loop: a CPU pause for the first spins (the other side is usually a few
/// hundred nanoseconds away), then `yield_now`, so that a waiting thread gives its core to the
/// thread it waits for when there are more threads than cores (other processes, tests in
/// parallel) instead of burning the time slice that thread needs.
fn backoff(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if *spins < 256 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

fn claim(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let items = s.items.load(Relaxed);
    loop {
        let i = s.next.fetch_add(1, Relaxed);
        if i >= items {
            break;
        }
        f(i);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0usize;
    loop {
        // Wait for a new epoch: spin, then sleep.
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Acquire) {
                return;
            }
            if s.epoch.load(SeqCst) != seen {
                break;
            }
            if spins % 1024 == 1023 && t0.elapsed() > SPIN_FOR {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, SeqCst);
                while s.epoch.load(SeqCst) == seen && !s.shutdown.load(Acquire) {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, SeqCst);
                break;
            }
            backoff(&mut spins);
        }
        if s.shutdown.load(Acquire) {
            return;
        }
        seen = s.epoch.load(SeqCst);
        // SAFETY: published before the epoch bump we just observed; valid until we report done.
        let task = unsafe { *s.task.get() };
        if let Some(f) = task {
            if catch_unwind(AssertUnwindSafe(|| claim(s, f))).is_err() {
                s.panicked.store(true, Relaxed);
            }
        }
        s.done.fetch_add(1, Release);
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Release);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_exactly_once_over_many_regions() {
        for threads in [1, 2, 3] {
            let pool = SpinPool::new(threads).unwrap();
            for items in [0usize, 1, 2, 7, 100] {
                for _ in 0..50 {
                    let hits: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
                    pool.run(items, &|i| {
                        hits[i].fetch_add(1, Relaxed);
                    });
                    assert!(
                        hits.iter().all(|h| h.load(Relaxed) == 1),
                        "{threads} threads, {items} items"
                    );
                }
            }
        }
    }

    #[test]
    fn chunks_are_disjoint_and_cover_the_slice() {
        let pool = SpinPool::new(2).unwrap();
        let mut v = vec![0usize; 1001];
        pool.for_each_chunk_mut(&mut v, 64, |c, part| {
            for (j, x) in part.iter_mut().enumerate() {
                *x += c * 64 + j + 1;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == i + 1));
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = SpinPool::new(2).unwrap();
        std::thread::sleep(SPIN_FOR * 5); // workers are asleep now
        let n = AtomicUsize::new(0);
        pool.run(64, &|_| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 64);
    }

    #[test]
    fn a_panicking_item_is_reported_not_hung() {
        let pool = SpinPool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(16, &|i| {
                if i == 9 {
                    panic!("item 9");
                }
            })
        }));
        assert!(r.is_err());
        // the pool still works afterwards
        let n = AtomicUsize::new(0);
        pool.run(8, &|_| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 8);
    }
}
