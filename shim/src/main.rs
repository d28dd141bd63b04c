//! The `containerd-shim-moat-v2` binary: containerd starts it (`start`, `delete`, serve);
//! with `pod-hold` it is a pod sandbox's placeholder process.

fn main() {
    if std::env::args().nth(1).as_deref() == Some(moat_shim::service::POD_HOLD) {
        // The pod sandbox's process: it only holds the pod until containerd signals it.
        loop {
            std::thread::park();
        }
    }
    containerd_shim::run::<moat_shim::service::Service>("io.containerd.moat.v2", None);
}
