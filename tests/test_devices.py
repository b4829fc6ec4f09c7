"""The GPU paths, checked on the CPU: each device fault the code could meet on a GPU, made to happen here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from vs2ray import devices
from vs2ray.devices import GpuUnavailable, precision_scope, worker_device


class DeviceTensor(torch.Tensor):
    """A tensor that behaves as a CUDA tensor does where it matters here: no `.numpy()` before `.cpu()`."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(devices.FAKE_GPUS_ENV, raising=False)


def test_a_process_uses_the_gpus_ray_gave_it_and_only_those(monkeypatch, no_cuda):
    assert worker_device("auto", []) == torch.device("cpu")  # given none: the CPU, whatever the node has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert worker_device("auto", []) == torch.device("cpu")  # ... even where torch sees a GPU (Ray 2.60)
    assert worker_device("auto", ["3"]) == torch.device("cuda", 0)  # Ray limits CUDA_VISIBLE_DEVICES to it
    assert worker_device("cpu", ["3"]) == torch.device("cpu")  # model.device: cpu is obeyed inside workers
    assert worker_device("auto", None) == torch.device("cuda")  # outside Ray: what torch sees
    with pytest.raises(GpuUnavailable, match="gave this trial no GPU"):
        worker_device("cuda", [], "this trial")


def test_a_gpu_that_torch_cannot_see_stops_the_stage_naming_build_and_driver(monkeypatch, no_cuda):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(devices, "nvidia_driver_version", lambda: "570.133.20")
    with pytest.raises(GpuUnavailable) as caught:
        worker_device("auto", ["0"], "this encoder actor")
    message = str(caught.value)
    assert "gave this encoder actor GPU ['0']" in message and "built for CUDA 13.0" in message
    assert "driver is 570.133.20" in message and "needs driver >= 580" in message
    assert devices.FAKE_GPUS_ENV in message
    with pytest.raises(GpuUnavailable, match="torch sees no CUDA device"):
        worker_device("cuda", None)
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "1")  # fake GPU resources, said explicitly: the CPU, recorded
    assert worker_device("auto", ["0"]) == torch.device("cpu")
    assert devices.environment("cpu")["fake_gpus"] is True


def test_neighbours_of_device_resident_splits_reach_faiss_through_the_host(no_cuda):
    from test_evaluate import CLASSES, EMBED, WIDTH, make_split

    from vs2ray.evaluate import Evaluator
    from vs2ray.retrieval import IndexShard
    from vs2ray.sae import SAETrainParams, train_sae

    head = {"ln_post.weight": torch.ones(WIDTH), "ln_post.bias": torch.zeros(WIDTH), "proj": torch.randn(WIDTH, EMBED)}
    pool, val, test = (
        make_split(name, n, seed, head) for name, n, seed in (("pool", 300, 1), ("val", 50, 2), ("test", 40, 3))
    )
    classifier = torch.nn.functional.normalize(torch.randn(CLASSES, EMBED), dim=1)
    sae = train_sae(pool.cls, SAETrainParams(k=2, expansion=2, steps=5, batch_size=64), device="cpu").sae
    index = IndexShard(pool.embedding.numpy(), np.arange(len(pool.labels)))
    evaluator = Evaluator(sae, head, classifier, pool, val, test, search=index.search)
    test.embedding = test.embedding.as_subclass(DeviceTensor)
    with pytest.raises(TypeError, match="cpu"):
        test.embedding.numpy()  # the fault itself
    similarities, rows = evaluator.neighbours(test, 5)
    expected = index.search(test.embedding.cpu().numpy(), 5)[1]
    np.testing.assert_array_equal(rows.numpy(), expected)
    assert rows.device == test.cls.device and similarities.shape == (40, 5)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32"])
def test_lower_precision_is_autocast_over_fp32_weights_and_does_not_crash(precision):
    from vs2ray.config import ModelConfig
    from vs2ray.models import block_runner, encode_images, load_clip

    reference = load_clip(ModelConfig(), device="cpu")
    lowered = load_clip(ModelConfig(precision=precision), device="cpu")
    assert {p.dtype for p in lowered.model.parameters()} == {torch.float32}  # weights and LayerNorm stay fp32
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fp32, low = encode_images(reference, images), encode_images(lowered, images)
    assert low.dtype == torch.float32 and low.shape == fp32.shape
    cosine = (fp32 * low).sum(dim=1)
    assert cosine.min() > 0.99, cosine  # the same embedding, within the lower precision's rounding
    if precision == "tf32":  # no TensorFloat-32 on the CPU: bit for bit
        torch.testing.assert_close(low, fp32, atol=0, rtol=0)
    tokens = torch.randn(4, 5, lowered.model.visual.transformer.width)
    out = block_runner(lowered)(tokens, 1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, block_runner(reference)(tokens, 1), atol=0.1, rtol=0.05)


def test_precision_scope_restores_tf32_flags_and_rejects_unknown_values():
    before = torch.backends.cuda.matmul.allow_tf32
    with precision_scope("cpu", "tf32"):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(ValueError, match="precision must be one of"), precision_scope("cpu", "fp8"):
        pass


def test_sae_training_syncs_with_the_host_only_to_log_and_trains_in_bf16(monkeypatch):
    from vs2ray.sae import SAETrainParams, evaluate_sae, train_sae

    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    calls = {"item": 0}
    real_item = torch.Tensor.item

    def counting_item(self):  # reads in vs2ray.sae itself (torch's CPU Adam reads its step count; fused CUDA Adam not)
        calls["item"] += sys._getframe(1).f_globals.get("__name__") == "vs2ray.sae"
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    counts = []
    for steps in (20, 60):
        calls["item"] = 0
        train_sae(x, SAETrainParams(k=4, expansion=2, steps=steps, batch_size=256, warmup_steps=2), device="cpu")
        counts.append(calls["item"])
    assert counts[0] == counts[1]  # none per step: a GPU step never waits for the host
    monkeypatch.setattr(torch.Tensor, "item", real_item)
    params = SAETrainParams(k=4, expansion=2, steps=200, batch_size=256, warmup_steps=10)
    fp32 = train_sae(x, params, device="cpu")
    bf16 = train_sae(x, SAETrainParams(**{**params.as_dict(), "precision": "bf16"}), device="cpu")
    assert bf16.sae.W_enc.dtype == torch.float32  # fp32 master weights
    assert abs(evaluate_sae(bf16.sae, x)["fvu"] - evaluate_sae(fp32.sae, x)["fvu"]) < 0.05
    # held-out figures come from the training device, in the same metrics
    held_out = train_sae(x[:1500], params, device="cpu", val_acts=x[1500:])
    assert held_out.metrics["val_fvu"] == pytest.approx(evaluate_sae(held_out.sae, x[1500:])["fvu"], rel=1e-6)


def test_sae_precision_is_part_of_the_cache_key_and_fp32_keeps_the_old_one():
    from vs2ray.sae import SAETrainParams
    from vs2ray.store import sae_dir_for

    fp32, bf16 = SAETrainParams(), SAETrainParams(precision="bf16")
    before_fields = (  # a top-k SAE's key before sae.precision (and sae.kind) existed
        "k", "expansion", "topk", "lr", "lr_scale_with_width", "warmup_steps", "steps", "epochs", "batch_size",
        "dead_threshold", "auxk_coef", "auxk_k", "w_aux", "pass_momentum", "init", "encoder_bias", "seed",
    )  # fmt: skip
    before = {name: fp32.as_dict()[name] for name in before_fields}
    assert sae_dir_for("/r", "acts", fp32.key_dict()) == sae_dir_for("/r", "acts", before)
    assert sae_dir_for("/r", "acts", bf16.key_dict()) != sae_dir_for("/r", "acts", fp32.key_dict())


def test_sae_training_on_cuda_turns_deterministic_kernels_on_and_back_off(monkeypatch):
    from vs2ray.sae import _deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with _deterministic_kernels(torch.device("cuda", 0)):  # embedding_bag / index_add_ backward without atomics
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    with _deterministic_kernels(torch.device("cpu")):  # the CPU kernels are deterministic already
        assert not torch.are_deterministic_algorithms_enabled()


def test_a_fractional_gpu_share_caps_the_process_memory(monkeypatch):
    capped = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share, device: capped.append(share))
    devices.limit_gpu_memory(torch.device("cuda", 0), 0.25)
    devices.limit_gpu_memory(torch.device("cuda", 0), 1.0)  # a whole GPU: no cap
    devices.limit_gpu_memory(torch.device("cpu"), 0.25)
    assert capped == [0.25]


class FakeGpuFaiss:
    """The attributes of a FAISS GPU build that IndexShard reads, around the real (CPU) faiss module."""

    def __init__(self, real, kernels: bool = True) -> None:
        self.real, self.kernels, self.moved = real, kernels, 0
        self.StandardGpuResources = object

    def __getattr__(self, name):
        return getattr(self.real, name)

    def get_num_gpus(self) -> int:
        return 1

    def index_cpu_to_gpu(self, resources, device, index):
        self.moved += 1
        if not self.kernels:
            return _NoKernelIndex(index)
        return index


class _NoKernelIndex:
    """A GPU index of a build without kernels for the card: its first kernel launch fails."""

    def __init__(self, index) -> None:
        self.index = index

    def add(self, vectors):
        raise RuntimeError("Faiss assertion failed\ndetails: CUDA error 209 no kernel image is available")


def test_faiss_shards_build_on_the_gpu_only_when_given_one_and_a_build_that_runs_there(monkeypatch):
    import faiss

    from vs2ray import retrieval
    from vs2ray.retrieval import FaissGpuUnavailable, IndexShard

    monkeypatch.delenv(devices.FAKE_GPUS_ENV, raising=False)
    vectors, ids = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32), np.arange(50)
    gpu_build = FakeGpuFaiss(faiss)
    monkeypatch.setitem(sys.modules, "faiss", gpu_build)
    assert not IndexShard(vectors, ids, gpu_ids=[]).on_gpu  # given no GPU: a CPU index on a GPU node
    assert gpu_build.moved == 0
    assert IndexShard(vectors, ids, gpu_ids=["0"]).on_gpu and gpu_build.moved == 1
    no_kernels = FakeGpuFaiss(faiss, kernels=False)
    monkeypatch.setitem(sys.modules, "faiss", no_kernels)
    with pytest.raises(FaissGpuUnavailable, match="no kernels for the card"):
        IndexShard(vectors, ids, gpu_ids=["0"])
    monkeypatch.setitem(sys.modules, "faiss", faiss)  # faiss-cpu on a GPU node: said, not silent
    with pytest.raises(FaissGpuUnavailable, match="CPU build"):
        IndexShard(vectors, ids, gpu_ids=["0"])
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "1")
    assert not IndexShard(vectors, ids, gpu_ids=["0"]).on_gpu
    assert retrieval._shard_gpu_ids() is None  # this test process is no Ray worker


def test_the_encoder_pool_follows_the_config_not_a_cold_cluster():
    from vs2ray.config import load_config
    from vs2ray.extract import EncoderPool, encoder_pool

    def pool(gpus_now, gpus_max, *assignments):
        return encoder_pool(load_config(None, list(assignments)), gpus_now, gpus_max)

    assert pool(0, None) == EncoderPool(1, 1, 0.0)  # a laptop: one CPU actor
    assert pool(0, 8) == EncoderPool(1, 8, 1.0)  # a cold autoscaling cluster that declares 8 GPUs
    assert pool(0, None, "model.device=cuda", "extraction.max_workers=4") == EncoderPool(1, 4, 1.0)
    assert pool(2, None, "extraction.gpus_per_worker=0.5") == EncoderPool(1, 4, 0.5)
    assert pool(4, None, "extraction.num_workers=3") == EncoderPool(3, 3, 1.0)
    assert pool(4, 8, "model.device=cpu") == EncoderPool(1, 1, 0.0)
    with pytest.raises(ValueError, match="gpus_per_worker > 0"):
        pool(0, None, "model.device=cuda", "extraction.gpus_per_worker=0")


def test_cifar100_is_downloaded_once_by_concurrent_readers(tmp_path, monkeypatch):
    import torchvision.datasets

    from vs2ray.config import DatasetConfig
    from vs2ray.data import get_dataset

    downloads = []

    class FakeCifar:  # what torchvision's CIFAR100 does to the folder, slowly
        def __init__(self, root, train=True, download=False):
            folder = tmp_path / "cifar-100-python"
            if download:
                downloads.append(threading.get_ident())
                time.sleep(0.3)
                folder.mkdir(exist_ok=True)
                for name in ("train", "test", "meta"):
                    (folder / name).write_bytes(b"x")
            elif not (folder / ("train" if train else "test")).is_file():
                raise RuntimeError("Dataset not found or corrupted")
            self.data, self.targets, self.classes = np.zeros((1, 2, 2, 3), np.uint8), [0], ["apple"]

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCifar)
    readers = [get_dataset(DatasetConfig(name="cifar100", root=str(tmp_path), download=True)) for _ in range(3)]
    threads = [threading.Thread(target=reader.records, args=("train",)) for reader in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(downloads) == 1 and all(reader._arrays for reader in readers)


HEAP_SCRIPT = """
import json
import numpy as np
from vs2ray.devices import bound_heap_growth, trim_heap

def private_kb():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0])

bound_heap_growth()  # as a store reader sets it
blocks = [np.ones(2048, dtype=np.uint8) for _ in range(50_000)]  # 100 MB of heap blocks under the mmap threshold
survivor = np.ones(2048, dtype=np.uint8)  # above them: the heap's top cannot shrink past it
del blocks
freed = private_kb()
released = trim_heap()
print(json.dumps({"freed_kb": freed, "trimmed_kb": private_kb(), "released": released}))
"""


def test_trimming_the_heap_hands_back_the_free_pages_that_freeing_alone_keeps():
    out = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], capture_output=True, text=True, check=True).stdout
    memory = json.loads(out.strip().splitlines()[-1])
    assert memory["released"]
    assert memory["freed_kb"] - memory["trimmed_kb"] > 60 * 1024  # most of the 100 MB freed comes back
