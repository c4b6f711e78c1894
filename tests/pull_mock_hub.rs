//! `bitnet_wgpu::pull` against a local mock of the hub's file API on 127.0.0.1: the standard
//! cache layout, resume after a cut connection, a checksum mismatch is an error, `--include`,
//! and resolving a cached repo id.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bitnet_wgpu::pull::{pull, resolve_cached};
use sha2::Digest;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct File {
    body: Vec<u8>,
    /// LFS files carry a sha256; small files a git blob sha1.
    lfs: bool,
    /// Advertised checksum (a wrong one tests the mismatch error).
    checksum: String,
}

struct Hub {
    files: Vec<(String, File)>,
    /// Cut the first GET of this file after this many bytes.
    cut: Option<(String, usize)>,
    cuts_done: AtomicUsize,
    log: Mutex<Vec<String>>,
}

fn sha256_hex(b: &[u8]) -> String {
    hex(&sha2::Sha256::digest(b))
}

fn git_sha1_hex(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex(&h.finalize())
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

impl Hub {
    fn file(name: &str, body: Vec<u8>, lfs: bool) -> (String, File) {
        let checksum = if lfs {
            sha256_hex(&body)
        } else {
            git_sha1_hex(&body)
        };
        (
            name.to_string(),
            File {
                body,
                lfs,
                checksum,
            },
        )
    }

    fn info(&self) -> String {
        let siblings: Vec<_> = self
            .files
            .iter()
            .map(|(n, f)| {
                if f.lfs {
                    serde_json::json!({"rfilename": n, "size": f.body.len(), "blobId": "00",
                        "lfs": {"sha256": f.checksum, "size": f.body.len()}})
                } else {
                    serde_json::json!({"rfilename": n, "size": f.body.len(), "blobId": f.checksum})
                }
            })
            .collect();
        serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string()
    }

    fn handle(&self, mut s: TcpStream) {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        if r.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_lowercase(), v.trim().to_string());
            }
        }
        let range = headers.get("range").cloned();
        self.log.lock().unwrap().push(format!("{path} {range:?}"));
        let reply = |s: &mut TcpStream, code: &str, body: &[u8], extra: &str| {
            let _ = write!(
                s,
                "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
                body.len()
            );
            let _ = s.write_all(body);
        };
        if path == "/api/models/org/tiny/revision/main?blobs=true" {
            return reply(
                &mut s,
                "200 OK",
                self.info().as_bytes(),
                "Content-Type: application/json\r\n",
            );
        }
        let prefix = format!("/org/tiny/resolve/{COMMIT}/");
        let Some(name) = path.strip_prefix(&prefix) else {
            return reply(&mut s, "404 Not Found", b"", "");
        };
        let Some((_, f)) = self.files.iter().find(|(n, _)| n == name) else {
            return reply(&mut s, "404 Not Found", b"", "");
        };
        let start = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        let body = &f.body[start.min(f.body.len())..];
        if let Some((cut_name, after)) = &self.cut {
            if cut_name == name && self.cuts_done.fetch_add(1, Ordering::SeqCst) == 0 {
                // Promise the whole body, send part of it, hang up.
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(&body[..*after]);
                let _ = s.flush();
                let _ = s.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        if start > 0 {
            let extra = format!(
                "Content-Range: bytes {start}-{}/{}\r\n",
                f.body.len() - 1,
                f.body.len()
            );
            reply(&mut s, "206 Partial Content", body, &extra)
        } else {
            reply(&mut s, "200 OK", body, "")
        }
    }
}

fn serve(hub: Hub) -> (String, Arc<Hub>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let hub = Arc::new(hub);
    let h = Arc::clone(&hub);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let h = Arc::clone(&h);
            std::thread::spawn(move || h.handle(s));
        }
    });
    (url, hub)
}

fn files() -> Vec<(String, File)> {
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    vec![
        Hub::file("config.json", b"{\"a\": 1}\n".to_vec(), false),
        Hub::file("model-i2_s.gguf", weights, true),
        Hub::file("sub/readme.txt", b"hello".to_vec(), false),
    ]
}

#[test]
fn pulls_into_the_standard_cache_layout_resuming_a_cut_download() {
    let (url, hub) = serve(Hub {
        files: files(),
        cut: Some(("model-i2_s.gguf".into(), 100_000)),
        cuts_done: AtomicUsize::new(0),
        log: Mutex::new(Vec::new()),
    });
    let cache = tempfile::tempdir().unwrap();
    let p = pull(Some(&url), cache.path(), "org/tiny", "main", &[], false).unwrap();
    assert_eq!(p.commit, COMMIT);
    let repo = cache.path().join("models--org--tiny");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    for (name, f) in &hub.files {
        let link = repo.join("snapshots").join(COMMIT).join(name);
        assert!(
            link.symlink_metadata().unwrap().file_type().is_symlink(),
            "{name}"
        );
        assert_eq!(std::fs::read(&link).unwrap(), f.body, "{name}");
        let blob = repo.join("blobs").join(&f.checksum);
        assert_eq!(
            std::fs::canonicalize(&link).unwrap(),
            std::fs::canonicalize(&blob).unwrap()
        );
    }
    // The cut download was resumed with a Range request from the bytes already on disk.
    let log = hub.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l.contains("model-i2_s.gguf") && l.contains("bytes=100000-")),
        "{log:?}"
    );
    assert_eq!(
        std::fs::read_dir(repo.join("blobs")).unwrap().count(),
        3,
        "no .incomplete left"
    );

    // Pulling again downloads nothing; the cached id resolves to the snapshot folder (it has a
    // config.json), or to one file of it.
    let again = pull(Some(&url), cache.path(), "org/tiny", "main", &[], false).unwrap();
    assert!(again.files.iter().all(|(_, fresh)| !fresh));
    let snap = repo.join("snapshots").join(COMMIT);
    assert_eq!(resolve_cached(cache.path(), "org/tiny"), Some(snap.clone()));
    assert_eq!(
        resolve_cached(cache.path(), "org/tiny:model-i2_s.gguf"),
        Some(snap.join("model-i2_s.gguf"))
    );
    assert_eq!(resolve_cached(cache.path(), "org/other"), None);
}

#[test]
fn include_patterns_and_a_gguf_only_snapshot() {
    let (url, _hub) = serve(Hub {
        files: files(),
        cut: None,
        cuts_done: AtomicUsize::new(0),
        log: Mutex::new(Vec::new()),
    });
    let cache = tempfile::tempdir().unwrap();
    let p = pull(
        Some(&url),
        cache.path(),
        "org/tiny",
        "main",
        &["*.gguf".into()],
        false,
    )
    .unwrap();
    assert_eq!(p.files, vec![("model-i2_s.gguf".to_string(), true)]);
    let snap = cache
        .path()
        .join("models--org--tiny/snapshots")
        .join(COMMIT);
    assert_eq!(
        resolve_cached(cache.path(), "org/tiny"),
        Some(snap.join("model-i2_s.gguf"))
    );
    let err = pull(
        Some(&url),
        cache.path(),
        "org/tiny",
        "main",
        &["*.bin".into()],
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no file"), "{err}");
}

#[test]
fn checksum_mismatch_is_an_error() {
    let mut f = files();
    f[1].1.checksum = sha256_hex(b"something else");
    let (url, _hub) = serve(Hub {
        files: f,
        cut: None,
        cuts_done: AtomicUsize::new(0),
        log: Mutex::new(Vec::new()),
    });
    let cache = tempfile::tempdir().unwrap();
    let err = pull(Some(&url), cache.path(), "org/tiny", "main", &[], false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checksum mismatch") && err.contains("model-i2_s.gguf"),
        "{err}"
    );
    // Nothing corrupt is left in the cache under the expected name.
    let blobs = cache.path().join("models--org--tiny/blobs");
    assert!(std::fs::read_dir(blobs)
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().ends_with("incomplete")));
}

#[test]
fn unknown_repo_is_a_clear_error() {
    let (url, _hub) = serve(Hub {
        files: files(),
        cut: None,
        cuts_done: AtomicUsize::new(0),
        log: Mutex::new(Vec::new()),
    });
    let cache = tempfile::tempdir().unwrap();
    let err = pull(Some(&url), cache.path(), "org/tiny", "v9", &[], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("HTTP 404"), "{err}");
}
