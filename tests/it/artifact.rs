//! Index artifacts (issue 14): `flatfs index push` on one host (cache dir) attaches the layer
//! indexes to an image in a real registry (distribution 2.8: the `sha256-HEX` tag fallback);
//! a lazy mount on another host with an empty cache takes them from there and fetches only
//! what it reads; a tampered or lying artifact is refused with a warning and the mount reads
//! the layers as without one.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::registry_harness::*;
use crate::util::*;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_BLOB: &str = "application/vnd.flatfs.index.layer.v2+zstd";
const CHECKPOINTS_BLOB: &str = "application/vnd.flatfs.index.checkpoints.v2";

/// Where the artifact `manifest` lists the blob of `media_type` for layer `digest`.
fn blob_at(manifest: &Value, media_type: &str, digest: &str) -> Option<usize> {
    manifest["layers"].as_array().unwrap().iter().position(|b| {
        b["mediaType"] == media_type && b["annotations"]["dev.flatfs.layer.digest"] == digest
    })
}

/// Puts `manifest` (an edited artifact, with `blobs`) in the registry in place of the one the
/// fallback tag lists.
fn replace_artifact(reg: &Registry, manifest: &Value, blobs: Vec<Vec<u8>>) {
    let bytes = serde_json::to_vec(manifest).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    let (tag, mut list) = fallback(reg, "app");
    list[0]["digest"] = Value::from(digest.clone());
    list[0]["size"] = Value::from(bytes.len());
    list[0]["annotations"] = manifest["annotations"].clone();
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list});
    reg.put_raw(
        "app",
        &blobs,
        &[
            (digest, OCI_MANIFEST.to_string(), bytes),
            (
                tag,
                OCI_INDEX.to_string(),
                serde_json::to_vec(&index).unwrap(),
            ),
        ],
    );
}

/// A 12 MiB layer of noise (gzip stores it: every byte fetched is a byte of the blob) with
/// a small file after it, and a small layer on top; returns the layout and the noise.
fn image(at: &Path) -> (PathBuf, Vec<u8>, Vec<String>) {
    let noise = noise(0x9e37_79b9_7f4a_7c15, 12 << 20);
    let layers = vec![
        layer([
            dir("data"),
            file("data/noise.bin", noise.clone()),
            file("data/tail.txt", b"the end of the big layer\n"),
        ])
        .compression(Compression::Gzip),
        layer([file("data/top.txt", b"top\n")]).compression(Compression::Gzip),
    ];
    let path = at.join("img");
    let written = write_oci_layout(&layers, &default_config(&layers), &path, Some("latest"));
    (path, noise, written.layer_digests)
}

/// flatfs with cache dir `cache` (a "host").
fn run(cache: &Path, args: &[&str]) -> Output {
    flatfs()
        .env("FLATFS_CACHE_DIR", cache)
        .env("FLATFS_REGISTRY_TIMEOUT", "10")
        .env("HOME", cache)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("DOCKER_CONFIG")
        .args(args)
        .output()
        .expect("run flatfs")
}

fn ok(cache: &Path, args: &[&str]) -> Output {
    let out = run(cache, args);
    assert_success(&out);
    out
}

/// GETs a document from the registry (plain HTTP) with `accept`.
fn get_doc(reg: &Registry, repo: &str, reference: &str, accept: &str) -> Value {
    let (status, _, body) = http(
        &reg.host,
        "GET",
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("Accept", accept)],
        &[],
    );
    assert_eq!(
        status,
        200,
        "GET {reference}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("json")
}

/// The referrers fallback tag of `repo`, and what it lists.
fn fallback(reg: &Registry, repo: &str) -> (String, Vec<Value>) {
    let tags: Vec<String> = reg
        .tags(repo)
        .into_iter()
        .filter(|t| t.starts_with("sha256-"))
        .collect();
    assert_eq!(tags.len(), 1, "{tags:?}");
    let index = get_doc(reg, repo, &tags[0], OCI_INDEX);
    let list = index["manifests"].as_array().expect("manifests").clone();
    (tags[0].clone(), list)
}

/// Blob bytes fetched from the proxy for `digest`, by ranged GETs; an unranged GET (the
/// whole blob) counts as its full size.
fn fetched(proxy: &FaultProxy, digest: &str, size: u64) -> u64 {
    proxy
        .seen()
        .iter()
        .filter(|s| s.method == "GET" && s.path.ends_with(&format!("/blobs/{digest}")))
        .map(|s| match s.header("range") {
            None => size,
            Some(r) => {
                let (a, b) = r
                    .strip_prefix("bytes=")
                    .and_then(|r| r.split_once('-'))
                    .expect("a single range");
                b.parse::<u64>().unwrap() + 1 - a.parse::<u64>().unwrap()
            }
        })
        .sum()
}

/// Mounts `url` with cache `cache` at `mnt`, reads the files, unmounts; returns the mount's
/// stderr and what was read.
fn mount_and_read(cache: &Path, url: &str, mnt: &Path) -> (String, Vec<Vec<u8>>) {
    let out = ok(
        cache,
        &["mount", url, mnt.to_str().unwrap(), "--tls-verify=false"],
    );
    let read = ["data/tail.txt", "data/top.txt"]
        .iter()
        .map(|p| std::fs::read(mnt.join(p)))
        .collect::<Vec<_>>();
    ok(cache, &["umount", mnt.to_str().unwrap()]);
    let read = read
        .into_iter()
        .map(|r| r.expect("read through the mount"))
        .collect();
    (stderr_of(&out), read)
}

fn want() -> Vec<Vec<u8>> {
    vec![b"the end of the big layer\n".to_vec(), b"top\n".to_vec()]
}

#[test]
fn artifact_pushed_by_one_host_makes_a_mount_on_another_lazy_at_once() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (img, noise, digests) = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "app:1");
    let big_size = std::fs::metadata(img.join("blobs/sha256").join(&digests[0][7..]))
        .unwrap()
        .len();

    // Host A indexes the image (pulling it) and pushes the indexes.
    let host_a = tmp.path().join("host-a");
    let out = ok(
        &host_a,
        &["index", "push", &reg.url("app:1"), "--tls-verify=false"],
    );
    let artifact = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(artifact.starts_with("sha256:"), "{artifact}");
    assert!(
        stderr_of(&out).contains("listed in tag sha256-"),
        "{}",
        stderr_of(&out)
    );
    // distribution 2.8 has no referrers API: the fallback tag lists the artifact.
    let (tag, list) = fallback(&reg, "app");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["digest"], artifact.as_str());
    assert_eq!(list[0]["artifactType"], "application/vnd.flatfs.index.v1");
    let manifest = get_doc(&reg, "app", &artifact, OCI_MANIFEST);
    assert_eq!(
        manifest["subject"]["digest"],
        tag.replacen('-', ":", 1).as_str()
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    let blobs = manifest["layers"].as_array().unwrap();
    let indexed: Vec<&str> = blobs
        .iter()
        .filter(|b| b["mediaType"] == INDEX_BLOB)
        .map(|b| {
            b["annotations"]["dev.flatfs.layer.digest"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        indexed,
        digests.iter().map(String::as_str).collect::<Vec<_>>()
    );
    // The big layer's gzip checkpoints travel in a blob of their own; the small layer has
    // none (it is shorter than a checkpoint span).
    assert!(blob_at(&manifest, CHECKPOINTS_BLOB, &digests[0]).is_some());
    assert!(blob_at(&manifest, CHECKPOINTS_BLOB, &digests[1]).is_none());
    assert_eq!(manifest["annotations"]["dev.flatfs.index.format"], "7");

    // From the local copy, on a host that never pulled it (`--to`): the same indexes, so
    // the same artifact, listed once; no layer downloaded.
    let host_l = tmp.path().join("host-l");
    let proxy = FaultProxy::start(&reg.host);
    let out = ok(
        &host_l,
        &[
            "index",
            "push",
            &format!("oci:{}:latest", img.display()),
            "--to",
            &proxy.url("app:1"),
            "--tls-verify=false",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), artifact);
    assert!(
        stderr_of(&out).contains("already in the registry; nothing pushed"),
        "{}",
        stderr_of(&out)
    );
    for d in &digests {
        assert!(
            fetched(&proxy, d, big_size) <= 256 * 1024,
            "layer {d} downloaded"
        );
    }
    drop(proxy);

    // Again, from a host that has the indexes cached (nothing downloaded): the same
    // artifact, listed once.
    let out = ok(
        &host_a,
        &["index", "push", &reg.url("app:1"), "--tls-verify=false"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), artifact);
    assert!(
        stderr_of(&out).contains("already in the registry; nothing pushed"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(fallback(&reg, "app").1, list);

    if !fuse_available("artifact_pushed_by_one_host_makes_a_mount_on_another_lazy_at_once") {
        return;
    }
    // Host B, empty cache, behind a proxy that counts bytes: lazy from the start.
    let host_b = tmp.path().join("host-b");
    let proxy = FaultProxy::start(&reg.host);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (log, read) = mount_and_read(&host_b, &proxy.url("app:1"), &mnt);
    assert_eq!(read, want(), "{log}");
    let bytes = fetched(&proxy, &digests[0], big_size);
    eprintln!(
        "host B: {bytes} of the big layer's {big_size} bytes fetched to mount and read two files"
    );
    assert!(bytes * 4 < big_size, "fetched {bytes} of {big_size}");
    assert!(
        host_b.join(format!("{}.idx", &digests[0][7..])).exists(),
        "the imported index is cached"
    );
    // Its checkpoints come once a mount has been up a moment (one only glanced at, or a
    // script's mount, read, unmount, fetches just the windows its reads need).
    let cpt = host_b.join(format!("{}.cpt", &digests[0][7..]));
    ok(
        &host_b,
        &[
            "mount",
            &proxy.url("app:1"),
            mnt.to_str().unwrap(),
            "--tls-verify=false",
        ],
    );
    let start = std::time::Instant::now();
    while !cpt.exists() && start.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ok(&host_b, &["umount", mnt.to_str().unwrap()]);
    assert!(cpt.exists(), "the imported checkpoints are cached");
    assert!(!log.contains("warning"), "{log}");
    // A part of the noise reads right, fetched by ranges.
    let out = ok(
        &host_b,
        &[
            "mount",
            &proxy.url("app:1"),
            mnt.to_str().unwrap(),
            "--tls-verify=false",
        ],
    );
    let mid = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(mnt.join("data/noise.bin")).unwrap();
        let mut buf = vec![0u8; 4096];
        let r = f.read_exact_at(&mut buf, 7 << 20);
        r.map(|()| buf)
    };
    ok(&host_b, &["umount", mnt.to_str().unwrap()]);
    assert_eq!(
        mid.unwrap(),
        noise[7 << 20..(7 << 20) + 4096],
        "{}",
        stderr_of(&out)
    );

    // Host N will not use artifacts: it never asks for one, and reads the layers itself.
    let host_n = tmp.path().join("host-n");
    let proxy = FaultProxy::start(&reg.host);
    let out = ok(
        &host_n,
        &[
            "mount",
            &proxy.url("app:1"),
            mnt.to_str().unwrap(),
            "--tls-verify=false",
            "--no-index-artifact",
        ],
    );
    let read = std::fs::read(mnt.join("data/tail.txt"));
    ok(&host_n, &["umount", mnt.to_str().unwrap()]);
    assert_eq!(read.unwrap(), want()[0], "{}", stderr_of(&out));
    let asked: Vec<String> = proxy.seen().iter().map(|s| s.path.clone()).collect();
    assert!(
        !asked
            .iter()
            .any(|p| p.contains("/manifests/sha256-") || p.contains("/referrers/")),
        "{asked:?}"
    );
    assert!(fetched(&proxy, &digests[0], big_size) >= big_size);
}

#[test]
fn artifact_tampered_or_lying_is_refused_and_the_mount_reads_the_layers() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (img, _, digests) = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "app:1");
    let host_a = tmp.path().join("host-a");
    let out = ok(
        &host_a,
        &["index", "push", &reg.url("app:1"), "--tls-verify=false"],
    );
    let artifact = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let manifest = get_doc(&reg, "app", &artifact, OCI_MANIFEST);
    let first = blob_at(&manifest, INDEX_BLOB, &digests[0]).unwrap();
    let first_blob = manifest["layers"][first]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    if !fuse_available("artifact_tampered_or_lying_is_refused_and_the_mount_reads_the_layers") {
        return;
    }
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();

    // A registry (or proxy) that flips a byte of an index blob: its digest catches it.
    let proxy = FaultProxy::start(&reg.host);
    proxy.inject(Fault::Corrupt {
        path: format!("/blobs/{first_blob}"),
        times: 1000,
    });
    let (log, read) = mount_and_read(&tmp.path().join("host-c"), &proxy.url("app:1"), &mnt);
    assert_eq!(read, want(), "{log}");
    assert!(
        log.contains("warning") && log.contains("digest mismatch") && log.contains(&digests[0]),
        "{log}"
    );

    // A well-formed artifact whose indexes do not fit: each blob claims the other layer.
    let mut lying = manifest.clone();
    let second = blob_at(&manifest, INDEX_BLOB, &digests[1]).unwrap();
    let (a, b) = (
        lying["layers"][first]["annotations"].clone(),
        lying["layers"][second]["annotations"].clone(),
    );
    lying["layers"][first]["annotations"] = b;
    lying["layers"][second]["annotations"] = a;
    replace_artifact(&reg, &lying, Vec::new());
    let host_d = tmp.path().join("host-d");
    let (log, read) = mount_and_read(&host_d, &reg.url("app:1"), &mnt);
    assert_eq!(read, want(), "{log}");
    assert!(
        log.contains("warning") && log.contains("it is the index of"),
        "{log}"
    );

    // A well-formed index of the right layer whose first span digest lies (checksums
    // resealed, as whoever forged it would): the first span fetched does not check, the
    // index is dropped and the layer pulled.
    let (status, _, packed) = http(
        &reg.host,
        "GET",
        &format!("/v2/app/blobs/{first_blob}"),
        &[],
        &[],
    );
    assert_eq!(status, 200);
    let mut index = zstd::stream::decode_all(&packed[..]).expect("zstd index blob");
    let blob = std::fs::read(img.join("blobs/sha256").join(&digests[0][7..])).unwrap();
    let span0 = sha256_bytes(&blob[..256 * 1024]);
    let at = index
        .windows(32)
        .position(|w| w == span0)
        .expect("first span digest in the index");
    index[at] ^= 1;
    let head_end = 20 + u64::from_le_bytes(index[12..20].try_into().unwrap()) as usize;
    let sum = crc32fast::hash(&index[..head_end]).to_le_bytes();
    index[head_end..head_end + 4].copy_from_slice(&sum);
    let end = index.len() - 4;
    let sum = crc32fast::hash(&index[head_end + 4..end]).to_le_bytes();
    index[end..].copy_from_slice(&sum);
    let forged_blob = zstd::bulk::compress(&index, 3).unwrap();
    let mut forged = manifest.clone();
    forged["layers"][first]["digest"] = Value::from(format!("sha256:{}", sha256_hex(&forged_blob)));
    forged["layers"][first]["size"] = Value::from(forged_blob.len());
    replace_artifact(&reg, &forged, vec![forged_blob]);
    let host_e = tmp.path().join("host-e");
    let (log, read) = mount_and_read(&host_e, &reg.url("app:1"), &mnt);
    assert_eq!(read, want(), "{log}");
    assert!(
        log.contains(&format!(
            "not using the index artifact for layer {}",
            digests[0]
        )),
        "{log}"
    );
    let partial = host_e.join("blobs/partial").join(&digests[0][7..]);
    assert!(!partial.exists(), "{} left behind", partial.display());
    // The index cached in the end is the one the pass over the layer built.
    let (again, read) = mount_and_read(&host_e, &reg.url("app:1"), &mnt);
    assert_eq!(read, want(), "{again}");
    assert!(!again.contains("warning"), "{again}");
}

fn sha256_bytes(data: &[u8]) -> Vec<u8> {
    let hex = sha256_hex(data);
    (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// A registry with the referrers API, as far as flatfs needs one: distribution 2.8 behind a
/// front that answers `GET /v2/NAME/referrers/DIGEST` from the manifests with a `subject` put
/// through it, and says `OCI-Subject` when it takes one (as the spec asks). Stops on drop.
struct ReferrersFront {
    host: String,
    listed: std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>,
    referrer_gets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for ReferrersFront {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(&self.host);
    }
}

impl ReferrersFront {
    fn start(upstream: &str) -> ReferrersFront {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let front = ReferrersFront {
            host,
            listed: Default::default(),
            referrer_gets: Default::default(),
            stop: Default::default(),
        };
        let (listed, gets, stop, up) = (
            front.listed.clone(),
            front.referrer_gets.clone(),
            front.stop.clone(),
            upstream.to_string(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { break };
                let Ok((seen, body)) = read_request(&conn) else {
                    continue;
                };
                if let Some(rest) = seen.path.split("/referrers/").nth(1) {
                    gets.fetch_add(1, Ordering::Relaxed);
                    let subject = rest.split('?').next().unwrap_or_default();
                    let list: Vec<Value> = listed
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|(s, _)| s == subject)
                        .map(|(_, d)| d.clone())
                        .collect();
                    let body = serde_json::to_vec(&serde_json::json!(
                        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list}
                    ))
                    .unwrap();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {OCI_INDEX}\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes());
                    let _ = conn.write_all(&body);
                    continue;
                }
                let Ok(mut raw) = forward(&up, &seen, &body, false) else {
                    continue;
                };
                let doc: Value = serde_json::from_slice(&body).unwrap_or_default();
                let subject = doc["subject"]["digest"].as_str();
                if let (true, Some(subject)) = (seen.method == "PUT", subject)
                    && raw.starts_with(b"HTTP/1.1 201")
                {
                    let desc = serde_json::json!({
                        "mediaType": doc["mediaType"],
                        "digest": format!("sha256:{}", sha256_hex(&body)),
                        "size": body.len(),
                        "artifactType": doc["artifactType"],
                        "annotations": doc["annotations"],
                    });
                    let mut l = listed.lock().unwrap();
                    if !l.iter().any(|(_, d)| d["digest"] == desc["digest"]) {
                        l.push((subject.to_string(), desc));
                    }
                    let at = raw.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
                    let header = format!("OCI-Subject: {subject}\r\n");
                    raw.splice(at..at, header.into_bytes());
                }
                let _ = conn.write_all(&raw);
            }
        });
        front
    }
}

#[test]
fn artifact_goes_through_the_referrers_api_where_the_registry_has_one() {
    use std::sync::atomic::Ordering;
    registry_tools(&[]);
    let reg = Registry::start();
    let front = ReferrersFront::start(&reg.host);
    let tmp = tempfile::tempdir().unwrap();
    let (img, _, digests) = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "app:1");
    let url = format!("docker://{}/app:1", front.host);
    let host_a = tmp.path().join("host-a");
    let push = || ok(&host_a, &["index", "push", &url, "--tls-verify=false"]);
    let out = push();
    assert!(
        stderr_of(&out).contains("listed by the referrers API"),
        "{}",
        stderr_of(&out)
    );
    let again = push();
    assert_eq!(again.stdout, out.stdout);
    assert_eq!(front.listed.lock().unwrap().len(), 1);
    // No fallback tag: the registry lists the artifact itself.
    assert!(
        reg.tags("app").iter().all(|t| !t.starts_with("sha256-")),
        "{:?}",
        reg.tags("app")
    );
    if !fuse_available("artifact_goes_through_the_referrers_api_where_the_registry_has_one") {
        return;
    }
    let proxy = FaultProxy::start(&front.host);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let gets = front.referrer_gets.load(Ordering::Relaxed);
    let (log, read) = mount_and_read(&tmp.path().join("host-b"), &proxy.url("app:1"), &mnt);
    assert_eq!(read, want(), "{log}");
    assert!(front.referrer_gets.load(Ordering::Relaxed) > gets);
    let size = std::fs::metadata(img.join("blobs/sha256").join(&digests[0][7..]))
        .unwrap()
        .len();
    let bytes = fetched(&proxy, &digests[0], size);
    assert!(bytes * 4 < size, "fetched {bytes} of {size}");
    assert!(
        proxy
            .seen()
            .iter()
            .all(|s| !s.path.contains("/manifests/sha256-")),
        "the fallback tag was asked for"
    );
}

#[test]
fn index_push_needs_a_registry_image_to_attach_to() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, _, _) = image(tmp.path());
    let cache = tmp.path().join("cache");
    let local = format!("oci:{}:latest", img.display());
    for args in [
        vec!["index", "push", local.as_str()],
        vec!["index", "push", local.as_str(), "--to", local.as_str()],
    ] {
        let out = run(&cache, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr_of(&out);
        assert!(err.contains("give docker://REF"), "{err}");
    }
    let indexed = std::fs::read_dir(&cache).map_or(0, |d| d.count());
    assert_eq!(indexed, 0, "indexed before the arguments were checked");
}

#[test]
fn index_push_to_warns_when_the_local_copy_is_not_the_registry_image() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &[u8]| {
        let layers = vec![layer([file("a.txt", text)]).compression(Compression::Gzip)];
        let path = tmp.path().join(name);
        write_oci_layout(&layers, &default_config(&layers), &path, Some("latest"));
        format!("oci:{}:latest", path.display())
    };
    let (pushed, other) = (write("pushed", b"pushed\n"), write("other", b"other\n"));
    reg.push(&pushed, "app:1");
    let host = tmp.path().join("host");
    let to = reg.url("app:1");

    // The copy that was pushed: its indexes serve, nothing to say.
    let out = ok(
        &host,
        &["index", "push", &pushed, "--to", &to, "--tls-verify=false"],
    );
    assert!(
        !stderr_of(&out).contains("not in it"),
        "{}",
        stderr_of(&out)
    );

    // Another image: the artifact is still REF's, but the user hears that the local copy
    // was of no use and REF's layers were downloaded.
    let out = ok(
        &host,
        &["index", "push", &other, "--to", &to, "--tls-verify=false"],
    );
    let err = stderr_of(&out);
    assert!(
        err.contains("1 of") && err.contains("layers are not in it"),
        "{err}"
    );
}

/// The checkpoints of a layer come after the mount: a read that needs one before they are
/// here gets its window alone; a checkpoints blob that is tampered with (in transit, or
/// forged with a digest of its own) is refused and the layer read from its start, right; an
/// artifact of another format is not used at all.
#[test]
fn artifact_checkpoints_come_after_the_mount_checked_and_an_old_format_is_ignored() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (img, _, digests) = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "app:1");
    let big_size = std::fs::metadata(img.join("blobs/sha256").join(&digests[0][7..]))
        .unwrap()
        .len();
    let out = ok(
        &tmp.path().join("host-a"),
        &["index", "push", &reg.url("app:1"), "--tls-verify=false"],
    );
    let artifact = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let manifest = get_doc(&reg, "app", &artifact, OCI_MANIFEST);
    let at = blob_at(&manifest, CHECKPOINTS_BLOB, &digests[0]).expect("a checkpoints blob");
    let cpt_blob = manifest["layers"][at]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let cpt_size = manifest["layers"][at]["size"].as_u64().unwrap();
    if !fuse_available(
        "artifact_checkpoints_come_after_the_mount_checked_and_an_old_format_is_ignored",
    ) {
        return;
    }
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let cpt_file = |host: &Path| host.join(format!("{}.cpt", &digests[0][7..]));

    // The whole checkpoints blob stalls for 6 s: a read at the end of the big layer gets
    // the window it needs by a range of its own, and does not wait.
    let proxy = FaultProxy::start(&reg.host);
    proxy.inject(Fault::Stall {
        path: format!("/blobs/{cpt_blob}"),
        after: 0,
        secs: 6,
        times: 1,
    });
    let host = tmp.path().join("host-b");
    let out = ok(
        &host,
        &[
            "mount",
            &proxy.url("app:1"),
            mnt.to_str().unwrap(),
            "--tls-verify=false",
        ],
    );
    // Wait until the fetch of the whole blob (the stalled one) has gone out.
    let asked = |proxy: &FaultProxy| {
        proxy
            .seen()
            .iter()
            .filter(|s| s.path.ends_with(&format!("/blobs/{cpt_blob}")))
            .count()
    };
    let start = std::time::Instant::now();
    while asked(&proxy) == 0 && start.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!cpt_file(&host).exists(), "the stalled blob arrived");
    let start = std::time::Instant::now();
    let read = std::fs::read(mnt.join("data/tail.txt"));
    let took = start.elapsed();
    let windows: Vec<u64> = proxy
        .seen()
        .iter()
        .filter(|s| s.path.ends_with(&format!("/blobs/{cpt_blob}")))
        .filter_map(|s| s.header("range").map(str::to_string))
        .map(|r| {
            let (a, b) = r.trim_start_matches("bytes=").split_once('-').unwrap();
            b.parse::<u64>().unwrap() + 1 - a.parse::<u64>().unwrap()
        })
        .collect();
    // Then the whole blob comes (asked again after the stall), is checked and kept.
    let start_wait = std::time::Instant::now();
    while !cpt_file(&host).exists() && start_wait.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let kept = cpt_file(&host).exists();
    ok(&host, &["umount", mnt.to_str().unwrap()]);
    assert_eq!(read.unwrap(), want()[0], "{}", stderr_of(&out));
    assert!(took.as_secs() < 5, "the read waited {took:?}");
    assert!(
        windows.iter().any(|&n| n < cpt_size / 2),
        "no window fetched alone: {windows:?} of {cpt_size}"
    );
    assert!(kept, "the checkpoints were not kept");
    assert_eq!(
        std::fs::read(cpt_file(&host)).unwrap().len() as u64,
        cpt_size
    );

    // Every byte of the checkpoints blob flipped in transit: its digest (and each window's
    // sha256) refuse it; the layer is read from its start, right, and nothing is kept.
    let proxy = FaultProxy::start(&reg.host);
    proxy.inject(Fault::Corrupt {
        path: format!("/blobs/{cpt_blob}"),
        times: 1000,
    });
    let host = tmp.path().join("host-c");
    let (log, read) = mount_and_read(&host, &proxy.url("app:1"), &mnt);
    assert_eq!(read, want(), "{log}");
    assert!(!cpt_file(&host).exists());
    assert!(fetched(&proxy, &digests[0], big_size) >= big_size / 2);

    // A forged checkpoints blob that matches its own digest but not the sha256 digests the
    // index names (a byte of every window's frame flipped: the noise's windows do not
    // compress, so each frame is about 32 KiB): refused all the same, whole or a window alone.
    let mut forged = std::fs::read(cpt_file(&tmp.path().join("host-b"))).unwrap();
    for i in (10..forged.len()).step_by(512) {
        forged[i] ^= 1;
    }
    let mut lying = manifest.clone();
    lying["layers"][at]["digest"] = Value::from(format!("sha256:{}", sha256_hex(&forged)));
    replace_artifact(&reg, &lying, vec![forged]);
    let proxy = FaultProxy::start(&reg.host);
    let host = tmp.path().join("host-d");
    let (log, read) = mount_and_read(&host, &proxy.url("app:1"), &mnt);
    assert_eq!(read, want(), "{log}");
    assert!(!cpt_file(&host).exists());
    assert!(fetched(&proxy, &digests[0], big_size) >= big_size / 2);

    // An artifact of another format (an older flatfs's) is not even fetched: the layers
    // are read as without one.
    let mut old = manifest.clone();
    old["annotations"]["dev.flatfs.index.format"] = Value::from("6");
    replace_artifact(&reg, &old, Vec::new());
    let proxy = FaultProxy::start(&reg.host);
    let host = tmp.path().join("host-e");
    let (log, read) = mount_and_read(&host, &proxy.url("app:1"), &mnt);
    assert_eq!(read, want(), "{log}");
    assert!(
        proxy
            .seen()
            .iter()
            .all(|s| !s.path.contains("/manifests/sha256:")),
        "the old artifact was fetched"
    );
    assert!(fetched(&proxy, &digests[0], big_size) >= big_size);
}
