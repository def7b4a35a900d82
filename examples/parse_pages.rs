//! The CPU a full sync spends parsing listing pages, outside the writer:
//! the sandbox's generated leads (`generate(7, …)`, as `write_floor`),
//! rendered into listing pages the way the sandbox serves them
//! (`{"data":[…],"pagination":{"limit":…,"nextPageToken":"…"}}`), then every
//! page parsed with `thumbtack::model::parse_page` (what a first sync does:
//! no known leads to check). Rendering is outside the timed part. Prints one
//! JSON line: wall and CPU seconds of the parsing alone, per round and the
//! median; then a second line for a re-sync's parsing
//! (`parse_page_with`, every lead found unchanged by its id and hash).
//!
//!     cargo run --release --example parse_pages -- [BUSINESSES LEADS_PER_BUSINESS PAGE ROUNDS SHAPE]
//!
//! Defaults: 20 5000 100 5 schema (1,000 pages of 100 schema-shaped leads).
//! With `--stages`, also times parts of the work with serde_json directly
//! (the envelope scan alone, UTF-8 validation alone, hashing, copying), to
//! see where the time goes.

use leadsync::sandbox::data::{Shape, generate};
use leadsync::thumbtack::model::{parse_page, parse_page_with};
use serde_json::value::RawValue;
use std::time::Instant;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `work` once per round over every page; the CPU seconds of each round.
fn rounds(pages: &[Vec<u8>], n: usize, mut work: impl FnMut(&[u8]) -> usize) -> (Vec<f64>, usize) {
    let mut out = Vec::new();
    let mut count = 0;
    for _ in 0..n {
        let cpu0 = cpu_seconds();
        count = pages.iter().map(|p| work(p)).sum();
        out.push(cpu_seconds() - cpu0);
    }
    (out, count)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stages = args.iter().any(|a| a == "--stages");
    let args: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let num = |i: usize, default: usize| -> anyhow::Result<usize> {
        Ok(args
            .get(i)
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let businesses = num(0, 20)?;
    let per = num(1, 5000)?;
    let page = num(2, 100)?.max(1);
    let n = num(3, 5)?.max(1);
    let shape = match args.get(4).map(|s| s.as_str()) {
        None | Some("schema") => Shape::Schema,
        Some("docs") => Shape::Docs,
        Some("mixed") => Shape::Mixed,
        Some(other) => anyhow::bail!("unknown shape {other}"),
    };

    let (data, _) = generate(7, businesses, per, shape);
    let mut pages: Vec<Vec<u8>> = Vec::new();
    for b in &data {
        let chunks: Vec<_> = b.leads.chunks(page).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let items: Vec<&str> = chunk.iter().map(|l| l.json.as_str()).collect();
            let mut body = format!(
                "{{\"data\":[{}],\"pagination\":{{\"limit\":{page}",
                items.join(",")
            );
            if i + 1 < chunks.len() {
                body.push_str(&format!(
                    ",\"nextPageToken\":\"{:x}.{:x}\"",
                    (i + 1) * page,
                    i
                ));
            }
            body.push_str("}}");
            pages.push(body.into_bytes());
        }
    }
    let bytes: usize = pages.iter().map(Vec::len).sum();

    let wall0 = Instant::now();
    let (cpu, leads) = rounds(&pages, n, |p| {
        parse_page(p).map(|p| p.leads.len()).unwrap_or(0)
    });
    let wall = wall0.elapsed().as_secs_f64() / n as f64;
    let show = |v: &[f64]| {
        v.iter()
            .map(|c| format!("{c:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        r#"{{"pages": {}, "bytes": {bytes}, "leads": {leads}, "rounds": {n}, "cpu_s": [{}], "cpu_s_median": {:.3}, "wall_s_mean": {wall:.3}}}"#,
        pages.len(),
        show(&cpu),
        median(cpu.clone()),
    );
    // A re-sync's parsing: every lead is known as it is listed (the check
    // finds all unchanged), so each is read no further than its id.
    let known: std::collections::HashMap<String, i64> = pages
        .iter()
        .filter_map(|p| parse_page(p).ok())
        .flat_map(|p| p.leads.into_iter().map(|l| (l.negotiation_id, l.hash)))
        .collect();
    let check = |id: &str, hash: i64| known.get(id) == Some(&hash);
    let (cpu, unchanged) = rounds(&pages, n, |p| {
        parse_page_with(p, Some(&check))
            .map(|p| p.unchanged.len())
            .unwrap_or(0)
    });
    println!(
        r#"{{"checked": true, "unchanged": {unchanged}, "cpu_s": [{}], "cpu_s_median": {:.3}}}"#,
        show(&cpu),
        median(cpu.clone()),
    );
    if stages {
        let stage = |name: &str, (cpu, _): (Vec<f64>, usize)| {
            println!(
                r#"{{"stage": "{name}", "cpu_s_median": {:.3}}}"#,
                median(cpu)
            );
        };
        stage(
            "from_utf8",
            rounds(&pages, n, |p| {
                std::str::from_utf8(p).map(str::len).unwrap_or(0)
            }),
        );
        #[derive(serde::Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            data: Vec<&'a RawValue>,
        }
        // The envelope's entries, read by serde_json (an empty list when
        // the page is not one).
        fn entries(p: &[u8]) -> Vec<&RawValue> {
            let s = std::str::from_utf8(p).unwrap_or("");
            serde_json::from_str::<Envelope>(s)
                .map(|e| e.data)
                .unwrap_or_default()
        }
        stage(
            "envelope (Vec<&RawValue>, from_str)",
            rounds(&pages, n, |p| {
                let s = std::str::from_utf8(p).unwrap_or("");
                serde_json::from_str::<Envelope>(s)
                    .map(|e| e.data.len())
                    .unwrap_or(0)
            }),
        );
        stage(
            "envelope + xxh3 + to_string per lead",
            rounds(&pages, n, |p| {
                entries(p)
                    .iter()
                    .map(|r| {
                        let h = xxhash_rust::xxh3::xxh3_64(r.get().as_bytes());
                        std::hint::black_box((h, r.get().to_string())).1.len()
                    })
                    .sum()
            }),
        );
        stage(
            "envelope + serde_json::Value per lead",
            rounds(&pages, n, |p| {
                entries(p)
                    .iter()
                    .map(|r| {
                        serde_json::from_str::<serde_json::Value>(r.get())
                            .map(|_| 1)
                            .unwrap_or(0)
                    })
                    .sum()
            }),
        );
    }
    Ok(())
}
