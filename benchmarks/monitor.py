"""What the machine is busy with while a benchmark runs: GPU and CPU utilization sampled on a clock."""

import subprocess
import threading
import time

import psutil


class UtilizationSampler:
    """GPU utilization (`nvidia-smi`, every `interval_s`; none without an NVIDIA driver) and the share of all
    CPU cores in use, as (seconds since start, value) series, while the context is open."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.gpu: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, float]] = []

    def __enter__(self) -> "UtilizationSampler":
        self.started = time.perf_counter()
        self._stop = threading.Event()
        try:
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", str(int(self.interval_s * 1000))], stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            self._smi = None
        self._threads = [threading.Thread(target=self._sample_cpu, daemon=True)]
        if self._smi:
            self._threads.append(threading.Thread(target=self._read_gpu, daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._smi:
            self._smi.terminate()
        for thread in self._threads:
            thread.join(timeout=5)

    def _now(self) -> float:
        return time.perf_counter() - self.started

    def _read_gpu(self) -> None:
        for line in self._smi.stdout:
            first = line.split(",")[0].strip()  # one line per GPU; the first is the one benchmarks use
            if first.isdigit():
                self.gpu.append((self._now(), int(first) / 100))

    def _sample_cpu(self) -> None:
        psutil.cpu_percent()
        while not self._stop.wait(self.interval_s):
            self.cpu.append((self._now(), psutil.cpu_percent() / 100))

    @staticmethod
    def mean(series: list[tuple[float, float]], start: float = 0.0, stop: float = float("inf")) -> float | None:
        values = [v for t, v in series if start <= t <= stop]
        return sum(values) / len(values) if values else None

    def summary(self) -> dict:
        return {"gpu_busy": self.mean(self.gpu), "cpu_busy": self.mean(self.cpu), "interval_s": self.interval_s}
