//! The fake-address pool behind the virtual DNS: every name the agent looks up gets an address
//! from 198.18.0.0/15, remembered both ways, so that when the agent connects to that address
//! the netstack knows which name it meant and can tell the host.
//!
//! Bounded: when every address is in use, the oldest assignment is reused.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

/// First address handed out (198.18.0.0 itself is skipped).
const BASE: u32 = u32::from_be_bytes([198, 18, 0, 1]);
/// Addresses in 198.18.0.0/15 after the base.
const SPAN: u32 = (1 << 17) - 2;

/// Name <-> fake address map.
#[derive(Debug)]
pub struct FakePool {
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, String>,
    order: VecDeque<Ipv4Addr>,
    next: u32,
    capacity: u32,
}

impl Default for FakePool {
    fn default() -> Self {
        Self::with_capacity(SPAN)
    }
}

impl FakePool {
    /// A pool handing out at most `capacity` addresses (at most the /15).
    pub fn with_capacity(capacity: u32) -> Self {
        FakePool {
            by_name: HashMap::new(),
            by_addr: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            capacity: capacity.clamp(1, SPAN),
        }
    }

    /// Is `addr` inside the pool's range?
    pub fn contains(addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        (BASE..BASE + SPAN).contains(&a)
    }

    /// The address for `name` (normalised by the caller), assigning one if needed.
    pub fn assign(&mut self, name: &str) -> Ipv4Addr {
        if let Some(addr) = self.by_name.get(name) {
            return *addr;
        }
        let addr = if self.next < self.capacity {
            let a = Ipv4Addr::from(BASE + self.next);
            self.next += 1;
            a
        } else {
            // Reuse the oldest assignment.
            let old = self.order.pop_front().unwrap_or(Ipv4Addr::from(BASE));
            if let Some(old_name) = self.by_addr.remove(&old) {
                self.by_name.remove(&old_name);
            }
            old
        };
        self.by_name.insert(name.to_owned(), addr);
        self.by_addr.insert(addr, name.to_owned());
        self.order.push_back(addr);
        addr
    }

    /// The name `addr` was assigned to, if any.
    pub fn name_of(&self, addr: Ipv4Addr) -> Option<&str> {
        self.by_addr.get(&addr).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_keeps_its_address_and_maps_back() {
        let mut pool = FakePool::default();
        let a = pool.assign("example.com");
        assert_eq!(pool.assign("example.com"), a);
        assert_eq!(pool.name_of(a), Some("example.com"));
        assert!(FakePool::contains(a));
        assert_ne!(pool.assign("other.example"), a);
    }

    #[test]
    fn a_full_pool_reuses_the_oldest_address() {
        let mut pool = FakePool::with_capacity(2);
        let a = pool.assign("a.test");
        let _b = pool.assign("b.test");
        let c = pool.assign("c.test");
        assert_eq!(c, a);
        assert_eq!(pool.name_of(a), Some("c.test"));
        assert_eq!(pool.by_name.get("a.test"), None);
    }

    #[test]
    fn addresses_outside_the_range_are_not_fake() {
        assert!(!FakePool::contains(Ipv4Addr::new(1, 1, 1, 1)));
        assert!(!FakePool::contains(Ipv4Addr::new(198, 18, 0, 0)));
        assert!(FakePool::contains(Ipv4Addr::new(198, 19, 255, 254)));
    }
}
