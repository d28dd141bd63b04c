//! Who opened a flow: the seam through which guest-init tells the netstack which program owns
//! the agent's connecting socket. The netstack asks once per connection, when it first sees the
//! SYN (the socket is then in the workspace kernel's table, owned by the process that called
//! `connect`), and carries the answer in the flow header (version 2) when the handshake
//! completes.
//!
//! The netstack decides nothing with it: the answer is the guest's claim, which the egress
//! proxy's rules may only use to narrow what the destination allows. guest-init's lookup
//! (`moat_guest_init::program`) reads the kernel's socket table and `/proc`; tests plug in
//! their own.

use std::net::SocketAddrV4;

use moat_flow_header::Program;

/// Finds the program that opened a connection.
pub trait ProgramLookup: Send {
    /// The program owning the workspace socket `agent -> destination`, if it can be told.
    /// Called on the netstack's thread for every new connection: it must bound its own work.
    fn program_of(&mut self, agent: SocketAddrV4, destination: SocketAddrV4) -> Option<Program>;
}
