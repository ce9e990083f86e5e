import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

import ldmflow.devices as devices
from ldmflow.devices import (
    CudaInfo,
    _warn_slow_bf16,
    check_cuda,
    claim_gpu,
    claim_gpus,
    get_device,
    gpu_lock_names,
    resolve_deterministic,
    resolve_precision,
    runs_on,
    set_deterministic,
    visible_device_names,
)
from ldmflow.errors import ConfigError, CudaSetupError, exit_code


def no_nvidia_smi():
    raise FileNotFoundError("nvidia-smi")


# what nvidia-smi --query-gpu=index,uuid reports on a 4-GPU machine
MACHINE = {"0": "GPU-aaaa", "1": "GPU-bbbb", "2": "GPU-cccc", "3": "GPU-dddd"}


def test_cpu_only_machine_is_a_no_op(tmp_path):
    with claim_gpu({}, tmp_path / "locks", device_count=0) as device:
        assert device is None
    assert not (tmp_path / "locks").exists()


def test_jobs_on_one_machine_get_different_gpus_and_wait_when_all_are_taken(tmp_path):
    with claim_gpu({}, tmp_path, device_count=2) as first, claim_gpu({}, tmp_path, device_count=2) as second:
        assert (first, second) == ("cuda:0", "cuda:1")
        with pytest.raises(TimeoutError, match="all 2 GPU"):
            with claim_gpu({}, tmp_path, device_count=2, poll_seconds=0.01, timeout=0.05):
                pass
    with claim_gpu({}, tmp_path, device_count=2) as again:
        assert again == "cuda:0"  # released when the first job's block ended


def test_locks_name_physical_gpus_from_cuda_visible_devices(tmp_path):
    assert visible_device_names({"CUDA_VISIBLE_DEVICES": "2,3"}, 2) == ["2", "3"]
    assert visible_device_names({}, 2) == ["0", "1"]
    with claim_gpu({"CUDA_VISIBLE_DEVICES": "3"}, tmp_path, device_count=1, uuid_query=no_nvidia_smi) as device:
        assert device == "cuda:0" and (tmp_path / "gpu-3.lock").exists()
        # a job that sees all GPUs skips GPU 3, which the first job holds
        with claim_gpu({}, tmp_path, device_count=4) as other:
            assert other == "cuda:0"
            with claim_gpu({}, tmp_path, device_count=4) as third:
                assert third == "cuda:1"
                with claim_gpu({}, tmp_path, device_count=4) as fourth:
                    assert fourth == "cuda:2"
                    with pytest.raises(TimeoutError):  # GPU 3 is held by the first job
                        with claim_gpu({}, tmp_path, device_count=4, poll_seconds=0.01, timeout=0.05):
                            pass


@pytest.mark.parametrize("variable", ["SLURM_JOB_ID", "LSB_JOBID", "PBS_JOBID"])
def test_a_scheduler_job_keeps_the_gpu_the_scheduler_gave_it(tmp_path, variable):
    env = {variable: "42", "CUDA_VISIBLE_DEVICES": "5"}
    with claim_gpu(env, tmp_path / "locks", device_count=1) as device:
        assert device == "cuda:0"
    assert not (tmp_path / "locks").exists()


def test_a_killed_job_releases_its_gpu(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ldmflow.devices import claim_gpu\n"
         f"with claim_gpu({{}}, {str(tmp_path)!r}, device_count=1):\n    print('held', flush=True)\n"
         "    time.sleep(60)"], stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TimeoutError):
        with claim_gpu({}, tmp_path, device_count=1, poll_seconds=0.01, timeout=0.05):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with claim_gpu({}, tmp_path, device_count=1, timeout=5) as device:
        assert device == "cuda:0"


def test_jobs_inside_one_allocation_of_several_gpus_get_different_gpus(tmp_path):
    """``snakemake --resources gpu=2`` inside ``salloc --gpus=2``: the two jobs do not share cuda:0."""
    env = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "2,3"}
    query = MACHINE.copy
    with claim_gpu(env, tmp_path, device_count=2, uuid_query=query) as first, \
            claim_gpu(env, tmp_path, device_count=2, uuid_query=query) as second:
        assert (first, second) == ("cuda:0", "cuda:1")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-GPU-cccc.lock", "gpu-GPU-dddd.lock"]
        with pytest.raises(TimeoutError):
            with claim_gpu(env, tmp_path, device_count=2, uuid_query=query, poll_seconds=0.01, timeout=0.05):
                pass


def test_a_gpu_named_by_uuid_in_one_job_and_by_index_in_another_is_one_gpu(tmp_path):
    assert gpu_lock_names({"CUDA_VISIBLE_DEVICES": "1,GPU-dddd"}, 2, MACHINE.copy) == ["GPU-bbbb", "GPU-dddd"]
    assert gpu_lock_names({"CUDA_VISIBLE_DEVICES": "1,2"}, 2, no_nvidia_smi) == ["1", "2"]  # no table: the ids
    with claim_gpu({"CUDA_VISIBLE_DEVICES": "1"}, tmp_path, device_count=1, uuid_query=MACHINE.copy):
        env = {"CUDA_VISIBLE_DEVICES": "GPU-bbbb,GPU-aaaa"}  # the same GPU 1, first in this job's list
        with claim_gpu(env, tmp_path, device_count=2, uuid_query=MACHINE.copy) as device:
            assert device == "cuda:1"


def test_a_ddp_job_claims_its_gpus_all_or_none_and_names_them_for_its_ranks(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    table = {"4": "GPU-a", "5": "GPU-b", "6": "GPU-c", "7": "GPU-d"}.copy
    with claim_gpu(env, tmp_path, device_count=4, uuid_query=table) as single:
        assert single == "cuda:0"
        with claim_gpus(env, 2, tmp_path, device_count=4, uuid_query=table) as ddp:
            assert ddp.indices == (1, 2) and ddp.visible_devices == "5,6"
            # a second DDP job that needs 2 finds 1 free: it waits holding nothing, so GPU 7 stays free
            with pytest.raises(TimeoutError, match="2 of all 4 GPU"):
                with claim_gpus(env, 2, tmp_path, device_count=4, uuid_query=table, poll_seconds=0.01, timeout=0.05):
                    pass
            with claim_gpu(env, tmp_path, device_count=4, uuid_query=table, timeout=0.05) as last:
                assert last == "cuda:3"
    with pytest.raises(ConfigError, match="asks for 8 GPUs but sees 4"):
        with claim_gpus(env, 8, tmp_path, device_count=4, uuid_query=table):
            pass


def protected_regular(monkeypatch):
    """Ubuntu's fs.protected_regular=1 on this process: O_CREAT on an existing file that another user owns, in a
    sticky world-writable folder, fails with EACCES (even for root)."""
    real_open = os.open

    def guarded_open(path, flags, mode=0o777, **kwargs):
        folder = os.stat(os.path.dirname(path))
        if flags & os.O_CREAT and os.path.exists(path) and os.stat(path).st_uid != os.geteuid() \
                and folder.st_mode & 0o1002 == 0o1002:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(devices.os, "open", guarded_open)


def test_a_lock_file_another_user_created_still_locks_under_protected_regular(tmp_path, monkeypatch):
    lock_dir = tmp_path / "locks"
    with claim_gpu({}, lock_dir, device_count=1, uuid_query=MACHINE.copy):
        pass
    lock = lock_dir / "gpu-GPU-aaaa.lock"
    os.chown(lock, 12345, 12345)  # the first job was another user's
    assert lock_dir.stat().st_mode & 0o7777 == 0o1777
    protected_regular(monkeypatch)
    with pytest.raises(PermissionError):  # what opening it for creation, as before, meets
        os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
    with claim_gpu({}, lock_dir, device_count=1, uuid_query=MACHINE.copy) as device:
        assert device == "cuda:0"
        with pytest.raises(TimeoutError):  # and it still excludes
            with claim_gpu({}, lock_dir, device_count=1, uuid_query=MACHINE.copy, poll_seconds=0.01, timeout=0.05):
                pass


def test_new_lock_files_are_writable_by_every_user_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        with claim_gpu({}, tmp_path, device_count=1, uuid_query=no_nvidia_smi):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "gpu-0.lock").stat().st_mode & 0o777 == 0o666


def test_a_lock_file_created_by_another_job_between_two_opens_is_opened(tmp_path, monkeypatch):
    real_open, path = os.open, tmp_path / "gpu-0.lock"
    calls = []

    def racing_open(p, flags, mode=0o777):
        calls.append(flags)
        if len(calls) == 1:  # the other job creates the file right after our first look
            os.close(real_open(path, os.O_WRONLY | os.O_CREAT))
            raise FileNotFoundError(p)
        return real_open(p, flags, mode)

    monkeypatch.setattr(devices.os, "open", racing_open)
    with claim_gpu({}, tmp_path, device_count=1, uuid_query=no_nvidia_smi) as device:
        assert device == "cuda:0"
    assert calls[1] & os.O_EXCL and not calls[2] & os.O_CREAT  # O_EXCL failed, so it opened the existing file


def test_a_ddp_training_job_runs_torchrun_on_the_gpus_it_claimed_with_its_share_of_threads(tmp_path, monkeypatch):
    import functools

    from ldmflow import launch

    calls = []
    monkeypatch.setattr(launch, "run_cli", lambda argv, nproc, env: calls.append((argv, nproc, env)))
    monkeypatch.setattr(launch, "claim_gpus", functools.partial(claim_gpus, lock_dir=tmp_path, device_count=4,
                                                                uuid_query=MACHINE.copy))
    env = {"LSB_JOBID": "7", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    with claim_gpu(env, tmp_path, device_count=4, uuid_query=MACHINE.copy):  # another job of the allocation
        launch.run_training("diffusion", gpus=2, environ=env, log_file=tmp_path / "log", threads=8,
                            config="c.yaml", latents="l.zarr", out_dir="out")
    (argv, nproc, child), = calls
    assert nproc == 2 and child["CUDA_VISIBLE_DEVICES"] == "1,2" and child["LSB_JOBID"] == "7"
    assert argv[argv.index("--threads") + 1] == "4" and child["OMP_NUM_THREADS"] == "4"
    assert launch.rank_threads(3, 4) == 1


def test_a_ddp_job_asking_for_more_gpus_than_it_sees_is_a_user_error(tmp_path, monkeypatch):
    import functools

    from ldmflow import launch

    monkeypatch.setattr(launch, "claim_gpus", functools.partial(claim_gpus, lock_dir=tmp_path, device_count=1,
                                                                uuid_query=MACHINE.copy))
    with pytest.raises(SystemExit) as exit_info:
        launch.run_training("diffusion", gpus=2, environ={"SLURM_JOB_ID": "1"}, log_file=tmp_path / "log",
                            threads=2, config="c.yaml", latents="l.zarr", out_dir="out")
    assert exit_info.value.code == 2
    assert "asks for 2 GPUs but sees 1" in (tmp_path / "log").read_text()


# --------------------------------------------------------------------------------------------------
# Start-up checks, precision and determinism by hardware (the GPU faked at the boundary: CudaInfo, capability)
# --------------------------------------------------------------------------------------------------

# torch 2.13's wheels by the support matrix: cu128 from Turing to Blackwell, cu126 back to Maxwell
CU128 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")
CU126 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")


def machine(devices=(), arch=CU128, cuda="12.8", driver=True, version="2.13.0+cu128") -> CudaInfo:
    return CudaInfo(version, cuda, arch if devices else (), tuple(devices), driver)


V100, T4, A100, H100 = ("Tesla V100-SXM2-32GB", (7, 0)), ("Tesla T4", (7, 5)), ("A100", (8, 0)), ("H100", (9, 0))


def test_a_v100_under_a_cu128_torch_is_one_line_naming_the_cu126_build():
    with pytest.raises(CudaSetupError) as err:
        check_cuda(1, machine([V100]))
    message = str(err.value)
    assert "\n" not in message and "V100" in message and "7.0" in message
    assert message.endswith("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126")
    assert exit_code(err.value) == 2


@pytest.mark.parametrize("gpu", [T4, A100, H100, ("B200", (10, 0)), ("RTX 5090", (12, 0)), ("L4", (8, 9))])
def test_turing_and_later_gpus_run_under_the_cu128_torch(gpu):
    check_cuda(1, machine([gpu]))


def test_a_cu126_torch_runs_a_v100_but_not_a_blackwell_gpu_and_names_cu128_for_it():
    check_cuda(1, machine([V100], CU126, "12.6", version="2.13.0+cu126"))
    with pytest.raises(CudaSetupError, match=r"cu128$"):
        check_cuda(1, machine([V100, ("B200", (10, 0))], CU126, "12.6", version="2.13.0+cu126"))


def test_ptx_in_the_build_runs_newer_gpus_and_arch_specific_kernels_run_only_their_own():
    assert runs_on(("sm_80", "compute_90"), (12, 0)) and not runs_on(("sm_80", "compute_90"), (7, 5))
    assert runs_on(("sm_80",), (8, 6)) and not runs_on(("sm_86",), (8, 0)) and not runs_on(("sm_80",), (9, 0))
    assert runs_on(("sm_90a",), (9, 0)) and not runs_on(("sm_90a",), (10, 0))
    assert runs_on((), (7, 0))  # a build that does not list its architectures is trusted


def test_a_gpu_job_with_cpu_only_torch_on_a_gpu_node_is_an_error_naming_a_cuda_build():
    with pytest.raises(CudaSetupError, match=r"CPU-only build; install a CUDA build: pip install torch==2\.13\.0 "
                       r"--index-url https://download\.pytorch\.org/whl/cu128 \(cu126 for Volta"):
        check_cuda(1, machine(cuda=None, version="2.13.0+cpu"))
    with pytest.raises(CudaSetupError, match="sees none; check CUDA_VISIBLE_DEVICES"):
        check_cuda(2, machine())  # a CUDA build that the driver does not serve
    check_cuda(0, machine(cuda=None, version="2.13.0+cpu"))  # a CPU rule on the same node is fine


def test_a_gpu_job_on_a_machine_without_an_nvidia_driver_runs_on_the_cpu_with_a_warning(caplog):
    check_cuda(1, machine(cuda=None, driver=False, version="2.13.0+cpu"))
    assert "no NVIDIA driver; running on the CPU" in caplog.text


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_training_entry_stops_with_exit_2_before_training_on_an_unsupported_gpu(tmp_path, monkeypatch, gpus):
    from ldmflow import launch

    monkeypatch.setattr(CudaInfo, "query", classmethod(lambda cls: machine([V100, V100])))
    monkeypatch.setattr(launch, "trainer", lambda stage: pytest.fail("training started"))
    monkeypatch.setattr(launch, "run_cli", lambda argv, nproc: pytest.fail("torchrun started"))
    with pytest.raises(SystemExit) as exit_:
        launch.run_training("diffusion", gpus=gpus, environ={}, log_file=tmp_path / "log", threads=1)
    assert exit_.value.code == 2
    assert "install a build for it: pip install torch==2.13.0" in (tmp_path / "log").read_text()


def test_a_stage_choosing_an_unsupported_cuda_device_stops_before_its_first_kernel(monkeypatch):
    monkeypatch.setattr(CudaInfo, "query", classmethod(lambda cls: machine([V100])))
    with pytest.raises(CudaSetupError, match="cu126"):
        get_device("cuda:0")
    assert get_device("cpu").type == "cpu"


@pytest.mark.parametrize(("capability", "auto"), [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_precision_auto_is_bf16_from_ampere_and_fp16_below_and_fp32_on_the_cpu(capability, auto):
    assert resolve_precision("auto", torch.device("cuda", 0), capability) == auto
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp32", torch.device("cuda", 0), capability) == "fp32"


def test_precision_reads_the_capability_of_the_device_it_runs_on(monkeypatch):
    monkeypatch.setattr("ldmflow.devices.device_capability", lambda device: (7, 0) if device.index == 1 else (8, 0))
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("auto", torch.device("cuda", 1)) == "fp16"


def test_explicit_bf16_on_a_pre_ampere_gpu_warns_once(caplog):
    _warn_slow_bf16.cache_clear()
    for _ in range(3):
        assert resolve_precision("bf16", torch.device("cuda", 0), (7, 0)) == "bf16"
    assert resolve_precision("bf16", torch.device("cuda", 0), (8, 0)) == "bf16"
    assert caplog.text.count("bf16 convolutions take a slow fallback") == 1


@pytest.mark.parametrize("value", [None, True, False])
def test_deterministic_defaults_to_on_for_the_cpu_and_off_on_cuda_with_cudnn_benchmark(value):
    cpu, cuda = resolve_deterministic(value, torch.device("cpu")), resolve_deterministic(value, torch.device("cuda"))
    assert (cpu, cuda) == ((True, False) if value is None else (value, value))
    try:
        set_deterministic(1, deterministic=cuda)
        assert torch.are_deterministic_algorithms_enabled() == cuda
        assert torch.backends.cudnn.benchmark == (not cuda)
    finally:
        set_deterministic(1)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark


def test_a_gpu_rule_other_than_training_stops_on_a_cpu_only_torch_instead_of_running_on_the_cpu(monkeypatch):
    monkeypatch.setattr(CudaInfo, "query", classmethod(lambda cls: machine(cuda=None, version="2.13.0+cpu")))
    with pytest.raises(CudaSetupError, match="CPU-only build"):
        with claim_gpu({}, requested_gpus=1):
            pytest.fail("the job started")
    with claim_gpu({}, requested_gpus=0) as device:  # a CPU rule on the same node
        assert device is None
