//! The log file: appends formatted lines to `<name>.log`, rotates it by size the way
//! Python's `logging.handlers.RotatingFileHandler` does (which Summoner's `max_file_size`
//! and `backup_count` configure), and reopens it on request (SIGUSR1, for logrotate).
//!
//! Rotation, as in Python: before a line is written, if the file is not empty and the line
//! would take it to `max_file_size` bytes or past, `<name>.log.<n-1>` becomes
//! `<name>.log.<n>` down to `<name>.log` becoming `<name>.log.1`, the oldest
//! (`<name>.log.<backup_count>`) being overwritten, and a fresh `<name>.log` is opened. A
//! zero `max_file_size` or `backup_count` never rotates. A line longer than the limit
//! still goes into a file of its own: nothing is cut.
//!
//! Only the `tracing-appender` worker thread writes, and the signal thread reopens; both go
//! through the one mutex in [`LogFile`]. A failing rename or open is reported once on stderr
//! (a log line about the log file could only go to the file that failed) and writing goes
//! on to whichever file is open, so no line is lost to a rotation error.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The file and its rotation settings, shared by the writer and [`LogFile::reopen`].
#[derive(Clone)]
pub struct LogFile(Arc<Mutex<Rotating>>);

struct Rotating {
    path: PathBuf,
    max_file_size: u64,
    backup_count: u32,
    file: File,
    /// Bytes in `file`, counted from its length at open plus what this writer appended.
    size: u64,
    /// Set after a rename or open failed, so that the stderr note is written once.
    reported: bool,
}

/// Creates the directory if needed and opens `path` for appending.
pub fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    /// Opens (creating) `path` for appending.
    pub fn open(path: PathBuf, max_file_size: u64, backup_count: u32) -> io::Result<LogFile> {
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(LogFile(Arc::new(Mutex::new(Rotating {
            path,
            max_file_size,
            backup_count,
            file,
            size,
            reported: false,
        }))))
    }

    fn lock(&self) -> MutexGuard<'_, Rotating> {
        // A panic while holding the lock leaves a consistent struct (a file and a size).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the file and opens the path again (logrotate has moved the old one away);
    /// on failure the old file stays in use and the error is returned.
    pub fn reopen(&self) -> io::Result<()> {
        let mut r = self.lock();
        let file = open_append(&r.path)?;
        r.size = file.metadata()?.len();
        r.file = file;
        Ok(())
    }
}

impl Rotating {
    fn due(&self, incoming: usize) -> bool {
        self.max_file_size > 0
            && self.backup_count > 0
            && self.size > 0
            && self.size.saturating_add(incoming as u64) >= self.max_file_size
    }

    fn rotate(&mut self) -> io::Result<()> {
        let numbered = |i: u32| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{i}"));
            PathBuf::from(name)
        };
        for i in (1..self.backup_count).rev() {
            let from = numbered(i);
            if from.exists() {
                std::fs::rename(&from, numbered(i + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        self.file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for LogFile {
    /// `tracing-appender`'s worker hands over one formatted event per call.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut r = self.lock();
        if r.due(buf.len()) {
            if let Err(e) = r.rotate() {
                if !r.reported {
                    r.reported = true;
                    eprintln!("corecast: cannot rotate the log file {}: {e}", r.path.display());
                }
                // Not retried at every line: the next attempt waits for another limit's worth.
                r.size = 0;
            }
        }
        r.file.write_all(buf)?;
        r.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.lock().file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("corecast-rotate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn rotates_before_the_line_that_would_reach_the_limit_and_keeps_backup_count_files() {
        let dir = temp_dir("size");
        let path = dir.join("relay.log");
        let mut f = LogFile::open(path.clone(), 10, 2).unwrap();
        for line in ["aaaa\n", "bbbb\n", "cccc\n", "dddd\n", "eeee\n", "ffff\n", "gggg\n"] {
            f.write_all(line.as_bytes()).unwrap();
        }
        // 5 + 5 reaches 10, so every file holds one line; only two backups survive.
        assert_eq!(read(&path), "gggg\n");
        assert_eq!(read(&dir.join("relay.log.1")), "ffff\n");
        assert_eq!(read(&dir.join("relay.log.2")), "eeee\n");
        assert!(!dir.join("relay.log.3").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn zero_size_or_zero_backups_never_rotate_and_a_long_line_is_kept_whole() {
        let dir = temp_dir("zero");
        for (name, max, backups) in [("a.log", 0, 3), ("b.log", 4, 0)] {
            let mut f = LogFile::open(dir.join(name), max, backups).unwrap();
            for _ in 0..5 {
                f.write_all(b"0123456789\n").unwrap();
            }
            assert_eq!(read(&dir.join(name)).len(), 55);
        }
        let mut f = LogFile::open(dir.join("c.log"), 4, 1).unwrap();
        f.write_all(b"longer than four\n").unwrap();
        f.write_all(b"x\n").unwrap();
        assert_eq!(read(&dir.join("c.log")), "x\n");
        assert_eq!(read(&dir.join("c.log.1")), "longer than four\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reopen_writes_to_the_new_file_after_a_rename_and_counts_its_existing_size() {
        let dir = temp_dir("reopen");
        let path = dir.join("relay.log");
        let mut f = LogFile::open(path.clone(), 0, 0).unwrap();
        f.write_all(b"before\n").unwrap();
        std::fs::rename(&path, dir.join("moved.log")).unwrap();
        f.write_all(b"still old\n").unwrap();
        f.reopen().unwrap();
        f.write_all(b"after\n").unwrap();
        assert_eq!(read(&dir.join("moved.log")), "before\nstill old\n");
        assert_eq!(read(&path), "after\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
