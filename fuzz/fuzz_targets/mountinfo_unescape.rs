//! The decoder of /proc/self/mountinfo fields (mount points under a pod's share, which the
//! guest names): any input against a strict model of the kernel's escaping (`\` and three
//! octal digits, as `seq_path` writes space, tab, newline and backslash), and every path
//! through escape-then-decode unchanged.
#![no_main]

use husk_sandbox::fuzzing::unescape_mountinfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(field) = std::str::from_utf8(data) else {
        return;
    };
    assert_eq!(
        unescape_mountinfo(field),
        model(field),
        "decoding {field:?}"
    );
    assert_eq!(
        unescape_mountinfo(&escape(field)),
        field,
        "round trip of {field:?}"
    );
});

/// `\ooo` (three octal digits, at most `\377`) is one byte; everything else is itself.
fn model(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let digits = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match digits {
            Some(d) if b == b'\\' && d[0] <= b'3' => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The kernel's `mangle_path(" \t\n\\")`.
fn escape(path: &str) -> String {
    let mut out = String::new();
    for c in path.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}
