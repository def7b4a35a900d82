//! The write floor of `examples/write_floor.rs` with the same rows,
//! schema, pragmas and transactions, bound through SQLite's C API with
//! `SQLITE_STATIC` (no copy of each text) instead of rusqlite's
//! statements, which bind every text as `SQLITE_TRANSIENT` (SQLite copies
//! it first). A measurement of what binding costs the floor (README,
//! "Performance", issue 16's thirteenth round), not the mirror's write
//! path. Prints the same JSON line.
//!
//!     cargo run --release --example write_floor_static -- DB BUSINESSES LEADS_PER_BUSINESS [PAGE]
//!         [--pages-per-tx N] [--bare] [--sequential-ids]

use std::time::Instant;
use write_floor_common::{bytes_written, cpu_seconds};

mod write_floor_common;

fn main() -> anyhow::Result<()> {
    let write_floor_common::Floor {
        page,
        pages_per_tx,
        bare,
        rows,
        conn,
    } = write_floor_common::setup()?;

    let (wall0, cpu0, written0) = (Instant::now(), cpu_seconds(), bytes_written());
    let mut n = 0usize;
    use rusqlite::ffi;
    // SAFETY: the handle is used only while `conn` lives, on this thread,
    // and every statement prepared on it is finalized before `conn` drops.
    let db = unsafe { conn.handle() };
    let prep = |sql: &str| -> *mut ffi::sqlite3_stmt {
        let c = std::ffi::CString::new(sql).unwrap();
        let mut st = std::ptr::null_mut();
        let rc =
            unsafe { ffi::sqlite3_prepare_v2(db, c.as_ptr(), -1, &mut st, std::ptr::null_mut()) };
        assert_eq!(rc, 0);
        st
    };
    let ins = prep(
        "INSERT INTO negotiations (negotiation_id, business_id, status, created_at, payload,
             payload_hash, category, customer_name, city, zip, customer_phone, lead_price,
             charge_state, first_seen_at, last_seen_at, changed_at, missing_since)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?14, NULL)",
    );
    let change = prep("INSERT INTO negotiation_changes (negotiation_id, business_id, observed_at, kind, new_status)
         VALUES (?1, ?2, ?3, 'new', ?4)");
    let begin = prep("BEGIN");
    let commit = prep("COMMIT");
    // SAFETY (binds): SQLITE_STATIC keeps the pointer, not a copy: every
    // bound text (a lead's columns, the business id, `now`) lives until
    // after the statement's step, and each step's texts are bound again
    // before the next; the statements are finalized before `rows` drops.
    let bt = |st: *mut ffi::sqlite3_stmt, i: i32, v: Option<&str>| unsafe {
        match v {
            Some(v) => ffi::sqlite3_bind_text(
                st,
                i,
                v.as_ptr().cast(),
                v.len() as i32,
                ffi::SQLITE_STATIC(),
            ),
            None => ffi::sqlite3_bind_null(st, i),
        }
    };
    let run = |st: *mut ffi::sqlite3_stmt| unsafe {
        let rc = ffi::sqlite3_step(st);
        assert_eq!(rc, ffi::SQLITE_DONE);
        ffi::sqlite3_reset(st);
    };
    for (business_id, leads) in &rows {
        for chunk in leads.chunks(page * pages_per_tx) {
            let now = leadsync::time::fmt(chrono::Utc::now());
            run(begin);
            for l in chunk {
                bt(ins, 1, Some(&l.negotiation_id));
                bt(ins, 2, Some(business_id));
                bt(ins, 3, l.status.as_deref());
                bt(ins, 4, l.created_at.as_deref());
                bt(ins, 5, Some(&l.payload));
                unsafe { ffi::sqlite3_bind_int64(ins, 6, l.hash) };
                bt(ins, 7, l.category.as_deref());
                bt(ins, 8, l.customer_name.as_deref());
                bt(ins, 9, l.city.as_deref());
                bt(ins, 10, l.zip.as_deref());
                bt(ins, 11, l.customer_phone.as_deref());
                bt(ins, 12, l.lead_price.as_deref());
                bt(ins, 13, l.charge_state.as_deref());
                bt(ins, 14, Some(&now));
                run(ins);
                if !bare {
                    bt(change, 1, Some(&l.negotiation_id));
                    bt(change, 2, Some(business_id));
                    bt(change, 3, Some(&now));
                    bt(change, 4, l.status.as_deref());
                    run(change);
                }
                n += 1;
            }
            run(commit);
        }
    }
    unsafe {
        for st in [ins, change, begin, commit] {
            ffi::sqlite3_finalize(st);
        }
    }
    let (wall, cpu) = (wall0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    let written_mb = (bytes_written() - written0) as f64 / 1e6;
    println!(
        r#"{{"rows": {n}, "wall_s": {wall:.3}, "cpu_s": {cpu:.3}, "written_mb": {written_mb:.1}}}"#
    );
    Ok(())
}
