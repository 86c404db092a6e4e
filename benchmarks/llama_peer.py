"""llama.cpp's ``llama-server`` as a peer in ``tandem bench quant``: started on a free loopback port
with the same GGUF file and thread count, fed the same token ids, its own decode timings read back.

Build it outside the repository (MEASURED.md has the recipe; on a CPU that advertises AMX inside a VM
that does not enable it, add ``-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`` to the C/C++ flags, or
the server dies at its first matmul). Nothing here is imported by the library.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class PeerRun:
    decode_tok_s: float  # the streams' own decode rates (the server's predicted_per_second), summed
    output_tok_s: float  # output tokens over the wall time of the whole batch, prompts included


class LlamaServer:
    """Lifecycle: ``start`` (waits for /health) -> ``complete`` ... -> ``close`` (idempotent)."""

    def __init__(self, binary: str | Path, model: Path, threads: int, slots: int, ctx_per_slot: int) -> None:
        self.binary, self.model = Path(binary), model
        self.threads, self.slots, self.ctx = threads, slots, slots * ctx_per_slot
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        fd, log = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        os.close(fd)
        self.log = Path(log)

    def start(self, timeout_s: float = 120.0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [str(self.binary), "-m", str(self.model), "-t", str(self.threads), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "-np", str(self.slots), "-c", str(self.ctx), "-ngl", "0"]
        with self.log.open("wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"llama-server not healthy after {timeout_s:.0f} s: {self.tail()}")

    def tail(self, lines: int = 8) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def complete(self, prompt: list[int], max_tokens: int) -> dict:
        body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "ignore_eos": True}
        body["cache_prompt"] = False
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/completion",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def run(self, prompts: list[list[int]], max_tokens: int) -> PeerRun:
        """All prompts at once (one per slot); one-stream figures from the first response."""
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(pool.map(lambda p: self.complete(p, max_tokens), prompts))
        wall = time.perf_counter() - t0
        produced = sum(int(o["timings"]["predicted_n"]) for o in outs)
        decode = sum(float(o["timings"]["predicted_per_second"]) for o in outs)  # the streams run together
        return PeerRun(decode, produced / wall)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.unlink(missing_ok=True)
