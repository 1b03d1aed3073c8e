"""libtpu on a host without TPU chips: compile-only, and quiet.

The `tpu` extra installs libtpu so that any host can compile for TPU topologies
(`moejax.sharding.topology`). On a host without TPU chips JAX still loads libtpu when it
starts its backends, and libtpu then prints that it cannot determine the accelerator type
and worker hostnames (a dozen lines of warnings before every `make train`). Neither matters
there: no TPU runtime can start, and a compile-only topology names its own chips. So when
libtpu is installed and the host has no TPU chip (no Google device on the PCI bus, which is
how JAX itself counts TPU chips), we set placeholder values for the variables that are
unset. libtpu also takes a lock file (/tmp/libtpu_lockfile) so that two processes do not
drive the same chips; with no chips there is nothing to guard, and the lock would stop two
processes on one host from compiling for TPU at once (pytest-xdist workers, a sweep and a
report), so `ALLOW_MULTIPLE_LIBTPU_LOAD` is set too. On a TPU VM nothing changes.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are Google PCI devices
PLACEHOLDERS = {
    "TPU_ACCELERATOR_TYPE": "v5p-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # no chips to guard: compile-only processes may share
}


def host_has_tpu() -> bool:
    """Whether a Google PCI device (a TPU chip) is attached to this host."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if pathlib.Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def quiet_libtpu_without_chips() -> None:
    """Sets `PLACEHOLDERS` (only those unset) when libtpu is installed on a host without TPU."""
    if importlib.util.find_spec("libtpu") is None or host_has_tpu():
        return
    for name, value in PLACEHOLDERS.items():
        os.environ.setdefault(name, value)
