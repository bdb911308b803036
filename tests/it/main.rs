//! Integration tests: build images in code, run the real `flatfs` binary, and compare
//! what it writes with listings written down from the spec (issue 2).

mod artifact;
mod browse;
mod cache;
mod cli;
mod content_cache;
mod export;
mod harness;
mod hostile;
mod lazy;
mod merge;
mod mount;
mod names;
mod oracle;
mod props;
mod registry;
mod registry_harness;
mod sparse;
mod squash;
mod toc;
mod util;
mod writers;
mod zran;
