"""Decoding in a child process with a per-sample timeout, so a decoder that hangs or crashes natively costs one
sample, never the Ray worker or the job.

    proc = DecodeProcess(spec)                              # one per decode worker process, reused
    outcome = decode_isolated(proc, request, timeout_s=30, retries=1)
    outcome.arrays or (outcome.stage, outcome.error)        # stage "timeout"/"crash" after 1 + retries tries

The child is ``python -m mimo_ray.data.isolation`` talking length-prefixed pickles over its stdin/stdout; its own
stdout is redirected to stderr so library prints cannot corrupt the channel. A hung child is SIGKILLed and
restarted. Fault injection for tests: a request's ``"fault"`` (``hang``, ``abort``, ``exit``) is acted out by the
child before decoding; the pipeline sets it from the ``MIMO_RAY_DECODE_FAULTS`` environment variable of the driver.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: JSON ``{"<file name or sample id>": "hang" | "abort" | "exit"}`` read by the driver (tests only); a fault
#: ending in ``-once`` (``"hang-once"``) acts on the first try of that row only (needs :data:`TRACE_ENV`).
FAULTS_ENV = "MIMO_RAY_DECODE_FAULTS"
#: A folder where decode tasks append ``<epoch> <id>`` per row decoded to ``decoded.txt`` (tests only).
TRACE_ENV = "MIMO_RAY_DECODE_TRACE"
_HEADER = struct.Struct("!Q")
_START_TIMEOUT_S = 120.0


class DecoderTimeout(Exception):
    """The child did not answer within the timeout (it was killed)."""


class DecoderCrash(Exception):
    """The child died while decoding."""


@dataclass
class Outcome:
    """Result of one isolated decode: ``arrays`` on success, else ``stage`` and ``error``."""

    arrays: dict[str, np.ndarray] | None = None
    stage: str = ""
    error: str = ""
    attempts: int = 0
    history: list[str] = field(default_factory=list)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child must import mimo_ray exactly as this process does (Ray workers add the job's working dir).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    # One BLAS thread: features are then bit-identical whichever worker (with whatever CPU share) decodes them.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


class DecodeProcess:
    """Parent side of one isolated decoder child.

    Args:
        spec: the :class:`~mimo_ray.data.sample_media.MediaSpec` the child decodes with.
    """

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mimo_ray.data.isolation"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_child_env(),
            close_fds=True,
        )
        try:
            reply = self._roundtrip(("spec", self.spec), _START_TIMEOUT_S)
        except (DecoderTimeout, DecoderCrash) as err:
            raise RuntimeError(f"the isolated decoder process did not start: {err}") from err
        if reply != ("ready",):
            raise RuntimeError(f"the isolated decoder process answered {reply!r} instead of ready")

    def _send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(_HEADER.pack(len(data)) + data)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise DecoderCrash(self._death_reason()) from err

    def _read_exact(self, n: int, deadline: float) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        chunks: list[bytes] = []
        while n > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DecoderTimeout()
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                raise DecoderTimeout()
            chunk = os.read(fd, min(n, 1 << 20))
            if not chunk:
                raise DecoderCrash(self._death_reason())
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _roundtrip(self, message: Any, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        try:
            self._send(message)
            (size,) = _HEADER.unpack(self._read_exact(_HEADER.size, deadline))
            return pickle.loads(self._read_exact(size, deadline))
        except DecoderTimeout:
            self.kill()
            raise
        except DecoderCrash:
            self.kill()
            raise

    def _death_reason(self) -> str:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "decoder process closed its output but is still running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"decoder process died with {name}"
        return f"decoder process exited with code {code}"

    def call(self, request: dict[str, Any], timeout_s: float) -> tuple:
        """Decode one request in the child.

        Returns:
            ``("ok", transport arrays)`` (:func:`~mimo_ray.data.sample_media.decode_media`),
            ``("media", stage, message)`` or ``("error", type_name, message)``.

        Raises:
            DecoderTimeout: no answer within ``timeout_s`` (the child was killed; the next call restarts it).
            DecoderCrash: the child died (or could not be started).
        """
        if self._proc is None or self._proc.poll() is not None:
            try:
                self._start()
            except RuntimeError as err:  # a child that cannot start is a crash of this try, not of the sample
                self.kill()
                raise DecoderCrash(str(err)) from err
        return self._roundtrip(("decode", request), timeout_s)

    def kill(self) -> None:
        """Kill the child (if any) and reap it."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    close = kill


def decode_isolated(proc: DecodeProcess, request: dict[str, Any], timeout_s: float, retries: int) -> Outcome:
    """Decode with up to ``1 + retries`` tries; a timeout or crash on every try gives stage ``timeout``/``crash``."""
    out = Outcome()
    for attempt in range(1 + retries):
        out.attempts = attempt + 1
        try:
            reply = proc.call(request, timeout_s)
        except DecoderTimeout:
            out.history.append(f"try {attempt + 1}: no answer within {timeout_s:g} s (data.decode_timeout_s)")
            out.stage = "timeout"
            continue
        except DecoderCrash as err:
            out.history.append(f"try {attempt + 1}: {err}")
            out.stage = "crash"
            continue
        if reply[0] == "ok":
            return Outcome(arrays=reply[1], attempts=attempt + 1, history=out.history)
        stage = reply[1] if reply[0] == "media" else "error"
        message = reply[2] if reply[0] == "media" else f"{reply[1]}: {reply[2]}"
        return Outcome(stage=stage, error=message, attempts=attempt + 1, history=out.history)
    out.error = "; ".join(out.history) + f" (gave up after {out.attempts} tries, data.decode_retries={retries})"
    return out


# ---------------------------------------------------------------- the child


def _act_out(fault: str | None) -> None:
    if fault == "hang":
        while True:
            time.sleep(3600)
    if fault == "abort":
        os.abort()
    if fault == "exit":
        os._exit(3)


def _child_main() -> None:
    from mimo_ray.data.errors import MediaError
    from mimo_ray.data.sample_media import decode_request

    channel_in = os.fdopen(os.dup(0), "rb", buffering=0)
    channel_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints (ours or native) go to stderr, never into the channel
    spec = None

    def read_exact(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = channel_in.read(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    while True:
        header = read_exact(_HEADER.size)
        if header is None:
            return  # parent went away
        message = pickle.loads(read_exact(_HEADER.unpack(header)[0]) or b"")
        if message[0] == "spec":
            spec = message[1]
            reply: tuple = ("ready",)
        else:
            request = message[1]
            _act_out(request.get("fault"))
            try:
                reply = ("ok", decode_request(request, spec))
            except MediaError as err:
                reply = ("media", err.stage, err.message)
            except Exception as err:  # reported as stage "error" for this sample only
                reply = ("error", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        channel_out.write(_HEADER.pack(len(data)) + data)


if __name__ == "__main__":
    _child_main()
