//! Keeps the end-of-turn model's memory on transparent huge pages. On a virtual machine the
//! model's ~50 MB of weights and buffers, left idle between two pauses, come back slowly: the
//! page walks of 4 KiB pages are what is cold, and an inference that takes 45 ms back to back
//! took 130-300 ms after a second or more of idle (measured on a 2-core Firecracker VM; the
//! same loop over 2 MiB pages stays at 35-55 ms). ONNX Runtime allocates through the C
//! library, out of our reach, so after the model is loaded and has run once, the anonymous
//! memory that appeared meanwhile is advised and collapsed onto huge pages (`MADV_HUGEPAGE`,
//! `MADV_COLLAPSE`, Linux 6.1+). Where the kernel says no (THP off, an older kernel) nothing
//! changes but speed.

/// The size of a transparent huge page on x86-64 and (4 KiB-page) arm64.
const HUGE: usize = 2 << 20;

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
    /// Bytes the kernel would not collapse: never touched, or THP is off (advised only: it
    /// may still do so later).
    pub refused: usize,
}

/// The anonymous private writable mappings in a `/proc/<pid>/maps` text (the heap, the
/// allocator's arenas and its large blocks; no files, stacks or special mappings).
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
            if !(path.is_empty() || path == "[heap]") {
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
/// 2 MiB pages; the ones with no whole huge page in them are left out.
pub fn new_huge_spans(before: &[Region], after: &[Region]) -> Vec<Region> {
    after
        .iter()
        .filter(|r| !before.contains(r))
        .filter_map(|r| {
            let start = r.start.checked_add(HUGE - 1)? / HUGE * HUGE;
            let end = r.end / HUGE * HUGE;
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

/// Advises and collapses onto huge pages the memory that appeared since `before`.
#[cfg(target_os = "linux")]
pub fn back_new_memory(before: &[Region]) -> Backed {
    // The kernel's value (include/uapi/asm-generic/mman-common.h); not in libc for every
    // target C library.
    const MADV_COLLAPSE: libc::c_int = 25;
    let mut done = Backed::default();
    for span in new_huge_spans(before, &snapshot()) {
        let len = span.end - span.start;
        // SAFETY: madvise only gives the kernel a hint about pages of our own mapping (the
        // span lies inside a mapping just read from /proc/self/maps and is aligned); no
        // advice here changes their contents. A span unmapped meanwhile fails with ENOMEM.
        if unsafe { libc::madvise(at(span.start), len, libc::MADV_HUGEPAGE) } != 0 {
            done.refused = done.refused.saturating_add(len);
            continue;
        }
        // One huge page at a time: a range the process never touched has no page table and
        // fails alone (EINVAL), the others still collapse.
        for start in (span.start..span.end).step_by(HUGE) {
            // SAFETY: as above, for one aligned huge page of the span.
            let ok = unsafe { libc::madvise(at(start), HUGE, MADV_COLLAPSE) };
            if ok == 0 {
                done.collapsed = done.collapsed.saturating_add(HUGE);
            } else {
                done.refused = done.refused.saturating_add(HUGE);
            }
        }
    }
    done
}

/// The address `addr` of a mapping of ours, for madvise.
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
7f2000000000-7f2000400000 rw-p 00000000 fd:01 9    /usr/lib/libonnxruntime.so
7f3000000000-7f3000400000 rw-s 00000000 00:05 7    /dev/shm/x
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0    [stack]
";

    #[test]
    fn only_anonymous_private_writable_memory_is_taken() {
        let r = anonymous_regions(MAPS);
        assert_eq!(
            r,
            vec![
                Region {
                    start: 0x55d0c2000000,
                    end: 0x55d0c2600000
                },
                Region {
                    start: 0x7f0000000000,
                    end: 0x7f0004000000
                },
                Region {
                    start: 0x7f1000000000,
                    end: 0x7f1000021000
                },
            ]
        );
        assert!(anonymous_regions("garbage\n\nzz-yy rw-p 0 0 0\n").is_empty());
    }

    #[test]
    fn new_and_grown_regions_are_cut_to_whole_huge_pages() {
        let before = vec![
            Region {
                start: 0x1000_0000,
                end: 0x1040_0000,
            },
            Region {
                start: 0x2000_0000,
                end: 0x2010_0000,
            },
        ];
        let after = vec![
            // Unchanged: left alone.
            Region {
                start: 0x1000_0000,
                end: 0x1040_0000,
            },
            // Grown from 1 MiB to 9 MiB: whole pages from its start (already aligned) to 8 MiB.
            Region {
                start: 0x2000_0000,
                end: 0x2090_0000,
            },
            // New, unaligned: 0x3010_0000..0x3050_0000 holds one whole page at 0x3020_0000.
            Region {
                start: 0x3010_0000,
                end: 0x3050_0000,
            },
            // New but smaller than a huge page.
            Region {
                start: 0x4000_0000,
                end: 0x4010_0000,
            },
        ];
        assert_eq!(
            new_huge_spans(&before, &after),
            vec![
                Region {
                    start: 0x2000_0000,
                    end: 0x2080_0000
                },
                Region {
                    start: 0x3020_0000,
                    end: 0x3040_0000
                },
            ]
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn memory_mapped_after_the_snapshot_is_found_and_backed() {
        const LEN: usize = 16 << 20;
        let before = snapshot();
        // Mapped directly (the C library might serve a large block from an arena it had).
        // SAFETY: a fresh private anonymous mapping, unmapped below and used only here.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // SAFETY: the mapping is LEN bytes, readable and writable.
        let block = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), LEN) };
        block.fill(1);
        let middle = addr.addr() + LEN / 2;
        let spans = new_huge_spans(&before, &snapshot());
        let found = spans.iter().any(|s| s.start <= middle && middle < s.end);
        let done = back_new_memory(&before);
        let intact = block.iter().all(|&b| b == 1);
        // SAFETY: unmaps what was mapped above; `block` is not used after.
        unsafe { libc::munmap(addr, LEN) };
        assert!(found, "the block at {addr:?} is not in {spans:x?}");
        assert!(done.collapsed + done.refused >= 8 << 20, "{done:?}");
        assert!(intact, "contents changed");
    }
}
