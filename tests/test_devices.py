import os
import signal
import subprocess
import sys

import pytest

from ldmflow.devices import claim_gpu, visible_device_names


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
    with claim_gpu({"CUDA_VISIBLE_DEVICES": "3"}, tmp_path, device_count=1) as device:
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
