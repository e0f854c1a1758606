//! Real networks on one machine, for tests that need nodes behind NAT or
//! on a slow line: Linux network namespaces joined by veth pairs, a router
//! namespace that masquerades (nftables, else iptables), and `tc` shaping
//! on a link's egress. Needs root and `ip`, `tc` and `nft` or `iptables`;
//! a test that uses it fails, with one line saying what is missing, when
//! they are not there (CI provides them: it must not skip silently).
//!
//! ```text
//!   root namespace: "the internet" (coordinator, storers, ...)
//!     {id}uN   100.64.a.b/30        one /30 per home, from the pid
//!        │ veth
//!   router namespace: forwards, masquerades what leaves by its uplink,
//!     {id}uN   100.64.a.b+1/30      egress shaped (the home's uplink)
//!     {id}lN   192.168.1.1/24
//!        │ veth
//!   home namespace: default route via 192.168.1.1
//!     {id}hN   192.168.1.2/24
//! ```
//!
//! Names carry the test process's pid (`pluto-PID-N-ROLE` for namespaces,
//! `pPIDxN` for interfaces, at most 15 characters), so parallel runs do
//! not collide; everything goes when the [`Lab`] is dropped, and what a
//! killed earlier run left (a pid no longer alive) goes when the next one
//! starts. Traffic stays on this machine: nothing is routed beyond the
//! root namespace's own addresses.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "pluto-";

/// Labs made by this process so far (for unique names).
static LABS: AtomicU32 = AtomicU32::new(0);

/// Where a tool is, from PATH or the usual system directories (root's
/// PATH in a container may lack the `sbin` ones).
fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| PathBuf::from(d).join(tool))
        .find(|p| p.is_file());
    found
}

fn is_root() -> bool {
    // The effective uid: the second field of the `Uid:` line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// How the home masquerades.
#[derive(Clone, Debug)]
enum Nat {
    Nft(PathBuf),
    Iptables(PathBuf),
}

/// The tools, found; or a panic with one line saying what is missing.
#[derive(Clone, Debug)]
struct Tools {
    ip: PathBuf,
    tc: PathBuf,
    nat: Nat,
}

impl Tools {
    fn find() -> Self {
        let mut missing = Vec::new();
        if !is_root() {
            missing.push("root (network namespaces need CAP_NET_ADMIN; CI runs tests as root)");
        }
        let ip = which("ip");
        let tc = which("tc");
        if ip.is_none() || tc.is_none() {
            missing.push("`ip` and `tc` (apt-get install iproute2)");
        }
        let nat = match (which("nft"), which("iptables")) {
            (Some(p), _) => Some(Nat::Nft(p)),
            (None, Some(p)) => Some(Nat::Iptables(p)),
            (None, None) => {
                missing.push("`nft` or `iptables` (apt-get install nftables)");
                None
            }
        };
        match (ip, tc, nat, missing.is_empty()) {
            (Some(ip), Some(tc), Some(nat), true) => Self { ip, tc, nat },
            _ => panic!(
                "this network test needs, and is missing: {}",
                missing.join("; ")
            ),
        }
    }
}

/// Runs `cmd` and panics, with what it said, unless it succeeds.
fn must(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} could not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `tc tbf` shaper: a line of `rate_kbit`, which lets `burst_bytes`
/// through at once and queues up to `latency_ms` worth of traffic before
/// it drops (as a home modem's buffer does).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Line rate, kbit/s.
    pub rate_kbit: u32,
    /// Bucket size, bytes.
    pub burst_bytes: u32,
    /// The longest a packet may wait in the queue, ms.
    pub latency_ms: u32,
}

/// A home behind a NAT router, as [`Lab::home`] made it.
#[derive(Clone, Debug)]
pub struct Home {
    /// The router's namespace.
    pub router: String,
    /// The home's namespace.
    pub ns: String,
    /// The router's uplink interface (in `router`): what leaves the home
    /// leaves by it, shaped.
    pub uplink: String,
    /// The address in the root namespace the router's uplink reaches: the
    /// one to serve the home from (coordinator, storers).
    pub internet: Ipv4Addr,
    /// The router's address on the uplink: what the internet sees of the
    /// home (masquerade).
    pub public: Ipv4Addr,
    /// The home machine's own address, behind the NAT.
    pub address: Ipv4Addr,
}

/// Namespaces made for one test; all deleted on drop.
pub struct Lab {
    tools: Tools,
    id: String,
    namespaces: Vec<String>,
    homes: u32,
}

impl Lab {
    /// Checks that everything needed is there (else panics with one line
    /// saying what is missing) and removes what killed runs left behind.
    pub fn new() -> Self {
        let tools = Tools::find();
        let lab = Self {
            id: format!(
                "{}-{}",
                std::process::id(),
                LABS.fetch_add(1, Ordering::Relaxed)
            ),
            tools,
            namespaces: Vec::new(),
            homes: 0,
        };
        lab.remove_stale();
        lab
    }

    fn ip(&self) -> Command {
        Command::new(&self.tools.ip)
    }

    /// Deletes namespaces of this module whose process is gone (their
    /// veth pairs go with them).
    fn remove_stale(&self) {
        let list = must(self.ip().args(["netns", "list"]));
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = self.ip().args(["netns", "del", name]).status();
            }
        }
    }

    /// A new namespace, its loopback up.
    pub fn namespace(&mut self, role: &str) -> String {
        let name = format!("{PREFIX}{}-{role}", self.id);
        let _ = self.ip().args(["netns", "del", &name]).output();
        must(self.ip().args(["netns", "add", &name]));
        self.namespaces.push(name.clone());
        must(self.ip().args(["-n", &name, "link", "set", "lo", "up"]));
        name
    }

    /// `program` run inside namespace `ns`.
    pub fn command(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = self.ip();
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Wraps `cmd` so that it runs inside namespace `ns` (same program,
    /// arguments, environment and working directory).
    pub fn inside(&self, ns: &str, cmd: &Command) -> Command {
        let mut c = self.command(ns, cmd.get_program());
        c.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// An interface name of this lab: `p`, the pid, the lab's number and
    /// `tag` (at most 15 characters, the kernel's limit).
    fn ifname(&self, tag: &str) -> String {
        let name = format!("p{}{tag}", self.id.replace('-', "x"));
        assert!(name.len() <= 15, "interface name {name} is too long");
        name
    }

    /// A veth pair: `a` in namespace `a_ns` (None: the root namespace)
    /// with address `a_cidr`, `b` in `b_ns` with `b_cidr`; both up.
    fn veth(&self, a: &str, a_ns: Option<&str>, a_cidr: &str, b: &str, b_ns: &str, b_cidr: &str) {
        must(self.ip().args([
            "link", "add", a, "type", "veth", "peer", "name", b, "netns", b_ns,
        ]));
        if let Some(ns) = a_ns {
            must(self.ip().args(["link", "set", a, "netns", ns]));
        }
        let at = |ns: Option<&str>| {
            let mut c = self.ip();
            if let Some(ns) = ns {
                c.args(["-n", ns]);
            }
            c
        };
        must(at(a_ns).args(["addr", "add", a_cidr, "dev", a]));
        must(at(a_ns).args(["link", "set", a, "up"]));
        must(at(Some(b_ns)).args(["addr", "add", b_cidr, "dev", b]));
        must(at(Some(b_ns)).args(["link", "set", b, "up"]));
    }

    /// A /30 in 100.64.0.0/10 (shared address space, as carrier-grade NAT
    /// uses) that no interface of the root namespace has yet.
    fn free_uplink(&self) -> (Ipv4Addr, Ipv4Addr) {
        let taken = must(self.ip().args(["-o", "-4", "addr", "show"]));
        let start = std::process::id().wrapping_mul(7) ^ self.homes.wrapping_mul(0x9E37);
        for k in 0..1024u32 {
            let slot = (start.wrapping_add(k)) % (1 << 20);
            let base = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + slot * 4;
            let (a, b) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
            if !taken.contains(&format!(" {a}/")) && !taken.contains(&format!(" {b}/")) {
                return (a, b);
            }
        }
        panic!("no free /30 in 100.64.0.0/10 for a home's uplink");
    }

    /// A home behind a NAT router whose uplink reaches the root
    /// namespace; the uplink's egress (home to internet) is shaped by
    /// `shape` when given.
    pub fn home(&mut self, shape: Option<Shape>) -> Home {
        let n = self.homes;
        self.homes += 1;
        let router = self.namespace(&format!("router{n}"));
        let ns = self.namespace(&format!("home{n}"));
        let (internet, public) = self.free_uplink();
        let (up_root, up_router) = (self.ifname(&format!("u{n}")), self.ifname(&format!("r{n}")));
        let (lan_router, lan_home) = (self.ifname(&format!("l{n}")), self.ifname(&format!("h{n}")));
        self.veth(
            &up_root,
            None,
            &format!("{internet}/30"),
            &up_router,
            &router,
            &format!("{public}/30"),
        );
        let address = Ipv4Addr::new(192, 168, 1, 2);
        self.veth(
            &lan_router,
            Some(&router),
            "192.168.1.1/24",
            &lan_home,
            &ns,
            &format!("{address}/24"),
        );
        must(
            self.ip()
                .args(["-n", &ns, "route", "add", "default", "via", "192.168.1.1"]),
        );
        // The router: a default route to the internet, forwarding, and the
        // home's addresses rewritten to its own on the way out.
        must(self.ip().args([
            "-n",
            &router,
            "route",
            "add",
            "default",
            "via",
            &internet.to_string(),
        ]));
        must(
            self.command(&router, "sh")
                .args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]),
        );
        match &self.tools.nat {
            Nat::Nft(nft) => {
                let nft = |rule: &str| {
                    must(self.command(&router, nft).arg(rule));
                };
                nft("add table ip nat");
                nft("add chain ip nat postrouting { type nat hook postrouting priority 100; }");
                nft(&format!(
                    "add rule ip nat postrouting oifname \"{up_router}\" masquerade"
                ));
            }
            Nat::Iptables(iptables) => {
                must(self.command(&router, iptables).args([
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-o",
                    &up_router,
                    "-j",
                    "MASQUERADE",
                ]));
            }
        }
        if let Some(s) = shape {
            must(self.command(&router, &self.tools.tc).args([
                "qdisc",
                "add",
                "dev",
                &up_router,
                "root",
                "tbf",
                "rate",
                &format!("{}kbit", s.rate_kbit),
                "burst",
                &s.burst_bytes.to_string(),
                "latency",
                &format!("{}ms", s.latency_ms),
            ]));
        }
        Home {
            router,
            ns,
            uplink: up_router,
            internet,
            public,
            address,
        }
    }

    /// Bytes interface `iface` of namespace `ns` has sent.
    pub fn tx_bytes(&self, ns: &str, iface: &str) -> u64 {
        let path = format!("/sys/class/net/{iface}/statistics/tx_bytes");
        let text = must(self.command(ns, "cat").arg(&path));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{path} in {ns}: {text:?}: {e}"))
    }

    /// What `tc` says of the qdiscs of `iface` in `ns` (sent, dropped,
    /// overlimits), for a test to print.
    pub fn qdisc_stats(&self, ns: &str, iface: &str) -> String {
        must(
            self.command(ns, &self.tools.tc)
                .args(["-s", "qdisc", "show", "dev", iface]),
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The veth pairs go with their namespaces.
        for ns in self.namespaces.iter().rev() {
            let _ = self.ip().args(["netns", "del", ns]).output();
        }
    }
}
