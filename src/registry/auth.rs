//! Registry credentials and challenges: where a user's password for a registry comes from
//! (a creds file, containers' and Docker's auth files, credential helpers), and what a registry's
//! `WWW-Authenticate` asks for. Nothing here logs or prints a secret.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::Options;
use crate::error::{Error, Result};

/// A user name and password (or token) for one registry. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// The value of a `Basic` Authorization header.
    pub fn basic(&self) -> String {
        format!(
            "Basic {}",
            base64_encode(format!("{}:{}", self.username, self.password).as_bytes())
        )
    }
}

/// What a registry's `WWW-Authenticate` header asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// Send the user's name and password with every request.
    Basic,
    /// Get a token from `realm` for `service` and the scopes wanted, and send that.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The `service` parameter to pass, if any.
        service: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value: `Bearer realm="…",service="…",scope="…"` or `Basic
/// realm="…"`. Returns `None` for a scheme flatfs does not speak.
/// See: <https://distribution.github.io/distribution/spec/auth/token/>
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(rest);
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
        });
    }
    None
}

/// `key="value", key=value` pairs; quoted values may hold commas and `\"`.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    out
}

/// The credentials for `host` (and repository `repo`), from `--creds-file`, else the first
/// auth file that has an entry for it: `--authfile`, else `$REGISTRY_AUTH_FILE`, else
/// `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.config/containers/auth.json`,
/// `$DOCKER_CONFIG/config.json` (or `~/.docker/config.json`), as skopeo and crane look.
pub fn lookup(host: &str, repo: &str, opts: &Options) -> Result<Option<Credentials>> {
    if let Some(path) = &opts.creds_file {
        return read_creds_file(path).map(Some);
    }
    let (files, explicit) = auth_files(opts);
    for path in files {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => continue,
            Err(e) => return Err(Error::io(path.display(), e)),
        };
        let config: AuthFile = serde_json::from_str(&text).map_err(|e| Error::Json {
            what: path.display().to_string(),
            source: e,
        })?;
        if let Some(c) = config.find(host, repo, &path)? {
            log::debug!(
                "credentials for {host} from {} (user {})",
                path.display(),
                c.username
            );
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// The auth files to look in, and whether the user named them (then a missing one is an error).
fn auth_files(opts: &Options) -> (Vec<PathBuf>, bool) {
    if let Some(p) = &opts.authfile {
        return (vec![p.clone()], true);
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("REGISTRY_AUTH_FILE") {
        return (vec![p], true);
    }
    let mut files = Vec::new();
    if let Some(d) = env("XDG_RUNTIME_DIR") {
        files.push(d.join("containers/auth.json"));
    }
    let home = env("HOME");
    if let Some(h) = &home {
        files.push(h.join(".config/containers/auth.json"));
    }
    match env("DOCKER_CONFIG") {
        Some(d) => files.push(d.join("config.json")),
        None => files.extend(home.map(|h| h.join(".docker/config.json"))),
    }
    (files, false)
}

/// `USER:PASSWORD` on the first line of a file (what `--creds-file` names), or of standard
/// input for `-`, so that a password never has to be on a command line or in a file.
fn read_creds_file(path: &Path) -> Result<Credentials> {
    let text = if path == Path::new("-") {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| Error::io("standard input (--creds-file -)", e))?;
        line
    } else {
        std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?
    };
    let line = text.lines().next().unwrap_or("");
    match line.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        }),
        _ => Err(Error::invalid(
            path.display(),
            "expected USER:PASSWORD on the first line",
        )),
    }
}

/// The parts of `auth.json` / Docker's `config.json` that matter here.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct AuthFile {
    auths: HashMap<String, AuthEntry>,
    #[serde(rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl AuthFile {
    /// The entry for `host/repo`, or its namespaces, or `host` (containers-auth.json(5));
    /// a credential helper named for the host wins, `credsStore` is the fallback.
    fn find(&self, host: &str, repo: &str, file: &Path) -> Result<Option<Credentials>> {
        if let Some(helper) = self.cred_helpers.get(host) {
            return run_helper(helper, host);
        }
        let entries: HashMap<String, &AuthEntry> = self
            .auths
            .iter()
            .map(|(k, v)| (normalise_key(k), v))
            .collect();
        let mut key = format!("{host}/{repo}");
        loop {
            if let Some(entry) = entries.get(&key)
                && let Some(c) = entry.credentials(&key, file)?
            {
                return Ok(Some(c));
            }
            match key.rsplit_once('/') {
                Some((shorter, _)) => key = shorter.to_string(),
                None => break,
            }
        }
        match &self.creds_store {
            Some(store) if !store.is_empty() => run_helper(store, host),
            _ => Ok(None),
        }
    }
}

impl AuthEntry {
    fn credentials(&self, key: &str, file: &Path) -> Result<Option<Credentials>> {
        if let (Some(u), Some(p)) = (&self.username, &self.password)
            && !u.is_empty()
        {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
        let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) else {
            return Ok(None);
        };
        let bad = || {
            Error::invalid(
                file.display(),
                format!("auths.{key:?}.auth is not base64 USER:PASSWORD"),
            )
        };
        let decoded = base64_decode(auth).ok_or_else(bad)?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (u, p) = decoded.split_once(':').ok_or_else(bad)?;
        Ok(Some(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        }))
    }
}

/// An auth file key as a `host[/path]`: Docker writes `https://index.docker.io/v1/` for Hub.
fn normalise_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let k = k
        .strip_suffix("/v1")
        .or_else(|| k.strip_suffix("/v2"))
        .unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        _ => match k.split_once('/') {
            Some(("index.docker.io" | "registry-1.docker.io", rest)) => format!("docker.io/{rest}"),
            _ => k.to_string(),
        },
    }
}

/// Asks `docker-credential-NAME get` for the host's credentials (Docker's helper protocol:
/// the server URL on stdin, `{"Username", "Secret"}` on stdout).
fn run_helper(name: &str, host: &str) -> Result<Option<Credentials>> {
    let program = format!("docker-credential-{name}");
    let server = if host == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        host
    };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(&program, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its exit status below.
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(&program, e))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if msg.contains("credentials not found") {
            return Ok(None);
        }
        return Err(Error::invalid(
            &program,
            format!("get {server} failed ({}): {msg}", out.status),
        ));
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let reply: Reply = serde_json::from_slice(&out.stdout).map_err(|e| Error::Json {
        what: format!("{program} get"),
        source: e,
    })?;
    Ok(Some(Credentials {
        username: reply.username,
        password: reply.secret,
    }))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648), for Basic auth and auth files.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` if it is not base64.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "user:pa:ss", "ünï"] {
            assert_eq!(
                base64_decode(&base64_encode(s.as_bytes())).unwrap(),
                s.as_bytes()
            );
        }
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
        assert!(base64_decode("not base64!").is_none());
    }

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="reg, one",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg, one".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None, "no realm");
    }

    #[test]
    fn auth_file_entries_match_repo_then_namespace_then_host() {
        let file: AuthFile = serde_json::from_str(
            r#"{"auths": {
                "reg.example:5000": {"auth": "aG9zdDpwdw=="},
                "reg.example:5000/team": {"username": "team", "password": "tpw"},
                "https://index.docker.io/v1/": {"auth": "aHViOmh1YnB3"}
            }}"#,
        )
        .unwrap();
        let find = |h: &str, r: &str| {
            file.find(h, r, Path::new("auth.json"))
                .unwrap()
                .map(|c| (c.username, c.password))
        };
        assert_eq!(
            find("reg.example:5000", "team/app"),
            Some(("team".into(), "tpw".into()))
        );
        assert_eq!(
            find("reg.example:5000", "other/app"),
            Some(("host".into(), "pw".into()))
        );
        assert_eq!(
            find("docker.io", "library/x"),
            Some(("hub".into(), "hubpw".into()))
        );
        assert_eq!(
            find("reg.example", "team/app"),
            None,
            "the port is part of the key"
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let c = Credentials {
            username: "u".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
