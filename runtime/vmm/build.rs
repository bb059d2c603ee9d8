//! Assembles the guest payloads in payloads/ (GNU as + objcopy, from binutils) into flat
//! binaries in OUT_DIR, for `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

/// The payloads (file stems in payloads/); more join as the tests need them.
const PAYLOADS: &[&str] = &["probe"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in PAYLOADS {
        let src = format!("payloads/{name}.S");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let bin = out.join(format!("{name}.bin"));
        run(Command::new("as").args(["--64", "-o"]).arg(&obj).arg(&src));
        run(Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin));
    }
}

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (binutils installed?)"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}
