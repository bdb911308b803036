//! Fuzz target for the image readers (index.json, manifests, configs, docker manifest.json,
//! archive member tables), through the real `flatfs::source::open` on a temp directory.
//!
//! Input: one mode byte, then documents separated by `\n--\n`. Digests and sizes cannot be
//! guessed by a fuzzer, so the documents may use placeholders that the harness fills in:
//! `@D0@` … the `sha256:…` of layer blob 0 … (also its diff_id: layers are stored as given),
//! `@S0@` its size, `@N0@` its docker member name, `@CD@`/`@CS@`/`@CN@` the config's digest,
//! size and docker name, `@MD@`/`@MS@` the manifest's digest and size.
//! - mode 0, OCI layout: index.json, manifest, config, layer blobs…
//! - mode 1, docker-archive directory: manifest.json, config, layer blobs…
//! - mode 2, archive: the rest of the input is the image archive file itself.
//!
//! An image that opens is indexed and merged too, so layer blobs reach the decompressors.

#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;

const SEPARATOR: &[u8] = b"\n--\n";

// Searches below go byte by byte to a candidate first: a memcmp at every offset is what the
// fuzzer's comparison hooks make slow.
fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'\n' && data[i..].starts_with(SEPARATOR) {
            parts.push(&data[start..i]);
            i += SEPARATOR.len();
            start = i;
        } else {
            i += 1;
        }
    }
    parts.push(&data[start..]);
    parts
}

fn hex(bytes: &[u8]) -> String {
    let d = flatfs::blob::sha256_of(bytes);
    d.trim_start_matches("sha256:").to_string()
}

/// Fills in `@NAME@` placeholders in one pass; unknown ones stay as they are.
fn replace(doc: &[u8], subs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(doc.len());
    let mut i = 0;
    while i < doc.len() {
        if doc[i] == b'@'
            && let Some(len) = doc[i + 1..].iter().take(8).position(|&b| b == b'@')
            && let Some((_, to)) = subs
                .iter()
                .find(|(from, _)| from.as_bytes() == &doc[i..i + len + 2])
        {
            out.extend_from_slice(to.as_bytes());
            i += len + 2;
        } else {
            out.push(doc[i]);
            i += 1;
        }
    }
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir in temp dir");
    }
    fs::write(path, bytes).expect("write in temp dir");
}

/// Stores layer blobs (as `blobs/sha256/…` and `lN/layer.tar`); returns the placeholders.
fn layers(dir: &Path, blobs: &[&[u8]]) -> Vec<(String, String)> {
    let mut subs = Vec::new();
    for (i, blob) in blobs.iter().enumerate() {
        let h = hex(blob);
        write(dir, &format!("blobs/sha256/{h}"), blob);
        write(dir, &format!("l{i}/layer.tar"), blob);
        subs.push((format!("@D{i}@"), format!("sha256:{h}")));
        subs.push((format!("@S{i}@"), blob.len().to_string()));
        subs.push((format!("@N{i}@"), format!("l{i}/layer.tar")));
    }
    subs
}

/// Stores a config (after filling in layer placeholders) and adds its own placeholders.
fn config(dir: &Path, doc: &[u8], subs: &mut Vec<(String, String)>) {
    let config = replace(doc, subs);
    let h = hex(&config);
    write(dir, &format!("blobs/sha256/{h}"), &config);
    write(dir, &format!("{h}.json"), &config);
    subs.push(("@CD@".into(), format!("sha256:{h}")));
    subs.push(("@CS@".into(), config.len().to_string()));
    subs.push(("@CN@".into(), format!("{h}.json")));
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // A tmpfs when there is one: the harness writes and removes a directory every run.
    let tmp = tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir");
    let dir = tmp.path();
    let spec = match mode % 3 {
        0 => {
            let parts = split(rest);
            let [index, manifest, cfg, blobs @ ..] = &parts[..] else {
                return;
            };
            let mut subs = layers(dir, blobs);
            config(dir, cfg, &mut subs);
            let manifest = replace(manifest, &subs);
            let h = hex(&manifest);
            write(dir, &format!("blobs/sha256/{h}"), &manifest);
            subs.push(("@MD@".into(), format!("sha256:{h}")));
            subs.push(("@MS@".into(), manifest.len().to_string()));
            write(dir, "index.json", &replace(index, &subs));
            write(dir, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
            dir.to_path_buf()
        }
        1 => {
            let parts = split(rest);
            let [manifest, cfg, blobs @ ..] = &parts[..] else {
                return;
            };
            let mut subs = layers(dir, blobs);
            config(dir, cfg, &mut subs);
            write(dir, "manifest.json", &replace(manifest, &subs));
            dir.to_path_buf()
        }
        _ => {
            let path = dir.join("image.tar");
            fs::write(&path, rest).expect("write in temp dir");
            path
        }
    };
    let Some(spec) = spec.to_str() else { return };
    let Ok(image) = flatfs::source::open(spec, None) else {
        return;
    };
    if let Ok(indexes) = flatfs::index_layers(&image, &flatfs::IndexOptions::default()) {
        let _ = flatfs::tree::merge_owned(indexes);
    }
});
