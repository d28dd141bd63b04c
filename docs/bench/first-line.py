#!/usr/bin/env python3
"""Runs a command and says when its standard output's first line starting with "up" came:
milliseconds from the spawn, and from the command's own start where its stderr carries moat's
debug log (MOAT_LOG=debug: the "moat run: start" line's timestamp). Prints
`sample LABEL_first_line_ms N`, `sample LABEL_from_main_ms N`, `sample LABEL_exit_ms N`, and
with `--boot-log`, when guest-init said it received the workspace (`LABEL_guest_received_ms`)
and its "moat guest-init: +N ms: STEP" lines as `step LABEL ...`. Blocking reads, no polling:
a poll loop of short processes would take the CPU the measured machine needs.

usage: first-line.py LABEL STDERR_FILE COMMAND [ARG...]
"""
import datetime
import re
import subprocess
import sys
import time

label, err_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(err_path, "wb") as err:
    t0 = time.monotonic()
    wall0 = time.time()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
    first = None
    received = None
    steps = []
    for raw in p.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        if first is None and line.startswith("up"):
            first = time.monotonic()
        if received is None and "guest-init: workspace received" in line:
            received = time.monotonic()
        if "guest-init: +" in line:
            steps.append(line.split("guest-init: ", 1)[1])
    rc = p.wait()
    end = time.monotonic()
if rc != 0 or first is None:
    print(f"failed {label} rc={rc}")
    sys.exit(0)
print(f"sample {label}_first_line_ms {round((first - t0) * 1000)}")
print(f"sample {label}_exit_ms {round((end - t0) * 1000)}")
with open(err_path, errors="replace") as f:
    for line in f:
        if "moat run: start" in line:
            stamp = re.sub(r"\x1b\[[0-9;]*m", "", line).split()[0]
            main = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            print(f"sample {label}_from_main_ms {round((wall0 + (first - t0) - main) * 1000)}")
            break
if received is not None:
    print(f"sample {label}_guest_received_ms {round((received - t0) * 1000)}")
if steps:
    print(f"step {label} " + " | ".join(steps))
