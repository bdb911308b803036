//! Registries (the OCI distribution protocol): the `docker://` source pulls an image's blobs
//! into the blob store and opens it like a local layout; `export -o docker://` pushes.
//! `client` speaks HTTP, `auth` finds credentials, `store` keeps blobs by digest.

pub mod artifact;
pub mod auth;
pub mod client;
pub mod push;
pub mod store;

use std::path::PathBuf;

pub use client::Client;
pub use store::BlobStore;

/// How to reach registries: credentials, certificates, TLS, and where pulled blobs go.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--authfile`: the one auth file to read credentials from.
    pub authfile: Option<PathBuf>,
    /// `--creds-file`: a file holding `USER:PASSWORD`.
    pub creds_file: Option<PathBuf>,
    /// `--cert-dir`: CAs (`*.crt`) and a client certificate (`*.cert` + `*.key`).
    pub cert_dir: Option<PathBuf>,
    /// `--tls-verify=false`: accept any certificate, and plain HTTP where HTTPS fails.
    pub insecure: bool,
    /// The cache directory whose `blobs/` is the blob store; `None` (`--no-cache`): a temp
    /// store that lives as long as the opened image's files.
    pub cache_dir: Option<PathBuf>,
    /// Fetch a layer by ranges when it is read (`mount`) instead of downloading it, where the
    /// cache holds its index with span digests to check the ranges against.
    pub lazy: bool,
    /// With `lazy`: do not look for a flatfs index artifact in the registry for layers the
    /// cache lacks (`flatfs index push`, which builds what it pushes from the layers).
    pub no_index_artifact: bool,
}
