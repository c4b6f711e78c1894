//! `bitnet pull`: downloads a Hugging Face model repo into the standard Hugging Face cache, and
//! finds a cached repo again for `--model ORG/NAME`.
//!
//! Plain HTTPS (ureq) rather than the hf-hub crate: the download must resume a cut transfer
//! (HTTP Range from the bytes already on disk) and verify every file against the hub's checksum
//! (the LFS sha256, or the git blob sha1 of small files), and both are a few lines here.
//!
//! Hub file API used (`$HF_ENDPOINT`, default https://huggingface.co):
//! - `GET /api/models/{repo}/revision/{rev}?blobs=true` → `{"sha": commit, "siblings":
//!   [{"rfilename", "size", "blobId", "lfs": {"sha256", "size"}?}]}`
//! - `GET /{repo}/resolve/{commit}/{file}` (redirects followed), `Range: bytes=N-` to resume.
//!
//! Cache layout (huggingface_hub's): `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; in it `models--{org}--{name}/` with `blobs/{etag}` (etag = LFS
//! sha256 or git blob sha1), `snapshots/{commit}/{file}` → relative symlink to the blob, and
//! `refs/{revision}` holding the commit. A partial download is `blobs/{etag}.incomplete`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::Digest;

use crate::error::{BitnetError, Result};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Attempts per file when the connection is cut (each resumes where the last stopped).
const ATTEMPTS: usize = 5;

fn herr(msg: impl Into<String>) -> BitnetError {
    BitnetError::Hub(msg.into())
}

/// The hub cache root.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("HF_HOME") {
        return PathBuf::from(d).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// `org/name` → the repo's folder in the cache; None when `id` is not a repo id.
pub fn repo_folder(cache: &Path, id: &str) -> Option<PathBuf> {
    let (org, name) = id.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (ok(org) && ok(name)).then(|| cache.join(format!("models--{org}--{name}")))
}

#[derive(Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(rename = "blobId", default)]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// What `pull` did.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub commit: String,
    pub snapshot: PathBuf,
    /// Files of the snapshot, and whether each was downloaded now (false: already cached).
    pub files: Vec<(String, bool)>,
}

/// Shell-style match: `*` any run of characters, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn valid_rel_path(f: &str) -> bool {
    !f.is_empty()
        && !f.starts_with('/')
        && !f.contains('\\')
        && f.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Downloads `repo` at `revision` (files matching any of `include`, all when empty) into
/// `cache`, with a progress bar per file when `progress`.
pub fn pull(
    endpoint: Option<&str>,
    cache: &Path,
    repo: &str,
    revision: &str,
    include: &[String],
    progress: bool,
) -> Result<Pulled> {
    let folder = repo_folder(cache, repo)
        .ok_or_else(|| herr(format!("{repo:?} is not a repo id (expected ORG/NAME)")))?;
    let endpoint = endpoint
        .map(str::to_string)
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let endpoint = endpoint.trim_end_matches('/');
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(30))
        .timeout_read(std::time::Duration::from_secs(60))
        .build();
    let token = std::env::var("HF_TOKEN").ok();
    let get = |url: &str| {
        let r = agent.get(url);
        match &token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    };

    let url = format!("{endpoint}/api/models/{repo}/revision/{revision}?blobs=true");
    let info: RepoInfo = match get(&url).call() {
        Ok(r) => serde_json::from_reader(r.into_reader())
            .map_err(|e| herr(format!("{url}: unexpected answer: {e}")))?,
        Err(ureq::Error::Status(code, _)) => {
            return Err(herr(format!(
                "{url}: HTTP {code} (repo or revision not found, or it needs HF_TOKEN)"
            )))
        }
        Err(e) => return Err(herr(format!("{url}: {e}"))),
    };
    if info.sha.len() < 7 || !info.sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(herr(format!("{url}: commit {:?} is not a hash", info.sha)));
    }
    let snapshot = folder.join("snapshots").join(&info.sha);
    let blobs = folder.join("blobs");
    let io = |p: &Path, e| BitnetError::io(p, e);
    std::fs::create_dir_all(&blobs).map_err(|e| io(&blobs, e))?;
    let mut files = Vec::new();
    for s in &info.siblings {
        let f = &s.rfilename;
        if !include.is_empty() && !include.iter().any(|p| glob_match(p, f)) {
            continue;
        }
        if !valid_rel_path(f) {
            return Err(herr(format!("the hub lists an unsafe file name {f:?}")));
        }
        let (etag, size, check) = match (&s.lfs, &s.blob_id) {
            (Some(l), _) => (l.sha256.to_lowercase(), Some(l.size), Checksum::Sha256),
            (None, Some(b)) => (b.to_lowercase(), s.size, Checksum::GitSha1),
            (None, None) => return Err(herr(format!("{f}: the hub gave no checksum"))),
        };
        if etag.is_empty() || !etag.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(herr(format!("{f}: checksum {etag:?} is not hex")));
        }
        let blob = blobs.join(&etag);
        let fresh = !blob.is_file();
        if fresh {
            let url = format!("{endpoint}/{repo}/resolve/{}/{f}", info.sha);
            download(&get, &url, &blob, f, size, check, &etag, progress)?;
        }
        let link = snapshot.join(f);
        let parent = link.parent().expect("joined path");
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        let depth = f.matches('/').count();
        let target = PathBuf::from("../".repeat(depth + 2))
            .join("blobs")
            .join(&etag);
        let _ = std::fs::remove_file(&link);
        symlink_or_copy(&target, &blob, &link)?;
        files.push((f.clone(), fresh));
    }
    if files.is_empty() {
        return Err(herr(format!(
            "no file of {repo}@{revision} matches {include:?}"
        )));
    }
    let refs = folder.join("refs");
    std::fs::create_dir_all(&refs).map_err(|e| io(&refs, e))?;
    if revision != info.sha {
        let r = refs.join(revision);
        if let Some(p) = r.parent() {
            std::fs::create_dir_all(p).map_err(|e| io(p, e))?;
        }
        std::fs::write(&r, &info.sha).map_err(|e| io(&r, e))?;
    }
    Ok(Pulled {
        commit: info.sha,
        snapshot,
        files,
    })
}

#[cfg(unix)]
fn symlink_or_copy(target: &Path, _blob: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).map_err(|e| BitnetError::io(link, e))
}

#[cfg(not(unix))]
fn symlink_or_copy(_target: &Path, blob: &Path, link: &Path) -> Result<()> {
    // huggingface_hub also copies where symlinks are unavailable.
    std::fs::copy(blob, link)
        .map(|_| ())
        .map_err(|e| BitnetError::io(link, e))
}

#[derive(Clone, Copy)]
enum Checksum {
    Sha256,
    /// git's blob id: sha1("blob {len}\0" + content).
    GitSha1,
}

#[allow(clippy::too_many_arguments)]
fn download(
    get: &dyn Fn(&str) -> ureq::Request,
    url: &str,
    blob: &Path,
    name: &str,
    size: Option<u64>,
    check: Checksum,
    etag: &str,
    progress: bool,
) -> Result<()> {
    let part = blob.with_extension("incomplete");
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(size.unwrap_or(0));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        b.set_message(name.to_string());
        b
    });
    let mut last_err = String::new();
    for _ in 0..ATTEMPTS {
        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if size.is_some_and(|s| have >= s) {
            break;
        }
        if let Some(b) = &bar {
            b.set_position(have);
        }
        let req = get(url);
        let req = if have > 0 {
            req.set("Range", &format!("bytes={have}-"))
        } else {
            req
        };
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, _)) if have > 0 => break, // nothing left to send
            Err(ureq::Error::Status(code, _)) => {
                return Err(herr(format!("{url}: HTTP {code}")));
            }
            Err(e) => {
                last_err = e.to_string();
                continue;
            }
        };
        // 206: the rest from `have`; 200: the server ignored the range, start over.
        let append = resp.status() == 206 && have > 0;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&part)
            .map_err(|e| BitnetError::io(&part, e))?;
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut done = if append { have } else { 0 };
        let cut = loop {
            match reader.read(&mut buf) {
                Ok(0) => break false,
                Ok(n) => {
                    file.write_all(&buf[..n])
                        .map_err(|e| BitnetError::io(&part, e))?;
                    done += n as u64;
                    if let Some(b) = &bar {
                        b.set_position(done);
                    }
                }
                Err(e) => {
                    last_err = e.to_string();
                    break true;
                }
            }
        };
        file.flush().map_err(|e| BitnetError::io(&part, e))?;
        if !cut && size.is_none_or(|s| done >= s) {
            break;
        }
        if !cut {
            last_err = format!("connection closed after {done} bytes");
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let got = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if let Some(s) = size {
        if got != s {
            return Err(herr(format!(
                "{name}: got {got} of {s} bytes after {ATTEMPTS} attempts ({last_err}); run pull again to resume"
            )));
        }
    }
    let actual = file_checksum(&part, check)?;
    if actual != etag {
        let _ = std::fs::remove_file(&part);
        return Err(herr(format!(
            "{name}: checksum mismatch (expected {etag}, got {actual}); the partial file was removed"
        )));
    }
    std::fs::rename(&part, blob).map_err(|e| BitnetError::io(blob, e))
}

fn file_checksum(path: &Path, check: Checksum) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| BitnetError::io(path, e))?;
    let len = f.metadata().map_err(|e| BitnetError::io(path, e))?.len();
    let mut buf = vec![0u8; 1 << 20];
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    macro_rules! hash {
        ($h:expr) => {{
            let mut h = $h;
            loop {
                let n = f.read(&mut buf).map_err(|e| BitnetError::io(path, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            hex(&h.finalize())
        }};
    }
    Ok(match check {
        Checksum::Sha256 => hash!(sha2::Sha256::new()),
        Checksum::GitSha1 => {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {len}\0").as_bytes());
            hash!(h)
        }
    })
}

/// `--model ORG/NAME[:FILE]` → a path in the cache: the snapshot of `refs/main` (or the only
/// snapshot), or FILE in it; a snapshot without config.json but with one `.gguf` file resolves
/// to that file. None when `id` is not a cached repo.
pub fn resolve_cached(cache: &Path, id: &str) -> Option<PathBuf> {
    let (repo, file) = match id.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (id, None),
    };
    let folder = repo_folder(cache, repo)?;
    let snapshots = folder.join("snapshots");
    let commit = std::fs::read_to_string(folder.join("refs").join("main"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|c| snapshots.join(c).is_dir())
        .or_else(|| {
            let mut all: Vec<_> = std::fs::read_dir(&snapshots)
                .ok()?
                .filter_map(|e| e.ok())
                .collect();
            (all.len() == 1).then(|| all.remove(0).file_name().to_string_lossy().into_owned())
        })?;
    let snap = snapshots.join(commit);
    if let Some(f) = file {
        return valid_rel_path(f)
            .then(|| snap.join(f))
            .filter(|p| p.exists());
    }
    if snap.join("config.json").is_file() {
        return Some(snap);
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(&snap)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Some(one.clone()),
        _ => Some(snap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*.gguf", "ggml-model-i2_s.gguf"));
        assert!(glob_match("*i2_s*", "ggml-model-i2_s.gguf"));
        assert!(!glob_match("*.json", "model.safetensors"));
        assert!(glob_match("config.json", "config.json"));
        assert!(glob_match("tok?nizer.*", "tokenizer.json"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "acbd"));
    }

    #[test]
    fn repo_ids_and_paths() {
        let c = Path::new("/c");
        assert_eq!(
            repo_folder(c, "microsoft/bitnet-b1.58-2B-4T"),
            Some(PathBuf::from("/c/models--microsoft--bitnet-b1.58-2B-4T"))
        );
        assert_eq!(repo_folder(c, "../x"), None);
        assert_eq!(repo_folder(c, "a/b/c"), None);
        assert_eq!(repo_folder(c, "nope"), None);
        assert!(valid_rel_path("a/b.json"));
        assert!(!valid_rel_path("../etc/passwd"));
        assert!(!valid_rel_path("/abs"));
        assert!(!valid_rel_path("a//b"));
    }
}
