"""Thread counts follow the cores a process may really use: affinity masks, cgroup quotas, other busy
processes, the work. Run in subprocesses pinned with os.sched_setaffinity; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env

from llmctl.threads import MIN_WORK_PER_THREAD, busy_elsewhere, cgroup_cpu_limit

needs_two_cores = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs an affinity API and at least two cores",
)


def _env(omp: str | None = None) -> dict[str, str]:
    env = cli_env()
    env.pop("OMP_NUM_THREADS")
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    return env


def _pinned(cores: set[int]):
    return lambda: os.sched_setaffinity(0, cores)


def _choose(cores: set[int], call: str, omp: str | None = None) -> int:
    code = f"from llmctl.threads import choose_threads; print({call})"
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=_pinned(cores),
        capture_output=True,
        text=True,
        env=_env(omp),
        check=True,
    )
    return int(out.stdout)


@needs_two_cores
def test_choice_never_exceeds_the_affinity_mask():
    assert _choose({0}, "choose_threads()") == 1
    assert _choose({0}, "choose_threads(8)") == 1  # an explicit count is capped too
    assert _choose({0}, "choose_threads()", omp="8") == 1  # and so is OMP_NUM_THREADS
    assert _choose({0, 1}, "choose_threads(2)") == 2
    assert _choose({0, 1}, "choose_threads(8)") == 2
    assert _choose({0, 1}, "choose_threads()", omp="8") == 2
    assert _choose({0, 1}, "choose_threads(8, processes=2)") == 1  # one core per process
    assert _choose({0, 1}, "choose_threads()", omp="1") == 1
    assert _choose({0, 1}, f"choose_threads(work={MIN_WORK_PER_THREAD})", omp="2") == 1  # small work
    assert _choose({0, 1}, f"choose_threads(work={2 * MIN_WORK_PER_THREAD})", omp="2") == 2


@needs_two_cores
def test_a_busy_process_on_the_cores_is_left_out():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=_pinned({1}))
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{busy.pid}/stat").read_text().split()[2] != "R" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _choose({0, 1}, "choose_threads()") == 1
        assert _choose({0, 1}, "choose_threads(2)") == 2  # an explicit count is the user's call
    finally:
        busy.kill()
        busy.wait()


def test_busy_elsewhere_reads_the_run_queue(tmp_path):
    stat = tmp_path / "stat"
    cores = os.cpu_count() or 1
    stat.write_text("cpu  1 2 3\nprocs_running 1\nprocs_blocked 0\n")  # only this process runs
    assert busy_elsewhere(cores, stat) == 0
    stat.write_text("procs_running 3\n")
    assert busy_elsewhere(cores, stat) == min(cores, 2)
    stat.write_text("no run queue here\n")
    assert busy_elsewhere(cores, stat) == 0


@needs_two_cores
def test_every_command_caps_the_thread_budget_before_torch_starts():
    """The CLI sets OMP_NUM_THREADS (torch's and every child's) first thing, at most the cores."""
    probe = (
        "import os, sys\nfrom llmctl.cli import app\nsys.argv = ['llmctl', '--version']\n"
        "try:\n    app.main()\nexcept SystemExit:\n    pass\nprint(os.environ['OMP_NUM_THREADS'])"
    )
    for cores, expected in (({0}, "1"), ({0, 1}, "2")):
        out = subprocess.run(
            [sys.executable, "-c", probe],
            preexec_fn=_pinned(cores),
            capture_output=True,
            text=True,
            env=_env(omp="64"),  # more than the cores: capped
            check=True,
        )
        assert out.stdout.split()[-1] == expected, out.stdout


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    import torch

    from llmctl.data.synthetic import iter_documents
    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.model.checkpoint import save_model_folder
    from llmctl.model.config import preset
    from llmctl.model.transformer import Transformer

    folder = tmp_path_factory.mktemp("model")
    tok = train_tokenizer((d["text"] for d in iter_documents(100, seed=1)), vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(preset("test-1m", vocab_size=tok.vocab_size))
    save_model_folder(model, folder, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(folder, model_max_length=model.config.max_seq_len)
    return folder


def _run_pinned(cores: set[int], args: list[str], cwd: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "llmctl", *args, "--json"],
        preexec_fn=_pinned(cores),
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@needs_two_cores
@pytest.mark.parametrize(("cores", "threads"), [({0}, "4"), ({0, 1}, "2")])
def test_generate_threads_option_is_capped_at_the_cores(model_folder, tmp_path, cores, threads):
    args = ["generate", "Hi", "--ckpt", str(model_folder), "-n", "2", "--threads", threads]
    assert _run_pinned(cores, args, tmp_path)["threads"] == min(int(threads), len(cores))


@needs_two_cores
def test_eval_threads_option_is_capped_at_the_cores(model_folder, tmp_path):
    args = ["eval", "world_mc", "--ckpt", str(model_folder), "--limit", "2", "--threads", "4"]
    assert _run_pinned({0}, args, tmp_path)["settings"]["threads"] == 1


def _cgroup_tree(root: Path, proc: str, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "proc_cgroup").write_text(proc)
    return root / "proc_cgroup"


def test_cgroup_v2_quota_is_the_tightest_limit_above_the_process(tmp_path):
    proc = _cgroup_tree(
        tmp_path,
        "0::/jobs/job1\n",
        {
            "cgroup.controllers": "cpu memory\n",
            "cpu.max": "max 100000\n",
            "jobs/cpu.max": "150000 100000\n",  # 1.5 CPUs for every job
            "jobs/job1/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpu_limit(tmp_path, proc) == 1.5
    (tmp_path / "jobs" / "job1" / "cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_limit(tmp_path, proc) == 0.5


def test_cgroup_v2_in_a_container_and_unlimited(tmp_path):
    proc = _cgroup_tree(tmp_path, "0::/\n", {"cgroup.controllers": "cpu\n", "cpu.max": "200000 100000\n"})
    assert cgroup_cpu_limit(tmp_path, proc) == 2.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path, proc) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    proc = _cgroup_tree(
        tmp_path,
        "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_limit(tmp_path, proc) == 3.0
    (tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path, proc) is None
