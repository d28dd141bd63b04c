//! moat-netstack: TUN -> smoltcp -> one flow stream per TCP connection (issue 4).
//!
//! Not implemented yet. Each flow it opens will start with a `moat-flow-header` header and end
//! at the egress proxy's Unix socket.
