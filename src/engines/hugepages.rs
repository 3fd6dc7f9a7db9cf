//! Keeps the end-of-turn model's memory on transparent huge pages. On a virtual machine the
//! model's ~50 MB of weights and buffers, left idle between two pauses, come back slowly: the
//! page walks of 4 KiB pages are what is cold, and an inference that takes 45 ms back to back
//! took 130-300 ms after a second or more of idle (measured on a 2-core Firecracker VM; the
//! same loop over 2 MiB pages stays at 35-55 ms). ONNX Runtime allocates through the C
//! library, out of our reach, so after the model is loaded and has run once, the anonymous
//! memory that appeared meanwhile is advised and collapsed onto huge pages (`MADV_HUGEPAGE`,
//! `MADV_COLLAPSE`, Linux 6.1+), one huge page at a time and only where most of it is in use
//! (collapsing fills the rest; the rest is not advised either, or khugepaged would fill it
//! later). The advice stays on those huge pages: later faults there may take huge pages too.
//! Where the kernel says no (an older kernel, THP off for the process) nothing changes but
//! speed.

/// The size of a transparent huge page where the kernel does not say (x86-64, 4 KiB-page
/// arm64).
const DEFAULT_HUGE: usize = 2 << 20;

/// One anonymous writable mapping of the process, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: usize,
    pub end: usize,
}

/// What `back_new_memory` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Backed {
    /// Bytes now on huge pages.
    pub collapsed: usize,
    /// Bytes the kernel would not collapse (advised only: it may still do so later).
    pub refused: usize,
    /// Bytes left alone because most of their huge page was never used.
    pub sparse: usize,
}

/// The anonymous private writable mappings in a `/proc/<pid>/maps` text (the heap, the
/// allocator's arenas and its large blocks, named or not; no files or special mappings).
pub fn anonymous_regions(maps: &str) -> Vec<Region> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3).unwrap_or("");
            if !perms.starts_with("rw") || !perms.ends_with('p') {
                return None;
            }
            if !(path.is_empty() || path == "[heap]" || path.starts_with("[anon:")) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let start = usize::from_str_radix(a, 16).ok()?;
            let end = usize::from_str_radix(b, 16).ok()?;
            (end > start).then_some(Region { start, end })
        })
        .collect()
}

/// The regions of `after` that are not in `before` exactly (new or grown), cut to whole
/// `huge` pages; the ones with no whole huge page in them are left out.
pub fn new_huge_spans(before: &[Region], after: &[Region], huge: usize) -> Vec<Region> {
    let huge = huge.max(1);
    after
        .iter()
        .filter(|r| !before.contains(r))
        .filter_map(|r| {
            let start = r.start.checked_add(huge - 1)? / huge * huge;
            let end = r.end / huge * huge;
            (end > start).then_some(Region { start, end })
        })
        .collect()
}

/// The process's anonymous regions now (empty where `/proc` is not there).
pub fn snapshot() -> Vec<Region> {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| anonymous_regions(&m))
        .unwrap_or_default()
}

/// The kernel's transparent huge page size.
pub fn huge_page_size() -> usize {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &usize| n.is_power_of_two())
        .unwrap_or(DEFAULT_HUGE)
}

/// Advises and collapses onto huge pages the memory that appeared since `before`.
#[cfg(target_os = "linux")]
pub fn back_new_memory(before: &[Region]) -> Backed {
    let huge = huge_page_size();
    let mut done = Backed::default();
    // SAFETY: sysconf only reads a system constant.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut resident = vec![0u8; huge / page.max(1)];
    for span in new_huge_spans(before, &snapshot(), huge) {
        for start in (span.start..span.end).step_by(huge) {
            // SAFETY: mincore and madvise only ask the kernel about, or tell it about, pages
            // of the process's address space: the huge page lies in an anonymous mapping of
            // ours in /proc/self/maps a moment ago, and is aligned; `resident` has one byte
            // per page of it. No advice here changes memory contents; if another thread
            // unmapped the range meanwhile the calls fail (ENOMEM), and if it mapped
            // something else there, that only gets the same hint.
            let known = unsafe { libc::mincore(at(start), huge, resident.as_mut_ptr()) } == 0;
            let used = resident.iter().filter(|&&b| b & 1 == 1).count();
            if known && used.saturating_mul(2) < resident.len() {
                // Not advised either: khugepaged would fill it in the background.
                done.sparse = done.sparse.saturating_add(huge);
                continue;
            }
            // SAFETY: as above. EAGAIN (a page briefly locked or off the LRU) is worth a
            // second try.
            let collapse = || unsafe {
                libc::madvise(at(start), huge, libc::MADV_HUGEPAGE) == 0
                    && libc::madvise(at(start), huge, MADV_COLLAPSE) == 0
            };
            let again = || std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN);
            if collapse() || (again() && collapse()) {
                done.collapsed = done.collapsed.saturating_add(huge);
            } else {
                done.refused = done.refused.saturating_add(huge);
            }
        }
    }
    done
}

/// The kernel's value (include/uapi/asm-generic/mman-common.h); not in libc for every target
/// C library.
#[cfg(target_os = "linux")]
const MADV_COLLAPSE: libc::c_int = 25;

/// The address `addr` of a mapping of ours, for madvise (never dereferenced by us).
#[cfg(target_os = "linux")]
fn at(addr: usize) -> *mut libc::c_void {
    std::ptr::with_exposed_provenance_mut(addr)
}

/// Elsewhere there is nothing to do.
#[cfg(not(target_os = "linux"))]
pub fn back_new_memory(_before: &[Region]) -> Backed {
    Backed::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0c00000 r-xp 00000000 fd:01 123  /usr/bin/sidecall
55d0c2000000-55d0c2600000 rw-p 00000000 00:00 0    [heap]
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
7f0004000000-7f0008000000 ---p 00000000 00:00 0
7f1000000000-7f1000021000 rw-p 00000000 00:00 0
7f1100000000-7f1100400000 rw-p 00000000 00:00 0    [anon: glibc: malloc arena]
7f2000000000-7f2000400000 rw-p 00000000 fd:01 9    /usr/lib/libonnxruntime.so
7f3000000000-7f3000400000 rw-s 00000000 00:05 7    /dev/shm/x
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0    [stack]
";

    fn region(start: usize, end: usize) -> Region {
        Region { start, end }
    }

    #[test]
    fn only_anonymous_private_writable_memory_is_taken() {
        assert_eq!(
            anonymous_regions(MAPS),
            vec![
                region(0x55d0c2000000, 0x55d0c2600000),
                region(0x7f0000000000, 0x7f0004000000),
                region(0x7f1000000000, 0x7f1000021000),
                region(0x7f1100000000, 0x7f1100400000),
            ]
        );
        assert!(anonymous_regions("garbage\n\nzz-yy rw-p 0 0 0\n").is_empty());
    }

    #[test]
    fn new_and_grown_regions_are_cut_to_whole_huge_pages() {
        let before = vec![
            region(0x1000_0000, 0x1040_0000),
            region(0x2000_0000, 0x2010_0000),
        ];
        let after = vec![
            // Unchanged: left alone.
            region(0x1000_0000, 0x1040_0000),
            // Grown from 1 MiB to 9 MiB: whole pages from its start (already aligned) to 8 MiB.
            region(0x2000_0000, 0x2090_0000),
            // New, unaligned: 0x3010_0000..0x3050_0000 holds one whole page at 0x3020_0000.
            region(0x3010_0000, 0x3050_0000),
            // New but smaller than a huge page.
            region(0x4000_0000, 0x4010_0000),
        ];
        assert_eq!(
            new_huge_spans(&before, &after, DEFAULT_HUGE),
            vec![
                region(0x2000_0000, 0x2080_0000),
                region(0x3020_0000, 0x3040_0000)
            ]
        );
        // Larger huge pages (arm64 with 64 KiB pages: 512 MiB) leave none of these whole.
        assert!(new_huge_spans(&before, &after, 512 << 20).is_empty());
    }

    /// A fresh private anonymous mapping of `len` bytes on small pages, touched every
    /// `stride` bytes, between two inaccessible pages (so the kernel never merges it with a neighbour); it is
    /// unmapped when dropped.
    #[cfg(target_os = "linux")]
    struct Mapping {
        addr: *mut libc::c_void,
        len: usize,
    }

    #[cfg(target_os = "linux")]
    const GUARD: usize = 4096;

    /// The tests that advise new memory run one at a time: one's advice would otherwise land
    /// on the other's mapping while it is being touched (and fault it in as huge pages).
    #[cfg(target_os = "linux")]
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The test's turn to advise memory; None (said) where there is no /proc to read back.
    #[cfg(target_os = "linux")]
    fn exclusive() -> Option<std::sync::MutexGuard<'static, ()>> {
        if std::fs::metadata("/proc/self/smaps").is_err() {
            eprintln!("no /proc here: nothing to test");
            return None;
        }
        Some(ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()))
    }

    #[cfg(target_os = "linux")]
    impl Mapping {
        fn new(len: usize, stride: usize) -> Mapping {
            // SAFETY: a fresh private anonymous mapping, ours alone until dropped; its first
            // and last pages are made inaccessible and never touched.
            let addr = unsafe {
                let base = libc::mmap(
                    std::ptr::null_mut(),
                    len + 2 * GUARD,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(base, libc::MAP_FAILED);
                let inner = base.cast::<u8>().add(GUARD).cast::<libc::c_void>();
                assert_eq!(libc::mprotect(base, GUARD, libc::PROT_NONE), 0);
                let tail = inner.cast::<u8>().add(len).cast::<libc::c_void>();
                assert_eq!(libc::mprotect(tail, GUARD, libc::PROT_NONE), 0);
                // Small pages when touched, even where THP is `always`.
                libc::madvise(inner, len, libc::MADV_NOHUGEPAGE);
                inner
            };
            let mut m = Mapping { addr, len };
            for b in m.bytes().iter_mut().step_by(stride) {
                *b = 1;
            }
            m
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping is `len` bytes, readable and writable, alive while `self` is,
            // and only reached through `&mut self`.
            unsafe { std::slice::from_raw_parts_mut(self.addr.cast::<u8>(), self.len) }
        }

        fn middle(&self) -> usize {
            self.addr.addr() + self.len / 2
        }

        /// (Rss, AnonHugePages) of the mapping that holds `middle`, in bytes, from smaps.
        fn smaps(&self) -> (usize, usize) {
            let text = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
            let (mut inside, mut rss, mut huge) = (false, 0, 0);
            for line in text.lines() {
                // A mapping's first line starts with its range; its fields follow.
                let range = line.split_whitespace().next().and_then(|r| {
                    let (a, b) = r.split_once('-')?;
                    Some((
                        usize::from_str_radix(a, 16).ok()?,
                        usize::from_str_radix(b, 16).ok()?,
                    ))
                });
                if let Some((a, b)) = range {
                    inside = a <= self.middle() && self.middle() < b;
                    continue;
                }
                let kb = |key: &str| {
                    line.strip_prefix(key)
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
                };
                if inside {
                    rss += kb("Rss:").unwrap_or(0) * 1024;
                    huge += kb("AnonHugePages:").unwrap_or(0) * 1024;
                }
            }
            (rss, huge)
        }
    }

    #[cfg(target_os = "linux")]
    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps what `new` mapped, guards included; no slice of it outlives
            // `self`.
            unsafe {
                let base = self.addr.cast::<u8>().sub(GUARD).cast::<libc::c_void>();
                libc::munmap(base, self.len + 2 * GUARD);
            }
        }
    }

    /// Whether this kernel collapses memory on request at all (Linux 6.1+, THP not disabled).
    #[cfg(target_os = "linux")]
    fn collapse_works() -> bool {
        let huge = huge_page_size();
        let m = Mapping::new(2 * huge, 4096);
        let start = m.addr.addr().div_ceil(huge) * huge;
        // SAFETY: one aligned huge page inside the mapping, only hinted about.
        unsafe {
            libc::madvise(at(start), huge, libc::MADV_HUGEPAGE) == 0
                && libc::madvise(at(start), huge, MADV_COLLAPSE) == 0
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn memory_mapped_after_the_snapshot_goes_onto_huge_pages() {
        let Some(_one) = exclusive() else { return };
        let mut m = Mapping::new(16 << 20, 4096);
        // Everything but the new mapping counts as there before.
        let now = snapshot();
        let before: Vec<Region> = now
            .iter()
            .filter(|r| !(r.start <= m.middle() && m.middle() < r.end))
            .copied()
            .collect();
        assert_eq!(
            now.len(),
            before.len() + 1,
            "the mapping is not in {now:x?}"
        );
        let done = back_new_memory(&before);
        assert!(
            m.bytes().iter().step_by(4096).all(|&b| b == 1),
            "contents changed"
        );
        let (_, huge) = m.smaps();
        // What is reported matches what the kernel did, and all of the mapping but its
        // unaligned ends was looked at.
        assert!(
            done.collapsed >= huge,
            "{done:?} but {huge} bytes on huge pages"
        );
        assert!(done.collapsed + done.refused >= 12 << 20, "{done:?}");
        assert_eq!(done.sparse, 0, "every page was touched: {done:?}");
        if done.refused == 0 && collapse_works() {
            assert!(huge >= 12 << 20, "{huge} bytes on huge pages, {done:?}");
        } else {
            // No huge page to be had just now, or a kernel that does not collapse on request.
            eprintln!("the kernel refused some: {done:?}, {huge} bytes on huge pages");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn memory_mostly_unused_is_left_as_it_is() {
        let Some(_one) = exclusive() else { return };
        let before = snapshot();
        // One page in every 64 KiB used: collapsing would make it resident in full.
        let m = Mapping::new(16 << 20, 64 << 10);
        let done = back_new_memory(&before);
        let (rss, huge) = m.smaps();
        assert_eq!(huge, 0, "{done:?}");
        assert!(rss < 2 << 20, "{rss} bytes resident, {done:?}");
        assert!(done.sparse >= 12 << 20, "{done:?}");
    }
}
