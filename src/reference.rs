//! Image references (`[DOMAIN/]PATH[:TAG][@DIGEST]`): parsed, checked and normalised by the
//! Docker reference grammar, for the names an export writes and the registry sources read.
//!
//! The grammar is distribution/reference's (`reference.go`, `normalize.go`), written out by
//! hand here rather than as regular expressions:
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [domain "/"] path                       (at most 255 bytes in all)
//! domain           := host [":" port]
//! host             := domain-name | "[" IPv6 "]"
//! domain-name      := component ("." component)*             component: [a-zA-Z0-9] or
//!                                                             [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! port             := [0-9]+
//! path             := path-component ("/" path-component)*
//! path-component   := [a-z0-9]+ (separator [a-z0-9]+)*        separator: "." | "_" | "__" | "-"+
//! tag              := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! digest           := algorithm ":" hex                       sha256: 64 hex, sha512: 128 hex
//! ```
//!
//! Docker Hub's defaults apply as `docker` applies them: a first component that has no `.` or
//! `:`, is not `localhost` and is lowercase is part of the path, not a domain, so `app` is
//! `docker.io/library/app` and `me/app` is `docker.io/me/app`; `index.docker.io` is `docker.io`.
//! See: <https://github.com/distribution/reference/blob/main/reference.go>

use std::fmt;
use std::str::FromStr;

/// Docker Hub's domain, as references are normalised to it.
pub const DOCKER_HUB: &str = "docker.io";
/// The tag an untagged reference gets.
pub const DEFAULT_TAG: &str = "latest";

/// The most bytes a name (domain and path, without tag or digest) may have.
const NAME_MAX: usize = 255;
/// The most bytes a tag may have.
const TAG_MAX: usize = 128;

/// A checked, normalised image reference: `docker.io/library/app:1.0`,
/// `localhost:5000/team/app@sha256:…`.
///
/// Built by [`FromStr`] (`"app".parse::<Reference>()`), which applies Docker Hub's defaults;
/// [`Display`](fmt::Display) writes the full form, [`Reference::familiar`] the short one
/// `docker` shows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<String>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    /// The string as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: Reason,
}

/// What is wrong with a reference (the [`ReferenceError`] without its input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reason {
    /// Nothing at all.
    #[error("empty")]
    Empty,
    /// A path component with uppercase letters (Docker refuses these outright).
    #[error("repository name must be lowercase")]
    Uppercase,
    /// The domain is neither a host name nor `[IPv6]`, or its port is not a number.
    #[error("bad registry host {0:?} (HOST or HOST:PORT)")]
    Domain(String),
    /// A path component that breaks `[a-z0-9]+` joined by `.`, `_`, `__` or dashes.
    #[error(
        "bad name component {0:?} (lowercase letters and digits, joined by '.', '_', '__' or '-')"
    )]
    Component(String),
    /// Domain and path together are longer than 255 bytes.
    #[error("name is {0} bytes long, at most 255 allowed")]
    NameTooLong(usize),
    /// A `:` with nothing after it.
    #[error("empty tag after ':'")]
    EmptyTag,
    /// A tag that breaks `[A-Za-z0-9_][A-Za-z0-9_.-]*`.
    #[error("bad tag {0:?} (letters, digits, '_', '.' and '-', not starting with '.' or '-')")]
    Tag(String),
    /// A tag of more than 128 bytes.
    #[error("tag is {0} bytes long, at most 128 allowed")]
    TagTooLong(usize),
    /// A digest that is not `sha256:` and 64 lowercase hex digits (or sha512 and 128).
    #[error("bad digest {0:?} (sha256: and 64 lowercase hex digits)")]
    Digest(String),
    /// 64 hex digits alone: an image ID, which Docker refuses as a name.
    #[error("64 hex digits are an image ID, not a name")]
    ImageId,
    /// A digest where only a name and tag make sense (an image's own name).
    #[error("a name to write cannot hold a digest (the digest is of the image written)")]
    DigestNotAllowed,
}

impl Reference {
    /// The registry host, with its port if any: `docker.io`, `localhost:5000`, `[::1]:5000`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path inside the registry: `library/app`, `team/app`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`sha256:…`), if the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// Domain and path, without tag or digest: `docker.io/library/app`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The short form `docker` prints: `app:1.0` for `docker.io/library/app:1.0`, `me/app` for
    /// `docker.io/me/app`; references to other registries keep their domain.
    pub fn familiar(&self) -> String {
        let name = if self.domain == DOCKER_HUB {
            match self.path.strip_prefix("library/") {
                Some(rest) if !rest.contains('/') => rest.to_string(),
                _ => self.path.clone(),
            }
        } else {
            self.name()
        };
        self.with_suffix(name)
    }

    /// The same reference, tagged `latest` if it has neither tag nor digest (what `docker pull
    /// app` and `docker tag … app` mean).
    pub fn with_default_tag(mut self) -> Self {
        if self.tag.is_none() && self.digest.is_none() {
            self.tag = Some(DEFAULT_TAG.to_string());
        }
        self
    }

    /// The same name with `tag` instead of its tag (checked like any tag), digest dropped.
    pub fn with_tag(&self, tag: &str) -> Result<Self, ReferenceError> {
        check_tag(tag).map_err(|reason| ReferenceError {
            input: tag.to_string(),
            reason,
        })?;
        Ok(Self {
            domain: self.domain.clone(),
            path: self.path.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        })
    }

    /// Parses a name an image is to be given, `NAME[:TAG]` (`--tag`): a reference without a
    /// digest, tagged `latest` when untagged.
    pub fn parse_tag_arg(s: &str) -> Result<Self, ReferenceError> {
        // Said before any complaint about the digest itself: it has no place here at all.
        if s.contains('@') {
            return Err(ReferenceError {
                input: s.to_string(),
                reason: Reason::DigestNotAllowed,
            });
        }
        Ok(s.parse::<Self>()?.with_default_tag())
    }

    fn with_suffix(&self, mut s: String) -> String {
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

impl fmt::Display for Reference {
    /// The full form: `docker.io/library/app:1.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.with_suffix(self.name()))
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map_err(|reason| ReferenceError {
            input: s.to_string(),
            reason,
        })
    }
}

/// [`FromStr`] without the input in the error.
fn parse(s: &str) -> Result<Reference, Reason> {
    if s.is_empty() {
        return Err(Reason::Empty);
    }
    if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Reason::ImageId);
    }
    let (rest, digest) = match s.split_once('@') {
        Some((rest, d)) => (rest, Some(check_digest(d)?)),
        None => (s, None),
    };
    // A ':' after the last '/' starts the tag; one before it belongs to the domain's port.
    let after_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[after_slash..].rfind(':') {
        Some(i) => {
            let (name, tag) = (&rest[..after_slash + i], &rest[after_slash + i + 1..]);
            if tag.is_empty() {
                return Err(Reason::EmptyTag);
            }
            check_tag(tag)?;
            (name, Some(tag.to_string()))
        }
        None => (rest, None),
    };
    let (domain, path) = split_domain(name);
    let domain = match domain {
        Some(d) => {
            check_domain(d)?;
            if d == "index.docker.io" {
                DOCKER_HUB
            } else {
                d
            }
        }
        None => DOCKER_HUB,
    };
    let path = if domain == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    for component in path.split('/') {
        check_component(component)?;
    }
    let len = domain.len() + 1 + path.len();
    if len > NAME_MAX {
        return Err(Reason::NameTooLong(len));
    }
    Ok(Reference {
        domain: domain.to_string(),
        path,
        tag,
        digest,
    })
}

/// Splits off the domain, by Docker's rule: the first component is a domain when it has a `.`
/// or `:`, is `localhost`, or has uppercase letters (which a path component cannot have).
///
/// Such a component must then be a host name. Docker's regular expression also lets
/// `a.b_c/x` through, read as a path without a domain, while its own split calls `a.b_c` the
/// registry (skopeo writes `a.b_c/x:latest`, which no registry can serve): refused here.
fn split_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn check_domain(d: &str) -> Result<(), Reason> {
    let bad = || Reason::Domain(d.to_string());
    let (host_ok, port) = if let Some(v6) = d.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or_else(bad)?;
        let ok = !addr.is_empty() && addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad)?),
        };
        (ok, port)
    } else {
        let (host, port) = match d.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (d, None),
        };
        let label_ok = |l: &str| {
            let b = l.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
        };
        (host.split('.').all(label_ok), port)
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// `[a-z0-9]+` runs joined by one separator each: `.`, `_`, `__` or any number of `-`.
fn check_component(c: &str) -> Result<(), Reason> {
    if c.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(Reason::Uppercase);
    }
    let bad = || Reason::Component(c.to_string());
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        if i == b.len() {
            return Ok(());
        }
        let sep = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        match &c[sep..i] {
            "." | "_" | "__" => {}
            s if s.bytes().all(|b| b == b'-') => {}
            _ => return Err(bad()),
        }
    }
}

fn check_tag(t: &str) -> Result<(), Reason> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    if b.is_empty() {
        return Err(Reason::EmptyTag);
    }
    if !word(b[0]) || !b.iter().all(|&c| word(c) || c == b'.' || c == b'-') {
        return Err(Reason::Tag(t.to_string()));
    }
    if b.len() > TAG_MAX {
        return Err(Reason::TagTooLong(b.len()));
    }
    Ok(())
}

/// Only the algorithms a registry verifies (go-digest's sha256 and sha512), lowercase hex of
/// the algorithm's length: a digest nobody can check is a typo waiting to be trusted.
fn check_digest(d: &str) -> Result<String, Reason> {
    let bad = || Reason::Digest(d.to_string());
    let (algorithm, hex) = d.split_once(':').ok_or_else(bad)?;
    let want = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err(bad()),
    };
    if hex.len() != want || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    Ok(d.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Each input with its full form and familiar form.
    #[test]
    fn valid_references_normalise_like_docker() {
        let d = format!("sha256:{HEX}");
        let cases: Vec<(String, String, String)> = vec![
            ("app", "docker.io/library/app", "app"),
            ("app:1.0", "docker.io/library/app:1.0", "app:1.0"),
            ("me/app", "docker.io/me/app", "me/app"),
            ("docker.io/app", "docker.io/library/app", "app"),
            ("index.docker.io/me/app:v", "docker.io/me/app:v", "me/app:v"),
            (
                "docker.io/library/a/b",
                "docker.io/library/a/b",
                "library/a/b",
            ),
            ("localhost/app", "localhost/app", "localhost/app"),
            ("localhost:5000/x", "localhost:5000/x", "localhost:5000/x"),
            (
                "localhost:5000/x:5000",
                "localhost:5000/x:5000",
                "localhost:5000/x:5000",
            ),
            (
                "reg.example.com:443/a/b/c:t",
                "reg.example.com:443/a/b/c:t",
                "reg.example.com:443/a/b/c:t",
            ),
            ("Example.COM/app", "Example.COM/app", "Example.COM/app"),
            ("[::1]:5000/x", "[::1]:5000/x", "[::1]:5000/x"),
            ("[fe80::1]/x:t", "[fe80::1]/x:t", "[fe80::1]/x:t"),
            (
                "x/a.b_c__d---e:T_a.g-1",
                "docker.io/x/a.b_c__d---e:T_a.g-1",
                "x/a.b_c__d---e:T_a.g-1",
            ),
            (
                "my-app_1.x:_",
                "docker.io/library/my-app_1.x:_",
                "my-app_1.x:_",
            ),
            (
                "localhost:5000",
                "docker.io/library/localhost:5000",
                "localhost:5000",
            ),
        ]
        .into_iter()
        .map(|(a, b, c)| (a.into(), b.into(), c.into()))
        .chain([
            (
                format!("app@{d}"),
                format!("docker.io/library/app@{d}"),
                format!("app@{d}"),
            ),
            (
                format!("h:1/a:t@{d}"),
                format!("h:1/a:t@{d}"),
                format!("h:1/a:t@{d}"),
            ),
            (
                format!("app:{}", "t".repeat(128)),
                format!("docker.io/library/app:{}", "t".repeat(128)),
                format!("app:{}", "t".repeat(128)),
            ),
        ])
        .collect();
        for (input, full, familiar) in cases {
            let r: Reference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), full, "full form of {input}");
            assert_eq!(r.familiar(), familiar, "familiar form of {input}");
            // Both forms parse back to the same reference.
            assert_eq!(full.parse::<Reference>().unwrap(), r, "{full}");
            assert_eq!(familiar.parse::<Reference>().unwrap(), r, "{familiar}");
        }
    }

    #[test]
    fn invalid_references_say_what_is_wrong() {
        let cases: Vec<(String, Reason)> = vec![
            ("".into(), Reason::Empty),
            ("App".into(), Reason::Uppercase),
            ("me/App:1".into(), Reason::Uppercase),
            ("Bad Tag!!".into(), Reason::Uppercase),
            ("bad tag".into(), Reason::Component("bad tag".into())),
            ("app:".into(), Reason::EmptyTag),
            ("app:bad tag".into(), Reason::Tag("bad tag".into())),
            ("app:.x".into(), Reason::Tag(".x".into())),
            ("app:-x".into(), Reason::Tag("-x".into())),
            (format!("app:{}", "t".repeat(129)), Reason::TagTooLong(129)),
            ("app@sha256:abc".into(), Reason::Digest("sha256:abc".into())),
            (
                format!("app@sha256:{}", HEX.to_uppercase()),
                Reason::Digest(format!("sha256:{}", HEX.to_uppercase())),
            ),
            (
                format!("app@md5:{HEX}"),
                Reason::Digest(format!("md5:{HEX}")),
            ),
            ("app@".into(), Reason::Digest("".into())),
            (HEX.into(), Reason::ImageId),
            ("-app".into(), Reason::Component("-app".into())),
            ("app-".into(), Reason::Component("app-".into())),
            ("a..b".into(), Reason::Component("a..b".into())),
            ("a___b".into(), Reason::Component("a___b".into())),
            ("a/".into(), Reason::Component("".into())),
            ("a//b".into(), Reason::Component("".into())),
            ("/a".into(), Reason::Component("".into())),
            ("My Image".into(), Reason::Uppercase),
            (
                "localhost:port/x".into(),
                Reason::Domain("localhost:port".into()),
            ),
            ("localhost:/x".into(), Reason::Domain("localhost:".into())),
            ("-h.com/x".into(), Reason::Domain("-h.com".into())),
            ("h..com/x".into(), Reason::Domain("h..com".into())),
            // A first component with a '.' is a host, and hosts have no '_'.
            ("a.b_c/x".into(), Reason::Domain("a.b_c".into())),
            ("[::1/x".into(), Reason::Domain("[::1".into())),
            ("[zz]:1/x".into(), Reason::Domain("[zz]:1".into())),
            ("[::1]x/x".into(), Reason::Domain("[::1]x".into())),
            (
                format!("h.com/{}", "a".repeat(250)),
                Reason::NameTooLong(256),
            ),
            // docker.io/library/ counts: 18 + 238 = 256.
            ("a".repeat(238), Reason::NameTooLong(256)),
        ];
        for (input, reason) in cases {
            let err = input.parse::<Reference>().expect_err(&input);
            assert_eq!(err.reason, reason, "{input:?}: {err}");
            assert_eq!(err.input, input);
        }
        // Exactly at the limits.
        assert!(
            format!("h.com/{}", "a".repeat(249))
                .parse::<Reference>()
                .is_ok()
        );
        assert!("a".repeat(237).parse::<Reference>().is_ok());
    }

    #[test]
    fn tag_arg_takes_no_digest_and_defaults_to_latest() {
        let r = Reference::parse_tag_arg("app").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/app:latest");
        assert_eq!(r.familiar(), "app:latest");
        assert_eq!(
            Reference::parse_tag_arg("me/app:v2").unwrap().familiar(),
            "me/app:v2"
        );
        let err = Reference::parse_tag_arg(&format!("app@sha256:{HEX}")).unwrap_err();
        assert_eq!(err.reason, Reason::DigestNotAllowed);
        let err = Reference::parse_tag_arg("app@sha256:abc").unwrap_err();
        assert_eq!(err.reason, Reason::DigestNotAllowed);
        assert_eq!(
            Reference::parse_tag_arg("app:").unwrap_err().reason,
            Reason::EmptyTag
        );
        assert_eq!(
            Reference::parse_tag_arg("Bad Tag!!")
                .unwrap_err()
                .to_string(),
            "invalid image reference \"Bad Tag!!\": repository name must be lowercase"
        );
    }

    #[test]
    fn with_tag_replaces_tag_and_drops_digest() {
        let r: Reference = format!("localhost:5000/x:a@sha256:{HEX}").parse().unwrap();
        assert_eq!(r.with_tag("b").unwrap().to_string(), "localhost:5000/x:b");
        assert!(r.with_tag("b c").is_err());
        let untagged: Reference = format!("x@sha256:{HEX}").parse().unwrap();
        assert_eq!(untagged.clone().with_default_tag(), untagged);
        assert_eq!(
            "x".parse::<Reference>().unwrap().with_default_tag().tag(),
            Some("latest")
        );
    }
}
