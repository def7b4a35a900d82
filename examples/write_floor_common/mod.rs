//! What `write_floor.rs` and `write_floor_static.rs` share: their
//! arguments, the rows they write (generated before the timed part), the
//! database they open, and the CPU and write counters they read.

use leadsync::lead::LeadRow;
use leadsync::sandbox::data::{Shape, generate};
use leadsync::thumbtack::model::parse_lead_body;

pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Bytes this process handed to write calls so far (0 where /proc is not).
pub fn bytes_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("wchar: ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A write floor run, read from the command line, its rows ready and its
/// database open.
pub struct Floor {
    pub page: usize,
    pub pages_per_tx: usize,
    pub bare: bool,
    /// Each business's id and its leads' rows.
    pub rows: Vec<(String, Vec<LeadRow>)>,
    pub conn: rusqlite::Connection,
}

/// The command line's run: `DB BUSINESSES LEADS_PER_BUSINESS [PAGE]
/// [--pages-per-tx N] [--bare] [--sequential-ids]`.
pub fn setup() -> anyhow::Result<Floor> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: write_floor DB BUSINESSES LEADS_PER_BUSINESS [PAGE] [--pages-per-tx N] [--bare] [--sequential-ids]";
    let db = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?;
    let businesses: usize = args.get(2).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let per: usize = args.get(3).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let page: usize = match args.get(4) {
        Some(p) if !p.starts_with("--") => p.parse()?,
        _ => 100,
    };
    let flag = |name: &str| args.iter().position(|a| a == name);
    let pages_per_tx: usize = match flag("--pages-per-tx") {
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!(usage))?
            .parse()?,
        None => 1,
    };
    let bare = flag("--bare").is_some();
    let sequential = flag("--sequential-ids").is_some();

    let (data, _) = generate(7, businesses, per, Shape::Schema);
    let rows: Vec<(String, Vec<_>)> = data
        .iter()
        .map(|b| {
            let leads = b
                .leads
                .iter()
                .filter_map(|l| parse_lead_body(&l.json))
                .collect();
            (b.id.clone(), leads)
        })
        .collect();
    let rows = match sequential {
        false => rows,
        true => {
            let mut next = 900_000_000_000_000_000u64;
            rows.into_iter()
                .map(|(business, leads)| {
                    let leads = leads
                        .into_iter()
                        .map(|mut l: LeadRow| {
                            next -= 1;
                            l.negotiation_id = next.to_string();
                            l
                        })
                        .collect();
                    (business, leads)
                })
                .collect()
        }
    };
    let conn = leadsync::store::open_connection(std::path::Path::new(db), true)?;
    if bare {
        let indexes: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL
                   AND tbl_name IN ('negotiations', 'negotiation_changes')",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for name in indexes {
            conn.execute_batch(&format!("DROP INDEX \"{name}\""))?;
        }
    }
    Ok(Floor {
        page,
        pages_per_tx,
        bare,
        rows,
        conn,
    })
}
