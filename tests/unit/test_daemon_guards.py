"""The daemon's guards: a control request answered "busy" never runs later (the waiting
control thread and the main loop each try to claim the call, and only one can), and an
unexpected error in a reconciliation step or a SIGHUP reload is logged and retried, never
the end of the daemon."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ksbpf import control
from ksbpf.daemon import ControlCall, Daemon, Signalled
from ksbpf.errors import BackendError


class Stub:
    """Only what _control_handler and _answer touch, with a main loop we step by hand."""

    stopping = False
    enforcing = True

    def __init__(self) -> None:
        import queue

        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.ran: list[str] = []

    def status(self, brief: bool = False) -> dict[str, Any]:
        self.ran.append("status")
        return {"layers": {}}

    def _guard(self, *_a: Any) -> None:
        pass

    def _status_soon(self) -> None:
        pass

    engine = type("E", (), {"finish_bpf_cleanup": staticmethod(lambda: None)})()


def test_a_request_given_up_as_busy_is_never_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "REPLY_TIMEOUT", 5.2)  # the handler waits REPLY_TIMEOUT - 5
    d: Any = Stub()
    with pytest.raises(BackendError, match="busy; nothing was changed"):
        Daemon._control_handler(d, {"op": "status"})
    call = d.q.get_nowait()
    Daemon._answer(d, call)  # the main loop gets to it late
    assert d.ran == [] and call.reply is None


def test_a_request_the_main_loop_claimed_is_answered_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "REPLY_TIMEOUT", 5.2)
    d: Any = Stub()
    result: dict[str, Any] = {}

    def client() -> None:
        result["reply"] = Daemon._control_handler(d, {"op": "status"})

    t = threading.Thread(target=client)
    t.start()
    call: ControlCall = d.q.get(timeout=5)
    assert call.claim()  # the main loop starts it just before the client's wait runs out
    t.join(0.5)
    assert t.is_alive(), "the client gave up on a call that is running"
    call.reply = {"late": True}
    call.done.set()
    t.join(5)
    assert result["reply"] == {"late": True}


# ------------------------------------------------------------------ unexpected errors


class Interrupted(Exception):
    """Stands for pyroute2's NetlinkDumpInterrupted: not a KsbpfError."""


def test_an_unexpected_error_in_a_reconciliation_step_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    d: Any = Stub()
    d._transient_retry_at = None
    d._retry_check_soon = lambda: Daemon._retry_check_soon(d)

    def step() -> None:
        raise Interrupted("links changed during the dump")

    Daemon._guard(d, step)  # does not raise: the daemon's loop goes on
    assert d._transient_retry_at is not None
    assert "reconciling failed unexpectedly (Interrupted)" in caplog.text

    def emfile() -> None:
        raise OSError(24, "Too many open files")

    d._transient_retry_at = None
    Daemon._guard(d, emfile)
    assert d._transient_retry_at is not None


def test_sighup_survives_an_unexpected_reload_error(caplog: pytest.LogCaptureFixture) -> None:
    import signal

    d: Any = Stub()
    d.config = "/etc/ksbpf/policy.toml"

    def reload(why: str) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    d._reload = reload
    Daemon._handle(d, [Signalled(signal.SIGHUP)])
    assert "SIGHUP: reload failed unexpectedly" in caplog.text and not d.stopping


# ------------------------------------------------------------------ the watchdog during a compile
