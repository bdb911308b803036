//! The distribution protocol by hand over blocking HTTP (`ureq`): auth, manifests,
//! blobs (ranged, resumed), uploads and mounts, with retries. One [`Client`] per registry host;
//! it is `Sync`, so layer downloads can share it across threads.
//! See: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md>

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use ureq::http::{self, Response};
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};
use ureq::{Body, SendBody};

use super::Options;
use super::auth::{self, Challenge, Credentials};
use super::store::{BlobStore, BlobWriter};
use crate::error::{Error, Result};

/// What a manifest GET asks for: every manifest and index type flatfs reads.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Tries of one request before its error stands (5xx, 429, a dropped connection).
const ATTEMPTS: u32 = 5;
/// Tries of a lazy mount's range request: a reader waits for it, so a registry that is away
/// gives EIO within seconds (the next read tries again) rather than after the full backoff.
const RANGE_ATTEMPTS: u32 = 3;
/// The longest a lazy mount's range request may take, answer and body, per try: a registry
/// that accepts and then goes silent gives EIO in well under a minute. Lower with a lower
/// `$FLATFS_REGISTRY_TIMEOUT`.
const RANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// [`RANGE_TIMEOUT`], or `$FLATFS_REGISTRY_TIMEOUT` seconds if that is less.
fn range_timeout() -> Duration {
    std::env::var("FLATFS_REGISTRY_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(RANGE_TIMEOUT, |s| Duration::from_secs(s).min(RANGE_TIMEOUT))
}

/// Resumes of one blob download after dropped connections.
const RESUMES: u32 = 8;
/// The longest wait between tries, whatever `Retry-After` says.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// A manifest or index as the registry served it.
#[derive(Debug)]
pub struct Manifest {
    /// The document's bytes, exactly as served (its digest is over these).
    pub bytes: Vec<u8>,
    /// The `Content-Type` it came with (or its own `mediaType`).
    pub media_type: String,
    /// `sha256:` of the bytes.
    pub digest: String,
}

/// A request body that can be sent again on a retry.
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    /// No body.
    Empty,
    /// Bytes in memory (a manifest).
    Bytes(&'a [u8]),
    /// A whole file (a layer), reopened on each try.
    File(&'a Path, u64),
}

/// A connection to one registry host, with its auth state.
pub struct Client {
    /// The host as in the reference (`docker.io`, `127.0.0.1:5000`): names it in errors and
    /// picks credentials.
    host: String,
    /// `https://HOST` or, with `--tls-verify=false` and no TLS there, `http://HOST`.
    base: RwLock<String>,
    /// True once the scheme is known: TLS is required, or the registry answered, or the first
    /// request tried the other scheme already.
    settled: AtomicBool,
    /// Set when HTTPS failed and plain HTTP is being tried: remembered once it answers.
    fell_back: AtomicBool,
    /// Set when a remembered plain HTTP failed and HTTPS is being tried: forgotten once it
    /// answers.
    moved: AtomicBool,
    /// Set when a request could not reach the registry at all (refused, no route, DNS) or got
    /// no answer in time: what a mount from what this host resolved before goes by.
    unreachable: AtomicBool,
    /// Where this cache dir remembers that the registry speaks plain HTTP (only with
    /// `--tls-verify=false` and a cache dir).
    plain_http: Option<PlainHttp>,
    /// The authority requests go to; Authorization is only ever sent there.
    authority: String,
    agent: ureq::Agent,
    opts: Options,
    challenge: Mutex<Option<Challenge>>,
    creds: OnceLock<Option<Credentials>>,
    /// Bearer tokens by scope set, with when they stop being good.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.base())
    }
}

/// A request as [`Client::send`] takes it.
struct Req<'a> {
    method: &'static str,
    url: String,
    /// Token scopes (`repository:NAME:pull`); empty for the ping.
    scopes: &'a [String],
    headers: Vec<(&'static str, String)>,
    body: Payload<'a>,
    /// For errors: "GET manifest team/app:1.0".
    what: &'a str,
    /// Tries before a dropped connection or a 5xx stands.
    attempts: u32,
}

impl Client {
    /// A client for `host`. Nothing is sent yet: the first request learns how the registry
    /// wants to be authenticated (its 401 and challenge, as containerd does) rather than a
    /// `/v2/` ping costing a round trip of its own. With `--tls-verify=false`, that first
    /// request also settles the scheme: HTTPS, or plain HTTP when HTTPS fails (remembered in
    /// the cache dir, so the next run goes to plain HTTP at once).
    pub fn connect(host: &str, opts: &Options) -> Result<Client> {
        // Docker Hub's API lives on another name than the one references use.
        let authority = if host == crate::reference::DOCKER_HUB {
            "registry-1.docker.io".to_string()
        } else {
            host.to_string()
        };
        let memory = opts
            .cache_dir
            .as_deref()
            .filter(|_| opts.insecure)
            .and_then(|d| PlainHttp::new(d, &authority));
        let http = memory.as_ref().is_some_and(|m| m.remembered);
        if http {
            log::debug!("{host}: answered on plain HTTP before; trying that first");
        }
        let scheme = if http { "http" } else { "https" };
        Ok(Client {
            host: host.to_string(),
            base: RwLock::new(format!("{scheme}://{authority}")),
            // Only --tls-verify=false lets the scheme change; with TLS required it is settled.
            settled: AtomicBool::new(!opts.insecure),
            fell_back: AtomicBool::new(false),
            moved: AtomicBool::new(false),
            unreachable: AtomicBool::new(false),
            plain_http: memory,
            authority,
            agent: agent(host, opts)?,
            opts: opts.clone(),
            challenge: Mutex::new(None),
            creds: OnceLock::new(),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// `https://AUTHORITY` or `http://AUTHORITY`: where requests go.
    fn base(&self) -> String {
        self.base.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first request's failure with the scheme not yet settled (`--tls-verify=false`):
    /// switches to the other scheme and returns the new base, or `None` if it switched once
    /// already. HTTPS that fails means plain HTTP; a remembered plain HTTP that fails means
    /// the registry may have moved to HTTPS (forgotten once HTTPS answers).
    fn switch_scheme(&self, why: &str) -> Option<String> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return None;
        }
        let mut base = self.base.write().unwrap_or_else(|e| e.into_inner());
        if base.starts_with("https://") {
            log::info!(
                "{}: HTTPS failed ({why}); trying plain HTTP (--tls-verify=false)",
                self.host
            );
            *base = format!("http://{}", self.authority);
            self.fell_back.store(true, Ordering::Relaxed);
        } else {
            log::info!(
                "{}: plain HTTP failed ({why}); trying HTTPS, and forgetting plain HTTP",
                self.host
            );
            self.moved.store(true, Ordering::Relaxed);
            *base = format!("https://{}", self.authority);
        }
        Some(base.clone())
    }

    /// An answer came: the scheme is settled; plain HTTP that answered after HTTPS failed is
    /// remembered, HTTPS that answered after a remembered plain HTTP failed replaces it.
    fn settle(&self) {
        self.settled.store(true, Ordering::Relaxed);
        let Some(m) = &self.plain_http else { return };
        if self.fell_back.swap(false, Ordering::Relaxed) {
            m.remember();
        }
        if self.moved.swap(false, Ordering::Relaxed) {
            m.forget();
        }
    }

    /// True once a request could not reach the registry (refused, DNS, no route) or got no
    /// answer in time.
    pub fn unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
    }

    /// The host as the reference names it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The error for a failed request, naming the host.
    pub fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::Registry {
            host: self.host.clone(),
            msg: msg.to_string(),
        }
    }

    /// GETs the manifest or index `reference` (a tag or a digest) of `repo`, checking it
    /// against the digest when the reference is one.
    pub fn manifest(&self, repo: &str, reference: &str) -> Result<Manifest> {
        self.manifest_within(repo, reference, None)
    }

    /// [`Client::manifest`] bounded as a span read is ([`RANGE_ATTEMPTS`] tries of
    /// [`range_timeout`]): for a mount that has what this host resolved before to go on from,
    /// so a registry that accepts and never answers holds it up for under a minute, not
    /// minutes. The first retry's warning says how long it keeps trying.
    pub fn manifest_or_give_up(&self, repo: &str, reference: &str) -> Result<Manifest> {
        let each = range_timeout();
        let pauses: Duration = (1..RANGE_ATTEMPTS).map(|t| backoff(t, None)).sum();
        let note = format!(
            " (trying {RANGE_ATTEMPTS} times, {} s each, about {} s in all, then mounting \
             from what this host resolved before)",
            each.as_secs(),
            (each * RANGE_ATTEMPTS + pauses).as_secs()
        );
        self.manifest_within(repo, reference, Some((each, &note)))
    }

    /// The manifest request, each try bounded by the timeout given (with the note its first
    /// retry warning carries), else as any request.
    fn manifest_within(
        &self,
        repo: &str,
        reference: &str,
        bound: Option<(Duration, &str)>,
    ) -> Result<Manifest> {
        // A digest names the same bytes forever: the store's copy (checked) serves.
        if let Some(m) = self.stored_manifest(reference) {
            log::debug!(
                "{}: manifest {repo}@{reference} from the blob store",
                self.host
            );
            return Ok(m);
        }
        let what = format!("GET manifest {repo}{}{reference}", sep(reference));
        let scopes = [pull_scope(repo)];
        let resp = self.send_timed(
            &Req {
                method: "GET",
                url: format!("{}/v2/{repo}/manifests/{reference}", self.base()),
                scopes: &scopes,
                headers: vec![("accept", MANIFEST_ACCEPT.to_string())],
                body: Payload::Empty,
                what: &what,
                attempts: if bound.is_some() {
                    RANGE_ATTEMPTS
                } else {
                    ATTEMPTS
                },
            },
            bound.map(|b| b.0),
            bound.map_or("", |b| b.1),
        )?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(self.status_error(&what, status, resp));
        }
        let content_type = header(&resp, "content-type").unwrap_or_default();
        let bytes = resp
            .into_body()
            .with_config()
            .limit(crate::source::MAX_JSON)
            .read_to_vec()
            .map_err(|e| self.error(format!("{what}: {}", transport(&e))))?;
        let digest = crate::blob::sha256_of(&bytes);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(Error::DigestMismatch {
                what: format!("{}: manifest {repo}@{reference}", self.host),
                expected: reference.to_string(),
                found: digest,
            });
        }
        // Some registries answer `text/plain` or nothing: the document says what it is.
        let media_type = match content_type.split(';').next().map(str::trim) {
            Some(t) if t.starts_with("application/vnd.") => t.to_string(),
            _ => serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
                .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_string()),
        };
        Ok(Manifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Manifest `digest` as the cache dir's blob store holds it, if it does (its bytes
    /// checked against the digest), with the media type it names itself.
    pub fn stored_manifest(&self, digest: &str) -> Option<Manifest> {
        let dir = self.opts.cache_dir.as_ref()?;
        let path = BlobStore::in_cache(dir).path(digest)?;
        let bytes = std::fs::read(path).ok()?;
        if crate::blob::sha256_of(&bytes) != digest {
            return None;
        }
        let doc = serde_json::from_slice::<serde_json::Value>(&bytes).ok()?;
        let media_type = match doc.get("mediaType").and_then(|m| m.as_str()) {
            Some(t) => t.to_string(),
            None if doc.get("manifests").is_some() => {
                "application/vnd.oci.image.index.v1+json".to_string()
            }
            None => "application/vnd.oci.image.manifest.v1+json".to_string(),
        };
        Some(Manifest {
            bytes,
            media_type,
            digest: digest.to_string(),
        })
    }

    /// Downloads blob `digest` of `repo` into `store` unless it is there already; every byte
    /// is hashed on the way in, and only a blob with the right digest and size enters the
    /// store.
    pub fn fetch_blob(
        &self,
        repo: &str,
        digest: &str,
        size: u64,
        store: &BlobStore,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<PathBuf> {
        if store.has(digest, size) {
            progress(size);
            return store
                .path(digest)
                .ok_or_else(|| self.error(format!("bad digest {digest}")));
        }
        let mut w = store
            .writer(digest)
            .map_err(|e| Error::io(store.root().display(), e))?;
        let done = std::cell::Cell::new(0);
        self.fetch_into(repo, digest, size, &mut w, &|written| {
            progress(written - done.get().min(written));
            done.set(written);
        })?;
        self.commit(w, repo, digest, store)
    }

    /// Checks a downloaded blob's digest and moves it into the store, flushed.
    pub fn commit(
        &self,
        w: BlobWriter,
        repo: &str,
        digest: &str,
        store: &BlobStore,
    ) -> Result<PathBuf> {
        w.commit().map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                self.error(format!("GET blob {repo}@{digest}: {e}"))
            } else {
                Error::io(store.root().display(), e)
            }
        })
    }

    /// Streams blob `digest` (`size` bytes) of `repo` into `w`, telling `written` how many
    /// bytes are in so far. A dropped connection resumes with a `Range` request where it
    /// stopped; bytes once written are never rewritten (a reader may have them already).
    pub fn fetch_into(
        &self,
        repo: &str,
        digest: &str,
        size: u64,
        w: &mut BlobWriter,
        written: &dyn Fn(u64),
    ) -> Result<()> {
        let what = format!("GET blob {repo}@{digest}");
        let scopes = [pull_scope(repo)];
        let mut buf = vec![0u8; 256 * 1024];
        let mut resumes = 0;
        loop {
            let from = w.written();
            let mut headers = Vec::new();
            if from > 0 {
                headers.push(("range", format!("bytes={from}-")));
            }
            let resp = self.send(&Req {
                method: "GET",
                url: format!("{}/v2/{repo}/blobs/{digest}", self.base()),
                scopes: &scopes,
                headers,
                body: Payload::Empty,
                what: &what,
                attempts: ATTEMPTS,
            })?;
            // Bytes of the answer that are already in the file (a server that ignores Range
            // sends the blob from the start again).
            let mut skip = match resp.status().as_u16() {
                200 => from,
                206 if content_range_start(&resp) == Some(from) => 0,
                206 => {
                    return Err(self.error(format!(
                        "{what}: asked for bytes {from}- and got {:?}",
                        header(&resp, "content-range")
                    )));
                }
                s => return Err(self.status_error(&what, s, resp)),
            };
            let mut body = resp.into_body().into_reader();
            let dropped = loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break Some(e),
                };
                let fresh = &buf[(skip.min(n as u64) as usize)..n];
                skip -= skip.min(n as u64);
                if w.written() + fresh.len() as u64 > size {
                    return Err(self.error(format!(
                        "{what}: the registry sends more than the {size} bytes the descriptor says"
                    )));
                }
                w.write_all(fresh).map_err(|e| Error::io(&what, e))?;
                written(w.written());
            };
            if w.written() == size {
                return Ok(());
            }
            resumes += 1;
            let why = dropped.map_or("connection closed early".to_string(), |e| e.to_string());
            if resumes > RESUMES {
                return Err(self.error(format!(
                    "{what}: gave up after {RESUMES} resumes at byte {} of {size}: {why}",
                    w.written()
                )));
            }
            log::warn!(
                "{}: {what}: {why} at byte {} of {size}; resuming",
                self.host,
                w.written()
            );
        }
    }

    /// Bytes `[start, end)` of blob `digest` of `repo`, by one `Range` request; from a
    /// registry that ignores the range (200), the answer is read only as far as `end`.
    /// Unverified: the caller checks them.
    pub fn fetch_range(&self, repo: &str, digest: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        let what = format!("GET blob {repo}@{digest} bytes {start}-{}", end - 1);
        let scopes = [pull_scope(repo)];
        // The request is retried by `send_timed`; an answer whose body stops short (the
        // connection dropped or went silent) is asked for again here, as many times.
        let mut tries = 0;
        loop {
            tries += 1;
            let resp = self.send_timed(
                &Req {
                    method: "GET",
                    url: format!("{}/v2/{repo}/blobs/{digest}", self.base()),
                    scopes: &scopes,
                    headers: vec![("range", format!("bytes={start}-{}", end - 1))],
                    body: Payload::Empty,
                    what: &what,
                    attempts: RANGE_ATTEMPTS,
                },
                Some(range_timeout()),
                "",
            )?;
            let skip = match resp.status().as_u16() {
                200 => start,
                206 if content_range_start(&resp) == Some(start) => 0,
                206 => {
                    return Err(
                        self.error(format!("{what}: got {:?}", header(&resp, "content-range")))
                    );
                }
                s => return Err(self.status_error(&what, s, resp)),
            };
            let mut body = resp.into_body().into_reader();
            let mut out = Vec::with_capacity((end - start) as usize);
            let read = io::copy(&mut (&mut body).take(skip), &mut io::sink())
                .and_then(|_| body.take(end - start).read_to_end(&mut out));
            let problem = match read {
                Err(e) => e.to_string(),
                Ok(_) if (out.len() as u64) < end - start => {
                    format!("the answer ended after {} bytes", out.len())
                }
                Ok(_) => return Ok(out),
            };
            if tries >= RANGE_ATTEMPTS {
                return Err(self.error(format!("{what}: {problem}")));
            }
            let wait = backoff(tries, None);
            log::warn!("{}: {what}: {problem}; retrying in {wait:.1?}", self.host());
            std::thread::sleep(wait);
        }
    }

    /// True when the registry has blob `digest` in `repo` (HEAD).
    pub fn has_blob(&self, repo: &str, digest: &str, scopes: &[String]) -> Result<bool> {
        let what = format!("HEAD blob {repo}@{digest}");
        let resp = self.send(&Req {
            method: "HEAD",
            url: format!("{}/v2/{repo}/blobs/{digest}", self.base()),
            scopes,
            headers: Vec::new(),
            body: Payload::Empty,
            what: &what,
            attempts: ATTEMPTS,
        })?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            s => Err(self.status_error(&what, s, resp)),
        }
    }

    /// Makes blob `digest` (the file `path`, `size` bytes) exist in `repo`: nothing if it is
    /// there, a cross-repository mount from `mount_from` (same registry) when the registry
    /// allows it, else an upload (POST, then one monolithic PUT; a registry that refuses that
    /// gets one PATCH and a closing PUT). Returns how it got there.
    pub fn push_blob(
        &self,
        repo: &str,
        digest: &str,
        path: &Path,
        size: u64,
        mount_from: Option<&str>,
    ) -> Result<Pushed> {
        let mut scopes = vec![push_scope(repo)];
        if let Some(from) = mount_from.filter(|f| *f != repo) {
            scopes.push(pull_scope(from));
        }
        if self.has_blob(repo, digest, &scopes)? {
            return Ok(Pushed::Present);
        }
        let what = format!("upload blob {repo}@{digest}");
        let mut tries = 0;
        loop {
            tries += 1;
            match self.upload(repo, digest, path, size, mount_from, &scopes, &what) {
                Ok(p) => return Ok(p),
                // Lost at the POST (auth, a registry that refuses): trying again changes nothing.
                Err((false, e)) => return Err(e),
                Err((true, e)) => {
                    // The answer may be what got lost, not the blob.
                    if self.has_blob(repo, digest, &scopes).unwrap_or(false) {
                        return Ok(Pushed::Uploaded);
                    }
                    if tries >= 3 {
                        return Err(e);
                    }
                    log::warn!("{e}; starting the upload again");
                }
            }
        }
    }

    /// One upload session: POST (or mount), then the bytes. An error says whether a new
    /// session might do better (`true` once the session exists).
    #[allow(clippy::too_many_arguments)]
    fn upload(
        &self,
        repo: &str,
        digest: &str,
        path: &Path,
        size: u64,
        mount_from: Option<&str>,
        scopes: &[String],
        what: &str,
    ) -> std::result::Result<Pushed, (bool, Error)> {
        let fatal = |e| (false, e);
        let again = |e| (true, e);
        let mut url = format!("{}/v2/{repo}/blobs/uploads/", self.base());
        if let Some(from) = mount_from.filter(|f| *f != repo) {
            url = format!("{url}?mount={digest}&from={from}");
        }
        let resp = self
            .send(&Req {
                method: "POST",
                url,
                scopes,
                headers: vec![("content-length", "0".to_string())],
                body: Payload::Empty,
                what,
                attempts: ATTEMPTS,
            })
            .map_err(fatal)?;
        let location = match resp.status().as_u16() {
            201 => return Ok(Pushed::Mounted),
            202 => self.location(&resp, what).map_err(fatal)?,
            s => return Err(fatal(self.status_error(what, s, resp))),
        };
        let put_url = format!("{location}{}digest={digest}", query_sep(&location));
        let resp = self
            .send(&Req {
                method: "PUT",
                url: put_url,
                scopes,
                headers: vec![
                    ("content-type", "application/octet-stream".to_string()),
                    ("content-length", size.to_string()),
                ],
                body: Payload::File(path, size),
                what,
                attempts: ATTEMPTS,
            })
            .map_err(again)?;
        match resp.status().as_u16() {
            201 => return Ok(Pushed::Uploaded),
            // Monolithic PUT refused: the chunked form, in one chunk.
            400 | 405 | 416 => log::info!("{what}: monolithic upload refused, trying PATCH"),
            s => return Err(again(self.status_error(what, s, resp))),
        }
        let resp = self
            .send(&Req {
                method: "POST",
                url: format!("{}/v2/{repo}/blobs/uploads/", self.base()),
                scopes,
                headers: vec![("content-length", "0".to_string())],
                body: Payload::Empty,
                what,
                attempts: ATTEMPTS,
            })
            .map_err(again)?;
        let location = match resp.status().as_u16() {
            202 => self.location(&resp, what).map_err(again)?,
            s => return Err(again(self.status_error(what, s, resp))),
        };
        let resp = self
            .send(&Req {
                method: "PATCH",
                url: location,
                scopes,
                headers: vec![
                    ("content-type", "application/octet-stream".to_string()),
                    ("content-length", size.to_string()),
                    ("content-range", format!("0-{}", size.saturating_sub(1))),
                ],
                body: Payload::File(path, size),
                what,
                attempts: ATTEMPTS,
            })
            .map_err(again)?;
        let location = match resp.status().as_u16() {
            202 => self.location(&resp, what).map_err(again)?,
            s => return Err(again(self.status_error(what, s, resp))),
        };
        let resp = self
            .send(&Req {
                method: "PUT",
                url: format!("{location}{}digest={digest}", query_sep(&location)),
                scopes,
                headers: vec![("content-length", "0".to_string())],
                body: Payload::Empty,
                what,
                attempts: ATTEMPTS,
            })
            .map_err(again)?;
        match resp.status().as_u16() {
            201 => Ok(Pushed::Uploaded),
            s => Err(again(self.status_error(what, s, resp))),
        }
    }

    /// PUTs a manifest or index under `reference` (a tag, or its digest); returns the digest
    /// the registry reports.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<String> {
        self.put_referrer(repo, reference, bytes, media_type)
            .map(|(digest, _)| digest)
    }

    /// PUTs a manifest that has a `subject` under `reference`; returns the digest the
    /// registry reports and whether it says (`OCI-Subject`) that it listed the manifest as a
    /// referrer of that subject, which only registries with the referrers API do.
    pub fn put_referrer(
        &self,
        repo: &str,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<(String, Option<String>)> {
        let what = format!("PUT manifest {repo}{}{reference}", sep(reference));
        let scopes = [push_scope(repo)];
        let resp = self.send(&Req {
            method: "PUT",
            url: format!("{}/v2/{repo}/manifests/{reference}", self.base()),
            scopes: &scopes,
            headers: vec![
                ("content-type", media_type.to_string()),
                ("content-length", bytes.len().to_string()),
            ],
            body: Payload::Bytes(bytes),
            what: &what,
            attempts: ATTEMPTS,
        })?;
        match resp.status().as_u16() {
            201 | 200 => Ok((
                header(&resp, "docker-content-digest")
                    .unwrap_or_else(|| crate::blob::sha256_of(bytes)),
                header(&resp, "oci-subject"),
            )),
            s => Err(self.status_error(&what, s, resp)),
        }
    }

    /// GETs `/v2/REPO/PATH` (a referrers list, a manifest by tag) asking for `accept`:
    /// `None` when the registry answers 404 (nothing there, or an endpoint it lacks), else
    /// the body (at most [`crate::source::MAX_JSON`] bytes) and its `Content-Type`.
    pub fn get_document(
        &self,
        repo: &str,
        path: &str,
        accept: &str,
        scopes: &[String],
    ) -> Result<Option<(Vec<u8>, String)>> {
        let what = format!("GET {repo}/{path}");
        let resp = self.send(&Req {
            method: "GET",
            url: format!("{}/v2/{repo}/{path}", self.base()),
            scopes,
            headers: vec![("accept", accept.to_string())],
            body: Payload::Empty,
            what: &what,
            attempts: ATTEMPTS,
        })?;
        match resp.status().as_u16() {
            200 => {
                let content_type = header(&resp, "content-type").unwrap_or_default();
                let bytes = resp
                    .into_body()
                    .with_config()
                    .limit(crate::source::MAX_JSON)
                    .read_to_vec()
                    .map_err(|e| self.error(format!("{what}: {}", transport(&e))))?;
                Ok(Some((bytes, content_type)))
            }
            404 => Ok(None),
            s => Err(self.status_error(&what, s, resp)),
        }
    }

    /// The `Location` of an upload session, made absolute.
    fn location(&self, resp: &Response<Body>, what: &str) -> Result<String> {
        let loc = header(resp, "location")
            .ok_or_else(|| self.error(format!("{what}: upload answer without a Location")))?;
        Ok(self.absolute(&loc))
    }

    /// A `Location` value made absolute against this registry.
    fn absolute(&self, loc: &str) -> String {
        if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else if loc.starts_with('/') {
            format!("{}{loc}", self.base())
        } else {
            format!("{}/{loc}", self.base())
        }
    }

    /// Sends a request: adds Authorization (for this registry's own authority only),
    /// answers an auth challenge once, follows redirects, and retries 5xx, 429 and dropped
    /// connections with bounded backoff (honouring `Retry-After`). Returns every other answer.
    fn send(&self, req: &Req) -> Result<Response<Body>> {
        self.send_timed(req, None, "")
    }

    /// [`Client::send`], each try (answer and body) bounded by `timeout` when given; `note`
    /// ends the first retry's warning.
    fn send_timed(
        &self,
        req: &Req,
        timeout: Option<Duration>,
        note: &str,
    ) -> Result<Response<Body>> {
        let mut url = req.url.clone();
        let mut tries = 0;
        let mut reauthed = false;
        let mut redirects = 0;
        loop {
            tries += 1;
            let base = self.base();
            let own = same_origin(&url, &base);
            let auth = if own && !req.scopes.is_empty() {
                self.authorization(req.scopes)?
            } else {
                None
            };
            log::debug!(
                "{} {url}{}",
                req.method,
                if auth.is_some() { " (authorized)" } else { "" }
            );
            let result = self.send_once(req, &url, auth.as_deref(), timeout);
            // The first request with --tls-verify=false: the other scheme on a failure.
            let other_scheme = |why: &str, url: &mut String| {
                let unsettled = own && !self.settled.load(Ordering::Relaxed);
                let to = unsettled.then(|| self.switch_scheme(why)).flatten()?;
                let path = url
                    .split_once("://")
                    .map_or("", |(_, r)| r.find(['/', '?']).map_or("", |i| &r[i..]));
                *url = format!("{to}{path}");
                Some(())
            };
            let resp = match result {
                Err(e) if other_scheme(&transport(&e), &mut url).is_some() => {
                    tries -= 1;
                    continue;
                }
                // A Go TLS server's answer to plain HTTP: a bare 400, no headers.
                Ok(r)
                    if r.status() == 400
                        && header(&r, "content-type").is_none()
                        && base.starts_with("http://")
                        && other_scheme("400 without a body type", &mut url).is_some() =>
                {
                    tries -= 1;
                    continue;
                }
                Ok(r) => {
                    if own {
                        self.settle();
                    }
                    r
                }
                Err(e) if tries < req.attempts && retryable(&e) => {
                    let wait = backoff(tries, None);
                    log::warn!(
                        "{}: {}: {}; retrying in {wait:.1?}{}",
                        self.host,
                        req.what,
                        transport(&e),
                        if tries == 1 { note } else { "" }
                    );
                    std::thread::sleep(wait);
                    continue;
                }
                Err(e) => {
                    // A registry that accepts and never answers is as away as one that
                    // refuses.
                    if cannot_connect(&e) || matches!(e, ureq::Error::Timeout(_)) {
                        self.unreachable.store(true, Ordering::Relaxed);
                    }
                    return Err(self.error(format!("{}: {}", req.what, transport(&e))));
                }
            };
            let status = resp.status().as_u16();
            match status {
                401 if own && !req.scopes.is_empty() && !reauthed => {
                    // An expired token, or the first request to a registry that only says
                    // what it wants now: take the challenge and try once more.
                    reauthed = true;
                    tries -= 1;
                    if let Some(ch) = challenge_of(&resp) {
                        *self.challenge.lock().unwrap_or_else(|e| e.into_inner()) = Some(ch);
                    }
                    self.tokens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&req.scopes.join(" "));
                    continue;
                }
                429 | 500 | 502 | 503 | 504 if tries < req.attempts => {
                    let wait = backoff(tries, header(&resp, "retry-after").as_deref());
                    log::warn!(
                        "{}: {}: {status}; retrying in {wait:.1?}{}",
                        self.host,
                        req.what,
                        if tries == 1 { note } else { "" }
                    );
                    std::thread::sleep(wait);
                    continue;
                }
                301 | 302 | 303 | 307 | 308 if matches!(req.method, "GET" | "HEAD") => {
                    redirects += 1;
                    let Some(loc) = header(&resp, "location") else {
                        return Ok(resp);
                    };
                    if redirects > 5 {
                        return Err(self.error(format!("{}: too many redirects", req.what)));
                    }
                    url = self.absolute(&loc);
                    log::debug!("redirected to {url}");
                    tries -= 1;
                    continue;
                }
                _ => return Ok(resp),
            }
        }
    }

    fn send_once(
        &self,
        req: &Req,
        url: &str,
        auth: Option<&str>,
        timeout: Option<Duration>,
    ) -> std::result::Result<Response<Body>, ureq::Error> {
        let builder = || {
            let mut b = http::Request::builder().method(req.method).uri(url);
            for (k, v) in &req.headers {
                b = b.header(*k, v);
            }
            if let Some(a) = auth {
                b = b.header("authorization", a);
            }
            b
        };
        let bad = |e: http::Error| ureq::Error::BadUri(format!("{url}: {e}"));
        match req.body {
            Payload::Empty if timeout.is_some() => {
                let r = builder().body(()).map_err(bad)?;
                let r = self
                    .agent
                    .configure_request(r)
                    .timeout_global(timeout)
                    .build();
                self.agent.run(r)
            }
            Payload::Empty => self.agent.run(builder().body(()).map_err(bad)?),
            Payload::Bytes(bytes) => self.agent.run(builder().body(bytes).map_err(bad)?),
            Payload::File(path, size) => {
                let file = File::open(path).map_err(ureq::Error::Io)?;
                let mut r = file.take(size);
                let body = SendBody::from_reader(&mut r);
                self.agent.run(builder().body(body).map_err(bad)?)
            }
        }
    }

    /// The Authorization header for a request with these scopes, if the registry wants one.
    fn authorization(&self, scopes: &[String]) -> Result<Option<String>> {
        let challenge = self
            .challenge
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials(scopes)?.map(|c| c.basic())),
            Some(Challenge::Bearer { realm, service }) => {
                let key = scopes.join(" ");
                if let Some((token, until)) = self
                    .tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&key)
                    && Instant::now() < *until
                {
                    return Ok(Some(format!("Bearer {token}")));
                }
                let (token, until) = self.fetch_token(&realm, service.as_deref(), scopes)?;
                self.tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, (token.clone(), until));
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// The user's credentials for this host (looked up once).
    fn credentials(&self, scopes: &[String]) -> Result<Option<Credentials>> {
        if let Some(c) = self.creds.get() {
            return Ok(c.clone());
        }
        let repo = scopes
            .first()
            .and_then(|s| s.strip_prefix("repository:"))
            .and_then(|s| s.rsplit_once(':'))
            .map_or("", |(r, _)| r);
        let c = auth::lookup(&self.host, repo, &self.opts)?;
        if c.is_none() {
            log::debug!("{}: no credentials found; anonymous", self.host);
        }
        Ok(self.creds.get_or_init(|| c).clone())
    }

    /// Asks the token service for a token for `scopes` (with the user's credentials, if any).
    /// See: <https://distribution.github.io/distribution/spec/auth/token/>
    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(String, Instant)> {
        let mut url = realm.to_string();
        let mut params = Vec::new();
        if let Some(s) = service {
            params.push(format!("service={}", query_escape(s)));
        }
        for s in scopes {
            params.push(format!("scope={}", query_escape(s)));
        }
        if !params.is_empty() {
            url = format!("{url}{}{}", query_sep(&url), params.join("&"));
        }
        let creds = self.credentials(scopes)?;
        let what = format!("token for {}", scopes.join(" "));
        log::debug!(
            "GET {url}{}",
            if creds.is_some() {
                " (with credentials)"
            } else {
                ""
            }
        );
        let request = || {
            let mut b = http::Request::builder().method("GET").uri(&url);
            if let Some(c) = &creds {
                // The registry named this realm as where its credentials go.
                b = b.header("authorization", c.basic());
            }
            b.body(())
        };
        let mut tries = 0;
        let resp = loop {
            tries += 1;
            let req =
                request().map_err(|e| self.error(format!("{what}: bad realm {realm:?}: {e}")))?;
            match self.agent.run(req) {
                Ok(r) if tries < ATTEMPTS && matches!(r.status().as_u16(), 429 | 500..=504) => {
                    std::thread::sleep(backoff(tries, header(&r, "retry-after").as_deref()));
                }
                Ok(r) => break r,
                Err(e) if tries < ATTEMPTS && retryable(&e) => {
                    std::thread::sleep(backoff(tries, None));
                }
                Err(e) => {
                    return Err(self.error(format!("{what} from {realm}: {}", transport(&e))));
                }
            }
        };
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(self.status_error(&what, status, resp));
        }
        #[derive(serde::Deserialize)]
        struct Reply {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = resp
            .into_body()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| self.error(format!("{what}: {}", transport(&e))))?;
        let reply: Reply = serde_json::from_slice(&body)
            .map_err(|e| self.error(format!("{what}: bad token reply: {e}")))?;
        let token = reply
            .token
            .or(reply.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.error(format!("{what}: token reply without a token")))?;
        // 60 s is the spec's default lifetime; renew a little early.
        Ok((token, token_until(Instant::now(), reply.expires_in)))
    }

    /// One line for a failed status: the registry's error code and message where it gives one.
    fn status_error(&self, what: &str, status: u16, resp: Response<Body>) -> Error {
        let body = resp
            .into_body()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        #[derive(serde::Deserialize)]
        struct Errors {
            errors: Vec<ErrorItem>,
        }
        #[derive(serde::Deserialize)]
        struct ErrorItem {
            code: Option<String>,
            message: Option<String>,
        }
        let detail = serde_json::from_str::<Errors>(&body)
            .ok()
            .and_then(|e| e.errors.into_iter().next())
            .map(|e| {
                let msg = e.message.unwrap_or_default();
                match e.code {
                    Some(c) if !c.is_empty() => format!("{msg} ({c})"),
                    _ => msg,
                }
            })
            .filter(|m| !m.is_empty());
        let reason = match status {
            401 => "unauthorized",
            403 => "denied",
            404 => "not found",
            429 => "too many requests",
            _ => http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or(""),
        };
        let mut detail = detail.map_or(String::new(), |d| format!(": {d}"));
        if status == 401 && matches!(self.creds.get(), Some(None) | None) {
            detail.push_str(" (no credentials found: --creds-file, --authfile or an auth file)");
        }
        self.error(format!("{what}: {status} {reason}{detail}"))
    }
}

/// This cache dir's memory that a registry answered on plain HTTP (`registries/AUTHORITY.http`,
/// empty): with `--tls-verify=false` the next run goes there at once instead of first failing
/// over HTTPS, a round trip each time. Never read when TLS is required.
#[derive(Debug)]
struct PlainHttp {
    path: PathBuf,
    /// The file was there when the client was made.
    remembered: bool,
}

impl PlainHttp {
    /// The memory for `authority` under `cache_dir`; `None` for a name that is no file name.
    fn new(cache_dir: &Path, authority: &str) -> Option<PlainHttp> {
        let ok = |b: u8| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b);
        if authority.is_empty() || authority.starts_with('.') || !authority.bytes().all(ok) {
            return None;
        }
        let path = cache_dir
            .join("registries")
            .join(format!("{authority}.http"));
        let remembered = path.is_file();
        Some(PlainHttp { path, remembered })
    }

    fn remember(&self) {
        if self.remembered {
            return;
        }
        let made = self
            .path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&self.path, b""));
        match made {
            Ok(()) => log::debug!("remembering plain HTTP in {}", self.path.display()),
            // Only a round trip is lost next time.
            Err(e) => log::debug!("cannot write {}: {e}", self.path.display()),
        }
    }

    fn forget(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => log::debug!("forgot plain HTTP: removed {}", self.path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove {}: {e}", self.path.display()),
        }
    }
}

/// How a blob got into the target repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The registry had it.
    Present,
    /// Mounted from the source repository.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// Builds the HTTP agent: no automatic redirects (we follow them, choosing which get
/// Authorization), statuses as answers, the system roots plus the host's private CAs.
fn agent(host: &str, opts: &Options) -> Result<ureq::Agent> {
    let timeout = std::env::var("FLATFS_REGISTRY_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs);
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(timeout))
        .user_agent(concat!("flatfs/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls_config(host, opts)?)
        .build();
    Ok(config.into())
}

/// System roots (`rustls-native-certs`), plus `*.crt` CAs and a `*.cert`/`*.key` client
/// certificate from `--cert-dir` or the host's `certs.d` directory. With `--tls-verify=false`
/// no root is loaded: nothing is verified against them, and reading every file of
/// `/etc/ssl/certs` took a few milliseconds of each run.
fn tls_config(host: &str, opts: &Options) -> Result<TlsConfig> {
    let mut roots: Vec<Certificate<'static>> = Vec::new();
    if !opts.insecure {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            log::debug!("system certificates: {e}");
        }
        roots.extend(
            native
                .certs
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned()),
        );
    }
    let mut client_cert = None;
    if let Some(dir) = cert_dir(host, opts) {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(dir.display(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        for path in &names {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext == "crt" {
                for cert in pem_items(path)?.into_iter().filter_map(|i| match i {
                    PemItem::Certificate(c) => Some(c),
                    _ => None,
                }) {
                    roots.push(cert);
                }
                log::debug!("{host}: CA from {}", path.display());
            } else if ext == "cert" {
                let key_path = path.with_extension("key");
                let chain: Vec<Certificate<'static>> = pem_items(path)?
                    .into_iter()
                    .filter_map(|i| match i {
                        PemItem::Certificate(c) => Some(c),
                        _ => None,
                    })
                    .collect();
                let key: Option<PrivateKey<'static>> =
                    pem_items(&key_path)?.into_iter().find_map(|i| match i {
                        PemItem::PrivateKey(k) => Some(k),
                        _ => None,
                    });
                let key = key.ok_or_else(|| {
                    Error::invalid(
                        key_path.display(),
                        "no private key for the client certificate",
                    )
                })?;
                client_cert = Some(ClientCert::new_with_certs(&chain, key));
                log::debug!("{host}: client certificate {}", path.display());
            }
        }
    }
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .client_cert(client_cert)
        .disable_verification(opts.insecure)
        .build())
}

/// `--cert-dir`, else the first of `/etc/containers/certs.d/HOST`, `/etc/docker/certs.d/HOST`
/// that exists.
fn cert_dir(host: &str, opts: &Options) -> Option<PathBuf> {
    if let Some(d) = &opts.cert_dir {
        return Some(d.clone());
    }
    ["/etc/containers/certs.d", "/etc/docker/certs.d"]
        .iter()
        .map(|d| Path::new(d).join(host))
        .find(|d| d.is_dir())
}

fn pem_items(path: &Path) -> Result<Vec<PemItem<'static>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path.display(), e))?;
    ureq::tls::parse_pem(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid(path.display(), format!("bad PEM: {e}")))
}

/// `repository:REPO:pull`.
pub fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

/// `repository:REPO:pull,push`.
pub fn push_scope(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

/// `@` before a digest, `:` before a tag.
fn sep(reference: &str) -> &'static str {
    if reference.contains(':') { "@" } else { ":" }
}

fn query_sep(url: &str) -> &'static str {
    if url.contains('?') { "&" } else { "?" }
}

/// Percent-encodes a query value (scopes hold `:` and `,`, which are fine, and may hold `/`).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'_'
            | b'.'
            | b'~'
            | b':'
            | b'/'
            | b',' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `host[:port]` of an absolute URL.
/// Whether `url` is on `base`'s origin: the same authority *and* scheme, so that a redirect
/// from https to http on the same host never carries the registry's credentials in clear.
fn same_origin(url: &str, base: &str) -> bool {
    let scheme = |u: &str| u.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    authority_of(url).is_some()
        && authority_of(url) == authority_of(base)
        && scheme(url) == scheme(base)
}

fn authority_of(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    Some(rest.split(['/', '?', '#']).next().unwrap_or(rest))
}

fn header(resp: &Response<Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn challenge_of(resp: &Response<Body>) -> Option<Challenge> {
    resp.headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(auth::parse_challenge)
        // Prefer a token flow when the registry offers both.
        .max_by_key(|c| matches!(c, Challenge::Bearer { .. }))
}

/// The first byte of a `Content-Range: bytes FIRST-LAST/TOTAL`.
fn content_range_start(resp: &Response<Body>) -> Option<u64> {
    let v = header(resp, "content-range")?;
    let v = v.trim().strip_prefix("bytes")?.trim();
    v.split('-').next()?.trim().parse().ok()
}

/// Transport failures that mean the registry was not reached at all.
fn cannot_connect(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
        ureq::Error::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
                | io::ErrorKind::AddrNotAvailable
        ),
        ureq::Error::Timeout(t) => matches!(t, ureq::Timeout::Connect | ureq::Timeout::Resolve),
        _ => false,
    }
}

/// Transport failures worth another try: the connection dropped or stalled. A refused
/// connection, a name that does not resolve and a TLS failure will be the same next time.
fn retryable(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Io(io) => !matches!(
            io.kind(),
            io::ErrorKind::ConnectionRefused | io::ErrorKind::InvalidData
        ),
        ureq::Error::Timeout(_) | ureq::Error::Protocol(_) => true,
        _ => false,
    }
}

/// One line for a transport failure, saying which kind (DNS, connect, TLS, …).
pub fn transport(e: &ureq::Error) -> String {
    match e {
        ureq::Error::HostNotFound => "DNS: host not found".to_string(),
        ureq::Error::ConnectionFailed => "cannot connect".to_string(),
        ureq::Error::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused => {
            format!("cannot connect: {io}")
        }
        // rustls reports handshake failures as InvalidData I/O errors.
        ureq::Error::Io(io) if io.kind() == io::ErrorKind::InvalidData => {
            let hint = if io.to_string().contains("InvalidContentType") {
                " (a plain HTTP registry? --tls-verify=false allows that)"
            } else {
                ""
            };
            format!("TLS: {io}{hint}")
        }
        ureq::Error::Tls(m) => format!("TLS: {m}"),
        ureq::Error::Rustls(e) => format!("TLS: {e}"),
        ureq::Error::Timeout(t) => timed_out(*t).to_string(),
        e => e.to_string(),
    }
}

/// Which phase a timeout hit, in words. ureq's `connect` phase includes the TLS handshake, so
/// a registry that accepts the TCP connection and then says nothing times out "in connect":
/// saying so sent a user looking at the network rather than at a hung registry.
fn timed_out(t: ureq::Timeout) -> &'static str {
    use ureq::Timeout as T;
    match t {
        T::Resolve => "timed out resolving the host name",
        T::Connect => "timed out opening the TCP/TLS session (no answer to it)",
        T::SendRequest | T::SendBody | T::PerWrite => "timed out sending the request",
        T::RecvBody => "timed out reading the answer's body",
        T::PerRead | T::RecvResponse => "timed out waiting for an answer",
        _ => "timed out: no whole answer within the request's time limit",
    }
}

/// How long to wait before try `tries + 1`: `Retry-After` seconds if given, else 0.5 s
/// doubling; never more than [`MAX_WAIT`].
/// When a token that the token service says lives `expires_in` seconds is no longer used: a
/// little early, and never later than a day, whatever the service claims (a huge value must
/// not overflow the clock).
fn token_until(now: Instant, expires_in: Option<u64>) -> Instant {
    let life = expires_in.unwrap_or(60).clamp(10, 24 * 3600);
    now + Duration::from_secs(life - life / 10)
}

fn backoff(tries: u32, retry_after: Option<&str>) -> Duration {
    if let Some(secs) = retry_after.and_then(|v| v.trim().parse::<u64>().ok()) {
        return Duration::from_secs(secs).min(MAX_WAIT);
    }
    (Duration::from_millis(500) * 2u32.saturating_pow(tries.saturating_sub(1))).min(MAX_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_only_to_the_same_scheme_and_authority() {
        let base = "https://reg.example:5000";
        assert!(same_origin("https://reg.example:5000/v2/a/blobs/x", base));
        assert!(!same_origin("http://reg.example:5000/v2/a/blobs/x", base));
        assert!(!same_origin("https://reg.example/v2/a/blobs/x", base));
        assert!(!same_origin("https://storage.example/x", base));
        assert!(!same_origin("ftp://reg.example:5000/x", base));
    }

    #[test]
    fn authority_is_host_and_port() {
        assert_eq!(
            authority_of("https://r.example:5000/v2/x"),
            Some("r.example:5000")
        );
        assert_eq!(authority_of("http://r.example?x"), Some("r.example"));
        assert_eq!(authority_of("/v2/x"), None);
    }

    #[test]
    fn backoff_is_bounded_and_honours_retry_after() {
        assert_eq!(backoff(1, None), Duration::from_millis(500));
        assert_eq!(backoff(3, None), Duration::from_secs(2));
        assert_eq!(backoff(30, None), MAX_WAIT);
        assert_eq!(backoff(1, Some("2")), Duration::from_secs(2));
        assert_eq!(backoff(1, Some("100000")), MAX_WAIT);
    }

    #[test]
    fn a_token_lives_a_bounded_time_whatever_the_service_says() {
        let now = Instant::now();
        assert_eq!(token_until(now, None), now + Duration::from_secs(54));
        assert_eq!(token_until(now, Some(0)), now + Duration::from_secs(9));
        assert_eq!(token_until(now, Some(300)), now + Duration::from_secs(270));
        for huge in [u64::MAX, u64::MAX / 2, 1 << 62] {
            assert!(token_until(now, Some(huge)) <= now + Duration::from_secs(24 * 3600));
        }
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(
            query_escape("repository:a/b:pull,push"),
            "repository:a/b:pull,push"
        );
        assert_eq!(query_escape("a b&c"), "a%20b%26c");
    }
}
