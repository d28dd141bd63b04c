"""What an agent tries against a workspace service (moat/tests/services_e2e.rs): trace it,
signal it, open its /proc files, read its models, open its device. Standard library only (it
runs on the root image's python3). Prints one JSON object: for each attempt, "allowed" or the
errno's name."""

import ctypes
import errno
import json
import os
import sys

SERVICE = sys.argv[1] if len(sys.argv) > 1 else "llm"
# The service's program: the python3 one of whose arguments starts with this (the server's
# path, or its source where it runs as `python3 -c`).
MARKER = (sys.argv[2] if len(sys.argv) > 2 else f"/run/moat-services/{SERVICE}/models/server.py").encode()
DIR = f"/run/moat-services/{SERVICE}"


def find_service():
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if argv[0].endswith(b"python3") and any(a.startswith(MARKER) for a in argv[1:]):
                return int(entry)
        except OSError:
            pass
    return None


def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def opens(path):
    return lambda: os.close(os.open(path, os.O_RDONLY))


def ptrace(pid):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

    def attach():
        if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH

    return attach


pid = find_service()
out = {"pid": pid}
if pid is not None:
    out["ptrace"] = attempt(ptrace(pid))
    out["signal"] = attempt(lambda: os.kill(pid, 0))
    for name in ("mem", "environ", "maps"):
        out[name] = attempt(opens(f"/proc/{pid}/{name}"))
    out["proc_root"] = attempt(lambda: os.listdir(f"/proc/{pid}/root/"))
out["models"] = attempt(opens(f"{DIR}/models/weights.bin"))
out["models_dir"] = attempt(lambda: os.listdir(f"{DIR}/models"))
out["device"] = attempt(opens(f"{DIR}/dev/gpu0"))
out["device_in_dev"] = attempt(opens("/dev/gpu0"))
out["services_dir"] = attempt(lambda: os.listdir("/run/moat-services"))
print(json.dumps(out))
