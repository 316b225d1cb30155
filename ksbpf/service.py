"""ksbpfd as a systemd service: sd_notify (READY, STATUS, RELOADING, the watchdog, fed
from a helper thread while the main loop does slow, bounded work) and where the log goes
(the journal when systemd runs ksbpfd, else stderr). Both are silent no-ops without systemd."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("ksbpfd")


class Notifier:
    """sd_notify through systemd-python; silent when not run by systemd."""

    def __init__(self) -> None:
        try:
            from systemd import daemon as sd
        except ImportError:
            sd = None
        self._sd = sd
        self.socket = os.environ.get("NOTIFY_SOCKET") or None
        self.watchdog_s: float | None = None
        self._keeping = False
        usec = os.environ.get("WATCHDOG_USEC", "")
        wpid = os.environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def active(self) -> bool:
        """Is anyone listening (systemd)? Else STATUS lines need not be computed."""
        return self._sd is not None and self.socket is not None

    def notify(self, **fields: str | int) -> None:
        if self._sd is None or self.socket is None:
            return
        msg = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            self._sd.notify(msg)
        except OSError as e:
            log.warning("sd_notify failed: %s", e)

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    @contextlib.contextmanager
    def keepalive(self, bound_s: float, starting: bool = False) -> Iterator[None]:
        """Feed the watchdog from a helper thread while the main loop does slow, bounded
        work (a BPF compile takes up to COMPILE_BOUND_S, WatchdogSec is 30): for at most
        bound_s, so a main loop truly stuck there is still killed. `starting`: before
        READY, also extend the start timeout as long as the work may take."""
        if not self.active or (self.watchdog_s is None and not starting) or self._keeping:
            yield
            return
        self._keeping = True
        stop = threading.Event()
        every = min(self.watchdog_s / 2 if self.watchdog_s else 10.0, 10.0)

        def feed() -> None:
            until = time.monotonic() + bound_s
            while not stop.wait(every) and time.monotonic() < until:
                fields: dict[str, str | int] = {"WATCHDOG": 1} if self.watchdog_s else {}
                if starting:
                    fields["EXTEND_TIMEOUT_USEC"] = int(every * 3 * 1e6)
                self.notify(**fields)

        t = threading.Thread(target=feed, name="watchdog-keepalive", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            self._keeping = False


def setup_logging(target: str) -> str:
    """The journal when systemd runs us (or when asked), else stderr."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    use_journal = target == "journal" or (
        target == "auto"
        and os.path.exists("/run/systemd/journal/socket")
        and bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    )
    if use_journal:
        try:
            from systemd.journal import JournalHandler

            root.addHandler(JournalHandler(SYSLOG_IDENTIFIER="ksbpfd"))
            return "journal"
        except ImportError:
            pass
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s ksbpfd[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(h)
    return "stderr"
