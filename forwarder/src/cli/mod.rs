//! # Theory of operation
//!
//! The front ends: each face of forwarder is one file here that turns its own command line
//! into the one [`Config`](crate::config::Config); nothing below `cli` knows which face
//! started the process (`../shared/DESIGN.md`, "One engine, several faces"). A face owns its
//! grammar, its defaults and its messages; the value parsers they share (addresses, masks,
//! MACs, port specs, rules, bounds) and the drawing of the engine's ISS key live here, so
//! two faces cannot disagree about what `-a 198.51.100.2/24` means.
//!
//! | face | file | selected by |
//! |---|---|---|
//! | native (pasta's names, a superset) | `native.rs` | the `forwarder` binary |
//! | pasta | `pasta.rs` | argv\[0\] `pasta` (podman 5, rootlesskit 2) |
//!
//! argv\[0\]'s file name picks the face ([`Face::of`]); `slirp4netns`, `slirpnetstack` and
//! `passt` are recognised and refused with a message until their faces exist, rather than
//! being parsed with the wrong grammar. The pasta face shares the native parser (its names
//! are the native ones) and differs in its defaults: `auto` for each of `-t/-u/-T/-U`, DNS
//! not advertised unless `--dhcp-dns`, the background process of pasta's contract, and
//! pasta's `--version` text. Options of pasta that forwarder cannot honour yet are parsed
//! so that they are refused by name (`native::Unsupported`), never silently ignored.
//!
//! Errors name the option and the value; a usage error exits 2 (clap), a plan that cannot
//! work is refused before anything is set up.

mod native;
mod pasta;

use std::net::IpAddr;

use anyhow::Result;

pub use native::Args;
pub use pasta::VERSION_TEXT as PASTA_VERSION_TEXT;

/// Which tool's command line this process speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Face {
    /// `forwarder`.
    #[default]
    Native,
    /// `pasta`.
    Pasta,
}

/// What argv\[0\] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invocation {
    /// A face this binary speaks.
    Face(Face),
    /// A tool whose face does not exist yet (its name).
    NotYet(&'static str),
}

impl Face {
    /// The face argv\[0\]'s file name selects: `pasta` (also `pasta.avx2`), the names of
    /// faces still to come, or the native one for anything else.
    #[must_use]
    pub fn of(argv0: &std::ffi::OsStr) -> Invocation {
        let name = std::path::Path::new(argv0)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        let stem = name.split('.').next().unwrap_or(name);
        match stem {
            "pasta" => Invocation::Face(Self::Pasta),
            "passt" => Invocation::NotYet("passt"),
            "slirp4netns" => Invocation::NotYet("slirp4netns"),
            "slirpnetstack" => Invocation::NotYet("slirpnetstack"),
            _ => Invocation::Face(Self::Native),
        }
    }
}

/// The `forwarder(1)` man page, generated from the native command line (every option's
/// help as `--help` shows it) with a FACES section: what `forwarder man` prints.
///
/// # Errors
///
/// Rendering failing (an I/O error of the in-memory buffer).
pub fn man_page() -> std::io::Result<Vec<u8>> {
    use clap::CommandFactory;
    let man = clap_mangen::Man::new(Args::command());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    out.extend_from_slice(FACES_SECTION.as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// The man page's FACES section (roff).
const FACES_SECTION: &str = r#".SH FACES
The name forwarder is started as selects the command line it speaks.
.TP
\fBforwarder\fR
The native face: pasta's option names, as a superset (this page).
.TP
\fBpasta\fR
A link named pasta (as podman 5 and rootlesskit 2 start it): the same options with pasta's
defaults (\-t, \-u, \-T, \-U default to auto; DNS servers are not advertised unless
\-\-dhcp\-dns), pasta's \-\-version, and pasta's process contract: serving an existing
namespace without \-f, forwarder forks into the background once the namespace is served; the
foreground exits 0 (or 1 with the reason), the daemon keeps no standard stream, \-\-pid names
it, and it exits when the namespace is gone unless \-\-no\-netns\-quit.
.TP
\fBslirp4netns\fR, \fBslirpnetstack\fR, \fBpasst\fR
Recognised and refused with a message until their faces exist.
.PP
Options of pasta that forwarder cannot honour yet are refused by name with the reason, never
ignored. docs/faces.md lists what each face serves and every known difference.
"#;

/// Parses the command line as `face` speaks it; `--help`, `--version` and usage errors
/// end the process the way that tool does.
#[must_use]
pub fn parse(face: Face, argv: Vec<std::ffi::OsString>) -> Args {
    match face {
        Face::Native => {
            use clap::Parser;
            Args::parse_from(argv)
        }
        Face::Pasta => pasta::parse(argv),
    }
}

use crate::forward::Spec;
use crate::policy::Rule;
use crate::wire::EthernetAddress;

/// A `-t`/`-u`/`-T`/`-U` value: as written (pasta's rules are built from the text, see
/// `forward::rule`) and as forwarder's grammar reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortsArg {
    /// The value as given.
    pub text: String,
    /// What it means.
    pub spec: Spec,
}

pub(super) fn parse_ports(s: &str) -> Result<PortsArg, String> {
    crate::forward::parse_spec(s)
        .map(|spec| PortsArg {
            text: s.to_string(),
            spec,
        })
        .map_err(|e| e.to_string())
}

pub(super) fn parse_remote(s: &str) -> Result<crate::forward::RemoteForward, String> {
    crate::forward::parse_remote(s).map_err(|e| e.to_string())
}

pub(super) fn parse_rule(s: &str) -> Result<Rule, String> {
    s.parse::<Rule>().map_err(|e| e.to_string())
}

pub(super) fn parse_addr(s: &str) -> Result<(IpAddr, Option<u8>), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (
            a,
            Some(
                l.parse::<u8>()
                    .map_err(|_| format!("prefix length {l:?} is not a number"))?,
            ),
        ),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len.is_some_and(|l| l > max) {
        return Err(format!("prefix length must be at most {max}"));
    }
    Ok((addr, len))
}

pub(super) fn parse_netmask(s: &str) -> Result<u8, String> {
    if let Ok(len) = s.parse::<u8>() {
        return if len <= 32 {
            Ok(len)
        } else {
            Err("prefix length must be 0-32".into())
        };
    }
    let mask: std::net::Ipv4Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is neither a prefix length nor a dotted mask"))?;
    let bits = u32::from(mask);
    if bits.leading_ones() + bits.trailing_zeros() != 32 {
        return Err(format!("{s} is not a contiguous netmask"));
    }
    u8::try_from(bits.leading_ones()).map_err(|_| "bad mask".into())
}

pub(super) fn parse_mac(s: &str) -> Result<EthernetAddress, String> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?} is not a MAC address"))?;
    let arr: [u8; 6] = bytes
        .try_into()
        .map_err(|_| format!("{s:?} is not a MAC address (six hex bytes)"))?;
    let mac = EthernetAddress(arr);
    if !mac.is_unicast() {
        return Err(format!("{s} is a multicast address"));
    }
    Ok(mac)
}

/// A fresh key for the engine's initial sequence numbers, from the OS's random source.
pub(super) fn iss_secret() -> Result<[u8; 16]> {
    let mut key = [0; 16];
    getrandom::fill(&mut key).map_err(|err| anyhow::anyhow!("read the OS random source: {err}"))?;
    Ok(key)
}

pub(super) fn parse_max_flows(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (1..=MAX_MAX_FLOWS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be 1-{MAX_MAX_FLOWS}"))
    }
}

/// The largest `--max-flows` accepted.
pub const MAX_MAX_FLOWS: usize = 1 << 20;

#[cfg(test)]
mod tests {
    #[test]
    fn the_man_page_has_the_options_and_the_faces() {
        let page = String::from_utf8(super::man_page().unwrap()).unwrap();
        assert!(
            page.starts_with(".ie") || page.contains(".TH forwarder"),
            "{}",
            &page[..200]
        );
        for needle in [
            ".SH OPTIONS",
            ".SH FACES",
            "netns\\-only",
            "tcp\\-ports",
            "pasta",
        ] {
            assert!(page.contains(needle), "{needle} missing");
        }
    }
}
