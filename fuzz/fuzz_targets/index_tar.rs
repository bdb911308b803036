//! Fuzz target for the layer indexer: arbitrary bytes as a layer tar, then the overlay merge.
//! Any panic (overflow included: build with debug assertions) is a bug; errors are fine.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// A mutated header almost never keeps a valid checksum, and the reader stops at the first bad
/// one; so besides the input as it is, the harness also tries it with the checksum of every
/// block carrying the ustar magic made right, which lets mutations reach the fields behind it.
fn with_checksums_fixed(data: &[u8]) -> Vec<u8> {
    let mut data = data.to_vec();
    for block in data.chunks_exact_mut(512) {
        if &block[257..262] == b"ustar" {
            block[148..156].fill(b' ');
            let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
            block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        }
    }
    data
}

fn check(data: &[u8]) {
    let Ok(index) = flatfs::layer::index::index_tar(data, "fuzz") else {
        return;
    };
    // One layer (borrowed, as inspect merges), then the same layer over itself (owned, as
    // mount and export merge): its whiteouts and opaque markers then hide paths of a lower
    // layer, and every entry replaces or merges with its twin.
    let single = flatfs::tree::merge(std::slice::from_ref(&index));
    let double = flatfs::tree::merge_owned(vec![index.clone(), index]);
    for merged in [single, double] {
        if let Ok(tree) = merged {
            let mut names = 0usize;
            tree.walk(|_, _, _| {
                names += 1;
                Ok(())
            })
            .expect("walk only fails when its visitor does");
            assert!(names >= tree.len(), "every node has a name");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&with_checksums_fixed(data));
});
