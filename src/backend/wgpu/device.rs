//! Device setup, buffers, the per-step command encoder and its submission, bind groups, the
//! dispatch recorder (with the counters the bench and tests read) and the read-back path.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::kernels::{self, Kernel, PipelineCache};
use super::{
    adapter, gpu_err, layout, select_adapter, AdapterChoice, GpuBuf, GpuCounters, GpuOptions,
    GpuQTensor, GpuTensor, GpuVector, TileShapes, WgpuBackend, NEXT_ID,
};
use crate::error::{BitnetError, Result};

/// Most bindings of one kernel (row_ops has 8).
pub(super) const MAX_BINDINGS: usize = 8;

/// (binding signature, buffer ids padded with 0): fixed-size, no allocation per lookup.
pub(super) type BindKey = (&'static [kernels::Bind], [u64; MAX_BINDINGS]);

/// Reused host-visible buffers for the per-step upload (Step uniform + token ids), so a decoded
/// token allocates nothing once warm. A buffer is written while mapped, unmapped and copied from
/// in the step's command buffer, then re-mapped (asynchronously, completing once the GPU is done
/// with it: at the next poll). The pool grows to the number of steps in flight, typically 1-2.
/// Unlike wgpu's StagingBelt, a failed map (device loss) is an error, not a panic.
#[derive(Default)]
pub(super) struct UploadPool {
    free: Vec<wgpu::Buffer>,                 // mapped, ready to write
    in_flight: Vec<wgpu::Buffer>,            // used by the last submission
    returned: Arc<Mutex<Vec<wgpu::Buffer>>>, // re-mapped by the callbacks
    failed: Arc<Mutex<Option<String>>>,      // a re-map that failed
    pub(super) created: usize,               // buffers made so far
}

impl UploadPool {
    const SIZE: u64 = 4096;

    /// A buffer holding `bytes` (COPY_SRC), to be copied from in the current encoder.
    pub(super) fn stage(
        &mut self,
        device: &wgpu::Device,
        bytes: &[u8],
    ) -> std::result::Result<wgpu::Buffer, String> {
        if let Some(e) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        self.free.extend(
            self.returned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..),
        );
        let need = (bytes.len() as u64).next_multiple_of(4).max(4);
        let pos = self.free.iter().position(|b| b.size() >= need);
        let buf = match pos {
            Some(i) => self.free.swap_remove(i),
            None => {
                self.created += 1;
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("step upload"),
                    size: need.max(Self::SIZE).next_power_of_two(),
                    usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: true,
                })
            }
        };
        {
            let mut view = buf.get_mapped_range_mut(..).map_err(|e| e.to_string())?;
            view.slice(..bytes.len()).copy_from_slice(bytes);
        }
        buf.unmap();
        self.in_flight.push(buf.clone());
        Ok(buf)
    }

    /// After a submit: map the used buffers again once the GPU is done with them.
    pub(super) fn recycle(&mut self) {
        for buf in self.in_flight.drain(..) {
            let (returned, failed, b) = (self.returned.clone(), self.failed.clone(), buf.clone());
            buf.map_async(wgpu::MapMode::Write, .., move |r| match r {
                Ok(()) => returned.lock().unwrap_or_else(|e| e.into_inner()).push(b),
                Err(e) => {
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("re-mapping an upload buffer: {e}"))
                }
            });
        }
    }
}

impl WgpuBackend {
    /// Opens the adapter chosen by `choice` / `name_substring` (see [`select_adapter`]).
    pub fn new(choice: AdapterChoice, name_substring: Option<&str>) -> Result<Self> {
        Self::new_with(choice, name_substring, GpuOptions::default())
    }

    /// [`WgpuBackend::new`] with explicit options.
    pub fn new_with(
        choice: AdapterChoice,
        name_substring: Option<&str>,
        options: GpuOptions,
    ) -> Result<Self> {
        let adapter = select_adapter(choice, name_substring).map_err(BitnetError::Gpu)?;
        Self::from_adapter_with(adapter, options)
    }

    /// Opens a device on `adapter` with the default options.
    pub fn from_adapter(adapter: wgpu::Adapter) -> Result<Self> {
        Self::from_adapter_with(adapter, GpuOptions::default())
    }

    /// Opens a device on `adapter` with the adapter's own limits (so large buffers and bindings
    /// are allowed up to what the hardware supports) and, where the adapter has it and
    /// `options.subgroups` allows, `Features::SUBGROUP`: the kernels' reductions then use
    /// subgroup operations, after a self-test of them on this device (see [`GpuOptions`]).
    pub fn from_adapter_with(adapter: wgpu::Adapter, options: GpuOptions) -> Result<Self> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let subgroups = options.subgroups && adapter.features().contains(wgpu::Features::SUBGROUP);
        let tiles = options.tiles.unwrap_or_else(|| {
            TileShapes::for_adapter(info.device_type, adapter::is_software(&info), &limits)
                .with_env(&limits)
        });
        if !tiles.fits(limits.max_compute_workgroup_storage_size) {
            return Err(gpu_err(format!(
                "tile sizes {tiles:?} do not fit {} ({} bytes of workgroup memory)",
                info.name, limits.max_compute_workgroup_storage_size
            )));
        }
        let required_features = if subgroups {
            wgpu::Features::SUBGROUP
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("bitnet"),
            required_features,
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        }))
        .map_err(|e| gpu_err(format!("cannot open a device on {}: {e}", info.name)))?;
        let lost = Arc::new(Mutex::new(None));
        let errors = Arc::new(Mutex::new(Vec::new()));
        {
            let lost = lost.clone();
            device.set_device_lost_callback(move |reason, msg| {
                *lost.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("{reason:?}: {msg}"));
            });
            let errors = errors.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e.to_string());
            }));
        }
        let mk = |label: &str, size: u64, usage: wgpu::BufferUsages| GpuBuf {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            buf: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            }),
        };
        let step_buf = mk(
            "step",
            16,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let rows_cap = 64;
        let rows_buf = mk(
            "step rows",
            rows_cap as u64 * 16,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        let logit_rows_cap = 64;
        let logit_rows_buf = mk(
            "logit rows",
            logit_rows_cap as u64 * 4,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        let storage = wgpu::BufferUsages::STORAGE;
        let dummy_r = mk("unused (read)", 16, storage);
        let dummy_rw = mk("unused (read-write)", 16, storage);
        let argmax_result = mk(
            "argmax result",
            16,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        );
        let mut backend = WgpuBackend {
            device,
            queue,
            info,
            limits,
            pipelines: PipelineCache::new(subgroups),
            subgroup_fallback: None,
            tiles,
            bind_groups: HashMap::new(),
            step_buf,
            rows_buf,
            rows_cap,
            tokens: Vec::new(),
            max_pos: 0,
            max_slot: 0,
            slot_runs: 0,
            logit_rows_buf,
            logit_rows_cap,
            logit_rows_host: Vec::new(),
            encoder: None,
            pass: None,
            uploads: UploadPool::default(),
            staging: None,
            rope_tables: HashMap::new(),
            argmax_partials: HashMap::new(),
            argmax_result,
            head_argmax: None,
            positions_hint: 0,
            max_chunk_bytes: tiles.head_chunk_bytes,
            upload_scratch: Vec::new(),
            attn_partials: HashMap::new(),
            counters: GpuCounters::default(),
            pending_norm: None,
            chain: Default::default(),
            sample_bufs: None,
            encode_start: None,
            dummy_r,
            dummy_rw,
            lost,
            errors,
        };
        if subgroups {
            if let Err(e) = backend.check_reductions() {
                // A driver whose subgroups break the library's contract: the workgroup kernels
                // are slower but right. Pipelines and bind groups are rebuilt without subgroups.
                backend.check_alive().ok(); // drop an error the failed check left behind
                backend.pipelines = PipelineCache::new(false);
                backend.subgroup_fallback = Some(e.to_string());
            }
            // The check is not part of any model's work (and a fallback's bind groups were made
            // with the old layouts).
            backend.bind_groups.clear();
            backend.counters = GpuCounters::default();
        }
        Ok(backend)
    }

    /// The kernels' tile sizes on this device.
    pub fn tiles(&self) -> TileShapes {
        self.tiles
    }

    /// Bytes of workgroup memory a kernel may use on this device.
    pub fn workgroup_memory(&self) -> u32 {
        self.limits.max_compute_workgroup_storage_size
    }

    /// Which reductions the kernels use: `"subgroup"` or `"workgroup"`.
    pub fn reductions(&self) -> &'static str {
        if self.pipelines.subgroups() {
            "subgroup"
        } else {
            "workgroup"
        }
    }

    /// Why the subgroup kernels were not used although the adapter has subgroups (their
    /// self-test failed on this device), if so.
    pub fn subgroup_fallback(&self) -> Option<&str> {
        self.subgroup_fallback.as_deref()
    }

    /// Runs shaders/reduce_check.wgsl with the reductions in use and compares every thread's
    /// results with the exact answers; the error names the first difference.
    #[doc(hidden)]
    pub fn check_reductions(&mut self) -> Result<()> {
        const N: usize = 256;
        let out = self.storage("reduction check", (3 * N * 16) as u64, None)?;
        self.record(&kernels::REDUCE_CHECK, &[], &[&out], [1, 1, 1])?;
        let bytes = self.download(&out, (3 * N * 16) as u64)?;
        let v: Vec<u32> = bytemuck::cast_slice(&bytes).to_vec();
        let fail = |what: &str, t: usize, got: u32, want: u32| {
            Err(gpu_err(format!(
                "the {} reductions' self-test failed: {what} of thread {t} is {got:#x}, expected {want:#x}",
                self.reductions()
            )))
        };
        let mut seen = [false; N];
        for t in 0..N {
            let r = &v[12 * t..12 * t + 12];
            let i = r[0] as usize;
            if i >= N || seen[i] {
                return fail("thread number", t, r[0], t as u32);
            }
            seen[i] = true;
            // the run of `lanes` threads that i belongs to: Σ of its thread numbers
            let run = |lanes: usize| (i / lanes * lanes..(i / lanes + 1) * lanes).sum::<usize>();
            // (what, valid in threads that are a multiple of, got, expected)
            let expect = [
                ("workgroup i32 sum", 1, r[1], 32640),
                ("workgroup f32 sum", 1, r[4], 510f32.to_bits()),
                ("workgroup f32 max", 1, r[5], 250f32.to_bits()),
                ("argmax value", 1, r[6], 63f32.to_bits()),
                ("argmax index", 1, r[7], 19),
                ("16-lane i32 sum", 16, r[2], run(16) as u32),
                ("32-lane f32 sum", 32, r[3], 112f32.to_bits()),
                ("4-lane i32 sum", 4, r[8], run(4) as u32),
                ("8-lane f32 sum", 8, r[9], (run(8) as f32).to_bits()),
                ("16-lane f32 max", 16, r[10], 15f32.to_bits()),
                ("4-lane f32 max", 4, r[11], ((i + 3) as f32).to_bits()),
            ];
            for (what, every, got, want) in expect {
                if i.is_multiple_of(every) && got != want {
                    return fail(what, i, got, want);
                }
            }
        }
        Ok(())
    }

    /// Pipelines compiled so far (a model compiles all of its pipelines in its first steps).
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.pipeline_count()
    }

    /// Buffers created for the per-step uploads (constant once warm).
    pub fn upload_buffer_count(&self) -> usize {
        self.uploads.created
    }

    /// Dispatches recorded so far (fused op chains count once).
    pub fn dispatch_count(&self) -> u64 {
        self.counters.dispatches
    }

    /// Steps, dispatches, submits, blocking waits and host encode time so far.
    pub fn counters(&self) -> GpuCounters {
        self.counters
    }

    /// A new command encoder (and the start of the host encode time it accounts for).
    pub(super) fn new_encoder(&mut self, label: &'static str) -> wgpu::CommandEncoder {
        self.encode_start.get_or_insert_with(Instant::now);
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// Bind groups created so far (constant once every op has run for each step size class).
    pub fn bind_group_count(&self) -> usize {
        self.bind_groups.len()
    }

    /// Compiles every kernel with its default constants (a quick check of the WGSL).
    #[doc(hidden)]
    pub fn compile_all(&mut self) -> Result<()> {
        for k in kernels::ALL {
            self.pipelines.pipeline(&self.device, k, &[])?;
        }
        Ok(())
    }

    /// Caps the bytes per float-matrix chunk below the device limit, to exercise the split
    /// (tests; takes effect at the next upload_embedding).
    #[doc(hidden)]
    pub fn set_max_chunk_bytes(&mut self, max: Option<u64>) {
        self.max_chunk_bytes = max;
    }

    /// Destroys the device as if the driver had lost it (tests of the fallback path).
    #[doc(hidden)]
    pub fn simulate_device_loss(&mut self) {
        self.pass = None;
        self.encoder = None;
        self.device.destroy();
    }

    pub(super) fn n(&self) -> usize {
        self.tokens.len()
    }

    /// The error wgpu reported since the last check, if any (device loss first).
    pub(super) fn check_alive(&self) -> Result<()> {
        if let Some(why) = self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(gpu_err(format!("device lost: {why}")));
        }
        let mut errs = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if !errs.is_empty() {
            let msg = errs.join("; ");
            errs.clear();
            return Err(gpu_err(msg));
        }
        Ok(())
    }

    /// A failed poll or map: device loss when the callback said so, else the wgpu message.
    pub(super) fn sync_error(&self, what: &str, e: impl std::fmt::Display) -> BitnetError {
        if let Err(lost) = self.check_alive() {
            return lost;
        }
        gpu_err(format!("device lost: {what} failed: {e}"))
    }

    pub(super) fn new_buffer(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
        contents: Option<&[u8]>,
    ) -> Result<GpuBuf> {
        // Bindings of size 0 are invalid and copies go in 4-byte units.
        let size = size.max(16).next_multiple_of(4);
        if size > self.limits.max_buffer_size {
            return Err(gpu_err(format!(
                "{label}: a {size}-byte buffer exceeds this adapter's max_buffer_size ({})",
                self.limits.max_buffer_size
            )));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: contents.is_some(),
        });
        if let Some(data) = contents {
            let mut view = buf
                .get_mapped_range_mut(..)
                .map_err(|e| gpu_err(format!("{label}: cannot map for upload: {e}")))?;
            view.slice(..data.len()).copy_from_slice(data);
            drop(view);
            buf.unmap();
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err(format!(
                "out of device memory allocating {label} ({} MiB): {e}",
                size >> 20
            )));
        }
        self.check_alive()?;
        Ok(GpuBuf {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            buf,
        })
    }

    pub(super) fn storage(
        &self,
        label: &str,
        size: u64,
        contents: Option<&[u8]>,
    ) -> Result<GpuBuf> {
        if size > self.limits.max_storage_buffer_binding_size {
            return Err(gpu_err(format!(
                "{label}: {size} bytes exceed this adapter's max_storage_buffer_binding_size ({})",
                self.limits.max_storage_buffer_binding_size
            )));
        }
        self.new_buffer(
            label,
            size,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            contents,
        )
    }

    pub(super) fn uniform(&self, label: &str, contents: &[u8]) -> Result<GpuBuf> {
        self.new_buffer(
            label,
            contents.len() as u64,
            wgpu::BufferUsages::UNIFORM,
            Some(contents),
        )
    }

    /// The open compute pass of the step (opened on demand).
    pub(super) fn pass(&mut self) -> &mut wgpu::ComputePass<'static> {
        if self.pass.is_none() {
            if self.encoder.is_none() {
                self.encoder = Some(self.new_encoder("bitnet step"));
            }
            let enc = self.encoder.as_mut().expect("just created");
            let pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("bitnet ops"),
                    timestamp_writes: None,
                })
                .forget_lifetime();
            self.pass = Some(pass);
        }
        self.pass.as_mut().expect("just opened")
    }

    /// Submits everything recorded so far (nothing if empty).
    pub(super) fn flush(&mut self) -> Result<()> {
        self.flush_pending()?;
        self.pass = None;
        if let Some(enc) = self.encoder.take() {
            let index = self.queue.submit([enc.finish()]);
            self.uploads.recycle();
            self.counters.submits += 1;
            self.chain_submitted(&index);
            if let Some(t0) = self.encode_start.take() {
                self.counters.encode_ns += t0.elapsed().as_nanos() as u64;
            }
        }
        self.check_alive()
    }

    pub(super) fn bind_group(&mut self, k: &'static Kernel, bufs: &[&GpuBuf]) -> wgpu::BindGroup {
        let mut ids = [0u64; MAX_BINDINGS];
        ids[0] = self.step_buf.id;
        for (slot, b) in ids[1..].iter_mut().zip(bufs) {
            *slot = b.id;
        }
        let key = (k.bindings, ids);
        if let Some(bg) = self.bind_groups.get(&key) {
            return bg.clone();
        }
        let layout = self.pipelines.bind_group_layout(&self.device, k);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: self.step_buf.buf.as_entire_binding(),
        }];
        for (i, b) in bufs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.buf.as_entire_binding(),
            });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(k.entry),
            layout: &layout,
            entries: &entries,
        });
        self.bind_groups.insert(key, bg.clone());
        bg
    }

    /// Records one dispatch of `k` over `groups` workgroups.
    pub(super) fn record(
        &mut self,
        k: &'static Kernel,
        constants: &[(&'static str, f64)],
        bufs: &[&GpuBuf],
        groups: [u32; 3],
    ) -> Result<()> {
        self.flush_pending()?;
        self.check_alive()?;
        assert_eq!(bufs.len() + 1, k.bindings.len(), "{}: bindings", k.entry);
        if groups.contains(&0) {
            return Ok(());
        }
        let max = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(gpu_err(format!(
                "{}: dispatch {groups:?} exceeds max_compute_workgroups_per_dimension {max}",
                k.entry
            )));
        }
        if let Some((logits, _, _)) = &self.head_argmax {
            // Another kernel writing the logits makes the head's argmax epilogue stale.
            let writes_logits = bufs
                .iter()
                .zip(&k.bindings[1..])
                .any(|(b, kind)| *kind == super::kernels::Bind::ReadWrite && b.id == *logits);
            if writes_logits && !std::ptr::eq(k, &super::kernels::LM_HEAD) {
                self.head_argmax = None;
            }
        }
        let pipeline = self.pipelines.pipeline(&self.device, k, constants)?;
        let bg = self.bind_group(k, bufs);
        let pass = self.pass();
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        self.counters.dispatches += 1;
        Ok(())
    }

    /// `count` workgroups of a 1-D kernel, folded onto 2-D when one dimension is not enough
    /// (the kernels recover the index with `linear_wg` and skip the excess).
    pub(super) fn grid(&self, count: usize) -> Result<[u32; 3]> {
        let max = self.limits.max_compute_workgroups_per_dimension as usize;
        if count <= max {
            return Ok([count as u32, 1, 1]);
        }
        let y = count.div_ceil(max);
        if y > max {
            return Err(gpu_err(format!(
                "{count} workgroups is too large a dispatch"
            )));
        }
        Ok([max as u32, y as u32, 1])
    }

    pub(super) fn check(&self, op: &'static str, t: &GpuTensor, cols: usize) -> Result<()> {
        crate::backend::check_tensor(op, t.capacity, t.cols, self.n(), cols)
    }

    /// Copies `bytes` bytes of `src` to the host (submits what is recorded, then waits).
    pub(super) fn download(&mut self, src: &GpuBuf, bytes: u64) -> Result<Vec<u8>> {
        self.flush_pending()?;
        self.pass = None;
        if bytes == 0 {
            self.flush()?;
            return Ok(Vec::new());
        }
        let need = bytes.next_multiple_of(4);
        if self.staging.as_ref().is_none_or(|s| s.size() < need) {
            let size = need.next_power_of_two().max(256);
            self.staging = Some(
                self.new_buffer(
                    "readback staging",
                    size,
                    wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    None,
                )?
                .buf,
            );
        }
        let staging = self.staging.clone().expect("just created");
        if self.encoder.is_none() {
            self.encoder = Some(self.new_encoder("bitnet read"));
        }
        let enc = self.encoder.as_mut().expect("just created");
        enc.copy_buffer_to_buffer(&src.buf, 0, &staging, 0, need);
        self.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging
            .slice(..need)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        self.counters.waits += 1;
        if let Err(e) = self.device.poll(wgpu::PollType::wait_indefinitely()) {
            return Err(self.sync_error("poll", e));
        }
        match rx.try_recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.sync_error("map", e)),
            Err(e) => return Err(self.sync_error("map", e)),
        }
        let out = {
            let view = staging
                .get_mapped_range(..need)
                .map_err(|e| self.sync_error("map range", e))?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        self.check_alive()?;
        Ok(out)
    }

    /// Uploads rows of f32 values into `t` (`data.len()` must be a multiple of `t.cols`): how a
    /// caller (or a test) puts its own activations on the device. Ordered after every op
    /// recorded before it.
    pub fn write(&mut self, t: &mut GpuTensor, data: &[f32]) -> Result<()> {
        if !data.len().is_multiple_of(t.cols.max(1)) || data.len() > t.capacity * t.cols {
            return Err(BitnetError::op(
                "write",
                format!(
                    "{} values do not fit [{}, {}]",
                    data.len(),
                    t.capacity,
                    t.cols
                ),
            ));
        }
        self.flush()?;
        if self.head_argmax.as_ref().is_some_and(|h| h.0 == t.buf.id) {
            self.head_argmax = None;
        }
        if !data.is_empty() {
            self.queue
                .write_buffer(&t.buf.buf, 0, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    /// Uploads int8 activations `q [rows, cols]` with their scales (test support: the matmul on
    /// exactly the CPU's inputs). Σq is computed here.
    #[doc(hidden)]
    pub fn write_q(&mut self, x: &mut GpuQTensor, q: &[i8], scales: &[f32]) -> Result<()> {
        let rows = scales.len();
        if q.len() != rows * x.cols || rows > x.capacity {
            return Err(BitnetError::op("write_q", "shape mismatch"));
        }
        self.flush()?;
        let words = layout::pack_q_rows(q, rows, x.cols);
        let mut meta = Vec::with_capacity(rows * 2);
        for (r, s) in scales.iter().enumerate() {
            let sum: i32 = q[r * x.cols..(r + 1) * x.cols]
                .iter()
                .map(|&v| v as i32)
                .sum();
            meta.push(s.to_bits());
            meta.push(sum as u32);
        }
        self.queue
            .write_buffer(&x.q.buf, 0, bytemuck::cast_slice(&words));
        self.queue
            .write_buffer(&x.meta.buf, 0, bytemuck::cast_slice(&meta));
        Ok(())
    }

    /// Reads back `rows` rows of int8 activations: (q `[rows, cols]`, scales, Σq).
    #[doc(hidden)]
    pub fn read_q(&mut self, x: &GpuQTensor, rows: usize) -> Result<(Vec<i8>, Vec<f32>, Vec<i32>)> {
        let qw = 4 * layout::groups(x.cols);
        let words: Vec<u32> =
            bytemuck::pod_collect_to_vec(&self.download(&x.q, (rows * qw * 4) as u64)?);
        let meta: Vec<u32> =
            bytemuck::pod_collect_to_vec(&self.download(&x.meta, (rows * 8) as u64)?);
        let q = layout::unpack_q_rows(&words, rows, x.cols);
        let scales = meta.chunks_exact(2).map(|m| f32::from_bits(m[0])).collect();
        let sums = meta.chunks_exact(2).map(|m| m[1] as i32).collect();
        Ok((q, scales, sums))
    }

    /// Starts a step over `rows` = (token, position, KV-cache slot): the Step uniform and the
    /// rows buffer are written once, through one reused upload buffer.
    pub(super) fn op_begin_rows(&mut self, rows: &[[u32; 3]]) -> Result<()> {
        self.flush()?;
        self.tokens.clear();
        self.tokens.extend(rows.iter().map(|r| r[0]));
        self.max_pos = rows.iter().map(|r| r[1] as usize).max().unwrap_or(0);
        self.max_slot = rows.iter().map(|r| r[2] as usize).max().unwrap_or(0);
        self.slot_runs = 1 + rows.windows(2).filter(|w| w[0][2] != w[1][2]).count();
        if rows.len() > self.rows_cap {
            // Grows at most a few times in a model's life (the largest prefill chunk).
            let cap = rows.len().next_power_of_two();
            self.rows_buf = self.new_buffer(
                "step rows",
                cap as u64 * 16,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                None,
            )?;
            self.rows_cap = cap;
        }
        self.counters.steps += 1;
        let mut enc = self.new_encoder("bitnet step");
        // Non-blocking: lets finished submissions return their upload buffers to the pool.
        let _ = self.device.poll(wgpu::PollType::Poll);
        let mut data = std::mem::take(&mut self.upload_scratch);
        data.clear();
        let start_pos = rows.first().map_or(0, |r| r[1]);
        data.extend_from_slice(&[rows.len() as u32, start_pos, 0, 0]);
        for r in rows {
            data.extend_from_slice(&[r[0], r[1], r[2], 0]);
        }
        let staged = self
            .uploads
            .stage(&self.device, bytemuck::cast_slice(&data));
        self.upload_scratch = data;
        let src = staged.map_err(|e| self.sync_error("upload", e))?;
        enc.copy_buffer_to_buffer(&src, 0, &self.step_buf.buf, 0, 16);
        if !rows.is_empty() {
            enc.copy_buffer_to_buffer(&src, 16, &self.rows_buf.buf, 0, rows.len() as u64 * 16);
        }
        self.encoder = Some(enc);
        Ok(())
    }

    pub(super) fn op_end_step(&mut self) -> Result<()> {
        self.flush()
    }

    pub(super) fn op_read(&mut self, t: &GpuTensor, rows: usize) -> Result<Vec<f32>> {
        if rows > t.capacity {
            return Err(BitnetError::op(
                "read",
                format!("{rows} rows of a [{}, {}] tensor", t.capacity, t.cols),
            ));
        }
        let bytes = self.download(&t.buf, (rows * t.cols * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    pub(super) fn op_alloc(&mut self, capacity: usize, cols: usize) -> Result<GpuTensor> {
        let bytes = (capacity as u64) * (cols as u64) * 4;
        Ok(GpuTensor {
            buf: self.storage("activations", bytes, None)?,
            capacity,
            cols,
        })
    }

    pub(super) fn op_alloc_q(&mut self, capacity: usize, cols: usize) -> Result<GpuQTensor> {
        let qw = 4 * layout::groups(cols) as u64;
        Ok(GpuQTensor {
            q: self.storage("int8 activations", capacity as u64 * qw * 4, None)?,
            meta: self.storage("int8 scales", capacity as u64 * 8, None)?,
            capacity,
            cols,
        })
    }

    pub(super) fn op_upload_vector(&mut self, v: &[f32]) -> Result<GpuVector> {
        Ok(GpuVector {
            buf: self.storage(
                "vector",
                (v.len() * 4) as u64,
                Some(bytemuck::cast_slice(v)),
            )?,
            len: v.len(),
        })
    }
}
