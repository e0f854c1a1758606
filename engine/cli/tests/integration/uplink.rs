//! A node at home, behind a NAT router whose uplink is a real 2 Mbit/s
//! line (network namespaces, masquerade, `tc tbf`; see [`super::netns`]):
//! its daemon places a 100 MB backup whole, the line carries little more
//! than the replicas' bytes, and the node stays online in the
//! coordinator's books, answering audits of what it holds, throughout.
//! Needs root, `ip`, `tc` and `nft` (or `iptables`); fails saying so
//! without them.

use std::path::Path;
use std::time::{Duration, Instant};

use super::common::*;
use super::exchange::{corpus, held_objects, node_id, set, standing, Net};
use super::netns::{Lab, Shape};
use super::network::Proc;

/// The home's uplink: 2 Mbit/s, with a modem's buffer (300 ms of it).
const UPLINK: Shape = Shape {
    rate_kbit: 2_000,
    burst_bytes: 16 << 10,
    latency_ms: 300,
};
/// What the node backs up: 100 MB that does not compress.
const DATA: usize = 100_000_000;
/// The longest the placing may take: at 2 Mbit/s the replicas need about
/// 400 s of line time.
const WITHIN: Duration = Duration::from_secs(20 * 60);
/// How often the test looks at the books and at the node's placement.
const POLL: Duration = Duration::from_secs(3);

/// `pluto daemon` of `home`, run inside namespace `ns`.
fn daemon_in(lab: &Lab, ns: &str, home: &Path) -> Proc {
    let p = Proc::spawn(
        &mut lab.inside(ns, pluto(home).arg("daemon").env("PLUTO_LOG", "info")),
        &home.with_extension("daemon.log"),
    );
    p.wait_for("holding ", Duration::from_secs(30));
    p
}

#[test]
fn a_slow_home_uplink_places_a_backup_whole() {
    let mut lab = Lab::new();
    let house = lab.home(Some(UPLINK));
    let internet = house.internet.to_string();
    // The coordinator and a storer on the internet side; audits on a
    // short clock (every storer about every 2 s), and a node is offline
    // after 3 heartbeats (3 s) without one.
    let listen = format!("\"{internet}:0\"");
    let net = Net::start_at(
        &internet,
        1,
        &[("listen", listen.as_str())],
        "audit_tick_ms = 100\nstorer_audit_every_ms = 2000\naudit_every_ms = 20000\n\
         proof_deadline_ms = 5000\nstanding_every_ms = 1000\n",
    );

    // The node at home saved its backup before it joined. One copy:
    // two would take twice the line time (about 14 minutes).
    let home = net.path("home");
    ok(pluto(&home).args(["init", "--offer", "256M"]));
    set(&home, "copies", "1");
    let data = net.path("home-data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..4u64 {
        std::fs::write(data.join(format!("part{i}.bin")), noise(40 + i, DATA / 4)).unwrap();
    }
    ok(pluto(&home).arg("backup").arg(&data));
    std::fs::remove_dir_all(&data).unwrap();
    {
        let text = std::fs::read_to_string(home.join("config.toml")).unwrap();
        let (url, key) = net.url.split_once('#').unwrap();
        let joined = format!("coordinator = \"{url}\"\ncoordinator_key = \"{key}\"\n{text}");
        std::fs::write(home.join("config.toml"), joined).unwrap();
    }
    let home_id = node_id(&home);

    // From here on, every byte the home sends crosses the shaped uplink.
    let sent_before = lab.tx_bytes(&house.router, &house.uplink);
    let started = Instant::now();
    let d = daemon_in(&lab, &house.ns, &home);

    // A neighbour on the same home network keeps its backup with the node
    // (over the LAN), so the coordinator audits the node all along, and
    // the answers share the busy uplink.
    let neighbour = net.path("neighbour");
    ok(&mut lab.inside(
        &house.ns,
        pluto(&neighbour)
            .args(["init", "--offer", "256M", "--coordinator"])
            .arg(&net.url),
    ));
    set(&neighbour, "pack_size", "262144");
    set(&neighbour, "copies", "1");
    set(&neighbour, "friends", &format!("[\"{home_id}\"]"));
    set(&neighbour, "friend_copies", "1");
    let theirs = net.path("neighbour-data");
    corpus(&theirs);
    let r = json(&ok(&mut lab.inside(
        &house.ns,
        pluto(&neighbour).args(["--json", "backup"]).arg(&theirs),
    )));
    assert_eq!(r["upload"]["short"], 0, "{r}");
    assert!(held_objects(&home).len() >= 3, "{r}");

    // The node places everything, online in the books at every look.
    let mut polls = 0;
    let (packs, placed) = loop {
        let n = standing(&net, &home_id);
        assert_eq!(
            n["online"],
            true,
            "offline in the books after {:?} of uploading: {n}",
            started.elapsed()
        );
        assert_eq!(n["audits_timed_out"], 0, "an audit timed out: {n}");
        polls += 1;
        let st = json(&ok(pluto(&home).args(["--json", "status"])));
        let (packs, placed) = (
            st["packs"].as_u64().unwrap(),
            st["packs_placed"].as_u64().unwrap(),
        );
        if placed == packs {
            break (packs, placed);
        }
        assert!(
            started.elapsed() < WITHIN,
            "after {WITHIN:?} on a 2 Mbit/s uplink only {placed} of {packs} packs are placed \
             ({:.1} MB sent)",
            (lab.tx_bytes(&house.router, &house.uplink) - sent_before) as f64 / 1e6
        );
        std::thread::sleep(POLL);
    };
    let took = started.elapsed();
    let sent = lab.tx_bytes(&house.router, &house.uplink) - sent_before;

    // What had to go: one replica of every pack, as big as the pack.
    let placement = pluto_engine::manifest::Placement::load(&home.join("placement")).unwrap();
    let replicas: u64 = placement
        .packs
        .values()
        .map(|p| p.size * p.replicas.len() as u64)
        .sum();
    assert!(replicas >= DATA as u64, "{replicas} bytes of replicas");
    let ratio = sent as f64 / replicas as f64;
    let n = standing(&net, &home_id);
    println!(
        "home {} behind {}, uplink {} kbit/s: {placed} of {packs} packs placed in {:.0} s; {sent} bytes left the \
         home for {replicas} bytes of replicas (ratio {ratio:.3}, {:.0} kbit/s); online at all \
         {polls} polls; audits passed {}, timed out {}",
        house.address,
        house.public,
        UPLINK.rate_kbit,
        took.as_secs_f64(),
        sent as f64 * 8.0 / took.as_secs_f64() / 1e3,
        n["audits_passed"],
        n["audits_timed_out"],
    );
    // The daemon says so too, once its round is over.
    let said = d.wait_for("packs placed", Duration::from_secs(60));
    println!("daemon: {said}");
    assert!(
        said.contains(&format!("{packs} of {packs} packs placed")),
        "{said}"
    );
    print!("{}", lab.qdisc_stats(&house.router, &house.uplink));
    assert!(
        ratio < 1.2,
        "{sent} bytes sent for {replicas} bytes of replicas: {ratio:.3} times"
    );
    assert_eq!(n["audits_timed_out"], 0, "{n}");
    assert!(n["audits_passed"].as_u64().unwrap() >= 3, "{n}");
    drop(d);
}
