//! Giving freed memory back to the operating system after a bulk load.
//!
//! An import stages its rows (8 bytes per event) on worker threads, whose allocator arenas keep
//! the freed pages: the process would stay as large as the import's peak, and how large depends
//! on which threads staged what. glibc's `malloc_trim` returns those pages.

/// Returns freed heap pages to the OS (glibc only; elsewhere a no-op).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: `malloc_trim` only walks the allocator's own free lists; it takes no pointer
        // and is safe to call at any time from any thread.
        unsafe {
            malloc_trim(0);
        }
    }
}
