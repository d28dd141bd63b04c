//! The serial console: a 16550 (vm-superio) on COM1 whose output goes to stdout or a file,
//! with a byte cap so a chatty or hostile guest cannot fill the host disk.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First COM1 port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1 ports: 0x3f8..=0x3ff.
pub const COM1_LEN: u16 = 8;

/// An interrupt line: an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A writer that keeps at most `cap` bytes and then drops the rest (once saying so).
#[derive(Debug)]
pub struct CappedWriter<W: Write> {
    inner: W,
    left: u64,
    line: Vec<u8>,
    capped: bool,
}

impl<W: Write> CappedWriter<W> {
    /// Wraps `inner`, keeping at most `cap` bytes.
    pub fn new(inner: W, cap: u64) -> Self {
        Self {
            inner,
            left: cap,
            line: Vec::with_capacity(256),
            capped: false,
        }
    }

    /// The wrapped writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if self.left == 0 {
                if !self.capped {
                    self.capped = true;
                    self.flush()?;
                    tracing::warn!("serial output reached its cap; dropping the rest");
                }
                break;
            }
            self.left -= 1;
            self.line.push(b);
            if b == b'\n' || self.line.len() >= 4096 {
                self.flush()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.write_all(&self.line)?;
        self.line.clear();
        self.inner.flush()
    }
}

/// Where console output goes.
pub type ConsoleOut = CappedWriter<Box<dyn Write + Send>>;

/// Opens the console sink: `path` (created or truncated) or stdout.
pub fn console_out(path: Option<&Path>, cap: u64) -> io::Result<ConsoleOut> {
    let sink: Box<dyn Write + Send> = match path {
        Some(p) => Box::new(File::create(p)?),
        None => Box::new(io::stdout()),
    };
    Ok(CappedWriter::new(sink, cap))
}

/// The COM1 device.
pub type SerialDevice = Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleOut>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_writer_keeps_only_cap_bytes() {
        let mut w = CappedWriter::new(Vec::new(), 5);
        assert!(w.write_all(b"hello world\n").is_ok());
        assert!(w.flush().is_ok());
        assert_eq!(w.get_ref().as_slice(), b"hello");
    }

    #[test]
    fn capped_writer_flushes_whole_lines() {
        let mut w = CappedWriter::new(Vec::new(), 100);
        assert!(w.write_all(b"a\nb").is_ok());
        assert_eq!(w.get_ref().as_slice(), b"a\n");
    }
}
