import pytest
import torch
from tests.device_tracking import tensors_stay_on_cpu
from tests.quant.tiny_unets import pixel_unet

from tfmq.devices import module_device, module_dtype, on_device, resolve_device, resolve_dtype
from tfmq.errors import TfmqError


def test_cpu_and_auto_resolve_to_the_cpu_on_a_machine_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_a_gpu_asked_for_on_a_machine_without_one_is_a_one_line_error(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TfmqError, match="no CUDA GPU") as error:
        resolve_device(spec)
    assert "\n" not in str(error.value)


def test_a_device_index_out_of_range_names_the_gpus_there_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(TfmqError, match="no GPU 2, this machine has 2"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "mps", ""])
def test_an_unknown_device_is_refused(spec):
    with pytest.raises(TfmqError, match="device must be"):
        resolve_device(spec)


def test_dtypes_by_name():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(None) is None
    with pytest.raises(TfmqError, match="dtype must be one of"):
        resolve_dtype("float64")


def test_a_module_says_where_it_is_and_in_which_dtype():
    unet = pixel_unet().to(torch.bfloat16)
    assert module_device(unet) == torch.device("cpu") and module_dtype(unet) is torch.bfloat16
    assert module_device(torch.nn.ReLU()) == torch.device("cpu") and module_dtype(torch.nn.ReLU()) is torch.float32
    moved = on_device({"sample": torch.zeros(1), "flag": True}, torch.device("meta"))
    assert moved["sample"].is_meta and moved["flag"] is True


def test_the_tracker_catches_a_tensor_made_without_a_device():
    kept = torch.ones(2)
    with tensors_stay_on_cpu() as offenders:
        kept + kept  # where the inputs are: fine
        torch.zeros(2, device=kept.device)  # named: fine
    assert offenders == {}
    with pytest.raises((RuntimeError, NotImplementedError)), tensors_stay_on_cpu():
        kept + torch.zeros(2)  # made on the default device, then mixed with the model's
    with tensors_stay_on_cpu() as offenders:
        torch.zeros(2)
    assert len(offenders) == 1
