//! `forwarder ctl`: the runtime API from the command line (protocol in `docs/api.md`).
//!
//! Each subcommand is one request on one connection to the API socket. The reply's
//! `return` is printed (a table for `list`, counters one per line for `stats`, or the JSON
//! itself with `--json`); an `error` is printed to standard error with exit status 1;
//! a socket that cannot be reached exits 2, like a usage error.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

/// Control a running forwarder through its API socket.
#[derive(Debug, Parser)]
#[command(name = "forwarder ctl", version)]
struct Ctl {
    /// The API socket forwarder was started with (`--api-socket`).
    #[arg(short = 's', long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Print the reply as JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    op: Op,
}

#[derive(Debug, Subcommand)]
enum Op {
    /// List the forwards (id, kind, origin, ports).
    List,
    /// Add a forward, all ports or none: KIND is tcp, udp (host → namespace), tcp-ns or
    /// udp-ns (namespace → host); SPEC uses the -t syntax (e.g. 8080:80, 9000-9010).
    Add {
        /// tcp, udp, tcp-ns or udp-ns.
        kind: String,
        /// Ports, as for -t.
        spec: String,
    },
    /// Remove the forward with this id; connections in flight go on.
    Remove {
        /// The id `list` shows.
        id: u32,
    },
    /// The data plane's counters.
    Stats,
    /// Every flow: ID, PROTO, PATH (userspace, or kernel for `--ebpf`'s fast path), STATE,
    /// GUEST, REMOTE, HOST (a kernel flow's host address and reserved port), and a kernel
    /// flow's packets and bytes out/in.
    Flows,
    /// Send a raw JSON request and print the reply.
    Raw {
        /// The request, e.g. '{"execute":"list_forwards"}'.
        request: String,
    },
}

/// Runs `forwarder ctl ARGS` (`args` starts with "ctl").
#[must_use]
pub fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    let ctl = Ctl::parse_from(args);
    let request = match &ctl.op {
        Op::List => json!({"execute": "list_forwards"}),
        Op::Add { kind, spec } => {
            json!({"execute": "add_forward", "arguments": {"kind": kind, "spec": spec}})
        }
        Op::Remove { id } => json!({"execute": "remove_forward", "arguments": {"id": id}}),
        Op::Stats => json!({"execute": "stats"}),
        Op::Flows => json!({"execute": "list_flows"}),
        Op::Raw { request } => match serde_json::from_str(request) {
            Ok(v) => v,
            Err(err) => {
                eprintln!("forwarder ctl: the request is not JSON: {err}");
                return ExitCode::from(2);
            }
        },
    };
    let reply = match exchange(&ctl.api_socket, &request) {
        Ok(r) => r,
        Err(err) => {
            eprintln!("forwarder ctl: {}: {err}", ctl.api_socket.display());
            return ExitCode::from(2);
        }
    };
    if let Some(desc) = reply.pointer("/error/desc") {
        eprintln!(
            "forwarder ctl: {}",
            desc.as_str().unwrap_or("unknown error")
        );
        return ExitCode::from(1);
    }
    let ret = reply.get("return").cloned().unwrap_or(Value::Null);
    if ctl.json || matches!(ctl.op, Op::Raw { .. }) {
        println!("{ret}");
    } else {
        match ctl.op {
            Op::List => print_list(&ret),
            Op::Add { .. } => println!("{}", ret.get("id").unwrap_or(&Value::Null)),
            Op::Stats => {
                if let Some(map) = ret.get("counters").and_then(Value::as_object) {
                    for (name, n) in map {
                        println!("{name} {n}");
                    }
                }
            }
            Op::Flows => print_flows(&ret),
            Op::Remove { .. } | Op::Raw { .. } => {}
        }
    }
    ExitCode::SUCCESS
}

fn exchange(path: &std::path::Path, request: &Value) -> std::io::Result<Value> {
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    stream.write_all(request.to_string().as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    serde_json::from_slice(&reply).map_err(|e| std::io::Error::other(format!("bad reply: {e}")))
}

fn print_list(ret: &Value) {
    println!("ID\tKIND\tORIGIN\tPORTS");
    for e in ret
        .get("entries")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ports: Vec<String> = e
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| {
                let bind = p
                    .get("bind")
                    .and_then(Value::as_str)
                    .map(|b| format!("{b}/"))
                    .unwrap_or_default();
                format!(
                    "{bind}{}:{}",
                    p.get("listen").unwrap_or(&Value::Null),
                    p.get("to").unwrap_or(&Value::Null)
                )
            })
            .collect();
        println!(
            "{}\t{}\t{}\t{}",
            e.get("id").unwrap_or(&Value::Null),
            e.get("kind").and_then(Value::as_str).unwrap_or("?"),
            e.get("origin").and_then(Value::as_str).unwrap_or("?"),
            ports.join(",")
        );
    }
}

fn print_flows(ret: &Value) {
    println!("ID\tPROTO\tPATH\tSTATE\tGUEST\tREMOTE\tHOST\tOUT\tIN");
    let text = |f: &Value, k: &str| f.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let n = |f: &Value, k: &str| f.get(k).map_or_else(|| "-".to_string(), Value::to_string);
    for f in ret
        .get("flows")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}p/{}B\t{}p/{}B",
            n(f, "id"),
            text(f, "protocol"),
            text(f, "path"),
            text(f, "state"),
            text(f, "guest"),
            text(f, "remote"),
            text(f, "host"),
            n(f, "packets_out"),
            n(f, "bytes_out"),
            n(f, "packets_in"),
            n(f, "bytes_in"),
        );
    }
}
