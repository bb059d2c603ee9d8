//! config.json loading: any bytes as the config.json of a bundle (with a rootfs directory),
//! loaded alone and as a pod's sandbox and member container, and as the OCI `process` and
//! `linux.resources` objects of `exec -p` and the shim's Update.
#![no_main]

use husk_sandbox::bundle::{process_from_json, resources_from_json, Bundle, PodRole};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As `exec -p` (LSM labels refused) and as the shim's Exec (dropped).
    let _ = process_from_json(data, false);
    let _ = process_from_json(data, true);
    let _ = resources_from_json(data);
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    if std::fs::create_dir(dir.path().join("rootfs")).is_err()
        || std::fs::write(dir.path().join("config.json"), data).is_err()
    {
        return;
    }
    let roles = [
        PodRole::Alone,
        PodRole::Sandbox,
        PodRole::Member { sandbox: "sandbox" },
    ];
    for role in roles {
        if let Ok(bundle) = Bundle::load_in_pod(dir.path(), "fuzz", role) {
            let _ = bundle.vm.clone();
        }
    }
});
