//! Helpers shared by the CLI's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;

/// Copies a directory tree (a model a test may then damage or rearrange).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// (max, mean) absolute difference over the RGB channels of two PNGs of the same size.
pub fn png_difference(actual: &[u8], expected_path: &Path) -> (u8, f64) {
    let actual = image::load_from_memory(actual).expect("decode output").to_rgb8();
    let expected = image::open(expected_path).expect("decode golden").to_rgb8();
    assert_eq!(actual.dimensions(), expected.dimensions(), "{}: size", expected_path.display());
    let diffs: Vec<u8> = actual.as_raw().iter().zip(expected.as_raw()).map(|(a, b)| a.abs_diff(*b)).collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
    (max, mean)
}
