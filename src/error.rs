//! Errors of every stage, one enum; the CLI prints the chain, the FUSE layer maps it to an errno.

use std::io;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between reading an image and writing or serving the merged tree.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a named file or blob.
    #[error("{path}: {source}")]
    Io {
        /// The file, blob or layer being read or written.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The input is none of the image forms flatfs reads.
    #[error("{0}: not a docker-archive, OCI image layout or OCI archive")]
    UnknownFormat(String),
    /// A JSON document that does not parse or does not have the expected shape.
    #[error("{what}: invalid JSON: {source}")]
    Json {
        /// Which document.
        what: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// An image document that parses but makes no sense.
    #[error("{what}: {msg}")]
    Invalid {
        /// Which document or blob.
        what: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A layer media type flatfs cannot (or must not) read.
    #[error("layer {layer}: unsupported media type {media_type}")]
    UnsupportedMediaType {
        /// The layer's digest or path.
        layer: String,
        /// The media type from the manifest.
        media_type: String,
    },
    /// A blob whose content does not hash to what the manifest or config says.
    #[error("{what}: digest mismatch: expected {expected}, found {found}")]
    DigestMismatch {
        /// The blob ("layer 2 (sha256:…)", "config").
        what: String,
        /// The digest recorded in the image.
        expected: String,
        /// The digest of the bytes actually read.
        found: String,
    },
    /// A blob named by the image that is not in the archive or layout.
    #[error("{image}: blob {name} is missing")]
    MissingBlob {
        /// The image.
        image: String,
        /// The member or file name of the blob.
        name: String,
    },
    /// An entry of a layer tar that breaks the rules (escapes the root, dangling hardlink, …).
    #[error("layer {layer}: entry {entry:?}: {msg}")]
    Entry {
        /// The layer ("2 (sha256:…)").
        layer: String,
        /// The entry path as written in the tar (lossy UTF-8 for display).
        entry: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A layer tar or compressed stream that cannot be read.
    #[error("layer {layer}: {source}")]
    Layer {
        /// The layer ("2 (sha256:…)").
        layer: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No manifest in the index matches the wanted platform.
    #[error("{image}: no manifest for platform {wanted} (available: {available})")]
    NoPlatform {
        /// The image.
        image: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms the index offers.
        available: String,
    },
    /// A registry request that failed: the host, what was asked and what went wrong, in one line.
    #[error("registry {host}: {msg}")]
    Registry {
        /// The registry host (`docker.io`, `127.0.0.1:5000`).
        host: String,
        /// "GET manifest app:1.0: 404 not found: manifest unknown (MANIFEST_UNKNOWN)".
        msg: String,
    },
    /// A Docker schema-1 manifest (registries before 2017), which flatfs does not read.
    #[error(
        "{image}: {what} is a Docker schema-1 image, which flatfs does not read; copy it again \
         from where it came from with skopeo, which converts it to schema 2: `skopeo copy \
         docker://REGISTRY/NAME:TAG oci:NEW-DIR:TAG` (or from dir:DIR, or to \
         docker-archive:NEW.tar)"
    )]
    Schema1 {
        /// The image.
        image: String,
        /// The document ("manifest sha256:…", "index.json").
        what: String,
    },
    /// A FUSE mount that could not be set up.
    #[error("mount {mountpoint}: {msg}")]
    Mount {
        /// Where.
        mountpoint: String,
        /// Why not.
        msg: String,
    },
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl std::fmt::Display, source: io::Error) -> Self {
        Error::Io {
            path: path.to_string(),
            source,
        }
    }

    /// Builds an [`Error::Invalid`].
    pub fn invalid(what: impl std::fmt::Display, msg: impl std::fmt::Display) -> Self {
        Error::Invalid {
            what: what.to_string(),
            msg: msg.to_string(),
        }
    }

    /// The errno a FUSE reply carries for this error: the OS error where there is one, else EIO.
    pub fn errno(&self) -> i32 {
        let source = match self {
            Error::Io { source, .. } | Error::Layer { source, .. } => source,
            _ => return libc::EIO,
        };
        match source.raw_os_error() {
            Some(e) => e,
            None => libc::EIO,
        }
    }
}
