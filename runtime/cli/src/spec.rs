//! `husk spec`: write runc's default config.json.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

/// `husk spec [--bundle DIR] [--rootless]`.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Directory to write config.json into.
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    /// A spec for a container without root on the host: a user namespace mapping the calling
    /// user, as `runc spec --rootless`.
    #[arg(long)]
    rootless: bool,
}

/// Writes `<bundle>/config.json`, refusing to overwrite one (as runc does).
pub fn spec(args: &SpecArgs) -> anyhow::Result<()> {
    let path = args.bundle.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let spec = match args.rootless {
        true => oci_spec::runtime::Spec::rootless(
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        ),
        false => oci_spec::runtime::Spec::default(),
    };
    let json = serde_json::to_string_pretty(&spec)?;
    std::fs::write(&path, json + "\n").with_context(|| format!("cannot write {}", path.display()))
}
