//! What a full scan holds in memory for its business's known leads
//! (`mirror::known_leads`): the daemon's peak RSS budget is 64 MiB, and one
//! business may have several hundred thousand leads. Alone in its test
//! binary: it counts every allocation of the process.

use leadsync::store::mirror;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn a_full_scan_remembers_a_known_lead_in_at_most_40_bytes() {
    const LEADS: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let conn = leadsync::store::open_connection(&dir.path().join("m.db"), true).unwrap();
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO negotiations (negotiation_id, business_id, payload, payload_hash,
             first_seen_at, last_seen_at, changed_at, missing_since)
         SELECT '5191534805' || i, 'b', '{}', i * 7919, 't',
                '2026-01-01T12:00:00.000Z', 't', CASE WHEN i % 10 = 0 THEN 't' END
           FROM n",
        [LEADS as i64],
    )
    .unwrap();
    let before = NOW.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let known = mirror::known_leads(&conn, "b").unwrap();
    let peak = PEAK.load(Ordering::SeqCst) - before;
    // Every tenth is missing, and a missing lead is not known.
    assert_eq!(known.len(), LEADS - LEADS / 10);
    // 400,000 leads at 40 bytes: 16 MB, with the 16 MiB page cache and the
    // rest of the daemon within the budget (it was 96 bytes a lead: a map
    // growing by doubling holds both tables for a moment).
    assert!(
        peak <= 40 * LEADS,
        "reading {LEADS} known leads took {peak} bytes at peak ({} a lead)",
        peak / LEADS
    );
}
