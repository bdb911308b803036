//! Real components for the registry tests: a `docker-registry` (distribution 2.8) on
//! 127.0.0.1 with its own config and storage in a temp dir (optionally htpasswd basic auth
//! over TLS with a CA made here), `skopeo copy` to fill it, and a fault-injecting HTTP proxy
//! in front of it. Everything stops when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub use crate::util::have;

/// True when the registry tests can run; otherwise says why (a failure under
/// `FLATFS_REQUIRE_TOOLS=1`, as in CI).
pub fn registry_tools(extra: &[&str]) {
    let missing: Vec<&str> = ["docker-registry", "skopeo"]
        .iter()
        .chain(extra)
        .copied()
        .filter(|c| !have(c))
        .collect();
    // scripts/test.sh installs them: a test that cannot run fails rather than pass unchecked.
    assert!(
        missing.is_empty(),
        "registry test needs: {} (scripts/test.sh installs them)",
        missing.join(", ")
    );
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "docker-registry exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("docker-registry did not listen on {port} within 20 s");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Basic auth and TLS for a registry instance.
pub struct Secured {
    /// The user the htpasswd file knows.
    pub user: String,
    /// Their password.
    pub password: String,
    /// A directory with `ca.crt`: what `--cert-dir` is given.
    pub cert_dir: PathBuf,
}

/// A running `docker-registry serve`; killed on drop.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// Present for the htpasswd + TLS instance.
    pub secured: Option<Secured>,
    _dir: TempDir,
}

impl Registry {
    /// A plain-HTTP registry with filesystem storage.
    pub fn start() -> Registry {
        Self::start_with(false)
    }

    /// A registry that wants basic auth (htpasswd, bcrypt) over TLS with a certificate from
    /// a CA made for it; distribution allows htpasswd only over TLS.
    pub fn start_secured() -> Registry {
        Self::start_with(true)
    }

    fn start_with(secured: bool) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
            dir.path().join("storage").display()
        );
        let secured = secured.then(|| {
            let certs = dir.path().join("certs");
            std::fs::create_dir_all(&certs).expect("certs dir");
            make_certs(&certs);
            let user = "tester".to_string();
            let password = "s3cret-pw".to_string();
            let htpasswd = dir.path().join("htpasswd");
            run(Command::new("htpasswd")
                .arg("-Bbc")
                .arg(&htpasswd)
                .arg(&user)
                .arg(&password));
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: flatfs-test\n    path: {}\n",
                certs.join("server.crt").display(),
                certs.join("server.key").display(),
                htpasswd.display()
            ));
            let cert_dir = dir.path().join("cert-dir");
            std::fs::create_dir_all(&cert_dir).expect("cert dir");
            std::fs::copy(certs.join("ca.crt"), cert_dir.join("ca.crt")).expect("copy ca");
            Secured {
                user,
                password,
                cert_dir,
            }
        });
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write config");
        let log = dir.path().join("registry.log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(std::fs::File::create(dir.path().join("registry.err")).expect("log"))
            .spawn()
            .expect("start docker-registry");
        wait_for_port(port, &mut child, &log);
        Registry {
            child,
            host,
            secured,
            _dir: dir,
        }
    }

    /// `docker://HOST/REPO:TAG`.
    pub fn url(&self, repo_tag: &str) -> String {
        format!("docker://{}/{repo_tag}", self.host)
    }

    /// Copies an image into the registry with skopeo (`--all` keeps an index whole).
    pub fn push(&self, source: &str, repo_tag: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "-q", "--all", "--dest-tls-verify=false"]);
        if let Some(s) = &self.secured {
            cmd.arg(format!("--dest-creds={}:{}", s.user, s.password));
        }
        cmd.arg(source).arg(self.url(repo_tag));
        run(&mut cmd);
    }

    /// Copies an image out of the registry with skopeo into an OCI layout `DIR:latest`.
    pub fn pull_layout(&self, repo_tag: &str, dir: &Path) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "-q", "--src-tls-verify=false"]);
        if let Some(s) = &self.secured {
            cmd.arg(format!("--src-creds={}:{}", s.user, s.password));
        }
        cmd.arg(self.url(repo_tag))
            .arg(format!("oci:{}:latest", dir.display()));
        run(&mut cmd);
    }

    /// The tags of `repo`, as skopeo lists them (empty when the repo does not exist).
    pub fn tags(&self, repo: &str) -> Vec<String> {
        let out = Command::new("skopeo")
            .args(["list-tags", "--tls-verify=false"])
            .arg(self.url(repo))
            .output()
            .expect("run skopeo");
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            // Only "no such repository" means no tags; anything else must not pass for it.
            assert!(err.contains("404"), "skopeo list-tags failed: {err}");
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["Tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Puts blobs and then documents into `repo` by hand (plain HTTP, no auth): what skopeo
    /// will not push, like nested indexes. `docs` are `(reference, media type, bytes)`, put in
    /// order, so children go before the indexes naming them.
    pub fn put_raw(&self, repo: &str, blobs: &[Vec<u8>], docs: &[(String, String, Vec<u8>)]) {
        for blob in blobs {
            let digest = format!("sha256:{}", sha256_hex(blob));
            let (status, location, _) = http(
                &self.host,
                "POST",
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                &[],
            );
            assert_eq!(status, 202, "POST upload");
            let loc = location.expect("Location");
            let path = loc
                .trim_start_matches(&format!("http://{}", self.host))
                .to_string();
            let sep = if path.contains('?') { '&' } else { '?' };
            let (status, _, body) = http(
                &self.host,
                "PUT",
                &format!("{path}{sep}digest={digest}"),
                &[("Content-Type", "application/octet-stream")],
                blob,
            );
            assert_eq!(status, 201, "PUT blob: {}", String::from_utf8_lossy(&body));
        }
        for (reference, media_type, bytes) in docs {
            let (status, _, body) = http(
                &self.host,
                "PUT",
                &format!("/v2/{repo}/manifests/{reference}"),
                &[("Content-Type", media_type)],
                bytes,
            );
            assert_eq!(
                status,
                201,
                "PUT manifest {reference}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    crate::util::sha256_hex(bytes)
}

/// One plain HTTP/1.1 request; returns status, `Location` and body.
pub fn http(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Option<String>, Vec<u8>) {
    let mut s = TcpStream::connect(host).expect("connect");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(head.as_bytes()).expect("send");
    s.write_all(body).expect("send body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read answer");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let location = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("location")
            .then(|| v.trim().to_string())
    });
    (status, location, raw[split..].to_vec())
}

/// A CA and a server certificate for 127.0.0.1 signed by it (rustls refuses a CA
/// certificate as a server's own, so a bare `req -x509` would not do).
fn make_certs(dir: &Path) {
    let p = |n: &str| dir.join(n);
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=flatfs test CA"])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.crt")));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.crt"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("server.crt")));
}

/// What the proxy does to requests whose path contains `path`, for the next `times` of them.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status (with `Retry-After` if given) instead of forwarding.
    Status {
        path: String,
        status: u16,
        retry_after: Option<u32>,
        times: usize,
    },
    /// Forward, but close the connection after this many body bytes.
    Drop {
        path: String,
        after: usize,
        times: usize,
    },
    /// Forward, with one body byte flipped.
    Corrupt { path: String, times: usize },
    /// Close the connection without an answer; the request never reaches the registry.
    Refuse { path: String, times: usize },
    /// Forward, then close without an answer: the registry did it, the client never hears.
    Lose { path: String, times: usize },
    /// Forward without the `Range` header: a registry that ignores ranges (200, whole blob).
    IgnoreRange { path: String, times: usize },
    /// Forward, send this many body bytes, then go silent for `secs` before closing.
    Stall {
        path: String,
        after: usize,
        secs: u64,
        times: usize,
    },
}

impl Fault {
    fn path(&self) -> &str {
        match self {
            Fault::Status { path, .. }
            | Fault::Drop { path, .. }
            | Fault::Corrupt { path, .. }
            | Fault::Refuse { path, .. }
            | Fault::Lose { path, .. }
            | Fault::IgnoreRange { path, .. }
            | Fault::Stall { path, .. } => path,
        }
    }

    fn left(&self) -> usize {
        match self {
            Fault::Status { times, .. }
            | Fault::Drop { times, .. }
            | Fault::Corrupt { times, .. }
            | Fault::Refuse { times, .. }
            | Fault::Lose { times, .. }
            | Fault::IgnoreRange { times, .. }
            | Fault::Stall { times, .. } => *times,
        }
    }

    fn times(&mut self) -> &mut usize {
        match self {
            Fault::Status { times, .. }
            | Fault::Drop { times, .. }
            | Fault::Corrupt { times, .. }
            | Fault::Refuse { times, .. }
            | Fault::Lose { times, .. }
            | Fault::IgnoreRange { times, .. }
            | Fault::Stall { times, .. } => times,
        }
    }
}

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `GET`, `PUT`, …
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Every header line, as sent.
    pub headers: Vec<String>,
}

impl Seen {
    /// The value of a header, if present (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// An HTTP/1.1 proxy on 127.0.0.1 in front of `upstream` (one request per connection),
/// applying [`Fault`]s and recording what it saw. Stops on drop.
pub struct FaultProxy {
    /// `127.0.0.1:PORT`.
    pub host: String,
    faults: Arc<Mutex<Vec<Fault>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let host = listener.local_addr().expect("addr").to_string();
        let faults = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s, st, up) = (
            faults.clone(),
            seen.clone(),
            stop.clone(),
            upstream.to_string(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (f, s, up) = (f.clone(), s.clone(), up.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &up, &f, &s);
                });
            }
        });
        FaultProxy {
            host,
            faults,
            seen,
            stop,
        }
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.faults.lock().unwrap().push(fault);
    }

    /// Removes every fault: the proxy forwards faithfully again.
    pub fn clear_faults(&self) {
        self.faults.lock().unwrap().clear();
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// `docker://PROXY/REPO:TAG`.
    pub fn url(&self, repo_tag: &str) -> String {
        format!("docker://{}/{repo_tag}", self.host)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.host);
    }
}

fn serve(
    conn: TcpStream,
    upstream: &str,
    faults: &Mutex<Vec<Fault>>,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    let mut conn = conn;
    let (s, body) = read_request(&conn)?;
    let path = s.path.clone();
    seen.lock().unwrap().push(s.clone());

    let fault = {
        let mut faults = faults.lock().unwrap();
        let hit = faults
            .iter_mut()
            .find(|f| path.contains(f.path()) && f.left() > 0);
        hit.map(|f| {
            *f.times() -= 1;
            f.clone()
        })
    };
    if let Some(Fault::Status {
        status,
        retry_after,
        ..
    }) = &fault
    {
        let mut answer =
            format!("HTTP/1.1 {status} Injected\r\nContent-Length: 0\r\nConnection: close\r\n");
        if let Some(r) = retry_after {
            answer.push_str(&format!("Retry-After: {r}\r\n"));
        }
        answer.push_str("\r\n");
        conn.write_all(answer.as_bytes())?;
        return Ok(());
    }
    if let Some(Fault::Refuse { .. }) = &fault {
        conn.shutdown(Shutdown::Both)?;
        return Ok(());
    }

    let raw = match &fault {
        Some(Fault::IgnoreRange { .. }) => {
            let mut plain = s.clone();
            plain
                .headers
                .retain(|h| !h.to_ascii_lowercase().starts_with("range:"));
            forward(upstream, &plain, &body, false)?
        }
        _ => forward(upstream, &s, &body, false)?,
    };
    // The client must not reuse a connection the proxy is about to close.
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut answer: Vec<u8> = head
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .flat_map(|l| format!("{l}\r\n").into_bytes())
        .collect();
    answer.extend_from_slice(b"Connection: close\r\n\r\n");
    let body_at = answer.len();
    answer.extend_from_slice(&raw[split..]);
    match fault {
        Some(Fault::Drop { after, .. }) => {
            let end = (body_at + after).min(answer.len());
            conn.write_all(&answer[..end])?;
            conn.flush()?;
            conn.shutdown(Shutdown::Both)?;
        }
        Some(Fault::Lose { .. }) => conn.shutdown(Shutdown::Both)?,
        Some(Fault::Stall { after, secs, .. }) => {
            let end = (body_at + after).min(answer.len());
            conn.write_all(&answer[..end])?;
            conn.flush()?;
            std::thread::sleep(Duration::from_secs(secs));
            conn.shutdown(Shutdown::Both)?;
        }
        Some(Fault::Corrupt { .. }) if answer.len() > body_at => {
            let mid = body_at + (answer.len() - body_at) / 2;
            answer[mid] ^= 0xff;
            conn.write_all(&answer)?;
        }
        _ => conn.write_all(&answer)?,
    }
    Ok(())
}

/// Reads one HTTP/1.1 request (head and `Content-Length` body) from a connection.
pub fn read_request(conn: &TcpStream) -> std::io::Result<(Seen, Vec<u8>)> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        headers.push(line);
    }
    let seen = Seen {
        method,
        path,
        headers,
    };
    let length: usize = seen
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok((seen, body))
}

/// Sends `request` (head lines and body) to `upstream` and returns the whole answer.
pub fn forward(
    upstream: &str,
    seen: &Seen,
    body: &[u8],
    drop_auth: bool,
) -> std::io::Result<Vec<u8>> {
    let mut up = TcpStream::connect(upstream)?;
    let mut head = format!("{} {} HTTP/1.1\r\n", seen.method, seen.path);
    for h in &seen.headers {
        let name = h
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if name != "connection" && !(drop_auth && name == "authorization") {
            head.push_str(h);
            head.push_str("\r\n");
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    up.write_all(body)?;
    let mut raw = Vec::new();
    up.read_to_end(&mut raw)?;
    Ok(raw)
}

fn answer(
    conn: &mut TcpStream,
    status: u16,
    headers: &[String],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

/// Spawns an accept loop that hands each connection to `handle` on its own thread.
fn serve_forever(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    handle: impl Fn(TcpStream) + Send + Sync + 'static,
) {
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let Ok(conn) = conn else { continue };
            let h = handle.clone();
            std::thread::spawn(move || h(conn));
        }
    });
}

/// The token flow in front of a plain registry: a gateway that wants `Bearer` tokens (401
/// with a challenge otherwise; a token is good for `uses` requests, then it is "expired"), a
/// token server on another port that hands out tokens for `user:password` (pull only for
/// `reader`), and a storage server on a third port that blob GETs are redirected to.
pub struct BearerGateway {
    /// The gateway's `127.0.0.1:PORT` (the registry host clients use).
    pub host: String,
    /// Requests the gateway saw.
    pub gateway_seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests the token server saw.
    pub token_seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests the storage server saw.
    pub storage_seen: Arc<Mutex<Vec<Seen>>>,
    stops: Vec<(Arc<AtomicBool>, String)>,
}

/// A token: its scopes and how many more requests it is good for.
type Tokens = Arc<Mutex<std::collections::HashMap<String, (Vec<String>, usize)>>>;

impl BearerGateway {
    /// Starts the three servers in front of `upstream`; `user:password` may have push and
    /// pull, `reader:password` pull only.
    pub fn start(upstream: &str, user: &str, password: &str, uses: usize) -> BearerGateway {
        let bind = || {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let a = l.local_addr().expect("addr").to_string();
            (l, a, Arc::new(AtomicBool::new(false)))
        };
        let (gl, gaddr, gstop) = bind();
        let (tl, taddr, tstop) = bind();
        let (sl, saddr, sstop) = bind();
        let tokens: Tokens = Arc::new(Mutex::new(Default::default()));
        let gateway_seen = Arc::new(Mutex::new(Vec::new()));
        let token_seen = Arc::new(Mutex::new(Vec::new()));
        let storage_seen = Arc::new(Mutex::new(Vec::new()));

        // Token server.
        {
            let (tokens, seen) = (tokens.clone(), token_seen.clone());
            let good = |u: &str| {
                format!(
                    "Basic {}",
                    crate::registry::base64(&format!("{u}:{password}"))
                )
            };
            let (writer, reader) = (good(user), good("reader"));
            let counter = Arc::new(Mutex::new(0usize));
            serve_forever(tl, tstop.clone(), move |mut conn| {
                let Ok((req, _)) = read_request(&conn) else {
                    return;
                };
                seen.lock().unwrap().push(req.clone());
                let auth = req.header("authorization").unwrap_or("").to_string();
                let can_push = auth == writer;
                if !can_push && auth != reader {
                    let _ = answer(
                        &mut conn,
                        401,
                        &[],
                        br#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                    );
                    return;
                }
                let query = req.path.split_once('?').map_or("", |(_, q)| q).to_string();
                let mut granted = Vec::new();
                for kv in query.split('&') {
                    if let Some(scope) = kv.strip_prefix("scope=") {
                        let scope = scope
                            .replace("%3A", ":")
                            .replace("%2C", ",")
                            .replace("%2F", "/");
                        let scope = if can_push {
                            scope
                        } else {
                            scope.replace(":pull,push", ":pull")
                        };
                        granted.push(scope);
                    }
                }
                let mut n = counter.lock().unwrap();
                *n += 1;
                let token = format!("tok{n}");
                tokens
                    .lock()
                    .unwrap()
                    .insert(token.clone(), (granted, uses));
                let body = format!(r#"{{"token":"{token}","expires_in":300}}"#);
                let _ = answer(
                    &mut conn,
                    200,
                    &["Content-Type: application/json".into()],
                    body.as_bytes(),
                );
            });
        }
        // Storage server: serves blobs by digest from the registry, no auth needed.
        {
            let (seen, up) = (storage_seen.clone(), upstream.to_string());
            serve_forever(sl, sstop.clone(), move |mut conn| {
                let Ok((req, body)) = read_request(&conn) else {
                    return;
                };
                seen.lock().unwrap().push(req.clone());
                let path = req.path.replacen("/storage/", "/v2/", 1);
                let fwd = Seen { path, ..req };
                if let Ok(raw) = forward(&up, &fwd, &body, true) {
                    let _ = conn.write_all(&raw);
                }
            });
        }
        // Gateway.
        {
            let (seen, up, realm) = (
                gateway_seen.clone(),
                upstream.to_string(),
                format!("http://{taddr}/token"),
            );
            let storage = saddr.clone();
            serve_forever(gl, gstop.clone(), move |mut conn| {
                let Ok((req, body)) = read_request(&conn) else {
                    return;
                };
                seen.lock().unwrap().push(req.clone());
                let path = req.path.split('?').next().unwrap_or("").to_string();
                let rest = path.strip_prefix("/v2/").unwrap_or("");
                let repo = ["/manifests/", "/blobs/", "/tags/"]
                    .iter()
                    .find_map(|m| rest.find(m).map(|i| rest[..i].to_string()));
                let action = if matches!(req.method.as_str(), "GET" | "HEAD") {
                    "pull"
                } else {
                    "push"
                };
                let challenge = |scope: Option<String>| {
                    let mut c = format!(
                        r#"WWW-Authenticate: Bearer realm="{realm}",service="flatfs-test""#
                    );
                    if let Some(s) = scope {
                        c.push_str(&format!(r#",scope="{s}""#));
                    }
                    c
                };
                let token = req
                    .header("authorization")
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .map(str::to_string);
                let allowed = {
                    let mut tokens = tokens.lock().unwrap();
                    match token.as_deref().and_then(|t| tokens.get_mut(t)) {
                        Some((scopes, left)) if *left > 0 => {
                            *left -= 1;
                            match &repo {
                                None => true,
                                Some(r) => scopes.iter().any(|s| {
                                    s.strip_prefix(&format!("repository:{r}:"))
                                        .is_some_and(|acts| acts.split(',').any(|a| a == action))
                                }),
                            }
                        }
                        _ => false,
                    }
                };
                if !allowed {
                    let scope = repo.map(|r| format!("repository:{r}:{action}"));
                    let _ = answer(
                        &mut conn,
                        401,
                        &[challenge(scope), "Content-Type: application/json".into()],
                        br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                    );
                    return;
                }
                // Blob bytes come from "storage": a redirect, as S3-backed registries do.
                if req.method == "GET" && path.contains("/blobs/sha256:") {
                    let loc = format!("Location: http://{storage}/storage/{rest}");
                    let _ = answer(&mut conn, 307, &[loc], b"");
                    return;
                }
                if let Ok(raw) = forward(&up, &req, &body, true) {
                    let _ = conn.write_all(&raw);
                }
            });
        }
        BearerGateway {
            host: gaddr.clone(),
            gateway_seen,
            token_seen,
            storage_seen,
            stops: vec![(gstop, gaddr), (tstop, taddr), (sstop, saddr)],
        }
    }

    /// `docker://GATEWAY/REPO:TAG`.
    pub fn url(&self, repo_tag: &str) -> String {
        format!("docker://{}/{repo_tag}", self.host)
    }
}

impl Drop for BearerGateway {
    fn drop(&mut self) {
        for (stop, addr) in &self.stops {
            stop.store(true, Ordering::Relaxed);
            let _ = TcpStream::connect(addr);
        }
    }
}
