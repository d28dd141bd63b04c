//! MSI-X emulation: the capability's control word, the vector table and the pending-bit array
//! (PBA), all held by the VMM and never by the device. Each vector has an eventfd the device
//! signals (VFIO writes it when the hardware raises the vector) and a GSI whose KVM route
//! carries the guest's message: while the vector is live (MSI-X enabled, function not masked,
//! vector not masked) the eventfd is an irqfd on that GSI, so delivery never leaves the host
//! kernel. Masking detaches the irqfd: signals then accumulate in the eventfd, which is the
//! vector's pending bit; unmasking attaches it again and KVM delivers what is pending at once.
//!
//! Routing calls go through [`MsiRouter`], which KVM implements (`kvm::irq`) and tests fake.

use std::sync::Arc;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::guest_warn;

/// Size of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control: table size minus one.
pub const CONTROL_TABLE_SIZE: u16 = 0x7ff;
/// Vector control: masked.
pub const VECTOR_MASKED: u32 = 1;

/// An MSI message as the guest programs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Address (0xfee0_0000 | destination on x86).
    pub addr: u64,
    /// Data (vector and delivery mode on x86).
    pub data: u32,
}

/// Errors of the interrupt routing backend.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The host refused a routing change.
    #[error("cannot update the interrupt route of GSI {gsi}")]
    Route {
        /// The GSI.
        gsi: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No GSI is left.
    #[error("no free GSI for {0} MSI vectors")]
    NoGsi(u32),
}

/// Where MSI routes live (KVM's GSI routing table and irqfds).
pub trait MsiRouter: Send + Sync {
    /// Reserves `count` consecutive GSIs; returns the first.
    fn allocate_gsis(&self, count: u32) -> Result<u32, RouteError>;
    /// Routes `gsi` to `msg`.
    fn set_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), RouteError>;
    /// Makes `evt` inject `gsi` when signalled.
    fn attach(&self, gsi: u32, evt: &EventFd) -> Result<(), RouteError>;
    /// Undoes `attach`.
    fn detach(&self, gsi: u32, evt: &EventFd) -> Result<(), RouteError>;
}

/// One table entry and its live state.
#[derive(Debug)]
struct Vector {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
    evt: EventFd,
    /// The message KVM routes for this vector now, if any.
    routed: Option<MsiMessage>,
    attached: bool,
}

impl Vector {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            addr: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// The MSI-X state of one function.
pub struct Msix {
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
    gsi_base: u32,
    router: Arc<dyn MsiRouter>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.vectors.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .field("gsi_base", &self.gsi_base)
            .finish_non_exhaustive()
    }
}

/// Errors creating the MSI-X state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An eventfd could not be created.
    #[error("cannot create an MSI-X eventfd")]
    EventFd(#[source] std::io::Error),
    /// GSIs could not be reserved.
    #[error("cannot reserve GSIs for MSI-X")]
    Gsi(#[source] RouteError),
}

impl Msix {
    /// `count` vectors (1..=2048), all masked as after reset, MSI-X disabled.
    pub fn new(count: u16, router: Arc<dyn MsiRouter>) -> Result<Self, Error> {
        let count = count.clamp(1, 2048);
        let gsi_base = router.allocate_gsis(u32::from(count)).map_err(Error::Gsi)?;
        let vectors = (0..count)
            .map(|_| {
                Ok(Vector {
                    addr_lo: 0,
                    addr_hi: 0,
                    data: 0,
                    control: VECTOR_MASKED,
                    evt: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
                    routed: None,
                    attached: false,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            vectors,
            enabled: false,
            function_masked: false,
            gsi_base,
            router,
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    /// Whether there are no vectors (never: at least one exists).
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Whether the guest has MSI-X enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The eventfds the device signals, in vector order.
    pub fn eventfds(&self) -> Vec<&EventFd> {
        self.vectors.iter().map(|v| &v.evt).collect()
    }

    /// Size of the table in bytes.
    pub fn table_len(&self) -> u64 {
        u64::try_from(self.vectors.len()).unwrap_or(0) * ENTRY_SIZE
    }

    /// Size of the PBA in bytes (whole qwords).
    pub fn pba_len(&self) -> u64 {
        u64::try_from(self.vectors.len().div_ceil(64)).unwrap_or(0) * 8
    }

    /// The message control word's guest-visible bits (size bits come from the caller).
    pub fn control_bits(&self) -> u16 {
        let mut c = 0;
        if self.enabled {
            c |= CONTROL_ENABLE;
        }
        if self.function_masked {
            c |= CONTROL_FUNCTION_MASK;
        }
        c
    }

    /// The guest wrote the message control word. Returns whether the enable bit changed.
    pub fn write_control(&mut self, value: u16) -> bool {
        let enabled = value & CONTROL_ENABLE != 0;
        let changed = enabled != self.enabled;
        self.enabled = enabled;
        self.function_masked = value & CONTROL_FUNCTION_MASK != 0;
        self.sync_all();
        changed
    }

    /// A load from the table.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some((v, reg)) = self.locate(offset, data.len()) else {
            return;
        };
        let value = match reg {
            0 => v.addr_lo,
            4 => v.addr_hi,
            8 => v.data,
            _ => v.control,
        };
        if data.len() == 8 {
            let hi = match reg {
                0 => v.addr_hi,
                _ => v.control,
            };
            let q = u64::from(hi) << 32 | u64::from(value);
            data.copy_from_slice(&q.to_le_bytes());
        } else {
            data.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// A store to the table: dword or qword, aligned (other widths are dropped, as the
    /// specification leaves them undefined).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let Some(index) = self.locate(offset, data.len()).map(|_| offset / ENTRY_SIZE) else {
            guest_warn!(
                offset,
                len = data.len(),
                "MSI-X table write not dword or qword aligned"
            );
            return;
        };
        let Some(v) = usize::try_from(index)
            .ok()
            .and_then(|i| self.vectors.get_mut(i))
        else {
            return;
        };
        let reg = offset % ENTRY_SIZE;
        let mut words = [0u32; 2];
        for (w, chunk) in words.iter_mut().zip(data.chunks(4)) {
            *w = super::le_value(chunk);
        }
        let count = data.len() / 4;
        for (i, w) in words.iter().take(count).enumerate() {
            match reg + 4 * u64::try_from(i).unwrap_or(0) {
                0 => v.addr_lo = *w,
                4 => v.addr_hi = *w,
                8 => v.data = *w,
                _ => v.control = *w & VECTOR_MASKED,
            }
        }
        if let Ok(i) = usize::try_from(index) {
            self.sync(i);
        }
    }

    /// A load from the PBA: bit n is set when vector n is not live and its eventfd holds
    /// an undelivered signal.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let mut q = 0u64;
        let first = usize::try_from(offset / 8 * 64).unwrap_or(usize::MAX);
        for (bit, v) in self.vectors.iter().skip(first).take(64).enumerate() {
            if !v.attached && crate::vfio::sys::eventfd_is_signalled(&v.evt) {
                q |= 1 << bit;
            }
        }
        let bytes = q.to_le_bytes();
        let shift = usize::try_from(offset % 8).unwrap_or(0);
        for (d, s) in data.iter_mut().zip(bytes.iter().skip(shift)) {
            *d = *s;
        }
    }

    /// Tears every route down (device reset, MSI-X disabled by the VMM).
    pub fn reset(&mut self) {
        self.enabled = false;
        self.function_masked = false;
        for v in &mut self.vectors {
            v.control = VECTOR_MASKED;
        }
        self.sync_all();
    }

    fn locate(&self, offset: u64, len: usize) -> Option<(&Vector, u64)> {
        let aligned = match len {
            4 => offset.is_multiple_of(4),
            8 => offset.is_multiple_of(8),
            _ => false,
        };
        if !aligned {
            return None;
        }
        let v = self
            .vectors
            .get(usize::try_from(offset / ENTRY_SIZE).ok()?)?;
        Some((v, offset % ENTRY_SIZE))
    }

    fn live(&self, v: &Vector) -> bool {
        self.enabled && !self.function_masked && v.control & VECTOR_MASKED == 0
    }

    fn sync_all(&mut self) {
        for i in 0..self.vectors.len() {
            self.sync(i);
        }
    }

    /// Brings vector `i`'s KVM route and irqfd in line with the guest's table.
    fn sync(&mut self, i: usize) {
        let gsi = self.gsi_base + u32::try_from(i).unwrap_or(0);
        let Some(v) = self.vectors.get(i) else { return };
        let live = self.live(v);
        let msg = v.message();
        let router = self.router.clone();
        let Some(v) = self.vectors.get_mut(i) else {
            return;
        };
        let result = if live {
            let routed = if v.routed == Some(msg) {
                Ok(())
            } else {
                router.set_route(gsi, msg).map(|()| v.routed = Some(msg))
            };
            routed.and_then(|()| {
                if v.attached {
                    Ok(())
                } else {
                    router.attach(gsi, &v.evt).map(|()| v.attached = true)
                }
            })
        } else if v.attached {
            router.detach(gsi, &v.evt).map(|()| v.attached = false)
        } else {
            Ok(())
        };
        if let Err(e) = result {
            guest_warn!(gsi, "MSI-X routing failed: {e}");
        }
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod testing {
    //! A router that records what the VMM asked of KVM.

    use std::sync::Mutex;

    use super::*;

    /// One routing call.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Call {
        /// `set_route`.
        Route(u32, MsiMessage),
        /// `attach`.
        Attach(u32),
        /// `detach`.
        Detach(u32),
    }

    /// Records every call; GSIs from 24 (after the IOAPIC's pins), as the KVM router does.
    #[derive(Debug, Default)]
    pub struct RecordingRouter {
        calls: Mutex<Vec<Call>>,
        next: Mutex<u32>,
    }

    impl RecordingRouter {
        /// Takes the calls recorded so far.
        pub fn take(&self) -> Vec<Call> {
            self.calls
                .lock()
                .map(|mut c| std::mem::take(&mut *c))
                .unwrap_or_default()
        }

        fn push(&self, c: Call) {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(c);
            }
        }
    }

    impl MsiRouter for RecordingRouter {
        fn allocate_gsis(&self, count: u32) -> Result<u32, RouteError> {
            let mut next = self.next.lock().map_err(|_| RouteError::NoGsi(count))?;
            let base = (*next).max(24);
            *next = base + count;
            Ok(base)
        }
        fn set_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), RouteError> {
            self.push(Call::Route(gsi, msg));
            Ok(())
        }
        fn attach(&self, gsi: u32, _evt: &EventFd) -> Result<(), RouteError> {
            self.push(Call::Attach(gsi));
            Ok(())
        }
        fn detach(&self, gsi: u32, _evt: &EventFd) -> Result<(), RouteError> {
            self.push(Call::Detach(gsi));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Call, RecordingRouter};
    use super::*;

    fn msix(n: u16) -> (Msix, Arc<RecordingRouter>) {
        let r = Arc::new(RecordingRouter::default());
        let m = Msix::new(n, r.clone()).unwrap_or_else(|e| panic!("{e}"));
        (m, r)
    }

    fn program(m: &mut Msix, vector: u64, addr: u32, data: u32) {
        m.table_write(vector * 16, &addr.to_le_bytes());
        m.table_write(vector * 16 + 4, &0u32.to_le_bytes());
        m.table_write(vector * 16 + 8, &data.to_le_bytes());
    }

    #[test]
    fn nothing_is_routed_until_enabled_and_unmasked() {
        let (mut m, r) = msix(4);
        program(&mut m, 1, 0xfee0_0000, 0x41);
        m.write_control(CONTROL_ENABLE);
        assert_eq!(r.take(), vec![]);
        m.table_write(16 + 12, &0u32.to_le_bytes());
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(r.take(), vec![Call::Route(25, msg), Call::Attach(25)]);
    }

    #[test]
    fn rewriting_a_live_vector_updates_its_route_only() {
        let (mut m, r) = msix(2);
        program(&mut m, 0, 0xfee0_0000, 0x40);
        m.table_write(12, &0u32.to_le_bytes());
        m.write_control(CONTROL_ENABLE);
        r.take();
        m.table_write(8, &0x50u32.to_le_bytes());
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x50,
        };
        assert_eq!(r.take(), vec![Call::Route(24, msg)]);
    }

    #[test]
    fn masking_detaches_and_unmasking_reattaches_without_rerouting() {
        let (mut m, r) = msix(1);
        program(&mut m, 0, 0xfee0_1000, 0x40);
        m.table_write(12, &0u32.to_le_bytes());
        m.write_control(CONTROL_ENABLE);
        r.take();
        m.table_write(12, &VECTOR_MASKED.to_le_bytes());
        assert_eq!(r.take(), vec![Call::Detach(24)]);
        m.table_write(12, &0u32.to_le_bytes());
        assert_eq!(r.take(), vec![Call::Attach(24)]);
    }

    #[test]
    fn the_function_mask_detaches_every_live_vector() {
        let (mut m, r) = msix(2);
        for v in 0..2 {
            program(&mut m, v, 0xfee0_0000, 0x40);
            m.table_write(v * 16 + 12, &0u32.to_le_bytes());
        }
        m.write_control(CONTROL_ENABLE);
        r.take();
        m.write_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(r.take(), vec![Call::Detach(24), Call::Detach(25)]);
    }

    #[test]
    fn a_masked_signalled_vector_is_pending_in_the_pba() {
        let (mut m, _r) = msix(3);
        m.write_control(CONTROL_ENABLE);
        let evts = m.eventfds();
        evts.get(2).map(|e| e.write(1));
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b100);
        program(&mut m, 2, 0xfee0_0000, 0x40);
        m.table_write(2 * 16 + 12, &0u32.to_le_bytes());
        m.pba_read(0, &mut pba);
        assert_eq!(
            u64::from_le_bytes(pba),
            0,
            "a live vector is never pending here"
        );
    }

    #[test]
    fn table_reads_return_what_was_written_and_odd_widths_are_dropped() {
        let (mut m, _r) = msix(1);
        program(&mut m, 0, 0xfee0_2000, 0x4242);
        let mut q = [0u8; 8];
        m.table_read(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_2000);
        m.table_write(8, &[0x11, 0x22]);
        let mut d = [0u8; 4];
        m.table_read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4242);
        m.table_read(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), VECTOR_MASKED, "vectors start masked");
    }

    #[test]
    fn accesses_past_the_table_read_as_ones() {
        let (m, _r) = msix(1);
        let mut d = [0u8; 4];
        m.table_read(16, &mut d);
        assert_eq!(d, [0xff; 4]);
    }
}
