//! The pasta face: argv\[0\] `pasta`, as podman ≥ 5 and rootlesskit ≥ 2 start it
//! (`../shared/COMPAT.md`). The grammar is the native one, whose names are pasta's; this
//! file holds what is pasta's own: the program name in messages, the `--version` text, and
//! the marking of the parsed arguments as pasta's, from which [`Args::into_config`] takes
//! pasta's defaults (see the table in `cli`).

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches};

use super::{Args, Face};

/// What `pasta --version` prints (rootlesskit only checks that it exits 0; people read
/// the first line).
pub const VERSION_TEXT: &str = concat!(
    "pasta ",
    env!("CARGO_PKG_VERSION"),
    " (forwarder, a pasta-compatible front end)\n",
    "License: ",
    env!("CARGO_PKG_LICENSE"),
    "\n"
);

/// Parses pasta's command line. `--version` prints [`VERSION_TEXT`] and exits 0; usage
/// errors exit 1 with pasta's "Try --help" hint after clap's message (pasta exits 1).
pub(super) fn parse(argv: Vec<OsString>) -> Args {
    if argv.iter().skip(1).any(|a| a == "--version") {
        print!("{VERSION_TEXT}");
        std::process::exit(0);
    }
    let command = Args::command()
        .name("pasta")
        .bin_name("pasta")
        .about("pasta (forwarder's pasta face): connect a network namespace to the host's network without privileges")
        .disable_version_flag(true);
    match command
        .try_get_matches_from(argv)
        .and_then(|m| Args::from_arg_matches(&m))
    {
        Ok(mut args) => {
            args.face = Face::Pasta;
            args
        }
        Err(err) => {
            let code = if err.use_stderr() { 1 } else { 0 };
            let _ = err.print();
            std::process::exit(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_and_rootlesskit_argv_parse() {
        let podman = [
            "pasta",
            "--config-net",
            "-t",
            "8080",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--dns-forward",
            "169.254.1.1",
            "--no-map-gw",
            "--quiet",
            "--netns",
            "/run/user/1000/netns/x",
            "--map-guest-addr",
            "169.254.1.2",
        ];
        let args = parse(podman.iter().map(OsString::from).collect());
        assert_eq!(args.face, Face::Pasta);
        assert!(args.no_map_gw && args.quiet && args.config_net);
        let kit = [
            "pasta",
            "--stderr",
            "--ns-ifname=tap0",
            "--mtu=65520",
            "--config-net",
            "--address=10.0.2.100",
            "--netmask=24",
            "--gateway=10.0.2.2",
            "--dns-forward=10.0.2.3",
            "--tcp-ports=none",
            "--udp-ports=none",
            "--host-lo-to-ns-lo",
            "4242",
        ];
        let args = parse(kit.iter().map(OsString::from).collect());
        assert!(args.stderr && args.host_lo_to_ns_lo);
        assert_eq!(args.command, vec![OsString::from("4242")]);
    }
}
