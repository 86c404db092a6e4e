"""The servers ``tandem bench compare`` measures, each started for its turn and stopped after it:
Tandem's three setups and, when their programs are given, llama.cpp's server and vLLM's.

::

    engine    tandem serve --backend engine                    one in-process engine
    never     tandem serve --disaggregation never              Ray pools, prefilled where decoded
    always    tandem serve --disaggregation always             Ray pools, prefill -> decode handoff
    llama.cpp llama-server -m FILE.gguf -t 2 -np N             its own server, N parallel slots
    vllm      vllm serve DIR --dtype float32                   its CPU build

Every server listens on a free loopback port, in its own process group (stopped with the whole
group), its log in the run's temporary directory; a server is ready when its OpenAI API lists its
model. The peers' model files: ``f32_gguf`` writes an F32 GGUF of a GGUF's weights (the weights
Tandem computes with), ``hf_checkpoint`` a Hugging Face directory of them (what vLLM loads).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

TANDEM_SETUPS = {
    "engine": ["--backend", "engine"],
    "never": ["--backend", "pools", "--disaggregation", "never"],
    "always": ["--backend", "pools", "--disaggregation", "always"],
}


def set_autogroup_nice(pid: int, nice: int) -> bool:
    """Set the autogroup nice of ``pid``'s session (Linux; needs the right to); False if refused."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class Server:
    """One server to measure: how to start it, where its OpenAI API answers."""

    name: str
    cmd: list[str]
    port: int
    model: str  # the model name its OpenAI API expects
    tandem: bool = False
    env: dict[str, str] = field(default_factory=dict)
    startup_s: float = 600.0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, autogroup_nice: int | None = None) -> None:
        """Start it and wait until its API answers. ``autogroup_nice``: the scheduler weight of its
        session (it runs in its own: a per-process nice does not protect a run from load started
        elsewhere on these machines, the session's autogroup does; MEASURED.md)."""
        self.log = log_dir / f"{self.name}.log"
        out = open(self.log, "wb")  # noqa: SIM115  (the child keeps writing to it)
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        if autogroup_nice is not None:
            set_autogroup_nice(self.proc.pid, autogroup_nice)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r:
                    if r.status == 200 and json.loads(r.read()).get("data"):
                        return
            except OSError:
                pass
            time.sleep(1.0)
        tail = self.log.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"{self.name} did not start; its log ends:\n{tail}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tandem_server(setup: str, model: str, extra: list[str] | None = None, home: Path | None = None) -> Server:
    """``tandem serve`` in one of TANDEM_SETUPS on ``model`` (gRPC on a free port as well).
    ``home``: its ``TANDEM_HOME`` — a fresh one keeps the KV tiers' disk files of earlier runs (the
    same prompts, by the same seed) from serving its prompts from cache; models still come from the
    usual downloads directory."""
    from engine.smollm2 import downloads_dir

    port = free_port()
    cmd = [sys.executable, "-m", "deploy.serve", "--model", model, "--port", "0", "--http-port", str(port)]
    cmd += TANDEM_SETUPS[setup] + (extra or [])
    env = {"TANDEM_HOME": str(home), "TANDEM_DOWNLOADS": str(downloads_dir())} if home is not None else {}
    return Server(setup, cmd, port, model="", tandem=True, env=env)


def llama_server(
    binary: str, gguf: Path, parallel: int, threads: int = 2, ctx_per_slot: int = 1024
) -> Server:
    port = free_port()
    ctx = str(parallel * ctx_per_slot)
    cmd = [binary, "-m", str(gguf), "-t", str(threads), "-np", str(parallel), "-c", ctx,
           "--host", "127.0.0.1", "--port", str(port), "--no-webui",
           # a streamed request holds an HTTP thread to its end (default: one per CPU): without
           # enough of them, connections beyond the listen backlog are reset
           "--threads-http", str(parallel + 4)]  # fmt: skip
    return Server(f"llama.cpp ({gguf.name})", cmd, port, model=gguf.name)


def vllm_server(binary: str, model_dir: Path, max_seqs: int) -> Server:
    port = free_port()
    cmd = [binary, "serve", str(model_dir), "--served-model-name", "smollm2", "--dtype", "float32",
           "--max-num-seqs", str(max_seqs), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_TARGET_DEVICE": "cpu"}
    return Server("vllm (fp32)", cmd, port, model="smollm2", env=env, startup_s=900.0)


def served_model(server: Server) -> str:
    """The model name the server's OpenAI API lists first (Tandem's and vLLM's serving names)."""
    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as r:
        return str(json.loads(r.read())["data"][0]["id"])


# -- the peers' model files ------------------------------------------------------------------------
def f32_gguf(src: Path, dst: Path) -> Path:
    """An F32 GGUF of ``src``'s weights: every tensor dequantized (``gguf.quants.dequantize``, as
    Tandem loads it), the metadata copied. Written once; kept while ``dst`` exists."""
    if dst.exists():
        return dst
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(str(dst) + ".tmp", arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_uint32(name, 0)  # all F32
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_array(name, f.contents())
        else:
            writer.add_key_value(name, f.contents(), vtype)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(dst) + ".tmp", dst)
    return dst


def hf_checkpoint(gguf: Path, dst: Path) -> Path:
    """A Hugging Face checkpoint of a GGUF's weights in fp32 (transformers' GGUF loading), with its
    tokenizer: what vLLM serves. Written once; kept while ``dst`` exists."""
    if (dst / "config.json").exists():
        return dst
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    AutoTokenizer.from_pretrained(gguf.parent, **kw).save_pretrained(dst)
    AutoModelForCausalLM.from_pretrained(gguf.parent, dtype="float32", **kw).save_pretrained(dst)
    return dst
