"""A benchmark's other side in its own persistent process: one JSON line per command over pipes.

    peer = PeerProcess("PyTorch", [sys.executable, "scripts/torch_train_worker.py", ...], omp_wait="passive")
    info = peer.wait_ready()            # the child's first line (it builds and warms up meanwhile)
    answer = peer.ask({"steps": 4})     # one line out, one line back
    peer.close()

Used by scripts/benchmark.py --vs-torch, --what=decode --vs-hf and scripts/bench_rl.py, so each framework
runs in a process of its own (a PyTorch under bf16 autocast ran 1.4-2.4x slower inside a process that
also ran XLA) and the two take turns. The child's stderr goes to a log file whose tail is quoted when it
dies. `omp_wait` sets OMP_WAIT_POLICY for the child ('' leaves the library default).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile


class PeerProcess:
    def __init__(self, name: str, cmd: list[str], *, omp_wait: str = "", env: dict | None = None,
                 cwd: str | None = None, log_path: str | None = None):
        env = dict(os.environ if env is None else env)
        env.pop("OMP_WAIT_POLICY", None)
        if omp_wait:
            env["OMP_WAIT_POLICY"] = omp_wait.upper()
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"peer_{name.lower()}_", suffix=".log")
            os.close(fd)
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1, env=env, cwd=cwd)
        self.info = None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.log.flush()
            with open(self.log_path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"the {self.name} process exited (code {code}) without answering; its log "
                               f"({self.log_path}) ends:\n{tail}")
        return json.loads(line)

    def wait_ready(self) -> dict:
        if self.info is None:
            self.info = self._read()
        return self.info

    def ask(self, payload: dict) -> dict:
        self.wait_ready()
        self.proc.stdin.write(json.dumps(payload) + "\n")
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            self.proc.kill()
            self.proc.wait()
        self.log.close()
