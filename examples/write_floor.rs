//! The write floor for `bench/run.py`: the same rows a first full sync
//! writes (the sandbox's generated leads, columns already extracted), written
//! straight through rusqlite into a database with the mirror's schema,
//! indexes and pragmas (`store::open_connection`), one transaction per page,
//! a `negotiations` row and its `new` change row per lead. No HTTP, no JSON
//! work inside the timed part. Prints one JSON line: wall and CPU seconds of
//! the writes alone.
//!
//!     cargo run --release --example write_floor -- DB BUSINESSES LEADS_PER_BUSINESS [PAGE]
//!         [--pages-per-tx N] [--bare] [--sequential-ids]
//!
//! `--pages-per-tx 8` writes as a full scan does when its pages come faster
//! than they are written (up to 8 pages a transaction); `--bare` writes the
//! `negotiations` rows alone, without their change rows and without the
//! indexes beyond the primary key: what the schema's extras cost (README,
//! "Performance"). `--sequential-ids` gives the leads decreasing ids (newest
//! first, as time-ordered ids would be listed) instead of the sandbox's
//! random ones: what a primary-key index written at random costs. The JSON
//! line also gives the bytes the process handed to `write(2)`/`pwrite(2)`
//! (`wchar` of /proc/self/io: WAL frames and checkpoints), which, unlike
//! CPU time, does not move with the machine's load.

use std::time::Instant;
use write_floor_common::{bytes_written, cpu_seconds};

mod write_floor_common;

fn main() -> anyhow::Result<()> {
    let write_floor_common::Floor {
        page,
        pages_per_tx,
        bare,
        rows,
        mut conn,
    } = write_floor_common::setup()?;

    let (wall0, cpu0, written0) = (Instant::now(), cpu_seconds(), bytes_written());
    let mut n = 0usize;
    for (business_id, leads) in &rows {
        for chunk in leads.chunks(page * pages_per_tx) {
            // Each transaction's own time, as a scan's pages have (the
            // first_seen_at of the present-leads index grows with it).
            let now = leadsync::time::fmt(chrono::Utc::now());
            let tx = conn.transaction()?;
            {
                let mut ins = tx.prepare_cached(
                    "INSERT INTO negotiations (negotiation_id, business_id, status, created_at, payload,
                         payload_hash, category, customer_name, city, zip, customer_phone, lead_price,
                         charge_state, first_seen_at, last_seen_at, changed_at, missing_since)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?14, NULL)",
                )?;
                let mut change = tx.prepare_cached(
                    "INSERT INTO negotiation_changes (negotiation_id, business_id, observed_at, kind, new_status)
                     VALUES (?1, ?2, ?3, 'new', ?4)",
                )?;
                for l in chunk {
                    ins.execute(rusqlite::params![
                        l.negotiation_id,
                        business_id,
                        l.status,
                        l.created_at,
                        l.payload,
                        l.hash,
                        l.category,
                        l.customer_name,
                        l.city,
                        l.zip,
                        l.customer_phone,
                        l.lead_price,
                        l.charge_state,
                        now
                    ])?;
                    if !bare {
                        change.execute(rusqlite::params![
                            l.negotiation_id,
                            business_id,
                            now,
                            l.status
                        ])?;
                    }
                    n += 1;
                }
            }
            tx.commit()?;
        }
    }
    let (wall, cpu) = (wall0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    let written_mb = (bytes_written() - written0) as f64 / 1e6;
    println!(
        r#"{{"rows": {n}, "wall_s": {wall:.3}, "cpu_s": {cpu:.3}, "written_mb": {written_mb:.1}}}"#
    );
    Ok(())
}
